"""minivit pretrain / probe / reconstruct / train --init on the digits: MAE's loss falls and its
encoder beats a random one; DINO's loss falls without collapse; bad input is a clear error
that writes nothing; runs resume."""

import json

import numpy as np
import pytest

import minivit.pretrain as pretraining
from minivit import backend
from minivit.checkpoint import read_checkpoint
from minivit.cli import main
from minivit.data import load_dataset
from minivit.data.subset import stratified_fraction
from minivit.errors import MinivitError
from minivit.io import load_weights
from minivit.loss_scale import LossScaler
from minivit.pretrain import PretrainConfig, pretrain

QUICK = dict(dataset="digits", model="vit_digits", batch_size=64, warmup=1, progress=False)


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("mae") / "run"
    pretrain(PretrainConfig(method="mae", epochs=4, out=str(run), **QUICK))
    return run


def test_mae_reconstruction_loss_falls(mae_run):
    losses = [r["loss"] for r in records(mae_run)]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]
    assert (mae_run / "last.safetensors").exists() and not (mae_run / "best.safetensors").exists()


def test_mae_resume_continues_the_run(mae_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(mae_run, run)
    assert main(["pretrain", "--out", str(run), "--resume", "--epochs", "5"]) == 0
    assert [r["epoch"] for r in records(run)] == [1, 2, 3, 4, 5]
    printed = capsys.readouterr()  # not a terminal: plain epoch lines, no progress bar
    assert "epoch   5/5  loss" in printed.out and "batch" not in printed.err
    assert main(["pretrain", "--out", str(run), "--resume", "--mask-ratio", "0.5"]) == 1
    assert "--mask-ratio 0.5 (saved: 0.75)" in capsys.readouterr().err


def test_a_python_resume_takes_the_runs_saved_options(mae_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(mae_run, run)
    with pytest.raises(MinivitError, match=r"these options differ from it: --mask-ratio 0.5 "
                                           r"\(saved: 0.75\)"):
        pretrain(PretrainConfig(out=str(run), resume=True, epochs=5, mask_ratio=0.5))
    assert [r["epoch"] for r in records(run)] == [1, 2, 3, 4]
    # the run's warmup (1 epoch, not MAE's default 5), batch size and model go on
    pretrain(PretrainConfig(out=str(run), resume=True, epochs=5, progress=False))
    saved = json.loads((run / "config.json").read_text())
    original = json.loads((mae_run / "config.json").read_text())
    assert saved == dict(original, epochs=5, resume=True, out=str(run))
    assert [r["epoch"] for r in records(run)] == [1, 2, 3, 4, 5]


def test_probe_of_the_mae_encoder_beats_random_init(mae_run, capsys):
    assert main(["probe", str(mae_run), "--linear-epochs", "20"]) == 0
    trained = capsys.readouterr().out
    assert main(["probe", "--random", "--dataset", "digits", "--linear-epochs", "20"]) == 0
    random = capsys.readouterr().out

    def accuracy(text, kind):
        line = next(line for line in text.splitlines() if line.startswith(kind))
        return float(line.split()[-1])

    assert accuracy(trained, "k-NN") > accuracy(random, "k-NN") + 0.1
    assert accuracy(trained, "linear") > accuracy(random, "linear") + 0.1


def test_reconstruct_draws_a_png(mae_run, tmp_path, capsys):
    out = tmp_path / "rec.png"
    assert main(["reconstruct", str(mae_run), "--index", "0", "3", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["reconstruct", str(mae_run), "--index", "100000"]) == 1
    assert "--index 100000 is outside" in capsys.readouterr().err


def test_fine_tuning_from_the_mae_encoder_on_a_tenth_of_the_labels(mae_run, tmp_path):
    run = tmp_path / "ft"
    assert main(["train", "--init", str(mae_run), "--train-fraction", "0.1", "--epochs", "1",
                 "--out", str(run), "--quiet"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["init"] == str(mae_run) and saved["train_fraction"] == 0.1


def test_train_fraction_is_stratified():
    digits = load_dataset("digits", "train")
    part = stratified_fraction(digits, 0.1, seed=3)
    full = np.bincount(digits.labels)
    np.testing.assert_array_equal(np.bincount(part.labels), np.round(full * 0.1).astype(int))
    assert stratified_fraction(digits, 1.0) is digits


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--method", "mae", "--mask-ratio", "1.5"], "--mask-ratio must be in (0, 1)"),
    (["pretrain", "--method", "mae", "--mask-ratio", "0"], "--mask-ratio must be in (0, 1)"),
    (["pretrain", "--method", "dino", "--local-crop-size", "5"],
     "local crop size must be a positive multiple of the patch size 2, got 5"),
    (["train", "--train-fraction", "0"], "--train-fraction must be in (0, 1]"),
    (["pretrain", "--lr", "-1"], "--lr must be positive, got -1.0"),  # train's checks
    (["pretrain", "--method", "dino", "--seed", "-1"], "--seed must be at least 0, got -1"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv + ["--out", str(out), "--quiet"]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command", [["eval", "--checkpoint"], ["predict", "--checkpoint"],
                                     ["info"]])
def test_a_pretrain_run_given_to_a_classifier_command_says_what_to_do(mae_run, command,
                                                                      capsys):
    assert main(command + [str(mae_run)] + (["x.npy"] if command[0] == "predict" else [])) == 1
    err = capsys.readouterr().err
    assert "is a minivit pretrain run (mae)" in err and f"train --init {mae_run}" in err


def test_a_run_given_to_the_other_command_names_the_one_to_use(mae_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "mae"
    shutil.copytree(mae_run, run)
    assert main(["train", "--out", str(run), "--resume", "--epochs", "9", "--quiet"]) == 1
    assert f"is a minivit pretrain run (mae): continue it with `minivit pretrain --out {run} " \
        f"--resume`" in capsys.readouterr().err
    trained = tmp_path / "ft"
    assert main(["train", "--init", str(mae_run), "--train-fraction", "0.1", "--epochs", "1",
                 "--out", str(trained), "--quiet"]) == 0
    assert main(["pretrain", "--out", str(trained), "--resume", "--epochs", "9"]) == 1
    assert f"is a minivit train run: continue it with `minivit train --out {trained} " \
        f"--resume`" in capsys.readouterr().err
    assert main(["reconstruct", str(trained), "--out", str(tmp_path / "r.png")]) == 1
    assert "give a run folder of `minivit pretrain --method mae`" in capsys.readouterr().err
    assert [r["epoch"] for r in records(run)] == [1, 2, 3, 4]


def test_init_with_another_architecture_is_refused(mae_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--init", str(mae_run), "--model", "vit_mnist", "--out", str(out),
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "its encoder does not fit the model being trained" in err
    assert "patch_embed.proj.weight" in err
    assert not out.exists()


def test_a_nan_loss_stops_with_a_clear_message(tmp_path):
    from minivit.errors import TrainingError

    with pytest.raises(TrainingError, match="the loss became nan at epoch 1.*No checkpoint"):
        pretrain(PretrainConfig(**dict(QUICK, method="mae", epochs=2, lr=1e9, warmup=0,
                                       out=str(tmp_path / "r"))))
    assert not list((tmp_path / "r").glob("last.*"))


DINO_SMALL = dict(QUICK, method="dino", out_dim=32, head_hidden_dim=64, head_bottleneck_dim=16,
                  local_crops=2)


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dino") / "run"
    pretrain(PretrainConfig(**dict(DINO_SMALL, epochs=1, out=str(run))))
    return run


def test_dino_run_logs_collapse_metrics_freezes_the_last_layer_and_moves_the_teacher(
        dino_run, tmp_path):
    import shutil

    from minivit.checkpoint import read_checkpoint

    run = tmp_path / "dino"
    shutil.copytree(dino_run, run)
    state, _, info = read_checkpoint(run / "last.safetensors")
    assert info["method"] == "dino" and info["epoch"] == 1
    # epoch 0: the student's last layer is frozen (the decoupled weight decay only rescales
    # its rows, which the weight normalisation divides out)
    student_v = state["student.head.last_layer.weight_v"]
    teacher_v = state["teacher.head.last_layer.weight_v"]
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(unit(student_v), unit(teacher_v), atol=1e-6)
    # the teacher is an EMA of the student: it moved, but less than the student
    s, t = state["student.backbone.blocks.0.attn.qkv.weight"], \
        state["teacher.backbone.blocks.0.attn.qkv.weight"]
    assert 0 < np.abs(t - s).max()
    assert np.linalg.norm(state["center"]) > 0
    record = records(run)[0]
    log_k = np.log(32)
    assert 0 < record["teacher_entropy"] <= record["teacher_marginal_entropy"] <= log_k + 1e-6
    assert np.isfinite(record["loss"]) and record["center_norm"] > 0

    pretrain(PretrainConfig(**dict(DINO_SMALL, epochs=2, out=str(run), resume=True)))
    state2, _, _ = read_checkpoint(run / "last.safetensors")
    assert not np.allclose(unit(state2["student.head.last_layer.weight_v"]), unit(student_v))
    assert [r["epoch"] for r in records(run)] == [1, 2]


def test_dino_with_the_default_recipe_learns_on_the_digits_without_collapse(tmp_path):
    # the defaults for small images (batch norm in the head, no colour jitter, momentum 0.99;
    # docs/pretraining.md): without the head's batch norm this run is uniform (entropy = log K)
    # from epoch 2 on
    run = tmp_path / "dino"
    pretrain(PretrainConfig(method="dino", epochs=4, out=str(run),
                            **{k: v for k, v in QUICK.items() if k != "warmup"}))
    log = records(run)
    losses = [r["loss"] for r in log]
    log_k = np.log(PretrainConfig().out_dim)
    assert min(losses[1:]) < losses[0] - 0.5, losses
    for r in log:  # neither one-hot (entropy 0) nor uniform (log K)
        assert 0.25 * log_k < r["teacher_entropy"] < 0.8 * log_k, log
        assert r["teacher_marginal_entropy"] < 0.95 * log_k, log


def test_dino_encoder_loads_for_probe_and_fine_tuning(dino_run, tmp_path, capsys):
    assert main(["probe", str(dino_run), "--linear-epochs", "0"]) == 0
    assert "k-NN (k=20, T=0.07) test accuracy" in capsys.readouterr().out
    assert main(["train", "--init", str(dino_run), "--epochs", "1", "--out", str(tmp_path / "ft"),
                 "--quiet"]) == 0


def test_attention_draws_the_dino_teacher_backbone_and_compares_with_another_run(
        dino_run, mae_run, tmp_path, capsys):
    from minivit.checkpoint import read_checkpoint
    from minivit.commands.attention import load_attention_model

    model, _, name = load_attention_model(dino_run)
    state, _, _ = read_checkpoint(dino_run / "last.safetensors")
    key = "blocks.3.attn.qkv.weight"
    np.testing.assert_array_equal(model.state_dict()[key], state[f"teacher.backbone.{key}"])
    assert name == "DINO teacher backbone" and model.num_classes == 0
    assert main(["attention", "--checkpoint", str(dino_run), "--index", "0",
                 "--out", str(tmp_path / "dino.png")]) == 0
    assert capsys.readouterr().out.startswith("digits-test #0: DINO teacher backbone (no "
                                              "classifier); true ")
    out = tmp_path / "compare.png"
    assert main(["attention", "--checkpoint", str(dino_run), "--compare", str(mae_run),
                 "--index", "0", "1", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"DINO teacher backbone run ({dino_run}): last block, class "
                               f"token -> patches, mean over 2 images and 4 heads: entropy ")
    assert lines[3].startswith(f"MAE encoder run ({mae_run}): ") and "of uniform" in lines[3]
    assert out.read_bytes().startswith(b"\x89PNG") and lines[-1] == f"-> {out}"


def test_commands_for_classifiers_refuse_a_pretraining_checkpoint(mae_run, capsys):
    assert main(["eval", "--checkpoint", str(mae_run / "last.safetensors")]) == 1
    assert "is a mae pretraining checkpoint, not a classifier: `minivit probe" in \
        capsys.readouterr().err


def test_reconstruct_into_an_unwritable_folder_is_one_clear_error(mae_run, tmp_path, capsys,
                                                                  monkeypatch):
    """Root ignores permissions: matplotlib's write is refused as on a read-only filesystem."""
    import errno

    from matplotlib.figure import Figure

    def read_only(self, path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(Figure, "savefig", read_only)
    out = tmp_path / "rec.png"
    assert main(["reconstruct", str(mae_run), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"minivit reconstruct: error: cannot write {out}: Read-only file "
                          f"system") and "pass --out a .png file" in err
    assert list(tmp_path.iterdir()) == []


# -- the run folder is `minivit train`'s: time across resumes, failed writes -----------------
def test_time_continues_across_resumes(tmp_path, monkeypatch):
    """A clock that ticks one second per reading: a resumed run's `time` goes on from the
    checkpoint's instead of starting again from 0."""
    import itertools
    import types

    from minivit.checkpoint import read_checkpoint

    ticks = itertools.count()
    monkeypatch.setattr("minivit.pretrain.time",
                        types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    run = tmp_path / "run"
    pretrain(PretrainConfig(method="mae", epochs=1, out=str(run), **QUICK))
    first = records(run)[0]["time"]
    assert read_checkpoint(run / "last.safetensors")[2]["time"] == first
    summary = pretrain(PretrainConfig(method="mae", epochs=2, out=str(run), resume=True,
                                      **QUICK))
    times = [record["time"] for record in records(run)]
    assert times[0] == first and times[1] > first  # not `first` again
    assert summary["seconds"] >= times[1]


def test_a_read_only_out_is_one_clear_error(tmp_path, capsys, monkeypatch):
    from test_train_output import refuse_writes

    refuse_writes(monkeypatch)
    out = tmp_path / "ro"
    assert main(["pretrain", "--epochs", "1", "--out", str(out), "--quiet"]) == 1
    assert capsys.readouterr().err == (
        f"minivit pretrain: error: cannot write in the run folder {out} "
        f"({out / 'config.json'}: Read-only file system): pass --out a writable folder\n")


def test_a_full_disk_mid_run_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    from test_train_output import full_disk_on

    full_disk_on(monkeypatch, "last")
    out = tmp_path / "run"
    assert main(["pretrain", "--epochs", "1", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Pretraining stopped" in err
    assert "start again by adding --overwrite" in err and "Traceback" not in err


# -- --precision: as train's (fp16 needs the GPU; the loss scaling is checked on the CPU) -------
def test_pretrain_refuses_half_precision_on_the_cpu_and_defaults_to_fp32(tmp_path, capsys):
    out = tmp_path / "run"  # (the command line's refusal: test_precision.py)
    with pytest.raises(MinivitError, match="--precision bf16 needs the GPU"):
        pretrain(PretrainConfig(**dict(QUICK, precision="bf16", epochs=1, out=str(out))))
    assert not out.exists()
    assert PretrainConfig().precision == "fp32"
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "--precision {fp32,tf32,bf16,fp16}" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["mae", "dino"])
def test_a_loss_scaled_pretraining_run_equals_the_unscaled_one(method, tmp_path, monkeypatch):
    """fp16's LossScaler put into a CPU run (scaling by powers of two is exact in float32
    too): AdamW's moments are an unscaled run's, so the scale is taken off every gradient
    before it is used, DINO's per-parameter clipping included (with its bound left unscaled,
    they differed by 100%); and the scale grows as it should. (Not the weights: a parameter
    whose true gradient is 0, as a bias before a normalisation, takes lr-sized AdamW steps
    from its gradient's rounding noise, which differs between the runs.)"""
    options = dict(DINO_SMALL if method == "dino" else QUICK, method=method, epochs=1,
                   batch_size=256)
    pretrain(PretrainConfig(**options, out=str(tmp_path / "unscaled")))
    scalers = []
    monkeypatch.setattr(pretraining, "prepare_training", lambda name, backend, dtype, optimizer:
                        scalers.append(LossScaler(optimizer, init_scale=2.0 ** 10,
                                                  growth_interval=2)))
    pretrain(PretrainConfig(**options, out=str(tmp_path / "scaled")))
    assert scalers[0].scale == 2.0 ** 13  # 6 good steps: grown 3 times
    _, moments, _ = read_checkpoint(tmp_path / "unscaled" / "last.safetensors")
    _, scaled_moments, info = read_checkpoint(tmp_path / "scaled" / "last.safetensors")
    assert info["optimizer"]["loss_scale"] == {"scale": 2.0 ** 13, "good_steps": 0}
    for name in ("m", "v"):
        np.testing.assert_allclose(scaled_moments[name], moments[name], rtol=0,
                                   atol=1e-4 * np.abs(moments[name]).max(), err_msg=name)


@pytest.mark.skipif(not backend.cupy_available(), reason="CuPy or a CUDA GPU is not available")
@pytest.mark.parametrize("method", ["mae", "dino"])
def test_pretraining_on_the_cupy_backend_matches_numpy(tmp_path, method):
    """Two float64 epochs on each backend: the initial weights, MAE's masks and DINO's crops
    come from host generators, so the CuPy run's weights and logged figures are NumPy's, but
    for the order of the GPU's sums (DINO's biases before a batch norm have a gradient of 0
    but for rounding, which AdamW turns into steps of ~lr·1e-8: hence the atol)."""
    runs = {name: tmp_path / name for name in ("numpy", "cupy")}
    for name, run in runs.items():
        pretrain(PretrainConfig(method=method, epochs=2, dtype="float64", backend=name, seed=1,
                                out=str(run), **QUICK))
    want, _ = load_weights(runs["numpy"] / "last.safetensors")
    got, _ = load_weights(runs["cupy"] / "last.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-8, atol=1e-9, err_msg=key)
    for a, b in zip(records(runs["numpy"]), records(runs["cupy"])):
        for name in ("loss", "teacher_entropy", "center_norm"):
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-8), (name, a, b)


def test_a_damaged_pretrain_config_names_the_field(tmp_path):
    """A resume reads config.json with train's checks: a wrong type names the field."""
    (tmp_path / "config.json").write_text(json.dumps({"method": "mae", "lr": "fast"}))
    with pytest.raises(MinivitError, match=r'lr is "fast", expected float.*minivit pretrain'):
        pretrain(PretrainConfig(out=str(tmp_path), resume=True, progress=False))
