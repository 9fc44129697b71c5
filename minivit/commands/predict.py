"""minivit predict: classify image files with a minivit checkpoint or timm/ImageNet weights."""

import argparse

from minivit.commands.common import add_backend_flags, apply_backend

EPILOG = """examples:
  minivit predict --checkpoint runs/latest digit.npy batch.npy photo.png
  minivit predict --weights vit_base_patch16_224.safetensors --model vit_base_patch16_224 \\
                  --labels imagenet_classes.txt cat.jpg

Inputs: .npy arrays (H,W), (C,H,W) or (N,C,H,W) with values in [0,1] (or uint8 0..255), and
PNG/JPEG files (needs Pillow: pip install 'minivit[images]').
--checkpoint: a minivit training checkpoint (or run folder); images are converted to the
  model's channels, resized to its image size and normalised with the training data's
  mean/std; class names come from the checkpoint.
--weights with --model: timm-style ImageNet evaluation: the shorter side is resized to
  img_size/0.875 (bicubic), the centre img_size x img_size is cropped and normalised with
  ImageNet's mean/std. Class names from --labels (one per line), else indices.
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_PCT = 0.875
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PILLOW_HINT = "reading PNG/JPEG needs Pillow: pip install 'minivit[images]'"


def add_parser(subparsers, name, help_text):
    p = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE", help=".npy, .png, .jpg or .jpeg files")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="RUN_OR_FILE",
                        help="a minivit checkpoint file, or a run folder (its best checkpoint)")
    source.add_argument("--weights", metavar="FILE",
                        help="timm/minivit weights (.safetensors, .npz, .pth, .bin); needs "
                             "--model")
    p.add_argument("--model", metavar="NAME",
                   help="named configuration for --weights, e.g. vit_base_patch16_224")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of --weights' head (default: read from the weights, else 1000)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input image size (default: the model's); pos_embed is resampled to it")
    p.add_argument("--labels", metavar="FILE",
                   help="class names, one per line (default: the checkpoint's, else indices)")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    add_backend_flags(p)


def run(args):
    import sys

    from minivit.errors import MinivitError

    if args.weights is not None and args.model is None:
        raise MinivitError("--weights needs --model NAME (the configuration the weights were "
                           "trained with, e.g. vit_base_patch16_224)")
    if args.checkpoint is not None and (args.model is not None or args.num_classes is not None):
        raise MinivitError("--model and --num-classes go with --weights; a --checkpoint "
                           "carries its own configuration")
    if args.top_k < 1 or args.batch_size < 1:
        raise MinivitError("--top-k and --batch-size must be at least 1")
    apply_backend(args)

    def note(message):
        print(f"minivit predict: note: {message}", file=sys.stderr)

    if args.checkpoint is not None:
        model, class_names, mean, std = _from_checkpoint(args, note)
        preprocess = "resize"
    else:
        model, class_names, mean, std = _from_weights(args, note)
        preprocess = "center_crop"
    if model.head is None:
        raise MinivitError("the model has no head (num_classes=0): nothing to classify")
    if args.labels is not None:
        class_names = _read_labels(args.labels, model.num_classes)
    model.to(dtype=args.dtype).eval()

    items = []  # (name, (C, H, W) float32 array in [0, 1] at the model's size)
    for path in args.files:
        items += _prepare(path, model, preprocess)
    probs = _predict(model, [array for _, array in items], mean, std, args.dtype,
                     args.batch_size)
    k = min(args.top_k, probs.shape[1])
    for (name, _), row in zip(items, probs):
        print(f"{name}:")
        for index in row.argsort(kind="stable")[::-1][:k]:
            label = class_names[index] if class_names else str(index)
            print(f"  {row[index]:.4f}  {label}")
    return 0


# -- models --------------------------------------------------------------------------------------
def _from_checkpoint(args, note):
    from minivit.checkpoint import model_from_checkpoint

    model, info = model_from_checkpoint(args.checkpoint)
    if args.img_size is not None and _pair(args.img_size) != tuple(model.patch_embed.img_size):
        model.resample_pos_embed(args.img_size)
        note(f"resampled pos_embed to image size {args.img_size}")
    channels = model.patch_embed.in_chans
    mean, std = info.get("mean"), info.get("std")
    if mean is None or std is None:
        note("the checkpoint has no mean/std: using 0.5/0.5")
        mean, std = (0.5,) * channels, (0.5,) * channels
    return model, info.get("class_names"), tuple(mean), tuple(std)


def _from_weights(args, note):
    from minivit.models import create_model
    from minivit.pretrained import checkpoint_num_classes, load_pretrained, read_state_dict

    state, metadata, source = read_state_dict(args.weights)
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = checkpoint_num_classes(state) or 1000
    overrides = {"num_classes": num_classes}
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    model = create_model(args.model, **overrides)
    load_pretrained(model, state, notify=note, metadata=metadata, source=source)
    channels = model.patch_embed.in_chans
    if channels != 3:
        note(f"the model has {channels} channel(s): normalising each with mean 0.5, std 0.5")
        return model, None, (0.5,) * channels, (0.5,) * channels
    return model, None, IMAGENET_MEAN, IMAGENET_STD


def _read_labels(path, num_classes):
    from minivit.errors import MinivitError

    try:
        with open(path, encoding="utf-8") as file:
            names = [line.strip() for line in file.read().splitlines()]
    except OSError as err:
        raise MinivitError(f"cannot read --labels {path}: {err}") from None
    while names and not names[-1]:
        names.pop()
    if len(names) != num_classes:
        raise MinivitError(f"--labels {path} has {len(names)} names, the model has "
                           f"{num_classes} classes: expected one name per line")
    return names


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


# -- inputs --------------------------------------------------------------------------------------
def _prepare(path, model, preprocess):
    """[(name, (C, H, W) float32 array)] for one file, at the model's channels and size."""
    from pathlib import Path

    from minivit.errors import MinivitError

    path = Path(path)
    suffix = path.suffix.lower()
    channels = model.patch_embed.in_chans
    size = tuple(model.patch_embed.img_size)
    if not path.is_file():
        raise MinivitError(f"{path}: no such file")
    if suffix == ".npy":
        images = [(f"{path}" if len(a) == 1 else f"{path}[{i}]", image)
                  for a in [_read_npy(path)] for i, image in enumerate(a)]
    elif suffix in IMAGE_SUFFIXES:
        images = [(str(path), _read_image(path, channels))]
    else:
        raise MinivitError(f"{path}: unsupported file type {suffix or '(none)'!r}; expected "
                           f".npy, {', '.join(IMAGE_SUFFIXES)}")
    out = []
    for name, image in images:
        image = _match_channels(image, channels, name)
        if preprocess == "resize":
            image = _resize(image, size)
        else:
            image = _resize_and_crop(image, size)
        out.append((name, _as_unit_array(image)))
    return out


