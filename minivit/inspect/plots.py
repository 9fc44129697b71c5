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


# what each logged quantity and x axis is, for axis labels
X_LABELS = {"step": "training step", "epoch": "epoch", "time": "training time (s)"}
Y_LABELS = {"loss": "cross-entropy loss", "accuracy": "accuracy (fraction correct)",
            "lr": "learning rate", "images_per_s": "training speed (images/s)",
            "grad_norms": "gradient norm ‖g‖₂", "update_ratios": "update / weight ‖Δθ‖/‖θ‖"}


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
        _label_axes(ax, x, quantity)
        if ax.get_lines():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {quantity!r} records", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out_png)
    return fig


def _label_axes(ax, x, quantity):
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel(Y_LABELS.get(quantity, quantity))


def parameter_group(name):
    """(where, kind) of a parameter for --grads: where is "embedding", "block N" or "head";
    kind its layer type ("attn.qkv", "mlp.fc1", "norms", "patch_embed", "head", ...)."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 2:
        where, layer = f"block {parts[1]}", parts[2:-1] or parts[2:]
    elif parts[0] in ("patch_embed", "cls_token", "pos_embed"):
        where, layer = "embedding", parts[:1] if parts[0] == "patch_embed" else ["tokens"]
    else:
        where, layer = "head", parts[:-1] or parts
    kind = ".".join(layer)
    return where, "norms" if kind.startswith("norm") or kind.endswith("_norm") else kind


def grouped_curves(lines, quantity):
    """Per-parameter series {name: (xs, ys)} combined into {"by block": {where: (xs, ys)},
    "by layer type": {kind: (xs, ys)}}: a group's gradient norm is the norm of all its
    gradients, √Σ‖g‖²; its update ratio the mean of its parameters' ratios."""
    grouped = {}
    for index, axis in enumerate(("by block", "by layer type")):
        members = {}
        for name, series in lines.items():
            members.setdefault(parameter_group(name)[index], []).append(series)
        grouped[axis] = {}
        for group, series in members.items():
            columns = list(zip(*(ys for _, ys in series)))
            if quantity == "grad_norms":
                values = [math.sqrt(sum(v * v for v in column)) for column in columns]
            else:
                values = [sum(column) / len(column) for column in columns]
            grouped[axis][group] = (series[0][0][:len(values)], values)
    return grouped


def plot_grads(run_dir, out_png, x="step"):
    """Gradient norms and update ratios of one run (train with --log-grads), grouped.

    Columns: one per quantity present; rows: the parameters grouped by block (the embedding,
    each block, the head; coloured from the input, dark, to the head, bright) and by layer
    type. Each line is labelled; log y axis. Returns the Figure.
    """
    series = curves(read_metrics(run_dir), x=x)
    present = [q for q in ("grad_norms", "update_ratios") if q in series]
    if not present:
        raise MinivitError(f"{_metrics_path(run_dir)} has no gradient records (train with --log-grads)")
    fig, axes = new_figure(2, len(present), panel_inches=(6.0, 4.0))
    from matplotlib import colormaps

    for column, quantity in enumerate(present):
        lines = series[quantity]
        for row, (axis, groups) in enumerate(grouped_curves(lines, quantity).items()):
            ax = axes[row * len(present) + column]
            ordered = sorted(groups, key=_depth_order) if axis == "by block" else sorted(groups)
            for i, group in enumerate(ordered):
                xs, ys = groups[group]
                colour = (colormaps["viridis"](i / max(len(ordered) - 1, 1))
                          if axis == "by block" else f"C{i % 10}")
                ax.plot(xs, ys, color=colour, lw=1.2, label=group)
            if all(y > 0 and math.isfinite(y) for _, ys in groups.values() for y in ys):
                ax.set_yscale("log")
            ax.legend(fontsize="x-small", ncol=2 if len(groups) > 8 else 1)
            how = "√Σ‖g‖² of the group" if quantity == "grad_norms" else "mean over the group"
            ax.set_title(f"{quantity} {axis} ({how}; {len(lines)} parameters)", fontsize="small")
            _label_axes(ax, x, quantity)
    fig.tight_layout()
    fig.savefig(out_png)
    return fig


def _depth_order(where):
    """embedding, block 0, block 1, ..., head."""
    if where == "embedding":
        return -1, ""
    if where.startswith("block "):
        number = where.split(" ", 1)[1]
        return (int(number), "") if number.isdigit() else (10**6, number)
    return 10**7, where
