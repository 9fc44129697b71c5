"""Parity with PyTorch: the same weights give the same logits and gradients as a timm-layout
ViT written in PyTorch (minivit.torch_reference), and weights move between the two exactly.

Relative errors are measured against the reference's scale: max|ours - ref| / max|ref|, per
array (per parameter gradient). Weights are redrawn so that nothing is trivially zero or one:
biases, LayerNorm affine parameters, the class token and position embedding all carry signal,
and the attention is far from uniform.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import minivit  # noqa: E402
import minivit.functional as F  # noqa: E402
from minivit import Tensor  # noqa: E402
from minivit.io import load_weights, save_weights  # noqa: E402
from minivit.models import (VisionTransformer, load_pretrained, resample_abs_pos_embed,  # noqa: E402
                            save_torch_weights)
from minivit.torch_reference import reference_vit, resample_pos_embed_torch  # noqa: E402

CONFIGS = {
    "p4-32x32-rgb": dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=48,
                         depth=2, num_heads=3),
    "p16-224x224-rgb": dict(img_size=224, patch_size=16, in_chans=3, num_classes=7,
                            embed_dim=64, depth=1, num_heads=2),
    "p2-8x8-grey": dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32,
                        depth=2, num_heads=4, mlp_ratio=2.0),
}
CASES = [pytest.param(name, qkv_bias, id=f"{name}-{'qkv_bias' if qkv_bias else 'no_qkv_bias'}")
         for name in CONFIGS for qkv_bias in (True, False)]
BATCH = 2
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}

# The largest relative differences seen, by check; printed with `pytest -s` at the end.
OBSERVED = {}


def relative_error(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-300))


def record(check, error):
    OBSERVED[check] = max(OBSERVED.get(check, 0.0), error)
    return error


@pytest.fixture(scope="module", autouse=True)
def _report_observed():
    yield
    if OBSERVED:
        print("\nlargest relative differences observed:")
        for check, error in sorted(OBSERVED.items()):
            print(f"  {check:<34} {error:.2e}")


def randomize(model, seed):
    """Redraw every parameter (in its dtype): weights ~ N(0, 1/fan_in), everything else O(0.1-1)."""
    rng = np.random.default_rng(seed)
    for name, parameter in model.named_parameters():
        shape = parameter.shape
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
            values = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name in ("cls_token", "pos_embed"):
            values = 0.5 * rng.standard_normal(shape)
        elif len(shape) >= 2:
            values = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        else:
            values = 0.1 * rng.standard_normal(shape)
        parameter.data[...] = values.astype(parameter.dtype)
    return model


def make_pair(config, dtype, seed=0):
    """(minivit model, reference) with identical random weights in `dtype`."""
    minivit.manual_seed(seed)
    model = VisionTransformer(**config).to(dtype=dtype)
    randomize(model, seed)
    reference = reference_vit(model.config).to(getattr(torch, dtype))
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()},
                              strict=True)
    return model, reference


def images(config, dtype, seed=1, batch=BATCH):
    rng = np.random.default_rng(seed)
    size = config["img_size"]
    return rng.standard_normal((batch, config["in_chans"], size, size)).astype(dtype)


def reference_logits(reference, x):
    with torch.no_grad():
        return reference(torch.from_numpy(x)).numpy()


# -- forward ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name, qkv_bias", CASES)
def test_logits_match_reference(name, qkv_bias, dtype):
    config = dict(CONFIGS[name], qkv_bias=qkv_bias)
    model, reference = make_pair(config, dtype)
    assert ("blocks.0.attn.qkv.bias" in model.state_dict()) == qkv_bias
    x = images(config, dtype)
    with minivit.no_grad():
        logits = model.eval()(Tensor(x)).data
    assert logits.dtype == np.dtype(dtype)
    ref = reference_logits(reference, x)
    assert record(f"logits {dtype}", relative_error(logits, ref)) < TOLERANCE[dtype]


# -- backward -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, qkv_bias", CASES)
def test_gradients_match_reference(name, qkv_bias):
    """Cross-entropy on integer labels, backward through the whole model: every parameter's
    gradient and the image gradient equal PyTorch's autograd to 1e-8 relative (float64)."""
    config = dict(CONFIGS[name], qkv_bias=qkv_bias)
    model, reference = make_pair(config, "float64")
    x = images(config, "float64")
    labels = np.array([3, 1, 4, 1, 5][:BATCH]) % config["num_classes"]

    x_ours = Tensor(x, requires_grad=True)
    loss = F.cross_entropy(model.train()(x_ours), labels)
    model.zero_grad()
    loss.backward()

    x_ref = torch.from_numpy(x.copy()).requires_grad_(True)
    ref_loss = torch.nn.functional.cross_entropy(reference(x_ref), torch.from_numpy(labels))
    ref_loss.backward()

    assert relative_error(loss.data, ref_loss.detach().numpy()) < 1e-12
    ref_params = dict(reference.named_parameters())
    assert set(ref_params) == set(dict(model.named_parameters()))
    errors = {}
    for param_name, parameter in model.named_parameters():
        assert parameter.grad is not None, param_name
        ref_grad = ref_params[param_name].grad.numpy()
        assert parameter.grad.shape == ref_grad.shape, param_name
        errors[param_name] = relative_error(parameter.grad, ref_grad)
    errors["input image"] = relative_error(x_ours.grad, x_ref.grad.numpy())
    worst = max(errors, key=errors.get)
    record("gradients float64", errors[worst])
    assert errors[worst] < 1e-8, f"{worst}: relative error {errors[worst]:.2e}\n{errors}"


