"""--precision and dynamic loss scaling, what the CPU can check (the GPU side: test_half.py).

- the precision setting: fp32 everywhere; tf32/bf16/fp16 only on cupy with float32, else a
  MinivitError naming the choices and what works (the CLI prints it, no traceback);
- LossScaler (minivit.loss_scale) on float32 NumPy: a forced overflow skips the step (weights,
  AdamW's moments and step count unchanged) and halves the scale; the scale doubles after
  `growth_interval` good steps; the unscaled gradient equals an unscaled run's; the scale and
  its run of good steps are kept in checkpoints, so a resumed run goes on with them;
- the benchmark's PyTorch side under autocast (bf16 on the CPU, where PyTorch has it).
"""

import numpy as np
import pytest
from conftest import stop_after

import minivit
import minivit.functional as F
import minivit.train as training
from minivit import cli, cpu, precision
from minivit.checkpoint import read_checkpoint
from minivit.errors import MinivitError
from minivit.loss_scale import LossScaler, scaled_backward
from minivit.models import create_model
from minivit.optim import SGD, AdamW
from minivit.train import TrainConfig, train


@pytest.mark.parametrize("name", ["tf32", "bf16", "fp16"])
def test_gpu_precisions_are_a_clear_error_on_the_cpu(name):
    with pytest.raises(MinivitError, match=rf"--precision {name} needs the GPU.*fp32.*float64"):
        precision.set_precision(name, "numpy")
    assert precision.get_precision() == "fp32"


def test_unknown_precisions_and_half_float64_are_refused():
    with pytest.raises(MinivitError, match="expected one of fp32, tf32, bf16, fp16"):
        precision.set_precision("fp8", "numpy")
    with pytest.raises(MinivitError, match="--dtype float64"):
        precision.check_precision("bf16", "cupy", "float64")
    precision.check_precision("fp32", "numpy", "float64")  # what works on the CPU


def test_using_precision_returns_to_the_previous_one():
    with precision.using_precision("fp32", "numpy"):
        assert precision.get_precision() == "fp32"
    assert precision.get_precision() == "fp32"


@pytest.mark.parametrize("command", [["train", "--epochs", "1"], ["eval", "--checkpoint", "x"],
                                     ["predict", "--checkpoint", "x", "a.png"],
                                     ["bench", "--config", "tiny", "--steps", "1"],
                                     ["pretrain", "--epochs", "1"]])
def test_every_command_refuses_half_precision_on_the_cpu(capsys, tmp_path, command):
    code = cli.main(command + ["--precision", "bf16", "--backend", "numpy"])
    err = capsys.readouterr().err
    assert code == 1
    assert "--precision bf16 needs the GPU" in err and "Traceback" not in err


def test_train_refuses_fp16_on_the_cpu_before_training(tmp_path):
    with pytest.raises(MinivitError, match="--precision fp16 needs the GPU"):
        train(TrainConfig(precision="fp16", epochs=1, out=str(tmp_path / "run"),
                          progress=False))


