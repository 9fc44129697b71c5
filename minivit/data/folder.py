"""Image folders in the ImageFolder layout, read with Pillow.

    DIR/train/<class>/**/*.png|jpg|...      DIR/val/<class>/**/...
or  DIR/<class>/**/...                      split by a seeded fraction (val_fraction)

Classes are the first-level folder names, sorted; every image below a class folder (nested
folders included, symlinks followed once: a loop is cut where it comes back) belongs to it.
Files without an image suffix are ignored. Each image file is decoded once when the folder is
scanned, so an unreadable, truncated or empty one is listed and skipped (or, with
strict=True, refused) before training starts instead of failing in the middle of an epoch.

Decoding: any mode Pillow reads (grey, RGBA, palette, CMYK, 16-bit) is converted to "L" for
1-channel models and "RGB" for 3-channel ones; the EXIF orientation is applied first.
"""

import os
from pathlib import Path

import numpy as np

from minivit.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                  ".pgm", ".pbm")
SPLIT_FOLDERS = {"train": ("train",), "test": ("val", "test")}  # first existing one is used
PILLOW_HINT = "pip install 'minivit[images]' (or Pillow)"


def pillow():
    """PIL.Image, or a DatasetError saying how to install it."""
    try:
        from PIL import Image
    except ImportError:
        raise DatasetError(f"reading image folders needs Pillow: {PILLOW_HINT}") from None
    return Image


def open_image(path, channels):
    """A decoded Pillow image in mode "L" (channels 1) or "RGB" (3), EXIF orientation applied.
    OSError/ValueError (Pillow's errors for unreadable data) propagate."""
    Image = pillow()
    from PIL import ImageOps

    with Image.open(path) as image:
        image.load()  # a truncated file fails here, not later
        image = ImageOps.exif_transpose(image)
        mode = image.mode
        if mode in ("I;16", "I;16B", "I;16L", "I") and channels == 1:
            # Pillow's "L" clips 16-bit values at 255: scale them to 8 bits first
            wide = np.asarray(image, dtype=np.float64) / 65535.0 * 255.0
            return Image.fromarray(np.clip(np.round(wide), 0, 255).astype(np.uint8), "L")
        if mode == "P" or mode == "PA":  # palette (with transparency): through RGBA
            image = image.convert("RGBA")
        if mode.startswith("I") or mode == "F":
            image = image.point(lambda v: v / 257).convert("L")
        return image.convert("L" if channels == 1 else "RGB")


def _walk_images(folder):
    """Files with an image suffix below `folder`, sorted, following symlinks but entering each
    real folder once (a symlink loop ends where it comes back)."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.stat(top)
        if (real.st_dev, real.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((real.st_dev, real.st_ino))
        dirs.sort()
        found += [Path(top) / name for name in sorted(files)
                  if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return found


def list_classes(split_dir):
    """(class_names, paths, labels) of one split folder; DatasetError for no class or an
    empty one."""
    split_dir = Path(split_dir)
    classes = sorted(entry.name for entry in split_dir.iterdir()
                     if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DatasetError(f"{split_dir} holds no class folders: expected one folder per class "
                           f"(e.g. {split_dir}/cat/*.jpg, {split_dir}/dog/*.jpg)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _walk_images(split_dir / name)
        if not files:
            raise DatasetError(f"class folder {split_dir / name} holds no image files "
                               f"({', '.join(IMAGE_SUFFIXES)}): add images or remove it")
        paths += files
        labels += [label] * len(files)
    return classes, paths, np.asarray(labels, np.int64)


def _check_file(path):
    """None if Pillow decodes `path` fully, else the reason it cannot."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        open_image(path, 3)
    except (OSError, ValueError, SyntaxError) as error:  # SyntaxError: Pillow's broken headers
        return str(error) or type(error).__name__
    except Exception as error:  # a decoder bug on hostile data must not stop the scan
        return f"{type(error).__name__}: {error}"
    return None


def check_files(paths, workers=0):
    """[(path, reason)] of the files Pillow cannot decode, decoding on `workers` threads."""
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            reasons = list(pool.map(_check_file, paths))
    else:
        reasons = [_check_file(path) for path in paths]
    return [(str(path), reason) for path, reason in zip(paths, reasons) if reason is not None]


