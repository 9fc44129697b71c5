"""load_pretrained's adaptations (prefixes, a new head, resampled position embeddings, training
checkpoints, non-strict loads) and its errors.
"""

import warnings

import numpy as np
import pytest
from helpers_pretrained import small_model

import minivit
from minivit.checkpoint import save_checkpoint
from minivit.errors import WeightsError
from minivit.io import load_weights, save_weights
from minivit.models import PretrainedWarning, create_model, load_pretrained


def assert_states_equal(a, b, skip=()):
    assert set(a) == set(b)
    for key in a:
        if key not in skip:
            assert np.array_equal(a[key], b[key]), key


@pytest.fixture
def weights(tmp_path):
    """(path, state) of a small random model saved as .safetensors."""
    state = small_model(seed=1).state_dict()
    path = tmp_path / "small.safetensors"
    save_weights(state, path)
    return path, state


# -- load_pretrained ------------------------------------------------------------------------------
def test_exact_fit_loads_silently(weights):
    path, state = weights
    model = small_model(seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_pretrained(model, path) == []
    assert_states_equal(model.state_dict(), state)


def test_prefixes_and_in_memory_state_dicts(weights):
    _, state = weights
    wrapped = {f"module.model.{k}": v for k, v in state.items()}
    model = small_model(seed=2)
    assert load_pretrained(model, wrapped) == []
    assert_states_equal(model.state_dict(), state)


def test_num_classes_mismatch_keeps_fresh_head_with_a_notice(weights):
    path, state = weights
    model = small_model(seed=2, num_classes=3)
    fresh_head = model.state_dict()["head.weight"].copy()
    with pytest.warns(PretrainedWarning, match="has 5 classes, the model 3: keeping the model's "
                                               "freshly initialised head"):
        notes = load_pretrained(model, path)
    assert len(notes) == 1
    loaded = model.state_dict()
    assert np.array_equal(loaded["head.weight"], fresh_head)
    assert_states_equal({k: v for k, v in loaded.items() if not k.startswith("head.")},
                        {k: v for k, v in state.items() if not k.startswith("head.")})


def test_headless_checkpoint_and_headless_model(weights):
    path, state = weights
    headless = {k: v for k, v in state.items() if not k.startswith("head.")}
    model = small_model(seed=2)
    notes = load_pretrained(model, headless, notify=lambda note: None)
    assert len(notes) == 1 and "has no head" in notes[0]
    no_head = small_model(seed=2, num_classes=0)
    notes = load_pretrained(no_head, path, notify=lambda note: None)
    assert len(notes) == 1 and "is not used" in notes[0]
    assert_states_equal(no_head.state_dict(), headless)


def test_other_image_size_resamples_pos_embed_with_a_notice(weights):
    path, _ = weights
    model = small_model(seed=2, img_size=24)
    notes = []
    load_pretrained(model, path, notify=notes.append)
    assert notes == ["resampled pos_embed from a 4x4 to a 6x6 patch grid (bicubic) for image "
                     "size 24"]
    assert model.pos_embed.shape == (1, 37, 32)


def test_create_model_pretrained(tmp_path):
    minivit.manual_seed(0)
    source = create_model("vit_digits", depth=1)
    path = tmp_path / "digits.npz"
    save_weights(source.state_dict(), path)
    model = create_model("vit_digits", depth=1, pretrained=path)
    assert_states_equal(model.state_dict(), source.state_dict())


def test_training_checkpoint_loads_without_its_optimizer_state(tmp_path):
    from minivit.optim import AdamW

    model = small_model(seed=1)
    optimizer = AdamW(model.named_parameters(), lr=1e-3)
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, model, {"epoch": 1}, optimizer)
    assert any(k.startswith("optimizer.") for k in load_weights(path)[0])
    fresh = small_model(seed=2)
    assert load_pretrained(fresh, path) == []
    assert_states_equal(fresh.state_dict(), model.state_dict())


def test_wrong_shapes_and_missing_keys_are_one_error(weights):
    _, state = weights
    bad = dict(state)
    del bad["blocks.0.norm1.weight"]
    bad["blocks.0.mlp.fc1.weight"] = np.zeros((64, 32), np.float32)
    bad["fc_norm.weight"] = np.ones(32, np.float32)
    with pytest.raises(WeightsError) as info:
        load_pretrained(small_model(), bad)
    message = str(info.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in message
    assert "missing: blocks.0.norm1.weight" in message
    assert "mis-shaped: blocks.0.mlp.fc1.weight: expected (128, 32), got (64, 32)" in message
    assert "fc_norm.weight (global-average-pool head" in message


def test_other_embed_dim_is_an_error_not_a_resample(weights):
    path, _ = weights
    with pytest.raises(WeightsError, match="mis-shaped: pos_embed"):
        load_pretrained(small_model(embed_dim=48, num_heads=2), path)


def test_non_strict_loads_what_fits(weights):
    _, state = weights
    bad = {k: v for k, v in state.items() if k != "norm.bias"}
    bad["blocks.0.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
    model = small_model(seed=2)
    before = model.state_dict()
    notes = load_pretrained(model, bad, strict=False, notify=lambda note: None)
    assert any("skipped 1 key" in n and "blocks.0.attn.qkv.weight" in n for n in notes)
    assert any("norm.bias" in n for n in notes)
    after = model.state_dict()
    assert np.array_equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    assert np.array_equal(after["head.weight"], state["head.weight"])


def test_a_state_dict_of_minivit_tensors_loads(weights):
    from minivit import Tensor

    _, state = weights
    model = small_model(seed=3)
    load_pretrained(model, {k: Tensor(v) for k, v in state.items()}, notify=lambda note: None)
    assert np.array_equal(model.state_dict()["head.weight"], state["head.weight"])


def test_non_vit_state_dict(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_weights({"conv1.weight": np.zeros((8, 3, 7, 7), np.float32),
                  "fc.weight": np.zeros((10, 8), np.float32)}, path)
    with pytest.raises(WeightsError, match="does not look like a timm ViT state dict"):
        load_pretrained(small_model(), path)


def test_truncated_safetensors(weights):
    path, _ = weights
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsError, match="truncated"):
        load_pretrained(small_model(), path)


def test_not_a_state_dict():
    with pytest.raises(WeightsError, match="expected a weights file path or a state dict"):
        load_pretrained(small_model(), 42)
