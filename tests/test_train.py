"""The training loop: it learns, resumes exactly, survives failures with its checkpoints intact."""

import dataclasses
import json
import os

import numpy as np
import pytest
from conftest import stop_after

import minivit
from minivit.checkpoint import find_checkpoint, read_checkpoint
from minivit.cli import main
from minivit.errors import MinivitError, TrainingError
from minivit.io import load_weights
from minivit.models import model_from_checkpoint
from minivit.train import OPTIMIZER_DEFAULTS, TrainConfig, train

# A small, quick configuration: 2-block digits model, a few epochs.
QUICK = dict(dataset="digits", model="vit_digits", epochs=3, warmup=1, lr=2e-3, batch_size=32,
             drop_path=0.0, label_smoothing=0.0, augment=False, progress=False)


def quick_config(tmp_path, name="run", **overrides):
    return TrainConfig(**dict(QUICK, out=str(tmp_path / name), **overrides))


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_training_learns(tmp_path):
    summary = train(quick_config(tmp_path, epochs=4))
    records = read_metrics(tmp_path / "run")
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert train_losses[-1] < 0.7 * train_losses[0]
    assert summary["test_accuracy"] > 0.5  # chance is 0.1
    assert {"epoch", "step", "time", "lr", "images_per_s"} <= set(records[0])
    assert (tmp_path / "run" / "best.safetensors").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 4


def test_sgd_has_its_own_defaults_and_learns(tmp_path):
    """AdamW's lr and decoupled decay left SGD at chance accuracy (its decay is an L2 term):
    --optimizer sgd without --lr/--weight-decay takes SGD's own, and learns."""
    assert OPTIMIZER_DEFAULTS == {"adamw": {"lr": 2e-3, "weight_decay": 0.05},
                                  "sgd": {"lr": 0.1, "weight_decay": 5e-4}}
    # unset until train() resolves them, so that switching the optimizer switches them too
    config = dataclasses.replace(quick_config(tmp_path, lr=None), optimizer="sgd", epochs=6)
    train(config)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["lr"], saved["weight_decay"]) == (0.1, 5e-4)  # the values it trained with
    train_losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert train_losses[-1] < 0.85 * train_losses[0]
    train(quick_config(tmp_path, "given", optimizer="sgd", lr=0.3, epochs=1))
    saved = json.loads((tmp_path / "given" / "config.json").read_text())
    assert (saved["lr"], saved["weight_decay"]) == (0.3, 5e-4)


def test_unknown_optimizer_or_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(MinivitError, match="unknown optimizer 'rmsprop'; known: adamw, sgd"):
        train(quick_config(tmp_path, optimizer="rmsprop", lr=None))
    with pytest.raises(MinivitError, match="unknown dataset 'imagenet'"):
        train(quick_config(tmp_path, dataset="imagenet"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_log_grads_records_each_epochs_last_step(tmp_path):
    train(quick_config(tmp_path, log_grads=True, clip_grad=1.0))
    grads = [r for r in read_metrics(tmp_path / "run") if r["split"] == "grads"]
    assert [r["epoch"] for r in grads] == [1, 2, 3]
    names = {name for name, _ in minivit.models.create_model("vit_digits").named_parameters()}
    for record in grads:
        norms, ratios = record["grad_norms"], record["update_ratios"]
        assert set(norms) == set(ratios) == names
        assert all(np.isfinite(list(norms.values()))) and all(v > 0 for v in ratios.values())
        # the per-parameter norms make up the step's gradient, clipped to --clip-grad
        assert 0 < np.sqrt(sum(v * v for v in norms.values())) <= 1.0 + 1e-5


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


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    config = quick_config(tmp_path, epochs=2)
    calls = []

    def fail_on_second_epoch(epoch, summary):
        calls.append(epoch)

    train(quick_config(tmp_path, epochs=1))
    last = tmp_path / "run" / "last.safetensors"
    before = last.read_bytes()

    import safetensors.numpy

    def broken_save(state, path, metadata=None):
        with open(path, "wb") as file:
            file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken_save)
    with pytest.raises(Exception, match="disk full"):
        train(TrainConfig(**dict(vars(config), resume=True)), on_epoch_end=fail_on_second_epoch)
    assert last.read_bytes() == before  # the last good checkpoint is intact
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp.safetensors")
                or ".tmp" in p.name]
    monkeypatch.undo()
    model, info = model_from_checkpoint(last)
    assert info["epoch"] == 1


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the message says it all: no NumPy noise
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    train(quick_config(tmp_path, epochs=1))
    last, saved = tmp_path / "run" / "last.safetensors", tmp_path / "run" / "config.json"
    before = last.read_bytes()
    # a run whose learning rate blows it up after its first epoch: a resume keeps its lr
    saved.write_text(json.dumps(dict(json.loads(saved.read_text()), lr=1e30, clip_grad=0.0)))
    with pytest.raises(TrainingError, match=r"loss became (nan|inf).*The last good checkpoint "
                                            r"is kept in .*last.safetensors") as error:
        train(TrainConfig(out=str(tmp_path / "run"), epochs=2, resume=True))
    assert last.read_bytes() == before
    # a resume (which keeps --lr) would blow up again: the advice is a new start
    assert "start again with a lower --lr (or with --clip-grad on) and --overwrite" in \
        str(error.value)
    # blown up within the first epoch: there is no checkpoint, and the message says so
    with pytest.raises(TrainingError, match="No checkpoint was written") as error:
        train(quick_config(tmp_path, "first", epochs=1, lr=1e30, clip_grad=0.0))
    assert "kept" not in str(error.value)