class ImageFolderSplit:
    """The readable images of one split: paths, labels (N,), class_names. `skipped` lists the
    (path, reason) of the files left out."""

    def __init__(self, paths, labels, class_names, name, skipped=()):
        self.paths = [str(path) for path in paths]
        self.labels = np.asarray(labels, np.int64)
        self.class_names = list(class_names)
        self.num_classes = len(class_names)
        self.name = name
        self.skipped = list(skipped)

    def __len__(self):
        return len(self.paths)

    def __repr__(self):
        return f"ImageFolderSplit({self.name!r}, {len(self)} images, {self.num_classes} classes)"


def _split_by_fraction(paths, labels, fraction, seed):
    """(train_idx, val_idx): per class, a seeded `fraction` (at least one image) for val."""
    if not 0 < fraction < 1:
        raise DatasetError(f"--val-fraction must lie in (0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 0x5EED])
    train, val = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            raise DatasetError(f"class folder {Path(paths[members[0]]).parent} has one image: "
                               f"--val-fraction needs at least two per class (one for val)")
        members = rng.permutation(members)
        cut = max(1, int(round(fraction * len(members))))
        val.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def load_image_folder(data_dir, val_fraction=None, split_seed=0, strict=False, workers=0):
    """{"train": ImageFolderSplit, "test": ImageFolderSplit} of an image folder (see the
    module's docstring). val_fraction: split one folder of class folders (required when there
    is no train/ folder, refused when there is). strict: refuse unreadable files instead of
    skipping them."""
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if root is None or not root.is_dir():
        raise DatasetError(f"--dataset folder needs --data-dir DIR, a folder of images "
                           f"(DIR/train/<class>/..., DIR/val/<class>/...); got {data_dir}")
    pillow()
    split_dirs = {split: next((root / name for name in names if (root / name).is_dir()), None)
                  for split, names in SPLIT_FOLDERS.items()}
    if val_fraction is None:
        missing = [f"{root}/{'|'.join(SPLIT_FOLDERS[s])}" for s, d in split_dirs.items()
                   if d is None]
        if missing:
            raise DatasetError(f"{root} has no {' and no '.join(missing)} folder: expected "
                               f"{root}/train/<class>/... and {root}/val/<class>/..., or pass "
                               f"--val-fraction F to split one folder of class folders")
        lists = {split: list_classes(split_dirs[split]) for split in split_dirs}
        if lists["test"][0] != lists["train"][0]:
            only = sorted(set(lists["train"][0]) ^ set(lists["test"][0]))
            raise DatasetError(f"{split_dirs['train']} and {split_dirs['test']} hold different "
                               f"class folders (in one only: {', '.join(only)}): both splits "
                               f"need the same classes")
    else:
        if split_dirs["train"] is not None:
            raise DatasetError(f"{root} already has a train/ folder: --val-fraction splits a "
                               f"folder of class folders; leave it out to use train/ and val/")
        classes, paths, labels = list_classes(root)
        train_idx, val_idx = _split_by_fraction(paths, labels, val_fraction, split_seed)
        lists = {"train": (classes, [paths[i] for i in train_idx], labels[train_idx]),
                 "test": (classes, [paths[i] for i in val_idx], labels[val_idx])}
    splits = {}
    for split, (classes, paths, labels) in lists.items():
        bad = check_files(paths, workers)
        if bad and strict:
            listed = "; ".join(f"{path} ({reason})" for path, reason in bad[:10])
            more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise DatasetError(f"{len(bad)} image file(s) cannot be read: {listed}{more}; "
                               f"remove or fix them, or leave out --strict to skip them")
        unreadable = {path for path, _ in bad}
        keep = [i for i, path in enumerate(paths) if str(path) not in unreadable]
        counts = np.bincount(labels[keep], minlength=len(classes))
        if not counts.all():
            empty = [name for name, count in zip(classes, counts) if not count]
            raise DatasetError(f"class folder(s) {', '.join(empty)} of the {split} split of "
                               f"{root} hold no readable image (all were skipped as "
                               f"unreadable): add images or remove the folder(s)")
        splits[split] = ImageFolderSplit([paths[i] for i in keep], labels[keep], classes,
                                         f"{root.name}-{split}", bad)
    return splits


def skipped_files_report(skipped, limit=20):
    """Lines naming the unreadable image files a run leaves out (up to `limit` of them)."""
    if not skipped:
        return []
    lines = [f"skipping {len(skipped)} unreadable image file(s) (--strict refuses them):"]
    lines += [f"  {path}: {reason}" for path, reason in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return lines