def _read_npy(path):
    """(N, C, H, W) float32 in [0, 1] from an .npy array (H,W), (C,H,W) or (N,C,H,W)."""
    import numpy as np

    from minivit.errors import MinivitError

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise MinivitError(f"{path}: cannot read as .npy ({err})") from None
    if array.ndim not in (2, 3, 4) or 0 in array.shape:
        raise MinivitError(f"{path}: expected an image array (H,W), (C,H,W) or (N,C,H,W); got "
                           f"shape {array.shape}")
    array = array.reshape((1,) * (4 - array.ndim) + array.shape)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255)
    if array.dtype.kind not in "fiub":
        raise MinivitError(f"{path}: expected numeric pixels, got dtype {array.dtype}")
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    if not (np.isfinite(low) and np.isfinite(high)) or low < -1e-6 or high > 1 + 1e-6:
        raise MinivitError(f"{path}: pixel values must lie in [0, 1] (or be uint8 0..255); "
                           f"found {low:g} to {high:g}")
    return np.clip(array, 0.0, 1.0)


def _pillow():
    from minivit.errors import MinivitError

    try:
        from PIL import Image
    except ImportError:
        raise MinivitError(PILLOW_HINT) from None
    return Image


def _read_image(path, channels):
    """A Pillow image in mode "L" (1 channel) or "RGB" (3 channels)."""
    from minivit.errors import MinivitError

    Image = _pillow()
    if channels not in (1, 3):
        raise MinivitError(f"{path}: the model takes {channels} channels; PNG/JPEG inputs need "
                           "a 1- or 3-channel model (give .npy arrays instead)")
    try:
        with Image.open(path) as image:
            return image.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError) as err:
        raise MinivitError(f"{path}: cannot read the image ({err})") from None


