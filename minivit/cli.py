"""The `minivit` command: one sub-command per module in `minivit.commands`."""

import argparse
import importlib
import os
import sys

from minivit import __version__, cpu
from minivit.errors import MinivitError

# name -> one-line help; the module minivit.commands.<name> does the work.
COMMANDS = {
    "train": "train a ViT (default: a tiny ViT on the embedded 8x8 digits, on the CPU)",
    "eval": "evaluate a checkpoint on a dataset's test split",
    "predict": "classify image files (.npy; PNG, JPEG, ... with Pillow) with a checkpoint or "
               "timm weights",
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
    parser.set_defaults(command_parsers=subparsers.choices)
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
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        parser.print_help()
        return 2
    if unknown:  # the sub-command's own usage, not the top-level one
        args.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    cpu.configure()  # BLAS threads and malloc for the CPU kernels (see minivit.cpu.runtime)
    try:
        status = _command_module(args.command).run(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except MinivitError as error:
        print(f"minivit {args.command}: error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader of our output went away (minivit info --list | head): stop quietly, as
        # Python's documentation advises, with the status of a process killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except OSError as error:  # a file the command writes or reads that the system refused
        where = f" ({error.filename})" if error.filename else ""
        print(f"minivit {args.command}: error: {error.strerror or error}{where}: a file this "
              f"command reads or writes; check the path, its permissions and the free space",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"minivit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
