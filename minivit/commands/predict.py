"""minivit predict: classify image files with a minivit checkpoint or timm/ImageNet weights."""

import sys

import numpy as np

from minivit import backend
from minivit.commands.common import (add_backend_flags, add_precision_flag, apply_backend,
                                     command_parser, number)
from minivit.errors import MinivitError
from minivit.images import image_names, read_images
from minivit.models import (checkpoint_num_classes, create_model, load_pretrained,
                            model_from_checkpoint, read_state_dict)
from minivit.tensor import no_grad

EPILOG = """examples:
  minivit predict --checkpoint runs/latest digit.npy batch.npy photo.png
  minivit predict --weights vit_base_patch16_224.safetensors --model vit_base_patch16_224 \\
                  --labels imagenet_classes.txt cat.jpg

Inputs: .npy arrays (H,W), (C,H,W) or (N,C,H,W), channels first or last, with values in [0,1]
(or uint8 0..255; a stack of grey images as (N,1,H,W)), and PNG/JPEG/GIF/BMP/TIFF/WebP files
(8- or 16-bit PNGs; needs Pillow: pip install 'minivit[images]'; so does resizing an array).
Grey images are repeated for RGB models, RGB made grey for 1-channel ones. A file that cannot
be read is reported and the others classified (exit status 1).
--checkpoint: a minivit training checkpoint (or run folder); images are converted to the
  model's channels, resized to its image size and normalised with the training data's
  mean/std; class names come from the checkpoint.
--weights with --model: timm-style ImageNet evaluation: the shorter side is resized to
  img_size/0.875 (bicubic), the centre img_size x img_size is cropped and normalised with
  ImageNet's mean/std. Class names from --labels (one per line), else indices.
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def add_parser(subparsers, name, help_text):
    p = command_parser(subparsers, name, help_text, EPILOG)
    p.add_argument("files", nargs="+", metavar="FILE",
                   help=".npy arrays or image files (.png, .jpg, .gif, .bmp, .tif, .webp)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="RUN_OR_FILE",
                        help="a minivit checkpoint file, or a run folder (its best checkpoint)")
    source.add_argument("--weights", metavar="FILE",
                        help="timm/minivit weights (.safetensors, .npz, .pth, .bin); needs "
                             "--model")
    p.add_argument("--model", metavar="NAME",
                   help="named configuration for --weights, e.g. vit_base_patch16_224")
    p.add_argument("--num-classes", type=number(int, 1), default=None,
                   help="classes of --weights' head (default: read from the weights, else 1000)")
    p.add_argument("--img-size", type=number(int, 1), default=None,
                   help="input image size (default: the model's); pos_embed is resampled to it")
    p.add_argument("--labels", metavar="FILE",
                   help="class names, one per line (default: the checkpoint's, else indices)")
    p.add_argument("--top-k", type=number(int, 1), default=5,
                   help="classes shown per image (default 5)")
    p.add_argument("--batch-size", type=number(int, 1), default=64,
                   help="images per forward pass (default: 64; only speed and memory change)")
    add_backend_flags(p)
    add_precision_flag(p)


def run(args):
    if args.weights is not None and args.model is None:
        raise MinivitError("--weights needs --model NAME (the configuration the weights were "
                           "trained with, e.g. vit_base_patch16_224)")
    if args.checkpoint is not None and (args.model is not None or args.num_classes is not None):
        raise MinivitError("--model and --num-classes go with --weights; a --checkpoint "
                           "carries its own configuration")
    apply_backend(args)

    def note(message):
        print(f"minivit predict: note: {message}", file=sys.stderr)

    if args.checkpoint is not None:
        model, class_names, mean, std = _from_checkpoint(args, note)
        fit = "resize"
    else:
        model, class_names, mean, std = _from_weights(args, note)
        fit = "center_crop"
    if model.head is None:
        raise MinivitError("the model has no head (num_classes=0): nothing to classify")
    if args.labels is not None:
        class_names = _read_labels(args.labels, model.num_classes)
    model.to(dtype=args.dtype).eval()

    items = []  # (name, (C, H, W) float32 array in [0, 1] at the model's size)
    failed = []  # a file that cannot be read is reported, and the others still classified
    for path in args.files:
        try:
            images = read_images(path, model.patch_embed.in_chans, model.patch_embed.img_size,
                                 fit)
        except MinivitError as error:
            print(f"minivit predict: error: {error}", file=sys.stderr)
            failed.append(path)
            continue
        items += zip(image_names(str(path), len(images)), images)
    if not items:
        raise MinivitError(f"none of the {len(failed)} file(s) could be read (see above)")
    probs = _predict(model, [array for _, array in items], mean, std, args.dtype,
                     args.batch_size)
    k = min(args.top_k, probs.shape[1])
    for (name, _), row in zip(items, probs):
        print(f"{name}:")
        for index in row.argsort(kind="stable")[::-1][:k]:
            label = class_names[index] if class_names else str(index)
            print(f"  {row[index]:.4f}  {label}")
    if failed:
        print(f"minivit predict: {len(failed)} of {len(args.files)} files could not be read: "
              f"{', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0


# -- models --------------------------------------------------------------------------------------
def _from_checkpoint(args, note):
    model, info = model_from_checkpoint(args.checkpoint)
    if args.img_size is not None and (args.img_size,) * 2 != model.patch_embed.img_size:
        if hasattr(model, "set_img_size"):  # Swin: masks rebuilt (tables where windows change)
            model.set_img_size(args.img_size)
            note(f"set the model's image size to {args.img_size}")
        else:
            model.resample_pos_embed(args.img_size)
            note(f"resized {_position_tables(model)} to image size {args.img_size}")
    channels = model.patch_embed.in_chans
    mean, std = info.get("mean"), info.get("std")
    if mean is None or std is None:
        note("the checkpoint has no mean/std: using 0.5/0.5")
        mean, std = (0.5,) * channels, (0.5,) * channels
    return model, info.get("class_names"), tuple(mean), tuple(std)


def _position_tables(model):
    """What resample_pos_embed resized in this ViT: its position embedding, its blocks'
    relative position bias tables (BEiT has only those), or nothing ('none')."""
    parts = [] if model.pos_embed_kind == "none" else ["the position embedding"]
    if model.config["rel_pos_bias"]:
        parts.append(f"the relative position bias tables of {len(model.blocks)} block(s)")
    return " and ".join(parts) or "nothing (no position embedding)"


def _from_weights(args, note):
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
    try:
        with open(path, encoding="utf-8") as file:
            names = [line.strip() for line in file.read().splitlines()]
    except OSError as err:
        raise MinivitError(f"cannot read --labels {path}: {err}") from None
    except UnicodeDecodeError:
        raise MinivitError(f"--labels {path} is not a text file: expected one class name per "
                           f"line (UTF-8)") from None
    while names and not names[-1]:
        names.pop()
    if len(names) != num_classes:
        raise MinivitError(f"--labels {path} has {len(names)} names, the model has "
                           f"{num_classes} classes: expected one name per line")
    return names


# -- inference -----------------------------------------------------------------------------------
def _predict(model, images, mean, std, dtype, batch_size):
    """Softmax probabilities (N, classes), float64 on the host."""
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