def _match_channels(image, channels, name):
    """An array image with `channels` channels: grey repeated to RGB, RGB to grey (ITU-R 601
    luma, as Pillow's "L"). Pillow images were converted on reading."""
    import numpy as np

    from minivit.errors import MinivitError

    if not isinstance(image, np.ndarray) or image.shape[0] == channels:
        return image
    if image.shape[0] == 1:
        return np.repeat(image, channels, axis=0)
    if image.shape[0] == 3 and channels == 1:
        luma = np.array([0.299, 0.587, 0.114], np.float32)[:, None, None]
        return (image * luma).sum(axis=0, keepdims=True)
    raise MinivitError(f"{name}: has {image.shape[0]} channels, the model takes {channels}")


def _image_size(image):
    """(width, height) of a Pillow image or a (C, H, W) array."""
    return image.size if not hasattr(image, "ndim") else (image.shape[2], image.shape[1])


def _resize(image, size):
    """Bicubic resize to (height, width) = size; arrays go through Pillow channel by channel
    (mode "F"), so they stay float."""
    import numpy as np

    height, width = size
    if _image_size(image) == (width, height):
        return image
    Image = _pillow()
    if not hasattr(image, "ndim"):
        return image.resize((width, height), Image.BICUBIC)
    planes = [np.asarray(Image.fromarray(plane).resize((width, height), Image.BICUBIC))
              for plane in np.ascontiguousarray(image, dtype=np.float32)]
    return np.clip(np.stack(planes), 0.0, 1.0)


def _resize_and_crop(image, size):
    """timm's ImageNet evaluation transform: resize the shorter side to size/0.875 keeping the
    aspect ratio (as torchvision's Resize(int)), then crop the centre (as CenterCrop)."""
    import math

    height, width = size
    scale = math.floor(max(size) / CROP_PCT)
    w, h = _image_size(image)
    if (w, h) != (width, height):
        if w <= h:
            new_w, new_h = scale, int(scale * h / w)
        else:
            new_w, new_h = int(scale * w / h), scale
        image = _resize(image, (new_h, new_w))
        w, h = new_w, new_h
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    if hasattr(image, "ndim"):
        return image[:, top:top + height, left:left + width]
    return image.crop((left, top, left + width, top + height))


def _as_unit_array(image):
    """(C, H, W) float32 in [0, 1] from a Pillow image or an array."""
    import numpy as np

    if hasattr(image, "ndim"):
        return np.ascontiguousarray(image, dtype=np.float32)
    array = np.asarray(image, dtype=np.float32) / np.float32(255)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()


# -- inference -----------------------------------------------------------------------------------
def _predict(model, images, mean, std, dtype, batch_size):
    """Softmax probabilities (N, classes), float64 on the host."""
    import numpy as np

    from minivit import backend
    from minivit.errors import MinivitError
    from minivit.tensor import no_grad

    channels = images[0].shape[0]
    if len(mean) != channels or len(std) != channels:
        raise MinivitError(f"normalisation has {len(mean)} mean / {len(std)} std values for "
                           f"{channels} channels")
    mean = np.asarray(mean, np.float32)[:, None, None]
    std = np.asarray(std, np.float32)[:, None, None]
    batch = np.stack([(image - mean) / std for image in images]).astype(dtype)
    logits = []
    with no_grad():
        for start in range(0, len(batch), batch_size):
            out = model(backend.to_backend(batch[start:start + batch_size]))
            logits.append(backend.to_numpy(out.data).astype(np.float64))
    logits = np.concatenate(logits)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)
