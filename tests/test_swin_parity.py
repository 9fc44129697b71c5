"""Parity with real timm's SwinTransformer in float64: the same random weights (loaded by
name) give the same logits (to 1e-10) and every parameter's gradient (to 1e-8), relative to
the reference's largest value; and the original Microsoft key layout loads as timm's filter
maps it. Needs torch and timm (the parity extra); skipped without them."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import minivit  # noqa: E402
from minivit import Tensor  # noqa: E402
from minivit.models import create_model  # noqa: E402
from minivit.models import load_pretrained  # noqa: E402
from helpers_timm import random_timm, relative_error  # noqa: E402

SMALL = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2),
             num_heads=(2, 4), num_classes=10)


def check_parity(name, batch, seed, **kwargs):
    reference = random_timm(name, seed, **kwargs)
    minivit.manual_seed(seed)
    model = create_model(name, **kwargs).to(dtype="float64").eval()
    load_pretrained(model, reference.state_dict())  # by name: every key, every shape
    size, chans = model.patch_embed.img_size, model.patch_embed.in_chans
    rng = np.random.default_rng(seed + 1)
    images = rng.standard_normal((batch, chans, *size))
    upstream = rng.standard_normal((batch, model.num_classes))

    logits = model(Tensor(images))
    logits.backward(upstream)
    torch_images = torch.from_numpy(images)
    torch_logits = reference(torch_images)
    torch_logits.backward(torch.from_numpy(upstream))

    assert relative_error(logits.numpy(), torch_logits.detach().numpy()) < 1e-10
    ours = dict(model.named_parameters())
    theirs = dict(reference.named_parameters())
    assert set(ours) == set(theirs)
    errors = {key: relative_error(ours[key].grad, theirs[key].grad.numpy()) for key in ours}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-8, f"{worst}: gradient relative error {errors[worst]:.2e}"


@pytest.mark.parametrize("seed", [0, 1])
def test_small_swin_matches_timm(seed):
    """Two stages at 16x16 and 8x8 with 4x4 windows: both shifted blocks carry a mask."""
    check_parity("swin_tiny_patch4_window7_224", batch=2, seed=seed, **SMALL)


def test_small_swin_where_the_last_map_is_the_window_matches_timm():
    """Stage 1's 4x4 map equals the window: one window, no shift (timm's rule)."""
    check_parity("swin_tiny_patch4_window7_224", batch=2, seed=3,
                 **dict(SMALL, img_size=16, qkv_bias=False, mlp_ratio=2.0))


def test_swin_tiny_at_224_matches_timm():
    check_parity("swin_tiny_patch4_window7_224", batch=1, seed=0)


def test_parameter_counts_are_timms():
    """The named models' counts (the arithmetic of swin_cost, which test_swin checks against
    built models; swin_tiny is built in full by the parity test above) equal timm's."""
    from minivit.inspect.swin_cost import swin_cost
    from minivit.models import model_config

    for name, count in (("swin_tiny_patch4_window7_224", 28_288_354),
                        ("swin_small_patch4_window7_224", 49_606_258),
                        ("swin_base_patch4_window7_224", 87_768_224)):
        reference = timm.create_model(name, pretrained=False, device="meta")
        assert sum(p.numel() for p in reference.parameters()) == count
        assert swin_cost(model_config(name)).total_params == count, name


def test_original_microsoft_layout_loads_as_timm_maps_it():
    """Downsample at the end of stages 0.., `head.` for `head.fc.`, the fixed buffers stored:
    timm's checkpoint_filter_fn and minivit's loader give the same model."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    reference = random_timm("swin_tiny_patch4_window7_224", 5, **SMALL)
    original = {}
    for key, value in reference.state_dict().items():
        stage = key.split(".")[1] if key.startswith("layers.") else None
        if stage is not None and ".downsample." in key:
            key = key.replace(f"layers.{stage}.", f"layers.{int(stage) - 1}.")
        original[key.replace("head.fc.", "head.")] = value
    original["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16).long()
    assert checkpoint_filter_fn(original, reference).keys() == reference.state_dict().keys()

    model = create_model("swin_tiny_patch4_window7_224", **SMALL).to(dtype="float64")
    notes = load_pretrained(model, original, notify=lambda note: None)
    assert any("original Swin checkpoint layout" in note for note in notes)
    for key, value in reference.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[key], value.numpy())


@pytest.mark.parametrize("name, kwargs", [
    ("swin_tiny_patch4_window7_224", {}),
    ("swin_tiny_patch4_window7_224", dict(img_size=256)),  # 64x64 map: timm pads to 7x7 windows
    ("swin_tiny_patch4_window7_224", SMALL),
])
def test_swin_cost_counts_the_macs_torch_counts_in_timm(name, kwargs):
    """minivit.inspect.swin_cost's arithmetic against torch's FlopCounterMode (2 FLOPs per
    multiply-add of every matmul, convolution and attention) on timm's model."""
    from torch.utils.flop_counter import FlopCounterMode

    from minivit.inspect.swin_cost import swin_cost
    from minivit.models import model_config

    # on the meta device: shapes only, nothing initialised or computed
    reference = timm.create_model(name, pretrained=False, device="meta", **kwargs).eval()
    size = reference.patch_embed.img_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        reference(torch.zeros(1, 3, *size, device="meta"))
    cost = swin_cost(model_config(name, **kwargs))
    assert 2 * cost.total_macs == counter.get_total_flops()
    assert cost.total_params == sum(p.numel() for p in reference.parameters())