# -- loss scaling ---------------------------------------------------------------------------
def _setup(seed=0, optimizer=AdamW):
    minivit.manual_seed(seed)
    model = create_model("vit_digits", drop_path_rate=0.0)
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((8, 1, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 10, 8)
    return model, optimizer(model.named_parameters(), lr=1e-3), images, labels


def _backward(model, optimizer, images, labels, overflow=False):
    optimizer.zero_grad()
    scaled_backward(F.cross_entropy(model(images), labels), optimizer)
    if overflow:  # an fp16 gradient that overflowed
        optimizer.parameters[3].grad[0] = np.inf


@pytest.mark.parametrize("optimizer", [AdamW, SGD])
def test_an_overflow_skips_the_step_and_lowers_the_scale(optimizer):
    model, opt, images, labels = _setup(optimizer=optimizer)
    scaler = LossScaler(opt)
    _backward(model, opt, images, labels)
    opt.step(max_grad_norm=1.0)
    assert scaler.update() is False and scaler.scale == 2.0 ** 16 and scaler.good_steps == 1
    before = {"flat": opt.flat.copy(), "step": opt.step_count,
              **{name: array.copy() for name, array in opt.state_arrays().items()}}
    _backward(model, opt, images, labels, overflow=True)
    opt.step(max_grad_norm=1.0)
    assert scaler.update() is True
    assert scaler.scale == 2.0 ** 15 and scaler.good_steps == 0
    assert opt.step_count == before["step"]
    np.testing.assert_array_equal(opt.flat, before["flat"])
    for name, array in opt.state_arrays().items():
        np.testing.assert_array_equal(array, before[name])
    _backward(model, opt, images, labels)  # the next good step updates again
    opt.step(max_grad_norm=1.0)
    assert scaler.update() is False and opt.step_count == before["step"] + 1
    assert not np.array_equal(opt.flat, before["flat"])


def test_the_scale_grows_after_the_interval_of_good_steps():
    model, opt, images, labels = _setup()
    scaler = LossScaler(opt, init_scale=8.0, growth_interval=3)
    scales = []
    for _ in range(7):
        _backward(model, opt, images, labels)
        opt.step()
        scaler.update()
        scales.append(scaler.scale)
    assert scales == [8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]


def test_unscaled_gradients_equal_the_unscaled_run():
    """Scaling by a power of two is exact: gradients and updated weights are the same."""
    runs = []
    for scaled in (False, True):
        model, opt, images, labels = _setup(seed=3)
        if scaled:
            LossScaler(opt, init_scale=2.0 ** 20)
        for _ in range(2):
            _backward(model, opt, images, labels)
            opt.step()
        runs.append((opt.flat_grad.copy(), opt.flat.copy()))
    (grad, weights), (scaled_grad, scaled_weights) = runs
    assert np.abs(grad).max() > 0
    np.testing.assert_allclose(scaled_grad, grad, rtol=1e-6, atol=0)
    np.testing.assert_allclose(scaled_weights, weights, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fast_paths", [True, False])  # AdamW's cpu and plain updates
def test_a_replayed_overflow_is_skipped_by_the_update_and_gives_its_step_back(monkeypatch,
                                                                              fast_paths):
    """The CUDA-graph protocol, played on NumPy: per_step as a replay's refill (advance, then
    a device-like array of the values), so unscale hands the flag to AdamW's update, which
    skips on it, and update() gives back the step count the refill advanced."""
    from minivit import cuda

    def refill(like, values, count, advance=None):
        if advance is not None:
            advance()
        return np.asarray(values(), like.dtype)

    model, opt, images, labels = _setup()
    scaler = LossScaler(opt)
    _backward(model, opt, images, labels)
    opt.step()  # eager: allocates the flag, as a capture's warm-up does
    scaler.update()
    monkeypatch.setattr(cuda, "recording", lambda like: True)
    monkeypatch.setattr(cuda, "per_step", refill)
    before = [opt.flat.copy(), opt.m.copy(), opt.v.copy()]
    _backward(model, opt, images, labels, overflow=True)
    with cpu.fast_paths(fast_paths):
        opt.step()
    assert opt.step_count == 2  # advanced by the refill, before the overflow was known
    assert scaler.update() is True and opt.step_count == 1 and scaler.scale == 2.0 ** 15
    for got, want in zip((opt.flat, opt.m, opt.v), before):
        np.testing.assert_array_equal(got, want)
    _backward(model, opt, images, labels)
    with cpu.fast_paths(fast_paths):
        opt.step()
    assert scaler.update() is False and opt.step_count == 2
    assert not np.array_equal(opt.flat, before[0])


def test_loss_scaler_refuses_bad_settings_and_update_before_a_step():
    _, opt, _, _ = _setup()
    with pytest.raises(MinivitError, match="backoff_factor must be in"):
        LossScaler(opt, backoff_factor=2.0)
    with pytest.raises(MinivitError, match="after optimizer.step"):
        LossScaler(opt).update()


# -- the loss scale in checkpoints: fp16 runs resume exactly --------------------------------
def test_the_loss_scale_travels_with_the_optimizer_state():
    _, opt, _, _ = _setup()
    scaler = LossScaler(opt)
    scaler.scale, scaler.good_steps = 2.0 ** 9, 17
    state = opt.state_dict()
    _, fresh, _, _ = _setup()
    restored = LossScaler(fresh)
    fresh.load_state_dict(state)
    assert (restored.scale, restored.good_steps) == (2.0 ** 9, 17)
    old = {key: value for key, value in state.items() if key != "loss_scale"}
    _, fresh, _, _ = _setup()
    initial = LossScaler(fresh)
    fresh.load_state_dict(old)  # a checkpoint from before the scale was kept: no error
    assert (initial.scale, initial.good_steps) == (2.0 ** 16, 0)
    _, unscaled, _, _ = _setup()
    unscaled.load_state_dict(state)  # an fp16 run's state resumed without scaling
    assert unscaled.loss_scaler is None


def test_a_resumed_loss_scaled_run_goes_on_with_the_saved_scale(tmp_path, monkeypatch):
    """fp16 needs the GPU, so the scaler is put into a CPU run (scaling by powers of two is
    exact in float32 too): an interrupted and resumed run ends with the straight run's scale,
    run of good steps and weights, and its checkpoint holds them."""
    scalers = []

    def with_scaler(name, backend_name, dtype, optimizer):
        scalers.append(LossScaler(optimizer, init_scale=2.0 ** 10, growth_interval=4))

    monkeypatch.setattr(training, "prepare_training", with_scaler)

    options = dict(model="vit_digits", epochs=2, warmup=1, batch_size=256, augment=False,
                   progress=False)
    train(TrainConfig(out=str(tmp_path / "straight"), **options))
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "resumed"), **options), on_epoch_end=stop_after(1))
    train(TrainConfig(out=str(tmp_path / "resumed"), resume=True, **options))
    straight, _, resumed = scalers
    assert straight.scale > 2.0 ** 11  # it grew in both epochs (6 steps each)
    assert (resumed.scale, resumed.good_steps) == (straight.scale, straight.good_steps)
    saved = [read_checkpoint(tmp_path / run / "last.safetensors") for run in ("straight",
                                                                              "resumed")]
    assert saved[0][2]["optimizer"]["loss_scale"] == straight.state_dict()
    for name, array in saved[0][0].items():
        np.testing.assert_array_equal(saved[1][0][name], array, err_msg=name)


# -- the benchmark's PyTorch side ---------------------------------------------------------------
def test_torch_runner_runs_under_bf16_autocast():
    torch = pytest.importorskip("torch")
    from minivit.bench.runners import TorchRunner
    from minivit.models import model_config
    args = model_config("vit_digits")
    model, _, images, labels = _setup()
    state = {k: np.asarray(v) for k, v in model.state_dict().items()}
    full = TorchRunner(torch, args, state, images, labels).logits()
    half = TorchRunner(torch, args, state, images, labels, precision="bf16")
    difference = np.abs(half.logits() - full).max()
    assert 0 < difference < 0.1 * np.abs(full).max()  # bf16 rounding, not another model
    half.train_step()
