"""minivit attention: what a trained ViT looks at.

Saves one PNG per image: the input, the class token's attention to each patch in every head
of the last block, and the attention rollout over all blocks (Abnar & Zuidema 2020: heads
averaged, identity added for the residual path, rows renormalised, layers multiplied),
laid over the input. Prints the predicted class. For a Swin Transformer (no class token,
moving windows), the attention each token receives inside its window (minivit.inspect.
window_maps).
"""

import sys
from pathlib import Path

import numpy as np

import minivit.functional as F
from minivit import backend
from minivit.commands.common import (add_backend_flags, add_run_data_flags, apply_backend,
                                     command_parser, run_data_dir, writing_figure)
from minivit.data import load_dataset
from minivit.errors import MinivitError
from minivit.images import image_names, read_images
from minivit.inspect import (attention_map_subject, attention_rollout, cls_attention_maps,
                             save_attention_figure)
from minivit.inspect.window_maps import SWIN_ATTENTION_NOTE, swin_attention_maps
from minivit.models import SwinTransformer, model_from_checkpoint
from minivit.tensor import Tensor, no_grad

EPILOG = """IMAGE is a .npy array ((H, W), (C, H, W) or a batch (N, C, H, W), channels first or
last; float values in [0, 1] as the datasets hold them, uint8 in 0..255) or, with Pillow, a
PNG/JPEG/GIF/BMP/TIFF/WebP. Images are converted to the model's channels and resized
(bicubic) to its image size; resizing an array needs Pillow too. A batch gives one figure per
image (b.npy: b_0_attention.png, b_1_attention.png, ...). Where output names would clash, they
take the file's suffix (b_npy_attention.png), else its folder (in_b_npy_...), else a number. A
file that cannot be read is reported and the others drawn (exit status 1). --index N
takes sample N of the checkpoint's dataset instead. The image is normalised with the
checkpoint's mean/std before the forward pass.

examples:
  minivit attention --checkpoint runs/latest --index 0 1 2 3
  minivit attention --checkpoint runs/latest/best.safetensors digit.png --out digit_attn.png
"""


def add_parser(subparsers, name, help_text):
    p = command_parser(subparsers, name, help_text, EPILOG)
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_FILE",
                   help="a checkpoint file, or a run folder (its best checkpoint)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (.npy, PNG, JPEG)")
    p.add_argument("--index", type=int, nargs="+", metavar="N",
                   help="sample(s) of the checkpoint's dataset instead of image files")
    add_run_data_flags(p, "the checkpoint's run", split="the dataset split --index reads")
    p.add_argument("--out", default=None, metavar="FILE.png",
                   help="output PNG (default ./attention_<split>_<N>.png or "
                        "./<image>_attention.png; with several images, _<N> or _<image> is "
                        "added to the name)")
    p.add_argument("--head-fusion", choices=("mean", "max", "min"), default="mean",
                   help="how rollout combines the heads of a layer (default: mean)")
    p.add_argument("--discard-ratio", type=float, default=0.0,
                   help="fraction of the weakest attention weights rollout drops per layer "
                        "(default 0)")
    add_backend_flags(p)


