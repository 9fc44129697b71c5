"""The scripts in examples/ run as their docstrings say."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_train_digits_example_learns_in_four_epochs():
    result = subprocess.run([sys.executable, str(EXAMPLES / "train_digits.py"), "--epochs", "4"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert [line.split(":")[0].split()[-1] for line in lines] == ["1", "2", "3", "4"]
    accuracy = float(lines[-1].split()[-1])
    assert accuracy > 0.2  # chance is 0.1; 0.30 here after 4 epochs (the warm-up takes one)


def test_train_digits_example_help_does_not_train():
    result = subprocess.run([sys.executable, str(EXAMPLES / "train_digits.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--epochs" in result.stdout
    assert "epoch" not in result.stdout.replace("--epochs", "").replace("EPOCHS", "")


def test_family_experiments_script_writes_its_table_and_plot(tmp_path):
    """One epoch, one seed per arm of the position ablation (the published numbers come from
    the command in docs/family.md)."""
    result = subprocess.run([sys.executable, str(EXAMPLES / "family_experiments.py"), "positions",
                             "--epochs", "1", "--seeds", "0", "--runs", str(tmp_path / "runs"),
                             "--out", str(tmp_path / "docs")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "docs" / "position_ablation.json").read_text())
    assert list(summary["arms"]) == ["none", "learn (1-D)", "2d (row + col)",
                                     "sincos (fixed 2-D)", "relative bias"]
    assert all(0.0 <= arm["mean"] <= 1.0 for arm in summary["arms"].values())
    assert (tmp_path / "docs" / "position_ablation.png").read_bytes().startswith(b"\x89PNG")
    assert "| relative bias |" in (tmp_path / "docs" / "position_ablation.md").read_text()


def test_digits_folder_example_trains_fine_tunes_and_predicts(tmp_path):
    pytest.importorskip("PIL")
    result = subprocess.run([sys.executable, str(EXAMPLES / "digits_folder.py"), "--epochs", "1",
                             "--work-dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("skipping 3 unreadable image file(s)") == 2
    assert "has 6 classes, the model 4" in result.stderr  # the new head
    assert sorted(p.name for p in (tmp_path / "second" / "val").iterdir()) == ["6", "7", "8", "9"]
    predictions = result.stdout.split("$ minivit predict")[1].splitlines()[2:4]
    assert all(line.split()[1] in "6789" for line in predictions)  # the folder's class names


def test_pretraining_experiments_script_writes_its_table_and_plot(tmp_path):
    """One epoch of each pretraining and fine-tuning, one seed, a tenth of the labels (the
    published numbers come from the command in docs/pretraining.md)."""
    result = subprocess.run([sys.executable, str(EXAMPLES / "pretraining_experiments.py"),
                             "--seeds", "0", "--fractions", "0.1", "--epochs", "1",
                             "--mae-epochs", "1", "--dino-epochs", "1",
                             "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "docs")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "docs" / "pretraining_finetune.json").read_text())
    assert list(summary["arms"]) == ["10% labels, scratch", "10% labels, MAE",
                                     "10% labels, DINO"]
    assert all(len(arm["accuracies"]) == 1 for arm in summary["arms"].values())
    assert f"--init {tmp_path / 'runs' / 'dino1'} --train-fraction 0.1" in result.stdout
    assert (tmp_path / "docs" / "pretraining_finetune.png").read_bytes().startswith(b"\x89PNG")
