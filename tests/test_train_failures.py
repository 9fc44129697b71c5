"""Training runs that fail keep their checkpoints intact: a failed checkpoint write, a NaN loss,
a damaged run folder, a missing last checkpoint, Ctrl-C.
"""

import json

import pytest
from helpers_train import quick_config, read_metrics

from minivit.checkpoint import find_checkpoint, read_checkpoint
from minivit.cli import main
from minivit.errors import TrainingError
from minivit.models import model_from_checkpoint
from minivit.train import TrainConfig, train


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
