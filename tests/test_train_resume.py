"""Resuming a training run: bit for bit the straight run (from Python and the command line),
with the run's saved options (a Python resume refuses options that differ from them).
"""

import json
import os

import numpy as np
import pytest
from conftest import stop_after
from helpers_train import quick_config, read_metrics

from minivit.checkpoint import find_checkpoint, read_checkpoint
from minivit.cli import main
from minivit.errors import MinivitError
from minivit.io import load_weights
from minivit.train import TrainConfig, train


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path):
    options = dict(epochs=2, drop_path=0.1, label_smoothing=0.1)  # random numbers matter too
    train(quick_config(tmp_path, "straight", **options))
    with pytest.raises(KeyboardInterrupt):
        train(quick_config(tmp_path, "resumed", **options), on_epoch_end=stop_after(1))
    train(quick_config(tmp_path, "resumed", resume=True, **options))

    straight, _ = load_weights(tmp_path / "straight" / "last.safetensors")
    resumed, _ = load_weights(tmp_path / "resumed" / "last.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:  # model weights and optimizer moments alike
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)
    epochs = [r["epoch"] for r in read_metrics(tmp_path / "resumed") if r["split"] == "train"]
    assert epochs == [1, 2]


# digits with the default recipe (CutMix), drop-path and label smoothing: 2 epochs of 6 steps
DEFAULT_RECIPE_RUN = dict(epochs=2, warmup=1, batch_size=256, progress=False)


@pytest.fixture(scope="module")
def straight_default_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(TrainConfig(out=str(run_dir), **DEFAULT_RECIPE_RUN))
    return run_dir


@pytest.mark.parametrize("given", [{}, {"epochs": 2}, DEFAULT_RECIPE_RUN],
                         ids=["nothing", "epochs", "the-same-options"])
def test_a_python_resume_takes_the_runs_saved_options(tmp_path, straight_default_run, given):
    """train(TrainConfig(out=RUN, resume=True, ...)) continues RUN with its config.json (the
    digits' default CutMix, its batch size and length included) bit for bit as the straight
    run, whether the options it was started with are given again or not."""
    def planned_two_epochs(epoch, summary):  # the run's own length, not the default 100
        assert summary["epochs"] == 2

    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(run_dir), **DEFAULT_RECIPE_RUN), on_epoch_end=stop_after(1))
    train(TrainConfig(**dict(given, out=str(run_dir), resume=True)),
          on_epoch_end=planned_two_epochs)
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["cutmix"], saved["batch_size"], saved["epochs"]) == (1.0, 256, 2)
    straight, _ = load_weights(straight_default_run / "last.safetensors")
    resumed, _ = load_weights(run_dir / "last.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:  # model weights and optimizer moments alike
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)


def test_a_python_resume_refuses_options_that_differ_from_the_runs(tmp_path):
    run_dir = tmp_path / "run"
    train(quick_config(tmp_path, epochs=1, batch_size=256))
    before = (run_dir / "last.safetensors").read_bytes()
    with pytest.raises(MinivitError) as error:  # epochs may change, the others may not
        train(quick_config(tmp_path, epochs=2, batch_size=32, log_grads=True, resume=True))
    assert str(error.value) == (
        f"--resume continues {run_dir} with the configuration saved in its config.json, and "
        f"these options differ from it: --batch-size 32 (saved: 256), --log-grads (saved: "
        f"log-grads false). Leave them out to continue the run as it was, or start a new run "
        f"with --out OTHER (or, without --resume, --overwrite to replace this one)")
    assert (run_dir / "last.safetensors").read_bytes() == before
    assert [r["epoch"] for r in read_metrics(run_dir) if r["split"] == "train"] == [1]


def test_resume_through_the_cli(tmp_path, capsys):
    run_dir = tmp_path / "cli"
    common = ["--epochs", "1", "--batch-size", "256", "--out", str(run_dir), "--quiet"]
    assert main(["train", "--model", "vit_digits", *common]) == 0
    assert main(["train", "--resume", "--out", str(run_dir), "--epochs", "2", "--quiet"]) == 0
    assert "after 2 epochs" in capsys.readouterr().out
    _, _, info = read_checkpoint(find_checkpoint(run_dir, "last"))
    assert info["epoch"] == 2
    assert main(["eval", "--checkpoint", str(run_dir)]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_resume_without_a_run_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", "--out", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_resume_without_epochs_keeps_the_runs_own(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        train(quick_config(tmp_path, epochs=2, batch_size=256), on_epoch_end=stop_after(1))
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "after 2 epochs" in capsys.readouterr().out  # not the default 100
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 2


def test_a_run_folder_reused_with_another_format_resumes_from_the_newer_checkpoint(tmp_path):
    train(quick_config(tmp_path, epochs=1, batch_size=256))
    run_dir = tmp_path / "run"
    stale, stale_time = (run_dir / "last.safetensors").read_bytes(), \
        (run_dir / "last.safetensors").stat().st_mtime_ns
    train(quick_config(tmp_path, epochs=2, batch_size=256, checkpoint_format="npz",
                       overwrite=True))
    assert not (run_dir / "last.safetensors").exists()  # --overwrite removed the first run's
    (run_dir / "last.safetensors").write_bytes(stale)  # as minivit before --overwrite left it
    os.utime(run_dir / "last.safetensors", ns=(stale_time, stale_time))
    assert find_checkpoint(run_dir, "last").name == "last.npz"
    summary = train(quick_config(tmp_path, epochs=3, batch_size=256, checkpoint_format="npz",
                                 resume=True))
    epochs = [r["epoch"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert epochs == [1, 2, 3] and summary["epoch"] == 3  # went on from epoch 2, not 1
