"""The `minivit` command: one sub-command per module in `minivit.commands`."""

import argparse
import importlib
import sys

from minivit import __version__, cpu
from minivit.errors import MinivitError

# name -> one-line help; the module minivit.commands.<name> does the work.
COMMANDS = {
    "train": "train a ViT (default: a tiny ViT on the embedded 8x8 digits, on the CPU)",
    "eval": "evaluate a checkpoint on a dataset's test split",
    "predict": "classify image files (.npy, PNG/JPEG with Pillow) with a checkpoint or timm weights",
    "gradcheck": "check every hand-written backward against finite differences",
    "bench": "training/inference images/s, memory and FLOP/s, optionally side by side with PyTorch",
    "info": "parameters, tokens, MACs/FLOPs and activation memory of a model or checkpoint",
    "plot": "plot loss/accuracy/learning-rate curves of one or more run folders",
    "attention": "save a PNG of a trained model's attention maps and attention rollout",
    "convert": "convert weights between .safetensors, .npz and PyTorch .pth/.bin",
    "pretrain": "self-supervised pretraining of a ViT encoder: MAE or DINO",
    "probe": "k-NN and linear-probe accuracy of a (pretrained, supervised or random) encoder",
    "reconstruct": "draw an MAE run's reconstructions of test images",
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="minivit",
        description="Vision Transformers on a small hand-written autograd engine (NumPy/CuPy).",
    )
    parser.add_argument("--version", action="version", version=f"minivit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = _command_module(name)
        if module is not None:
            module.add_parser(subparsers, name, help_text)
    return parser


def _command_module(name):
    try:
        return importlib.import_module(f"minivit.commands.{name}")
    except ModuleNotFoundError as error:
        if error.name == f"minivit.commands.{name}":
            return None  # command not written yet
        raise


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    cpu.configure()  # BLAS threads and malloc for the CPU kernels (see minivit.cpu.runtime)
    try:
        return _command_module(args.command).run(args) or 0
    except MinivitError as error:
        print(f"minivit {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"minivit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
