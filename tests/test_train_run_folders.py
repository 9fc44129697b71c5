"""Run folders: a new training run never mixes with, or silently destroys, another; a resume
refuses training options that differ from the saved ones.
"""

import json

import pytest
from conftest import stop_after
from helpers_train import QUICK, quick_config

from minivit.checkpoint import find_checkpoint, read_checkpoint
from minivit.cli import main
from minivit.errors import MinivitError
from minivit.train import TrainConfig, train


# -- run folders: a new run never mixes with, or silently destroys, another ---------------------

def run_files(run_dir):
    """{name: bytes} of everything in a run folder."""
    return {path.name: path.read_bytes() for path in sorted(run_dir.iterdir())}


def test_a_new_run_refuses_a_folder_that_holds_a_run(tmp_path, capsys):
    run_dir = tmp_path / "mix"
    assert main(["train", "--epochs", "2", "--batch-size", "256", "--out", str(run_dir),
                 "--quiet"]) == 0
    before = run_files(run_dir)
    capsys.readouterr()
    assert main(["train", "--epochs", "1", "--lr", "1e-3", "--out", str(run_dir),
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    # a finished run: --resume alone would be refused ("already trained 2 epochs")
    assert (f"{run_dir} already holds a finished run (epoch 2 of 2 done: last.safetensors, "
            f"best.safetensors, metrics.jsonl, config.json): pass --resume --epochs N (N > 2) "
            f"to train it further, --out OTHER to keep it and start another run, or --overwrite "
            f"to replace it") in err
    assert run_files(run_dir) == before  # config, metrics and checkpoints untouched
    with pytest.raises(MinivitError, match="already holds a finished run"):  # the Python API
        train(TrainConfig(**dict(QUICK, out=str(run_dir))))
    assert run_files(run_dir) == before
    assert main(["train", "--resume", "--epochs", "3", "--out", str(run_dir), "--quiet"]) == 0


def test_the_advice_for_an_unfinished_run_works(tmp_path, capsys):
    run_dir = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        train(quick_config(tmp_path, "r", epochs=2), on_epoch_end=stop_after(1))
    assert main(["train", "--epochs", "2", "--out", str(run_dir), "--quiet"]) == 1
    assert (f"{run_dir} already holds a run (epoch 1 of 2 done: last.safetensors, "
            f"best.safetensors, metrics.jsonl, config.json): pass --resume to continue it, "
            f"--out OTHER to keep it and start another run, or --overwrite to replace it"
            ) in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(run_dir), "--quiet"]) == 0


def test_an_overwritten_run_interrupted_in_its_first_epoch_cannot_resume_the_old_one(
        tmp_path, capsys, monkeypatch):
    import minivit.train.loop as loop_module

    run_dir = tmp_path / "mix"
    assert main(["train", "--epochs", "2", "--batch-size", "256", "--out", str(run_dir),
                 "--quiet"]) == 0

    def interrupt(*args, **kwargs):  # the first epoch's evaluation: before any checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "evaluate", interrupt)
    assert main(["train", "--epochs", "3", "--lr", "1e-3", "--batch-size", "128", "--overwrite",
                 "--out", str(run_dir), "--quiet"]) == 130
    monkeypatch.undo()
    assert sorted(path.name for path in run_dir.iterdir()) == ["config.json"]
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["lr"], saved["batch_size"], saved["epochs"]) == (1e-3, 128, 3)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run_dir), "--quiet"]) == 1
    assert (f"--resume: {run_dir} has no checkpoint to continue from (its run stopped before "
            f"its first checkpoint was written): start it again with --overwrite"
            ) in capsys.readouterr().err
    assert main(["train", "--epochs", "1", "--out", str(run_dir), "--quiet"]) == 1
    assert (f"{run_dir} already holds a run that stopped before its first checkpoint was written "
            f"(no epoch finished: config.json): pass --overwrite to start it again, or --out "
            f"OTHER to keep it and start another run") in capsys.readouterr().err  # no --resume


def test_overwrite_with_bad_input_keeps_the_old_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(quick_config(tmp_path, epochs=1, batch_size=256))
    before = run_files(run_dir)
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"),
                 "--overwrite", "--out", str(run_dir), "--quiet"]) == 1
    assert "mnist" in capsys.readouterr().err.lower()
    assert run_files(run_dir) == before
    assert main(["train", "--resume", "--overwrite", "--out", str(run_dir), "--quiet"]) == 1
    assert (f"--resume continues the run in {run_dir} and --overwrite replaces it: pass one of "
            f"them") in capsys.readouterr().err
    assert run_files(run_dir) == before


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    assert main(["train", "--epochs", "1", "--out", str(file), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert (f"--out {file} is a file, not a folder: pass --out a folder for the run (a new one, "
            f"or a run folder with --resume)") in err and "Traceback" not in err
    assert main(["train", "--epochs", "1", "--out", str(file / "run"), "--quiet"]) == 1
    assert f"cannot create the run folder {file / 'run'}: " in capsys.readouterr().err
    assert file.read_text() == "keep me"


def test_resume_refuses_training_options_that_differ_from_the_saved_ones(tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ["--batch-size", "256", "--out", str(run_dir), "--quiet"]
    assert main(["train", "--epochs", "1", *common]) == 0
    before = run_files(run_dir)
    capsys.readouterr()
    assert main(["train", "--resume", "--epochs", "2", "--lr", "1", "--optimizer", "sgd",
                 "--log-grads", *common]) == 1
    err = capsys.readouterr().err
    assert (f"--resume continues {run_dir} with the configuration saved in its config.json, and "
            f"these options differ from it: --lr 1.0 (saved: 0.002), --optimizer sgd (saved: "
            f"adamw), --log-grads (saved: log-grads false). Leave them out to continue the run "
            f"as it was, or start a new run with --out OTHER (or, without --resume, --overwrite "
            f"to replace this one)") in err
    assert run_files(run_dir) == before
    # options equal to the saved ones (digits get no augmentation) are fine; the data may move
    assert main(["train", "--resume", "--epochs", "2", "--model", "vit_digits", "--no-augment",
                 "--lr", "0.002", "--data-dir", str(tmp_path), *common]) == 0
    assert read_checkpoint(find_checkpoint(run_dir, "last"))[2]["epoch"] == 2
    assert json.loads((run_dir / "config.json").read_text())["data_dir"] == str(tmp_path)
