"""timm's names: checking a state dict against a ViT, and resampling position embeddings
(minivit.models.timm_keys and minivit.models.pos_embed), the latter against torch's bicubic."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minivit.errors import WeightsError
from minivit.models import check_state_dict, resample_abs_pos_embed
from minivit.torch_reference import resample_pos_embed_torch

# ------------------------------------------------------------------ timm names and checks


VIT_EXPECTED = {
    "cls_token": (1, 1, 8),
    "pos_embed": (1, 5, 8),
    "patch_embed.proj.weight": (8, 3, 2, 2),
    "patch_embed.proj.bias": (8,),
    "blocks.0.attn.qkv.weight": (24, 8),
    "norm.weight": (8,),
    "head.weight": (10, 8),
    "head.bias": (10,),
}


def vit_state():
    return {k: np.zeros(s, np.float32) for k, s in VIT_EXPECTED.items()}


def test_check_state_dict_accepts_exact_match():
    check_state_dict(VIT_EXPECTED, vit_state())


def test_check_state_dict_reports_every_problem_at_once():
    state = vit_state()
    del state["norm.weight"], state["cls_token"]
    state["fc_norm.weight"] = np.zeros(8)
    state["extra"] = np.zeros(1)
    state["head.weight"] = np.zeros((1000, 8))
    state["pos_embed"] = np.zeros((1, 17, 8))
    with pytest.raises(WeightsError) as info:
        check_state_dict(VIT_EXPECTED, state, source="w.safetensors")
    message = str(info.value)
    assert message.startswith("w.safetensors does not fit the model: 2 missing, 2 unexpected, 2")
    for line in [
        "missing: norm.weight",
        "missing: cls_token",
        "unexpected: fc_norm.weight (global-average-pool head",
        "unexpected: extra",
        "mis-shaped: head.weight: expected (10, 8), got (1000, 8)",
        "mis-shaped: pos_embed: expected (1, 5, 8), got (1, 17, 8)",
        "resample_abs_pos_embed",
        "num_classes",
    ]:
        assert line in message


@pytest.mark.parametrize(
    "key, reason",
    [
        ("reg_token", "register tokens"),
        ("blocks.3.ls1.gamma", "LayerScale"),
        ("patch_embed.norm.weight", "patch embedding"),
        ("blocks.0.attn.q_norm.weight", "qk_norm"),
    ],
)
def test_unsupported_timm_options_are_named(key, reason):
    state = vit_state()
    state[key] = np.zeros(8)
    with pytest.raises(WeightsError, match=reason):
        check_state_dict(VIT_EXPECTED, state)


def test_another_architecture_gets_a_short_error_without_misleading_hints():
    """Every width differs (another model size): at most 12 lines per kind of problem, then a
    count, and no pos_embed / num_classes hints."""
    state = {k: np.zeros(tuple(2 * n for n in shape)) for k, shape in VIT_EXPECTED.items()}
    for i in range(30):
        state[f"blocks.{i + 9}.mlp.fc1.weight"] = np.zeros(1)
    with pytest.raises(WeightsError) as info:
        check_state_dict(VIT_EXPECTED, state)
    message = str(info.value)
    assert "... and 18 more like these" in message  # the 30 unexpected keys
    assert "resample_abs_pos_embed" not in message and "drop them" not in message
    assert len(message.splitlines()) <= 1 + 3 * 13 + 1


def test_non_vit_state_dict_is_called_out():
    resnet = {"conv1.weight": np.zeros((4, 3, 7, 7)), "bn1.weight": np.zeros(4)}
    resnet["fc.weight"] = np.zeros((2, 4))
    with pytest.raises(WeightsError) as info:
        check_state_dict(VIT_EXPECTED, resnet, source="resnet.pth")
    message = str(info.value)
    assert "resnet.pth does not look like a timm ViT state dict" in message
    assert "expected keys like cls_token, pos_embed, patch_embed.proj.weight" in message
    assert "found keys like conv1.weight, bn1.weight, fc.weight (3 in all)" in message


# ------------------------------------------------------------------ pos-embed resampling


def torch_resample(pos_embed, new_size, old_size, prefix):
    torch = pytest.importorskip("torch")
    return resample_pos_embed_torch(torch.from_numpy(pos_embed), new_size, old_size,
                                    prefix).numpy()


@pytest.mark.parametrize(
    "old, new", [((7, 7), (14, 14)), ((14, 14), (8, 8)), ((4, 4), (6, 3)), ((3, 5), (5, 2))]
)
def test_resample_matches_torch(old, new):
    rng = np.random.default_rng(1)
    pos_embed = rng.standard_normal((1, 1 + old[0] * old[1], 6))
    out = resample_abs_pos_embed(pos_embed, new, old_size=None if old[0] == old[1] else old)
    np.testing.assert_allclose(out, torch_resample(pos_embed, new, old, 1), rtol=0, atol=1e-6)
    assert out.shape == (1, 1 + new[0] * new[1], 6)
    assert np.array_equal(out[:, :1], pos_embed[:, :1])


@settings(max_examples=30, deadline=None)
@given(
    old=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    new=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    dim=st.integers(1, 5),
    prefix=st.integers(0, 2),
    seed=st.integers(0, 2**32 - 1),
)
def test_resample_matches_torch_property(old, new, dim, prefix, seed):
    pos_embed = np.random.default_rng(seed).uniform(-2, 2, (1, prefix + old[0] * old[1], dim))
    out = resample_abs_pos_embed(pos_embed, new, old_size=old, num_prefix_tokens=prefix)
    np.testing.assert_allclose(out, torch_resample(pos_embed, new, old, prefix), rtol=0, atol=1e-6)
    assert np.array_equal(out[:, :prefix], pos_embed[:, :prefix])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resample_same_size_is_identity_and_keeps_dtype(dtype):
    pos_embed = np.random.default_rng(2).standard_normal((1, 1 + 5 * 5, 4)).astype(dtype)
    out = resample_abs_pos_embed(pos_embed, (5, 5))
    assert out.dtype == dtype and np.array_equal(out, pos_embed)
    assert resample_abs_pos_embed(pos_embed, (7, 3)).dtype == dtype


def test_resample_rejects_non_square_without_old_size():
    with pytest.raises(WeightsError, match="not a square grid; pass old_size"):
        resample_abs_pos_embed(np.zeros((1, 1 + 12, 4)), (4, 4))
    with pytest.raises(WeightsError, match="H\\*W equal to the number of patches"):
        resample_abs_pos_embed(np.zeros((1, 1 + 12, 4)), (4, 4), old_size=(3, 5))