def test_resume_of_a_damaged_run_folder_says_what_is_damaged(tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert main(["train", "--epochs", "2", "--batch-size", "256", "--out", str(run_dir),
                 "--quiet"]) == 0
    config_text = (run_dir / "config.json").read_text()
    resume = ["train", "--out", str(run_dir), "--resume", "--epochs", "3", "--quiet"]
    saved = json.loads(config_text)
    for damage, expected in (("{bad", "config.json is damaged (Expecting"),
                             ("[]", "holds a JSON list"),
                             (json.dumps(dict(saved, lr="abc")), 'lr is "abc", expected float'),
                             (json.dumps(dict(saved, epochs=2.5)), "epochs is 2.5, expected int")):
        (run_dir / "config.json").write_text(damage)
        assert main(resume) == 1
        assert expected in capsys.readouterr().err
    (run_dir / "config.json").write_text(config_text)
    # a metrics line damaged in the middle stops the resume; the run's files stay as they were
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    kept = {name: (run_dir / name).read_bytes() for name in ("last.safetensors", "config.json")}
    for bad_line in (metrics[1][:10], '{"epoch": null, "split": "test"}'):
        damaged = "\n".join([metrics[0], bad_line] + metrics[2:]) + "\n"
        (run_dir / "metrics.jsonl").write_text(damaged)
        assert main(resume) == 1
        assert "metrics.jsonl line 2 is damaged" in capsys.readouterr().err
        assert (run_dir / "metrics.jsonl").read_text() == damaged
        assert {name: (run_dir / name).read_bytes() for name in kept} == kept  # not --epochs 3
    # an interruption while epoch 3's records were written leaves a line cut short after the
    # checkpoint of epoch 2: it is dropped, epoch 3 is trained again, nothing else is lost
    cut = json.dumps({"epoch": 3, "step": 99, "split": "train", "loss": 1.0})[:20]
    (run_dir / "metrics.jsonl").write_text("\n".join(metrics + [cut]))
    assert main(resume) == 0
    records = [(r["epoch"], r["split"]) for r in read_metrics(run_dir)]
    assert records == [(e, split) for e in (1, 2, 3) for split in ("train", "test")]


def test_resume_without_last_checkpoint_does_not_advise_deleting_the_rest(tmp_path, capsys):
    run_dir = tmp_path / "r"
    train(quick_config(tmp_path, "r", epochs=1))
    (run_dir / "last.safetensors").unlink()
    assert main(["train", "--out", str(run_dir), "--resume", "--epochs", "2", "--quiet"]) == 1
    error = " ".join(capsys.readouterr().err.split())
    assert "has no last checkpoint" in error and "best.safetensors, metrics.jsonl" in error
    assert "put it back to resume" in error and "--out OTHER" in error
    assert "--overwrite starts this run again and deletes them" in error
    assert (run_dir / "best.safetensors").exists()


def test_negative_seed_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--seed", "-1", "--out", str(tmp_path / "s"), "--quiet"]) == 1
    assert "seed must be at least 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_float64_training_step(tmp_path):
    summary = train(quick_config(tmp_path, epochs=1, dtype="float64"))
    state, _ = load_weights(tmp_path / "run" / "last.safetensors")
    assert state["pos_embed"].dtype == np.float64
    assert summary["epoch"] == 1


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


def test_ctrl_c_names_the_kept_checkpoint_and_how_to_resume(tmp_path, capsys, monkeypatch):
    import minivit.commands.train as train_command

    real_train = train_command.train

    def interrupted_in_second_epoch(config, on_epoch_end=None):
        def end(epoch, summary):
            on_epoch_end(epoch, summary)
            raise KeyboardInterrupt

        return real_train(config, on_epoch_end=end)

    monkeypatch.setattr(train_command, "train", interrupted_in_second_epoch)
    run_dir = tmp_path / "run"
    argv = ["train", "--epochs", "3", "--batch-size", "256", "--out", str(run_dir), "--quiet"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"keeps the checkpoint of epoch 1: continue with minivit train --resume --out {run_dir}" \
        in err
    assert read_checkpoint(find_checkpoint(run_dir, "last"))[2]["epoch"] == 1


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


def test_one_epoch_is_singular(tmp_path, capsys):
    assert main(["train", "--epochs", "1", "--batch-size", "256", "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0
    assert "after 1 epoch, " in capsys.readouterr().out


def test_config_records_the_augmentation_actually_applied(tmp_path):
    summary = train(quick_config(tmp_path, epochs=1, batch_size=256, augment=True))
    assert summary["epoch"] == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["augment"] is False
    _, _, info = read_checkpoint(find_checkpoint(tmp_path / "run", "last"))
    assert info["train_config"]["augment"] is False  # digits get none


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