# -- weight interchange ---------------------------------------------------------------------------
def _bits(state):
    return {k: (v.dtype, v.shape, v.tobytes()) for k, v in state.items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pth"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_minivit_weights_load_into_reference_and_back(tmp_path, suffix, dtype):
    config = dict(CONFIGS["p4-32x32-rgb"], qkv_bias=True)
    model, _ = make_pair(config, dtype, seed=3)
    state = model.state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        save_torch_weights(state, path)
        torch_state = torch.load(path, weights_only=True)
    else:
        save_weights(state, path)
        torch_state = {k: torch.from_numpy(v) for k, v in load_weights(path)[0].items()}
    # minivit -> file -> PyTorch
    reference = reference_vit(model.config).to(getattr(torch, dtype))
    reference.load_state_dict(torch_state, strict=True)
    assert _bits({k: v.numpy() for k, v in reference.state_dict().items()}) == _bits(state)
    x = images(config, dtype)
    with minivit.no_grad():
        ours = model.eval()(Tensor(x)).data
    assert relative_error(ours, reference_logits(reference, x)) < TOLERANCE[dtype]

    # PyTorch -> file -> minivit
    back = tmp_path / f"back{suffix}"
    ref_state = reference.state_dict()
    if suffix == ".pth":
        torch.save(ref_state, back)
    else:
        save_weights({k: v.numpy() for k, v in ref_state.items()}, back)
    fresh = VisionTransformer(**model.config).to(dtype=dtype)
    assert load_pretrained(fresh, back) == []
    assert _bits(fresh.state_dict()) == _bits(state)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pth"])
def test_file_round_trip_is_bit_exact(tmp_path, suffix):
    model, _ = make_pair(dict(CONFIGS["p2-8x8-grey"], qkv_bias=False), "float64", seed=4)
    state = model.state_dict()
    state["extra_int"] = np.arange(6, dtype=np.int64).reshape(2, 3)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        save_torch_weights(state, path)
    else:
        save_weights(state, path, metadata={"note": "x"})
    loaded, metadata = load_weights(path)
    assert _bits(loaded) == _bits(state)
    assert metadata == ({} if suffix == ".pth" else {"note": "x"})


def test_reference_keys_are_timms():
    reference = reference_vit(dict(CONFIGS["p4-32x32-rgb"], qkv_bias=True))
    keys = list(reference.state_dict())
    assert keys[:4] == ["cls_token", "pos_embed", "patch_embed.proj.weight",
                        "patch_embed.proj.bias"]
    assert keys[4:16] == [f"blocks.0.{n}" for n in (
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias")]
    assert keys[-4:] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    minivit.manual_seed(0)
    ours = VisionTransformer(**CONFIGS["p4-32x32-rgb"])
    assert {k: tuple(v.shape) for k, v in reference.state_dict().items()} == \
        {k: v.shape for k, v in ours.state_dict().items()}


# -- position-embedding resampling ---------------------------------------------------------------
@pytest.mark.parametrize("new_size", [48, 24, 20])
def test_resampled_pos_embed_matches_torch_interpolate(tmp_path, new_size):
    config = dict(CONFIGS["p4-32x32-rgb"], qkv_bias=True)
    model, _ = make_pair(config, "float32", seed=5)
    path = tmp_path / "w.safetensors"
    save_weights(model.state_dict(), path)
    bigger = VisionTransformer(**dict(config, img_size=new_size))
    notes = []
    load_pretrained(bigger, path, notify=notes.append)
    grid = new_size // 4
    assert len(notes) == 1 and f"8x8 to a {grid}x{grid} patch grid" in notes[0]
    pos = torch.from_numpy(model.state_dict()["pos_embed"].astype(np.float64))
    expected = resample_pos_embed_torch(pos, (grid, grid), (8, 8)).numpy()
    got = bigger.state_dict()["pos_embed"]
    assert got.shape == expected.shape == (1, grid * grid + 1, config["embed_dim"])
    assert record("pos_embed resampling (float32)", relative_error(got, expected)) < 1e-6
    assert np.abs(got - expected).max() < 1e-6
    # every other weight is the checkpoint's, unchanged
    for key, value in model.state_dict().items():
        if key != "pos_embed":
            assert np.array_equal(bigger.state_dict()[key], value), key


@pytest.mark.parametrize("new_size", [48, 16])
def test_model_at_another_size_matches_reference(tmp_path, new_size):
    """Loaded at another image size, minivit gives the logits of the reference that uses
    torch's interpolated pos_embed (float64)."""
    config = dict(CONFIGS["p4-32x32-rgb"], qkv_bias=True)
    model, _ = make_pair(config, "float64", seed=6)
    path = tmp_path / "w.npz"
    save_weights(model.state_dict(), path)
    resized = VisionTransformer(**dict(config, img_size=new_size)).to(dtype="float64")
    load_pretrained(resized, path, notify=lambda note: None)

    grid = new_size // 4
    ref_state = {k: torch.from_numpy(v) for k, v in model.state_dict().items()}
    ref_state["pos_embed"] = resample_pos_embed_torch(ref_state["pos_embed"], (grid, grid), (8, 8))
    reference = reference_vit(resized.config).double()
    reference.load_state_dict(ref_state, strict=True)
    x = images(dict(config, img_size=new_size), "float64")
    with minivit.no_grad():
        ours = resized.eval()(Tensor(x)).data
    error = record("logits at another size float64", relative_error(ours, reference_logits(
        reference, x)))
    assert error < 1e-10

    # the model method gives the same model
    model.resample_pos_embed(new_size)
    assert model.patch_embed.img_size == (new_size, new_size)
    assert model.patch_embed.grid_size == (grid, grid)
    assert model.patch_embed.num_patches == grid * grid
    assert model.config["img_size"] == new_size
    assert np.array_equal(model.state_dict()["pos_embed"], resized.state_dict()["pos_embed"])
    with minivit.no_grad():
        assert np.array_equal(model.eval()(Tensor(x)).data, ours)


def test_resample_pos_embed_agrees_with_io():
    pos = np.random.default_rng(0).standard_normal((1, 1 + 36, 8))
    torch_result = resample_pos_embed_torch(torch.from_numpy(pos), (5, 7), (6, 6)).numpy()
    assert np.abs(resample_abs_pos_embed(pos, (5, 7), (6, 6)) - torch_result).max() < 1e-12
