"""The command line as a new user meets it: closed pipes, unknown flags, help texts, eval and
attention finding the run's data, predict going on past a bad file, plots with labels and
grouped gradients, and outputs that cannot be written."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_commands import assert_png, figures, lines_by_label, write_metrics  # noqa: F401

from minivit.cli import build_parser, main
from minivit.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A one-epoch digits run whose config records a data folder of its own."""
    from minivit.data import load_dataset

    base = tmp_path_factory.mktemp("user")
    run_dir = base / "run"
    train(TrainConfig(dataset="digits", model="vit_digits", epochs=1, warmup=0, batch_size=256,
                      augment=False, progress=False, out=str(run_dir),
                      data_dir=str(base / "data")))
    return run_dir, load_dataset("digits", "test")


@pytest.mark.parametrize("argv", [["info", "--list"], ["gradcheck", "--op", "add"],
                                  ["info", "vit_digits"]])
def test_output_into_a_closed_pipe_ends_quietly(argv):
    """As `minivit info --list | head -2` once head has exited: no BrokenPipeError traceback,
    the status of a process stopped by SIGPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "minivit.cli", *argv], stdout=write_end,
                              stderr=subprocess.PIPE, cwd=ROOT, timeout=300,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    finally:
        os.close(write_end)
    assert done.stderr.decode() == ""
    assert done.returncode == 141


def test_an_unknown_flag_shows_the_sub_commands_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--bogus-flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: minivit train ")
    assert err.endswith("minivit train: error: unrecognized arguments: --bogus-flag\n")


def test_every_option_of_every_command_has_help():
    parsers = build_parser().parse_args(["info", "--list"]).command_parsers
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, parser in parsers.items() for action in parser._actions
               if not action.help]
    assert missing == []


# -- eval and attention read the run's data folder and say which checkpoint -------------------
def test_eval_uses_the_runs_data_folder_and_names_the_checkpoint(trained_run, tmp_path,
                                                                 monkeypatch, capsys):
    import minivit.commands.eval as eval_command

    run_dir, _ = trained_run
    asked = []
    real_load = eval_command.load_dataset

    def recording(name, split="train", data_dir=None):
        asked.append(data_dir)
        return real_load(name, split, data_dir)

    monkeypatch.setattr(eval_command, "load_dataset", recording)
    monkeypatch.chdir(tmp_path)  # no ./data here
    assert main(["eval", "--checkpoint", str(run_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert asked == [str(run_dir.parent / "data")]
    assert out[0].startswith(f"checkpoint {run_dir / 'best.safetensors'} (epoch 1 of 1, test "
                             f"accuracy ")
    assert out[1].startswith("digits-test: 359 images, loss ")
    assert main(["eval", "--checkpoint", str(run_dir / "last.safetensors"), "--data-dir",
                 "elsewhere"]) == 0
    assert asked[-1] == "elsewhere"
    assert capsys.readouterr().out.startswith(f"checkpoint {run_dir / 'last.safetensors'} "
                                              f"(epoch 1 of 1")


def test_a_missing_dataset_names_the_data_dir_flag(tmp_path, capsys):
    from minivit.checkpoint import save_checkpoint
    from minivit.models import create_model

    model = create_model("vit_mnist", depth=1, embed_dim=16, num_heads=2)
    save_checkpoint(tmp_path / "best.safetensors", model,
                    {"dataset": "mnist", "train_config": {"data_dir": str(tmp_path / "mine")}})
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "mine" / "t10k-images-idx3-ubyte") in err  # the run's folder
    assert "--data-dir" in err and "another data_dir" not in err
    assert main(["attention", "--checkpoint", str(tmp_path), "--index", "0"]) == 1
    assert str(tmp_path / "mine" / "t10k-images-idx3-ubyte") in capsys.readouterr().err


def test_attention_figure_names_the_block_of_its_heads(trained_run, tmp_path, monkeypatch,
                                                       figures):  # noqa: F811
    run_dir, _ = trained_run
    monkeypatch.chdir(tmp_path)
    assert main(["attention", "--checkpoint", str(run_dir), "--index", "0"]) == 0
    titles = [ax.get_title() for ax in figures[0].axes]
    depth = 4  # vit_digits
    assert titles[1] == f"block {depth - 1}, head 0"
    assert f"rollout, blocks 0-{depth - 1}" in titles


def test_attention_compare_names_each_model_and_refuses_another_image_size(
        trained_run, tmp_path, capsys):
    from minivit.checkpoint import save_checkpoint
    from minivit.models import create_model

    run_dir, test_set = trained_run
    out = tmp_path / "same.png"
    assert main(["attention", "--checkpoint", str(run_dir), "--compare", str(run_dir),
                 "--index", "3", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"classifier run ({run_dir}): ")
    assert lines[2].startswith(f"classifier run (2) ({run_dir}): ")  # the same run twice
    assert lines[1] == lines[3] and f", true {test_set.labels[3]}" in lines[1]
    assert out.exists()
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    save_checkpoint(mnist / "best.safetensors", create_model("vit_mnist", depth=1, embed_dim=16,
                                                             num_heads=2), {"dataset": "mnist"})
    out = tmp_path / "other.png"
    assert main(["attention", "--checkpoint", str(run_dir), "--compare", str(mnist), "--index",
                 "0", "--out", str(out)]) == 1
    assert "takes (C, H, W) = (1, 28, 28) images, the images are (1, 8, 8)" in \
        capsys.readouterr().err
    assert not out.exists()


# -- predict reports a bad file and goes on ---------------------------------------------------
def test_predict_goes_on_past_a_bad_file(trained_run, tmp_path, capsys):
    run_dir, test_set = trained_run
    np.save(tmp_path / "a.npy", test_set.images[0])
    np.save(tmp_path / "b.npy", test_set.images[1])
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    files = [str(tmp_path / name) for name in ("a.npy", "bad.npy", "missing.png", "b.npy")]
    assert main(["predict", "--checkpoint", str(run_dir), *files, "--top-k", "1"]) == 1
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if not line.startswith(" ")] == [
        files[0] + ":", files[3] + ":"]
    assert "bad.npy: cannot read as .npy" in err and "missing.png: no such file" in err
    assert err.splitlines()[-1] == (f"minivit predict: 2 of 4 files could not be read: "
                                    f"{files[1]}, {files[2]}")
    assert main(["predict", "--checkpoint", str(run_dir), files[1]]) == 1
    assert "none of the 1 file(s) could be read" in capsys.readouterr().err


# -- plots: labelled axes, grouped gradients, and outputs that cannot be written ---------------
def test_plots_label_their_axes_with_units(tmp_path, figures):  # noqa: F811
    write_metrics(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run"), "--x", "time"]) == 0
    loss, accuracy, lr = figures[0].axes[:3]
    assert {ax.get_xlabel() for ax in (loss, accuracy, lr)} == {"training time (s)"}
    assert [ax.get_ylabel() for ax in (loss, accuracy, lr)] == [
        "cross-entropy loss", "accuracy (fraction correct)", "learning rate"]


def test_plot_grads_groups_by_block_and_layer_type_with_legends(tmp_path, figures):  # noqa: F811
    import json

    from minivit.models import create_model

    names = [name for name, _ in create_model("vit_digits").named_parameters()]  # 4 blocks
    records = [{"epoch": e, "step": 10 * e, "time": e, "split": "grads",
                "grad_norms": {name: float(e) for name in names},
                "update_ratios": {name: 0.01 * e for name in names}} for e in (1, 2)]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                            for r in records))
    assert main(["plot", str(tmp_path / "run"), "--grads"]) == 0
    norms_by_block, ratios_by_block, norms_by_type, ratios_by_type = figures[0].axes[:4]
    by_block = lines_by_label(norms_by_block)
    assert list(by_block) == ["embedding", "block 0", "block 1", "block 2", "block 3", "head"]
    # a block's 12 parameters of norm e: √(12 e²)
    assert by_block["block 2"] == ([10, 20], [np.sqrt(12), np.sqrt(12) * 2])
    assert set(lines_by_label(norms_by_type)) == {"attn.proj", "attn.qkv", "head", "mlp.fc1",
                                                  "mlp.fc2", "norms", "patch_embed", "tokens"}
    assert lines_by_label(ratios_by_type)["mlp.fc1"][1] == pytest.approx([0.01, 0.02])
    for ax in (norms_by_block, ratios_by_block, norms_by_type, ratios_by_type):
        assert ax.get_legend() is not None and ax.get_xlabel() == "training step"
    assert ratios_by_block.get_ylabel() == "update / weight ‖Δθ‖/‖θ‖"


@pytest.mark.parametrize("argv, out", [
    (["plot", "{run}"], "{run}/curves.png"),
    (["plot", "{run}", "--out", "{ro}/x.png"], "{ro}/x.png"),
    (["attention", "--checkpoint", "{run}", "--index", "0", "--out", "{ro}/a.png"],
     "{ro}/a.png"),
])
def test_a_figure_that_cannot_be_written_is_one_clear_error(trained_run, tmp_path, monkeypatch,
                                                            capsys, argv, out):
    """Root ignores permissions: matplotlib's write is refused as on a read-only filesystem."""
    from matplotlib.figure import Figure

    def read_only(self, path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(Figure, "savefig", read_only)
    run_dir, _ = trained_run
    values = {"run": run_dir, "ro": tmp_path}
    assert main([part.format(**values) for part in argv]) == 1
    assert capsys.readouterr().err.endswith(
        f"error: cannot write {out.format(**values)}: Read-only file system; pass --out a .png "
        f"file in a folder that can be written\n")


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pth"])
def test_convert_into_a_full_disk_is_one_clear_error(trained_run, tmp_path, monkeypatch, capsys,
                                                     suffix):
    """Each writer fails its own way on a full disk: OSError, SafetensorError, RuntimeError."""
    if suffix == ".pth":
        torch = pytest.importorskip("torch")

        def full(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

        monkeypatch.setattr(torch, "save", full)
    elif suffix == ".safetensors":
        from test_train_output import full_disk_on

        full_disk_on(monkeypatch, "w")
    else:
        import zipfile

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(zipfile.ZipFile, "open", full)
    run_dir, _ = trained_run
    destination = tmp_path / f"w{suffix}"
    assert main(["convert", str(run_dir / "best.safetensors"), str(destination)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"minivit convert: error: cannot write {destination}: ")
    assert err.endswith("check that its folder exists, is writable and has room\n")
    assert ".tmp" not in err and list(tmp_path.iterdir()) == []


def test_attention_goes_on_past_a_bad_file(trained_run, tmp_path, monkeypatch, capsys):
    run_dir, test_set = trained_run
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "a.npy", test_set.images[0])
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    assert main(["attention", "--checkpoint", str(run_dir), "bad.npy", "a.npy"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("a.npy: predicted ") and (tmp_path / "a_attention.png").exists()
    assert "bad.npy: cannot read as .npy" in err
    assert err.splitlines()[-1] == "minivit attention: 1 of 2 files could not be read: bad.npy"


def test_ctrl_c_after_the_last_checkpoint_does_not_advise_a_resume(tmp_path, capsys,
                                                                   monkeypatch):
    import minivit.commands.train as train_command

    real_train = train_command.train

    def interrupted_at_the_end(config, on_epoch_end=None):
        def end(epoch, summary):
            on_epoch_end(epoch, summary)
            if epoch == config.epochs:
                raise KeyboardInterrupt
        return real_train(config, on_epoch_end=end)

    monkeypatch.setattr(train_command, "train", interrupted_at_the_end)
    run_dir = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--warmup", "0", "--batch-size", "256", "--out",
                 str(run_dir), "--quiet"]) == 130
    assert capsys.readouterr().err == (f"minivit train: interrupted after the last epoch's "
                                       f"checkpoint; the run in {run_dir} is complete\n")


def test_eval_of_a_checkpoint_that_names_no_dataset_asks_for_one(tmp_path, capsys):
    from minivit.checkpoint import save_checkpoint
    from minivit.models import create_model

    path = tmp_path / "plain.safetensors"
    save_checkpoint(path, create_model("vit_digits", depth=1, embed_dim=16, num_heads=2), {})
    assert main(["eval", "--checkpoint", str(path)]) == 1  # was KeyError: 'dataset'
    assert capsys.readouterr().err == (f"minivit eval: error: {path} names no dataset (it was not "
                                       f"written by minivit train): pass --dataset NAME\n")
    assert main(["eval", "--checkpoint", str(path), "--dataset", "digits"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"checkpoint {path}"
