"""Helpers shared by the tests of the inspection commands (tests/test_commands_inspect.py,
test_commands_plot.py, test_commands_attention.py, test_commands_user.py): PNG checks, a tiny
checkpoint, metrics.jsonl files, and the Figures the plot commands draw."""

import json

import pytest

import minivit
import minivit.commands.attention as attention_command
import minivit.commands.plot as plot_command
from minivit.checkpoint import save_checkpoint
from minivit.models import create_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DIGITS_MEAN, DIGITS_STD = 0.3, 0.4


def assert_png(path):
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A run folder with an untrained 2-block digits ViT (dim 16, 2 heads) in best.safetensors."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    minivit.manual_seed(0)
    model = create_model("vit_digits", depth=2, embed_dim=16, num_heads=2).eval()
    info = {"dataset": "digits", "mean": [DIGITS_MEAN], "std": [DIGITS_STD],
            "class_names": [f"digit {k}" for k in range(10)], "epoch": 3, "test_accuracy": 0.25}
    save_checkpoint(run_dir / "best.safetensors", model, info)
    return run_dir, model



def write_metrics(run_dir, epochs=4, steps_per_epoch=10, offset=0.0):
    """metrics.jsonl in the layout minivit train writes (train/test/grads records)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for epoch in range(1, epochs + 1):
        common = {"epoch": epoch, "step": epoch * steps_per_epoch, "time": 1.5 * epoch}
        records.append(dict(common, split="train", loss=2.0 / epoch + offset,
                            accuracy=0.2 * epoch, lr=1e-3 / epoch, images_per_s=500.0))
        records.append(dict(common, split="test", loss=2.2 / epoch + offset, accuracy=0.18 * epoch))
        records.append(dict(common, split="grads",
                            grad_norms={"patch_embed.proj.weight": 0.1 * epoch,
                                        "head.weight": 0.5 / epoch},
                            update_ratios={"patch_embed.proj.weight": 1e-3,
                                           "head.weight": 2e-3 * epoch}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


@pytest.fixture
def figures(monkeypatch):
    """Record the Figures that the plot functions return to the command."""
    drawn = []

    def recording(function):
        def wrapper(*args, **kwargs):
            figure = function(*args, **kwargs)
            drawn.append(figure)
            return figure
        return wrapper

    for command, name in ((plot_command, "plot_runs"), (plot_command, "plot_grads"),
                          (attention_command, "save_attention_figure")):
        monkeypatch.setattr(command, name, recording(getattr(command, name)))
    return drawn


def lines_by_label(axes):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in axes.get_lines()}

