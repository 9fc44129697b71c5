"""minivit attention: what a trained ViT looks at.

Saves one PNG per image: the input, the class token's attention to each patch in every head
of the last block, and the attention rollout over all blocks (Abnar & Zuidema 2020: heads
averaged, identity added for the residual path, rows renormalised, layers multiplied),
laid over the input. Prints the predicted class. For a Swin Transformer (no class token,
moving windows), the attention each token receives inside its window (minivit.inspect.
window_maps). A pretraining run's encoder (MAE's encoder, DINO's teacher backbone, as DINO's
paper draws it) has no classifier: its maps are drawn without a prediction. --compare draws
two models side by side in one figure and prints how spread out (entropy) and how much on the
ink (correlation with the patches' mean intensity) their last block's maps are.
"""

import sys
from pathlib import Path

import numpy as np

import minivit.functional as F
from minivit import backend
from minivit.commands.common import (add_backend_flags, add_run_data_flags, apply_backend,
                                     check_png, command_parser, run_data_dir, writing_figure)
from minivit.data import load_dataset
from minivit.encoders import encoder_model, weights_file
from minivit.errors import MinivitError, PretrainingCheckpointError
from minivit.images import image_names, read_images
from minivit.inspect import (attention_map_subject, attention_rollout, cls_attention_maps,
                             map_statistics, save_attention_comparison, save_attention_figure)
from minivit.inspect.window_maps import SWIN_ATTENTION_NOTE, swin_attention_maps
from minivit.models import SwinTransformer, model_from_checkpoint
from minivit.tensor import Tensor, no_grad

# what a pretraining run's encoder is called in titles and output (it has no classifier)
ENCODER_NAMES = {"dino": "DINO teacher backbone", "mae": "MAE encoder"}

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
  minivit attention --checkpoint runs/dino --compare runs/latest --index 0 1 2 --out cmp.png
  minivit attention --checkpoint runs/latest/best.safetensors digit.png --out digit_attn.png
