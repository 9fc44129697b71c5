"""Training curves from a run folder's `metrics.jsonl`.

Reading (`read_metrics`) and extracting the series (`curves`) are kept apart from drawing
(`plot_runs`, `plot_grads`), so the data can be checked without matplotlib. Drawing uses
matplotlib's object API on an Agg canvas: no pyplot, no global backend switch, nothing to
close; the functions return the Figure so callers (and tests) can look at what was drawn.
"""

import json
import math
from pathlib import Path

from minivit.errors import MinivitError

METRICS_FILE = "metrics.jsonl"
X_KEYS = ("epoch", "step", "time")  # possible x axes; never plotted as a quantity
PANEL_INCHES = (4.5, 3.5)
DPI = 100


def new_figure(nrows, ncols, panel_inches=PANEL_INCHES):
    """An Agg-backed Figure with a grid of axes; returns (figure, flat list of axes)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MinivitError("plotting needs matplotlib: pip install 'minivit[plot]'") from None
    fig = Figure(figsize=(panel_inches[0] * ncols, panel_inches[1] * nrows), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    return fig, axes


def _metrics_path(run_dir):
    path = Path(run_dir)
    return path if path.is_file() else path / METRICS_FILE


def read_metrics(run_dir):
    """The records of `run_dir/metrics.jsonl` (or of a .jsonl file given directly), in order.

    Blank lines are skipped; a missing, binary or empty file, or a line that is not a JSON
    object, raises MinivitError naming the file (and the line number).
    """
    path = _metrics_path(run_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise MinivitError(f"cannot read metrics file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise MinivitError(f"{path} is not a metrics file: it is not text (minivit train writes "
                           f"{METRICS_FILE} in the run folder, one JSON record per line)") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MinivitError(f"{path}, line {number}: malformed JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise MinivitError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    if not records:
        raise MinivitError(f"{path} has no records: a run writes them as each epoch ends")
    return records


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def curves(records, x="step"):
    """The series to plot: {quantity: {label: (xs, ys)}}, xs and ys lists of equal length.

    Every numeric field of a record (loss, accuracy, lr, images_per_s, ...) adds a point to
    curves[field][split] ("all" for a record without a split); a dict of numbers (grad_norms,
    update_ratios) adds a point to curves[field][name] for each entry. The x value is the
    record's `x` field ("step", "epoch" or "time"); a record with data but no `x` raises
    MinivitError.
    """
    if x not in X_KEYS:
        raise MinivitError(f"x must be one of {', '.join(X_KEYS)}, got {x!r}")
    series = {}

    def add(quantity, label, xv, yv):
        xs, ys = series.setdefault(quantity, {}).setdefault(label, ([], []))
        xs.append(xv)
        ys.append(yv)

    for index, record in enumerate(records):
        split = record.get("split", "all")
        points = []
        for key, value in record.items():
            if key in X_KEYS or key == "split":
                continue
            if _is_number(value):
                points.append((key, split, value))
            elif isinstance(value, dict):
                points += [(key, name, v) for name, v in value.items() if _is_number(v)]
        if points and x not in record:
            raise MinivitError(f"metrics record {index + 1} ({split}) has no {x!r} to plot against")
        for quantity, label, value in points:
            add(quantity, label, record[x], value)
    return series


def _run_name(run_dir):
    path = Path(run_dir).resolve()
    return path.parent.name if path.is_file() else path.name


def plot_runs(run_dirs, out_png, what=("loss", "accuracy", "lr"), x="step"):
    """Draw several runs on one figure and save it as a PNG; returns the Figure.

    One panel per quantity in `what`, one line per run and split, labelled
    "<run folder name> <split>"; a run's lines share a colour, splits differ in line style.
    A quantity no run logged gets an empty panel saying so.
    """
    runs = [(_run_name(d), curves(read_metrics(d), x=x)) for d in run_dirs]
    fig, axes = new_figure(1, len(what))
    styles = {}
    for ax, quantity in zip(axes, what):
        for colour, (name, series) in enumerate(runs):
            for label, (xs, ys) in series.get(quantity, {}).items():
                style = styles.setdefault(label, ["-", "--", ":", "-."][len(styles) % 4])
                ax.plot(xs, ys, style, color=f"C{colour % 10}", label=f"{name} {label}")
        ax.set_title(quantity)
        ax.set_xlabel(x)
        if ax.get_lines():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {quantity!r} records", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out_png)
    return fig


def plot_grads(run_dir, out_png, x="step"):
    """Per-parameter gradient norms and update ratios of one run (train with --log-grads).

    One panel per quantity present, one line per parameter, coloured from the input
    (dark) to the head (bright); log y axis. Returns the Figure.
    """
    series = curves(read_metrics(run_dir), x=x)
    present = [q for q in ("grad_norms", "update_ratios") if q in series]
    if not present:
        raise MinivitError(f"{_metrics_path(run_dir)} has no gradient records (train with --log-grads)")
    fig, axes = new_figure(1, len(present))
    from matplotlib import colormaps

    for ax, quantity in zip(axes, present):
        lines = series[quantity]
        for i, (name, (xs, ys)) in enumerate(lines.items()):
            ax.plot(xs, ys, color=colormaps["viridis"](i / max(len(lines) - 1, 1)), lw=1, label=name)
        if all(y > 0 and math.isfinite(y) for _, ys in lines.values() for y in ys):
            ax.set_yscale("log")
        if len(lines) <= 12:
            ax.legend(fontsize="x-small")
        ax.set_title(f"{quantity} ({len(lines)} parameters)")
        ax.set_xlabel(x)
    fig.tight_layout()
    fig.savefig(out_png)
    return fig
