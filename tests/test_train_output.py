"""What a training run tells its user and leaves behind: the header, plain per-epoch lines off
a terminal, notes, config.json, time across resumes, and failed writes (read-only folders, a
full disk) reported as one clear message with advice that works."""

import errno
import json

import pytest
from conftest import stop_after
from helpers_train import QUICK, quick_config, read_metrics

from minivit.cli import main
from minivit.errors import MinivitError, TrainingError
from minivit.train import TrainConfig, train


def test_header_and_plain_epoch_lines_when_not_on_a_terminal(tmp_path, capsys):
    train(quick_config(tmp_path, epochs=2, progress=True))
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == ("minivit train: vit_digits (202,186 parameters) on digits: 1,438 train / "
                        "359 test images of 8x8x1, 10 classes")
    assert lines[1] == (f"  numpy float32, adamw lr 0.002, batch 32, 2 epochs of 45 steps; run "
                        f"folder {tmp_path / 'run'}")
    assert [line[:12] for line in lines[2:]] == ["epoch   1/2 ", "epoch   2/2 "]
    assert "\r" not in out + err and "batch/s" not in err  # no bar redraws in a log
    train(quick_config(tmp_path, epochs=3, progress=True, resume=True))
    assert capsys.readouterr().out.splitlines()[1].endswith(
        f"resuming {tmp_path / 'run'} after epoch 2 of 3")


def test_quiet_prints_nothing_but_notes(tmp_path, capsys):
    train(quick_config(tmp_path, epochs=1, warmup=3))
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("minivit train: note: the warmup (3 epochs) is longer than the training "
                   "(1 epoch): the learning rate only rises, to 33% of --lr 0.002, and never "
                   "decays; pass --warmup below --epochs\n")


def test_a_model_built_for_other_images_is_noted(tmp_path, capsys):
    train(quick_config(tmp_path, epochs=1, model="vit_cifar"))
    assert ("note: vit_cifar is configured for 32x32x3 images; it is built for digits-train's "
            "8x8x1 (4 patches of 4x4)") in capsys.readouterr().err


def test_config_json_names_the_default_model(tmp_path):
    train(TrainConfig(**dict(QUICK, model=None, epochs=1, out=str(tmp_path / "run"))))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == "vit_digits"


def test_time_continues_across_resumes(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(quick_config(tmp_path, epochs=3), on_epoch_end=stop_after(1))
    first = read_metrics(tmp_path / "run")[-1]["time"]
    with pytest.raises(KeyboardInterrupt):
        train(quick_config(tmp_path, epochs=3, resume=True), on_epoch_end=stop_after(2))
    summary = train(quick_config(tmp_path, epochs=3, resume=True))
    times = [record["time"] for record in read_metrics(tmp_path / "run")
             if record["split"] == "train"]
    assert times[0] == first and times[0] < times[1] < times[2]
    assert summary["seconds"] >= times[2]


def test_overwrite_removes_the_old_runs_plots(tmp_path):
    train(quick_config(tmp_path, epochs=1))
    for name in ("curves.png", "grads.png", "mine.png"):
        (tmp_path / "run" / name).write_bytes(b"old")
    train(quick_config(tmp_path, epochs=1, overwrite=True))
    assert sorted(p.name for p in (tmp_path / "run").glob("*.png")) == ["mine.png"]


# -- failed writes: root ignores permissions, so the system's refusals are simulated ---------
def refuse_writes(monkeypatch, code=errno.EROFS):
    """Every atomic write and metrics rewrite fails as on a read-only filesystem."""
    import pathlib

    import minivit.train.run_folder as run_folder

    def refused(path, *args, **kwargs):
        raise OSError(code, "Read-only file system", str(path))

    monkeypatch.setattr(run_folder, "atomic_write", refused)
    monkeypatch.setattr(pathlib.Path, "write_text", refused)


def test_a_read_only_out_is_one_clear_error(tmp_path, capsys, monkeypatch):
    refuse_writes(monkeypatch)
    argv = ["train", "--epochs", "1", "--out", str(tmp_path / "ro"), "--quiet"]
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        f"minivit train: error: cannot write in the run folder {tmp_path / 'ro'} "
        f"({tmp_path / 'ro' / 'config.json'}: Read-only file system): pass --out a writable "
        f"folder\n")


def test_resuming_a_read_only_run_says_to_copy_it(tmp_path, capsys, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        train(quick_config(tmp_path, epochs=2), on_epoch_end=stop_after(1))
    refuse_writes(monkeypatch)
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "Traceback" not in err
    assert "copy the run folder to a writable place and resume it there" in err


def full_disk_on(monkeypatch, name):
    """safetensors fails (as it does on a full disk) writing checkpoint `name`."""
    import safetensors.numpy
    from safetensors import SafetensorError

    real = safetensors.numpy.save_file

    def save_file(arrays, filename, metadata=None):
        if f".{name}." in filename:
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")
        return real(arrays, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", save_file)


def test_a_full_disk_in_the_first_epoch_leaves_a_run_that_can_start_again(tmp_path, capsys,
                                                                          monkeypatch):
    full_disk_on(monkeypatch, "last")
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match="No space left on device.*No checkpoint was kept.*"
                                            "adding --overwrite") as error:
        train(quick_config(tmp_path, epochs=2))
    assert "Traceback" not in str(error.value)
    # `best` of the epoch went too: the folder is not a 'finished' run that cannot resume
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "metrics.jsonl"]
    monkeypatch.undo()
    argv = ["train", "--epochs", "2", "--batch-size", "32", "--warmup", "1", "--out",
            str(run_dir), "--quiet"]
    assert main(argv) == 1
    assert "pass --overwrite to start it again" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(run_dir), "--quiet"]) == 1
    assert "start it again with --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_a_full_disk_later_keeps_the_last_good_checkpoint_and_says_resume(tmp_path, capsys,
                                                                        monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        train(quick_config(tmp_path, epochs=2), on_epoch_end=stop_after(1))
    full_disk_on(monkeypatch, "last")
    run_dir = tmp_path / "run"
    assert main(["train", "--resume", "--out", str(run_dir), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"minivit train: error: cannot write {run_dir / 'last.safetensors'}: ")
    assert (f"The last good checkpoint is kept in {run_dir / 'last.safetensors'}: continue with "
            f"minivit train --resume --out {run_dir} once the disk has room") in err
    monkeypatch.undo()
    assert main(["train", "--resume", "--out", str(run_dir), "--quiet"]) == 0


def test_a_full_disk_while_writing_metrics_is_a_training_error(tmp_path, monkeypatch):
    import minivit.train.run_folder as run_folder

    def disk_full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(run_folder.MetricsLog, "write", disk_full)
    with pytest.raises(TrainingError, match=r"cannot write .*metrics.jsonl: No space left on "
                                            r"device\. Training stopped"):
        train(quick_config(tmp_path, epochs=1))


def test_a_train_option_the_run_cannot_use_is_still_refused_first(tmp_path):
    with pytest.raises(MinivitError, match="epochs must be at least 1"):
        train(quick_config(tmp_path, epochs=0))
    assert not (tmp_path / "run").exists()