"""


def add_parser(subparsers, name, help_text):
    p = command_parser(subparsers, name, help_text, EPILOG)
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_FILE",
                   help="a checkpoint file, or a run folder (its best checkpoint); a pretraining "
                        "run's encoder (MAE's; DINO's teacher backbone) has no classifier")
    p.add_argument("--compare", default=None, metavar="RUN_OR_FILE",
                   help="a second model: one figure (--out) with a row of maps per model for "
                        "each image (the mean over heads, each head of the last block, rollout)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (.npy, PNG, JPEG)")
    p.add_argument("--index", type=int, nargs="+", metavar="N",
                   help="sample(s) of the checkpoint's dataset instead of image files")
    add_run_data_flags(p, "the checkpoint's run", split="the dataset split --index reads")
    p.add_argument("--out", default=None, metavar="FILE.png",
                   help="output PNG (default ./attention_<split>_<N>.png or "
                        "./<image>_attention.png; with several images, _<N> or _<image> is "
                        "added to the name; with --compare, one figure: ./attention_compare.png)")
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
    model, info, encoder_name = load_attention_model(args.checkpoint)
    class_names = info.get("class_names") or [str(k) for k in range(model.num_classes)]

    args.unreadable = []  # image files reported and skipped
    if args.index:
        images, labels, tags, stems = _dataset_samples(info, args)
    else:
        images, labels, tags, stems = _file_samples(model, args)
    if args.compare:
        return _compare(args, (model, info, encoder_name), images, labels, tags, class_names)
    outs = _output_paths(args, stems)

    probabilities, attentions = _forward(model, info, images, args.dtype)
    if isinstance(model, SwinTransformer):
        print(SWIN_ATTENTION_NOTE)
        head_maps, rollout_maps = swin_attention_maps(model, attentions, len(images))
        last_panel, block, subject = "stage 0 mean", None, ""
    else:
        head_maps, rollout_maps = _class_token_maps(model, attentions, args)
        block = len(attentions) - 1  # the head panels' block, named in their titles
        last_panel = f"rollout, blocks 0-{block}"
        subject = attention_map_subject(model.num_prefix_tokens)
    for b, (tag, label, out) in enumerate(zip(tags, labels, outs)):
        true_name = None if label is None else class_names[label]
        text = _verdict(probabilities, b, true_name, class_names, encoder_name)
        title = f"{tag}: {text}" + (f"\n{subject}" if subject else "")
        with writing_figure(out):
            save_attention_figure(images[b], head_maps[b], rollout_maps[b], out, title=title,
                                  last_title=last_panel, block=block)
        print(f"{tag}: {text} -> {out}")
    return _report_unreadable(args)


def load_attention_model(path):
    """(model, info, encoder_name): the classifier of a training run or checkpoint
    (encoder_name None), or the encoder of a pretraining run (no classifier), in eval mode."""
    source = weights_file(path)
    try:
        model, info = model_from_checkpoint(source)
        return model, info, None
    except PretrainingCheckpointError:
        model, info = encoder_model(source)
        return model, info, ENCODER_NAMES[info["method"]]


def _forward(model, info, images, dtype):
    """(class probabilities (B, classes), or None for an encoder; the attention probabilities
    of every block as NumPy float64) of images (B, C, H, W) in [0, 1]."""
    model.to(dtype=dtype)
    mean = np.asarray(info["mean"], dtype=np.float64).reshape(-1, 1, 1)
    std = np.asarray(info["std"], dtype=np.float64).reshape(-1, 1, 1)
    normalised = ((images - mean) / std).astype(dtype)
    with no_grad():
        logits, attentions = model.forward_with_attention(Tensor(backend.to_backend(normalised)))
        probabilities = (backend.to_numpy(F.softmax(logits, axis=-1).data)
                         if model.num_classes else None)
    return probabilities, [backend.to_numpy(a).astype(np.float64) for a in attentions]


def _class_token_maps(model, attentions, args):
    """(the last block's class-token maps (B, heads, gh, gw), rollout maps (B, gh, gw))."""
    grid, prefix = model.patch_embed.grid_size, model.num_prefix_tokens
    rollout = attention_rollout(attentions, args.discard_ratio, args.head_fusion)
    return (cls_attention_maps(attentions[-1], grid, prefix),
            cls_attention_maps(rollout[:, None], grid, prefix)[:, 0])


def _verdict(probabilities, b, true_name, class_names, encoder_name):
    """The prediction for image b (class_names: the model's) against its true class's name
    (None: unknown), in words; for an encoder, its name."""
    if probabilities is None:
        text = f"{encoder_name} (no classifier)"
        return text if true_name is None else f"{text}; true {true_name}"
    predicted = class_names[int(probabilities[b].argmax())]
    text = f"predicted {predicted} ({probabilities[b].max():.1%})"
    if true_name is not None:
        text += f", true {true_name}" + ("" if true_name == predicted else "  (wrong)")
    return text


def _compare(args, first, images, labels, tags, class_names):
    """One figure: for each image, a row of maps per model (--checkpoint, then --compare)."""
    out = Path(args.out or "attention_compare.png")
    check_png(out)
    entries = [(args.checkpoint, *first), (args.compare, *load_attention_model(args.compare))]
    for path, model, _, _ in entries:
        if isinstance(model, SwinTransformer):
            raise MinivitError(f"--compare draws class-token maps of ViTs; {path} is a Swin "
                               f"Transformer")
        expected = (model.patch_embed.in_chans, *model.patch_embed.img_size)
        if expected != images.shape[1:]:
            raise MinivitError(f"--compare: {path} takes (C, H, W) = {expected} images, the "
                               f"images are {images.shape[1:]}")
    true_names = [None if label is None else class_names[label] for label in labels]
    rows = {}
    for number, (path, model, info, encoder_name) in enumerate(entries, 1):
        probabilities, attentions = _forward(model, info, images, args.dtype)
        name = f"{encoder_name or 'classifier'} {Path(path).name}"
        name = f"{name} ({number})" if name in rows else name
        rows[name] = _class_token_maps(model, attentions, args)
        entropy, ink = map_statistics(rows[name][0], images)
        print(f"{name} ({path}): last block, class token -> patches, mean over "
              f"{len(images)} images and {entropy.shape[1]} heads: entropy {entropy.mean():.3f} "
              f"of uniform, correlation with the patches' ink {ink.mean():+.3f}")
        own_names = info.get("class_names") or [str(k) for k in range(model.num_classes)]
        for b, tag in enumerate(tags):
            print(f"  {tag}: {_verdict(probabilities, b, true_names[b], own_names, encoder_name)}")
    titles = [tag if name is None else f"{tag} (a {name})" for tag, name in zip(tags, true_names)]
    with writing_figure(out):
        save_attention_comparison(images, rows, out, titles)
    print(f"-> {out}")
    return _report_unreadable(args)


def _report_unreadable(args):
    """Exit status: 1 where image files could not be read (named on stderr), else 0."""
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
    check_png(out)
    if len(stems) == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{stem}{out.suffix}") for stem in stems]
