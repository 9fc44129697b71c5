"""minivit convert: weights between .safetensors, .npz and PyTorch .pth/.pt/.bin."""

from pathlib import Path

from minivit import io
from minivit.commands.common import command_parser
from minivit.errors import WeightsError
from minivit.models import save_torch_weights

EPILOG = """examples:
  minivit convert vit_base_patch16_224.pth vit_base_patch16_224.safetensors
  minivit convert runs/latest/best.safetensors best.pth      (loads into timm/PyTorch)
  minivit convert weights.npz weights.safetensors --force   (overwrite)

Names and values are copied exactly (float16/bfloat16 become float32). Metadata (a minivit
checkpoint's configuration, class names, normalisation) is kept between .safetensors and .npz;
a .pth file holds a plain state dict, without metadata. Reading or writing .pth needs PyTorch.
"""


def add_parser(subparsers, name, help_text):
    p = command_parser(subparsers, name, help_text, EPILOG)
    p.add_argument("src", metavar="SRC", help="weights file to read (.safetensors, .npz, .pth, "
                                              ".pt, .bin)")
    p.add_argument("dst", metavar="DST", help="file to write (.safetensors, .npz, .pth, .pt, "
                                              ".bin); the suffix picks the format")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")


def run(args):
    src, dst = Path(args.src), Path(args.dst)
    suffix = dst.suffix.lower()
    if suffix not in io.SAVE_SUFFIXES + io.TORCH_SUFFIXES:
        raise WeightsError(f"cannot write {dst}: unsupported suffix {suffix or '(none)'!r}; "
                           f"name it with one of {', '.join(io.SAVE_SUFFIXES + io.TORCH_SUFFIXES)}")
    if dst.exists() and not args.force:
        raise WeightsError(f"{dst} exists; pass --force to overwrite it")
    state, metadata = io.load_weights(src)
    if suffix in io.TORCH_SUFFIXES:
        save_torch_weights(state, dst)
        kept = "metadata not kept: .pth holds a plain state dict" if metadata else ""
    else:
        io.save_weights(state, dst, metadata=metadata)
        kept = f"metadata kept ({', '.join(metadata)})" if metadata else ""
    values = sum(int(array.size) for array in state.values())
    print(f"wrote {dst}: {len(state)} tensors, {values:,} values"
          + (f"; {kept}" if kept else ""))
    return 0
