"""What several sub-commands share: their parser's set-up and the backend flags."""

import argparse
import contextlib

from minivit import backend
from minivit.errors import MinivitError
from minivit.precision import PRECISIONS, set_precision


def command_parser(subparsers, name, help_text, epilog=None):
    """The sub-command's parser: its help line doubles as its description, and the epilog
    (examples, notes) keeps its own line breaks."""
    return subparsers.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def number(kind, lowest, inclusive=True):
    """An argparse type: a number of `kind` (int or float) at least (or, not inclusive, greater
    than) `lowest`; anything else is a usage error naming the flag, the bound and the value."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            expected = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (value >= lowest if inclusive else value > lowest):  # NaN fails both
            raise argparse.ArgumentTypeError(
                f"must be {'at least' if inclusive else 'greater than'} {lowest}, got {text}")
        return value

    return parse


def add_backend_flags(parser):
    parser.add_argument("--backend", choices=backend.BACKENDS, default=None,
                        help="array backend: numpy (CPU) or cupy (NVIDIA GPU); default: "
                             "$MINIVIT_BACKEND or numpy")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="floating-point type of weights and activations (default float32)")


def add_precision_flag(parser):
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="fp32 (default), or on the GPU: tf32 (TF32 tensor-core GEMMs), "
                             "bf16 or fp16 (half-precision GEMMs with fp32 accumulation, "
                             "weights and statistics; fp16 training scales the loss)")


def apply_backend(args):
    """Select the backend named by --backend (or keep the environment's choice), and the
    --precision where the command has one (checked against the backend and --dtype)."""
    if args.backend:
        backend.set_backend(args.backend)
    if getattr(args, "precision", None):
        set_precision(args.precision, backend.get_backend(), args.dtype or "float32")
    return backend.get_backend()


def check_png(out):
    """MinivitError unless `out` names a .png file (what the figure commands write)."""
    if out.suffix.lower() != ".png":
        raise MinivitError(f"--out must name a .png file, got {out}")


@contextlib.contextmanager
def writing_figure(out):
    """Make the folder of the PNG `out` and turn a refused write (read-only folder, full disk)
    into a MinivitError naming the file and what to do."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        yield
    except OSError as error:
        where = f" ({error.filename})" if error.filename not in (None, str(out)) else ""
        raise MinivitError(f"cannot write {out}: {error.strerror or error}{where}; pass --out a "
                           f".png file in a folder that can be written") from None


def add_run_data_flags(parser, run="the run", split=None):
    """--data-dir of a command that reads the dataset of `run` ("the run", "the checkpoint's
    run"; run_data_dir resolves it) and, with `split` (what the split is for, in its help),
    --split."""
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help=f"folder holding the dataset's files (default: the one {run} "
                             f"trained from, else ./data)")
    if split is not None:
        parser.add_argument("--split", choices=("train", "test"), default="test",
                            help=f"{split} (default: test)")


def run_data_dir(data_dir, info, dataset):
    """--data-dir, else (for the dataset the checkpoint was trained on) the data folder its
    run read, as its training configuration records it."""
    if data_dir is not None or dataset != info.get("dataset"):
        return data_dir
    return (info.get("train_config") or {}).get("data_dir")


def describe_checkpoint(path, info):
    """'runs/a/best.safetensors (epoch 3 of 10, test accuracy 0.9500)': which weights these are."""
    details = []
    if "epoch" in info:
        planned = (info.get("train_config") or {}).get("epochs")
        details.append(f"epoch {info['epoch']}" + (f" of {planned}" if planned else ""))
    if info.get("test_accuracy") is not None:
        details.append(f"test accuracy {info['test_accuracy']:.4f} when saved")
    return f"{path} ({', '.join(details)})" if details else str(path)
