"""minivit plot, through cli.main: training curves of one or several runs, gradient norms,
errors."""

import json
import sys

from helpers_commands import assert_png, lines_by_label, write_metrics
from helpers_commands import figures  # noqa: F401 (a fixture)

from minivit.cli import main


# ---------------------------------------------------------------- plot


def test_plot_one_run(tmp_path, capsys, figures):
    run_dir = tmp_path / "run_a"
    records = write_metrics(run_dir)
    assert main(["plot", str(run_dir)]) == 0
    assert f"wrote {run_dir / 'curves.png'}" in capsys.readouterr().out
    assert_png(run_dir / "curves.png")
    (figure,) = figures
    loss, accuracy, lr = figure.axes[:3]
    assert [ax.get_title() for ax in (loss, accuracy, lr)] == ["loss", "accuracy", "lr"]
    for split in ("train", "test"):
        rows = [r for r in records if r["split"] == split]
        assert lines_by_label(loss)[f"run_a {split}"] == ([r["step"] for r in rows],
                                                          [r["loss"] for r in rows])
        assert lines_by_label(accuracy)[f"run_a {split}"][1] == [r["accuracy"] for r in rows]
    assert lines_by_label(lr) == {"run_a train": ([10, 20, 30, 40],
                                                  [1e-3 / e for e in range(1, 5)])}


def test_plot_several_runs_by_epoch(tmp_path, monkeypatch, figures):
    monkeypatch.chdir(tmp_path)
    write_metrics(tmp_path / "run_a")
    write_metrics(tmp_path / "run_b", epochs=3, offset=1.0)
    assert main(["plot", "run_a", "run_b", "--x", "epoch"]) == 0
    assert_png(tmp_path / "comparison.png")
    loss = figures[0].axes[0]
    lines = lines_by_label(loss)
    assert set(lines) == {"run_a train", "run_a test", "run_b train", "run_b test"}
    assert lines["run_b test"] == ([1, 2, 3], [2.2 / e + 1.0 for e in (1, 2, 3)])
    assert loss.get_xlabel() == "epoch"
    assert main(["plot", "run_a", "run_b", "--out", "figs/both.png"]) == 0
    assert_png(tmp_path / "figs" / "both.png")


def test_plot_grads(tmp_path, capsys, figures):
    run_dir = tmp_path / "run_g"
    write_metrics(run_dir)
    assert main(["plot", str(run_dir), "--grads"]) == 0
    assert_png(run_dir / "grads.png")
    norms, ratios = figures[0].axes[:2]  # grouped by block: head.weight is the head's group
    assert lines_by_label(norms)["head"][1] == [0.5 / e for e in range(1, 5)]
    assert lines_by_label(ratios)["head"][1] == [2e-3 * e for e in range(1, 5)]
    assert norms.get_yscale() == "log"
    # a run without --log-grads says so
    (tmp_path / "plain" / "metrics.jsonl").parent.mkdir()
    (tmp_path / "plain" / "metrics.jsonl").write_text(json.dumps(
        {"epoch": 1, "step": 1, "split": "train", "loss": 1.0}) + "\n")
    assert main(["plot", str(tmp_path / "plain"), "--grads"]) == 1
    assert "--log-grads" in capsys.readouterr().err


def test_plot_errors(tmp_path, monkeypatch, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 1
    assert "no such run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 1
    assert "metrics.jsonl" in capsys.readouterr().err
    write_metrics(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "curves.pdf")]) == 1
    assert ".png" in capsys.readouterr().err
    # without matplotlib: one clear line, no traceback
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    assert main(["plot", str(tmp_path / "run")]) == 1
    assert "needs matplotlib" in capsys.readouterr().err
