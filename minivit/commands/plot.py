"""minivit plot: loss/accuracy/learning-rate curves of run folders, or their gradient norms."""

from pathlib import Path

from minivit.commands.common import check_png, command_parser, writing_figure
from minivit.errors import MinivitError
from minivit.inspect import plot_grads, plot_runs

EPILOG = """Reads RUN_DIR/metrics.jsonl (written by minivit train). Several runs go on one figure,
one colour per run, one line style per split (train, test). --grads draws instead the
per-parameter gradient norms and update ratios that `minivit train --log-grads` records,
one figure per run. Needs matplotlib (pip install 'minivit[plot]').

examples:
  minivit plot runs/latest                       -> runs/latest/curves.png
  minivit plot runs/a runs/b --x epoch           -> ./comparison.png
  minivit plot runs/latest --grads               -> runs/latest/grads.png
"""


def add_parser(subparsers, name, help_text):
    p = command_parser(subparsers, name, help_text, EPILOG)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders (or their metrics.jsonl files)")
    p.add_argument("--out", default=None, metavar="FILE.png",
                   help="where to save the figure (default: RUN_DIR/curves.png for one run, "
                        "./comparison.png for several; RUN_DIR/grads.png with --grads)")
    p.add_argument("--x", choices=("step", "epoch", "time"), default="step",
                   help="the x axis (default: step)")
    p.add_argument("--grads", action="store_true",
                   help="plot gradient norms and update ratios (runs trained with --log-grads)")


def run(args):
    for run_dir in args.runs:
        if not Path(run_dir).exists():
            raise MinivitError(f"no such run folder: {run_dir}")
    if args.grads:
        if args.out and len(args.runs) > 1:
            raise MinivitError("--grads draws one figure per run: give a single RUN_DIR with "
                               "--out, or leave --out out (each run gets RUN_DIR/grads.png)")
        for run_dir in args.runs:
            out = Path(args.out) if args.out else _folder(run_dir) / "grads.png"
            check_png(out)
            with writing_figure(out):
                plot_grads(run_dir, out, x=args.x)
            print(f"wrote {out}")
        return 0
    if args.out:
        out = Path(args.out)
    elif len(args.runs) == 1:
        out = _folder(args.runs[0]) / "curves.png"
    else:
        out = Path("comparison.png")
    check_png(out)
    with writing_figure(out):
        plot_runs(args.runs, out, x=args.x)
    print(f"wrote {out}")
    return 0


def _folder(run_dir):
    """The run folder of RUN_DIR or of RUN_DIR/metrics.jsonl."""
    path = Path(run_dir)
    return path.parent if path.is_file() else path
