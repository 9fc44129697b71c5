"""minivit attention: what a trained ViT looks at.

Saves one PNG per image: the input, the class token's attention to each patch in every head
of the last block, and the attention rollout over all blocks (Abnar & Zuidema 2020: heads
averaged, identity added for the residual path, rows renormalised, layers multiplied),
laid over the input. Prints the predicted class.
"""

EPILOG = """IMAGE is a .npy array ((H, W), (C, H, W) or (H, W, C); float values in [0, 1] as the
datasets hold them, uint8 in 0..255) or, with Pillow, a PNG/JPEG (converted to the model's
channels and resized to its image size). --index N takes sample N of the checkpoint's dataset
instead. The image is normalised with the checkpoint's mean/std before the forward pass.

examples:
  minivit attention --checkpoint runs/latest --index 0 1 2 3
  minivit attention --checkpoint runs/latest/best.safetensors digit.png --out digit_attn.png
"""


def add_parser(subparsers, name, help_text):
    import argparse

    from minivit.commands.common import add_backend_flags

    p = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_FILE",
                   help="a checkpoint file, or a run folder (its best checkpoint)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (.npy, PNG, JPEG)")
    p.add_argument("--index", type=int, nargs="+", metavar="N",
                   help="sample(s) of the checkpoint's dataset instead of image files")
    p.add_argument("--split", choices=("train", "test"), default="test",
                   help="the dataset split --index reads (default: test)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where the dataset's files are (MNIST, CIFAR; default ./data)")
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
    from pathlib import Path

    import numpy as np

    import minivit.functional as F
    from minivit import backend
    from minivit.checkpoint import model_from_checkpoint
    from minivit.commands.common import apply_backend
    from minivit.errors import MinivitError
    from minivit.inspect import attention_rollout, cls_attention_maps, save_attention_figure
    from minivit.tensor import Tensor, no_grad

    if bool(args.images) == bool(args.index):
        raise MinivitError("give image files or --index N (one of the two)")
    if not 0.0 <= args.discard_ratio < 1.0:
        raise MinivitError(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    apply_backend(args)
    model, info = model_from_checkpoint(args.checkpoint)
    model.to(dtype=args.dtype)
    config = info["model_config"]
    channels, size = config["in_chans"], _pair(config["img_size"])
    class_names = info.get("class_names") or [str(k) for k in range(config["num_classes"])]

    if args.index:
        images, labels, tags = _dataset_samples(info, args)
    else:
        images = np.stack([load_image(path, channels, size) for path in args.images])
        labels = [None] * len(images)
        tags = [Path(path).name for path in args.images]
    outs = _output_paths(args, tags)

    mean = np.asarray(info["mean"], dtype=np.float64).reshape(-1, 1, 1)
    std = np.asarray(info["std"], dtype=np.float64).reshape(-1, 1, 1)
    normalised = ((images - mean) / std).astype(args.dtype)
    with no_grad():
        logits, attentions = model.forward_with_attention(Tensor(backend.to_backend(normalised)))
        probabilities = backend.to_numpy(F.softmax(logits, axis=-1).data)
    attentions = [backend.to_numpy(a).astype(np.float64) for a in attentions]

    grid = model.patch_embed.grid_size
    head_maps = cls_attention_maps(attentions[-1], grid)  # (B, heads, gh, gw)
    rollout = attention_rollout(attentions, args.discard_ratio, args.head_fusion)
    rollout_maps = rollout[:, 0, 1:].reshape((len(images),) + grid)
    for b, (tag, label, out) in enumerate(zip(tags, labels, outs)):
        predicted = int(probabilities[b].argmax())
        text = f"predicted {class_names[predicted]} ({probabilities[b, predicted]:.1%})"
        if label is not None:
            text += f", true {class_names[label]}" + ("" if label == predicted else "  (wrong)")
        out.parent.mkdir(parents=True, exist_ok=True)
        save_attention_figure(images[b], head_maps[b], rollout_maps[b], out, title=f"{tag}: {text}")
        print(f"{tag}: {text} -> {out}")
    return 0


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def _dataset_samples(info, args):
    """(images (B, C, H, W) in [0, 1], labels, tags) of --index from the checkpoint's dataset."""
    from minivit.data import load_dataset
    from minivit.errors import MinivitError

    if not info.get("dataset"):
        raise MinivitError("the checkpoint names no dataset: give image files instead of --index")
    dataset = load_dataset(info["dataset"], args.split, args.data_dir)
    for index in args.index:
        if not 0 <= index < len(dataset):
            raise MinivitError(f"--index {index} is out of range: {dataset.name} has "
                               f"{len(dataset)} images (0..{len(dataset) - 1})")
    images = dataset.images[args.index].astype("float64")
    labels = [int(dataset.labels[i]) for i in args.index]
    tags = [f"{dataset.name} #{i}" for i in args.index]
    return images, labels, tags


def _output_paths(args, tags):
    from pathlib import Path

    from minivit.errors import MinivitError

    if args.index:
        labels = [str(i) for i in args.index]
        defaults = [Path(f"attention_{args.split}_{i}.png") for i in args.index]
    else:
        labels = [Path(p).stem for p in args.images]
        if len(set(labels)) < len(labels):  # img.npy and img.png
            labels = [Path(p).name.replace(".", "_") for p in args.images]
        defaults = [Path(f"{stem}_attention.png") for stem in labels]
    if args.out is None:
        return defaults
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise MinivitError(f"--out must name a .png file, got {out}")
    if len(tags) == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{label}{out.suffix}") for label in labels]


def load_image(path, channels, size):
    """An image file as a float64 (C, H, W) array in [0, 1] for a model with `channels` input
    channels and image size `size` (h, w)."""
    from pathlib import Path

    import numpy as np

    from minivit.errors import MinivitError

    path = Path(path)
    if not path.is_file():
        raise MinivitError(f"no such image file: {path}")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise MinivitError(f"cannot read {path} as a .npy array: {error}") from None
        return _from_array(array, channels, size, path)
    try:
        from PIL import Image
    except ImportError:
        raise MinivitError(f"reading {path.suffix or 'image'} files needs Pillow: "
                           f"pip install 'minivit[images]' (or save the image as .npy)") from None
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BILINEAR)
            array = np.asarray(image, dtype=np.float64) / 255.0
    except OSError as error:
        raise MinivitError(f"cannot read {path} as an image: {error}") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _from_array(array, channels, size, path):
    import numpy as np

    from minivit.errors import MinivitError

    scale = 255.0 if array.dtype == np.uint8 else 1.0
    if array.dtype.kind not in "uif":
        raise MinivitError(f"{path}: expected a numeric image array, got dtype {array.dtype}")
    array = np.asarray(array, dtype=np.float64) / scale
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2 and channels == 1:
        array = array[None]
    elif array.ndim == 3 and array.shape[0] != channels and array.shape[-1] == channels:
        array = array.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    expected = (channels,) + tuple(size)
    if array.shape != expected:
        raise MinivitError(f"{path}: expected an image of shape {expected} (C, H, W) for this "
                           f"model (or (H, W, C), or (H, W) for one channel); got {array.shape}")
    return array