def run(args):
    if bool(args.images) == bool(args.index):
        raise MinivitError("give image files or --index N (one of the two)")
    if not 0.0 <= args.discard_ratio < 1.0:
        raise MinivitError(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    apply_backend(args)
    model, info = model_from_checkpoint(args.checkpoint)
    model.to(dtype=args.dtype)
    class_names = info.get("class_names") or [str(k) for k in range(model.num_classes)]

    args.unreadable = []  # image files reported and skipped
    if args.index:
        images, labels, tags, stems = _dataset_samples(info, args)
    else:
        images, labels, tags, stems = _file_samples(model, args)
    outs = _output_paths(args, stems)

    mean = np.asarray(info["mean"], dtype=np.float64).reshape(-1, 1, 1)
    std = np.asarray(info["std"], dtype=np.float64).reshape(-1, 1, 1)
    normalised = ((images - mean) / std).astype(args.dtype)
    with no_grad():
        logits, attentions = model.forward_with_attention(Tensor(backend.to_backend(normalised)))
        probabilities = backend.to_numpy(F.softmax(logits, axis=-1).data)
    attentions = [backend.to_numpy(a).astype(np.float64) for a in attentions]

    grid = model.patch_embed.grid_size
    if isinstance(model, SwinTransformer):
        print(SWIN_ATTENTION_NOTE)
        head_maps, rollout_maps = swin_attention_maps(model, attentions, len(images))
        last_panel, block, subject = "stage 0 mean", None, ""
    else:
        prefix = model.num_prefix_tokens
        head_maps = cls_attention_maps(attentions[-1], grid, prefix)  # (B, heads, gh, gw)
        rollout = attention_rollout(attentions, args.discard_ratio, args.head_fusion)
        rollout_maps = cls_attention_maps(rollout[:, None], grid, prefix)[:, 0]
        block = len(attentions) - 1  # the head panels' block, named in their titles
        last_panel, subject = f"rollout, blocks 0-{block}", attention_map_subject(prefix)
    for b, (tag, label, out) in enumerate(zip(tags, labels, outs)):
        predicted = int(probabilities[b].argmax())
        text = f"predicted {class_names[predicted]} ({probabilities[b, predicted]:.1%})"
        if label is not None:
            text += f", true {class_names[label]}" + ("" if label == predicted else "  (wrong)")
        title = f"{tag}: {text}" + (f"\n{subject}" if subject else "")
        with writing_figure(out):
            save_attention_figure(images[b], head_maps[b], rollout_maps[b], out, title=title,
                                  last_title=last_panel, block=block)
        print(f"{tag}: {text} -> {out}")
    if args.unreadable:
        print(f"minivit attention: {len(args.unreadable)} of {len(args.images)} files could not "
              f"be read: {', '.join(map(str, args.unreadable))}", file=sys.stderr)
        return 1
    return 0


def _dataset_samples(info, args):
    """(images (B, C, H, W) in [0, 1], labels, tags, stems) of --index from the checkpoint's
    dataset."""
    if not info.get("dataset"):
        raise MinivitError("the checkpoint names no dataset: give image files instead of --index")
    dataset = load_dataset(info["dataset"], args.split,
                           run_data_dir(args.data_dir, info, info["dataset"]))
    args.index = list(dict.fromkeys(args.index))  # one figure per image, however often named
    for index in args.index:
        if not 0 <= index < len(dataset):
            raise MinivitError(f"--index {index} is out of range: {dataset.name} has "
                               f"{len(dataset)} images (0..{len(dataset) - 1})")
    images = dataset.images[args.index].astype("float64")
    labels = [int(dataset.labels[i]) for i in args.index]
    tags = [f"{dataset.name} #{i}" for i in args.index]
    return images, labels, tags, [str(i) for i in args.index]


def _file_samples(model, args):
    """(images (B, C, H, W) in [0, 1], labels, tags, stems) of the image files; a batch file
    gives one of each per image."""
    channels, size = model.patch_embed.in_chans, model.patch_embed.img_size
    paths, batches = [], []  # a file that cannot be read is reported, the others still drawn
    for path in args.images:
        try:
            batches.append(read_images(path, channels, size))
            paths.append(path)
        except MinivitError as error:
            print(f"minivit attention: error: {error}", file=sys.stderr)
            args.unreadable.append(path)
    if not batches:
        raise MinivitError(f"none of the {len(args.images)} file(s) could be read (see above)")
    tags = [tag for path, batch in zip(paths, batches)
            for tag in image_names(str(path), len(batch))]
    images = np.concatenate(batches)
    stems = _unique_stems([Path(path) for path in paths], [len(b) for b in batches])
    return images, [None] * len(images), tags, stems


def _unique_stems(paths, counts):
    """One output-name stem per image (b_0, b_1, ... for a batch), unique: from each file's stem
    (img), else its name (img_npy for img.npy and img.png), else its folder and name (in_img_npy
    for in/img.npy and out/img.npy), else its name and the image's number (img_npy_3)."""
    def name(path):
        return path.name.replace(".", "_")

    def folder_and_name(path):
        return "_".join(filter(None, (path.resolve().parent.name, name(path))))

    def per_image(stem):
        return [s for path, count in zip(paths, counts)
                for s in image_names(stem(path), count, "_{}")]

    for stem in (lambda path: path.stem, name, folder_and_name):
        stems = per_image(stem)
        if len(set(stems)) == len(stems):
            return stems
    return [f"{stem}_{i}" for i, stem in enumerate(per_image(name))]


def _output_paths(args, stems):
    """One PNG path per image: --out (with _<stem> added for several), else a default name."""
    if args.out is None:
        if args.index:
            return [Path(f"attention_{args.split}_{stem}.png") for stem in stems]
        return [Path(f"{stem}_attention.png") for stem in stems]
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise MinivitError(f"--out must name a .png file, got {out}")
    if len(stems) == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{stem}{out.suffix}") for stem in stems]
