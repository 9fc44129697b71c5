"""minivit train (and eval) on the command line: its help, and bad input as a clear error."""

import json

import pytest

import minivit
from minivit.cli import main
from minivit.train import TrainConfig


def test_negative_seed_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--seed", "-1", "--out", str(tmp_path / "s"), "--quiet"]) == 1
    assert "seed must be at least 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_train_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dataset", "--data-dir", "--model", "--epochs", "--batch-size", "--lr",
                 "--weight-decay", "--warmup", "--label-smoothing", "--backend", "--dtype",
                 "--seed", "--out", "--resume"):
        assert flag in text


def test_missing_dataset_files_are_a_clear_cli_error(tmp_path, capsys):
    code = main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--quiet",
                 "--out", str(tmp_path / "run")])
    assert code == 1
    assert "mnist" in capsys.readouterr().err.lower()


def test_cupy_backend_without_cupy_is_a_clear_cli_error(tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setattr(minivit.backend, "_checked_modules", {})  # forget a GPU seen before
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert main(["train", "--backend", "cupy", "--out", str(tmp_path / "run")]) == 1
    assert "pip install 'minivit[gpu]'" in capsys.readouterr().err
    minivit.set_backend("numpy")


def test_cuda_graph_on_the_cpu_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["train", "--cuda-graph", "--out", str(tmp_path / "run"), "--quiet"]) == 1
    assert "--cuda-graph records the training step on the GPU: it needs --backend cupy, got " \
           "numpy" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_nothing_left_to_train_is_a_clear_cli_error(tmp_path, capsys):
    run_dir = tmp_path / "done"
    assert main(["train", "--epochs", "0", "--out", str(run_dir), "--quiet"]) == 1
    assert "epochs must be at least 1, got 0" in capsys.readouterr().err
    common = ["--batch-size", "256", "--out", str(run_dir), "--quiet"]
    assert main(["train", "--epochs", "1", *common]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--epochs", "1", *common]) == 1
    assert "already trained 1 epoch; pass --epochs greater than 1" in capsys.readouterr().err
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 1


@pytest.mark.parametrize("flag, value, message", [
    ("--label-smoothing", "1.5", "label-smoothing must be in [0, 1), got 1.5"),
    ("--drop-path", "1", "drop-path must be in [0, 1), got 1.0"),
    ("--lr", "-1", "lr must be positive, got -1.0"),
    ("--clip-grad", "-1", "clip-grad must be at least 0 (0: off), got -1.0"),  # flipped the grads
    ("--warmup", "-2", "warmup must be at least 0, got -2"),
])
def test_out_of_range_training_options_are_a_clear_cli_error(tmp_path, capsys, flag, value,
                                                              message):
    assert main(["train", flag, value, "--epochs", "1", "--out", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_on_a_dataset_with_more_classes_than_the_model_is_a_clear_error(tmp_path, capsys):
    from minivit.checkpoint import save_checkpoint
    from minivit.models import create_model

    model = create_model("vit_digits", depth=1, embed_dim=16, num_heads=2, num_classes=5)
    save_checkpoint(tmp_path / "best.safetensors", model, {"dataset": "digits"})
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 1  # was a ValueError traceback
    err = capsys.readouterr().err
    assert "digits-test has 10 classes, the model only 5" in err


def test_eval_on_a_dataset_of_another_image_size_names_both(tmp_path, capsys):
    from minivit.checkpoint import save_checkpoint
    from minivit.models import create_model

    model = create_model("vit_digits", depth=1, embed_dim=16, num_heads=2)
    save_checkpoint(tmp_path / "best.safetensors", model, {"dataset": "digits"})
    assert main(["eval", "--checkpoint", str(tmp_path), "--dataset", "synthetic"]) == 1
    err = capsys.readouterr().err
    assert "synthetic-test's images are 3x32x32, the model takes 1x8x8 (it was trained on " \
           "digits)" in err and "Traceback" not in err


def test_plain_weights_given_as_a_checkpoint_point_to_predict(tmp_path, capsys):
    from minivit.io import save_weights
    from minivit.models import create_model

    path = tmp_path / "plain.safetensors"
    save_weights(create_model("vit_digits", depth=1).state_dict(), path)
    assert main(["eval", "--checkpoint", str(path)]) == 1
    err = capsys.readouterr().err
    assert "not a minivit checkpoint" in err and "minivit predict --weights" in err


def test_one_epoch_is_singular(tmp_path, capsys):
    assert main(["train", "--epochs", "1", "--batch-size", "256", "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0
    assert "after 1 epoch, " in capsys.readouterr().out


def test_train_help_names_the_real_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = TrainConfig()
    for expected in ("default: 0.002 with adamw, 0.1 with sgd",
                     "default: 0.05 with adamw, 0.0005 with sgd",
                     f"default: {defaults.batch_size}",
                     f"default: {defaults.dataset}", f"default: {defaults.optimizer}",
                     f"default: {defaults.seed}", "default float32", "--overwrite",
                     f"default: {defaults.checkpoint_format}", f"default: {defaults.out}"):
        assert expected in text, expected
    assert "None" not in text
