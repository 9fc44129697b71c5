"""Relative position bias tables learned for another window, resized as the real timm resizes
them (float64): timm's resize_rel_pos_bias_table itself; BEiT and Swin state dicts loaded into
models of another size against timm's checkpoint_filter_fn (the tables to 1e-12, the logits of
timm's model built at the new size to 1e-10); the same in place (BEiT's set_input_size, a Swin
stage whose window becomes its map); and a ViT with minivit's rel_pos_bias option (BEiT's
layout) against timm's function."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import minivit  # noqa: E402
from minivit import Tensor  # noqa: E402
from minivit.models import create_model, load_pretrained  # noqa: E402
from minivit.models.pos_embed import resize_rel_pos_bias_table  # noqa: E402
from helpers_timm import random_timm, relative_error  # noqa: E402

# timm's own interpolation helper warns about its indexing; nothing minivit can change
pytestmark = pytest.mark.filterwarnings("ignore:.*(non-contiguous|non-tuple sequence)")

BEIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
SWIN = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
            num_classes=10)


def assert_same_model(model, reference, seed):
    """minivit's `model` holds every bias table of timm's `reference` (to 1e-12) and gives
    its logits (to 1e-10)."""
    ours = model.state_dict()
    tables = {key: value.numpy() for key, value in reference.state_dict().items()
              if key.endswith("relative_position_bias_table")}
    assert tables
    for key, value in tables.items():
        assert relative_error(ours[key], value) < 1e-12, key
    images = np.random.default_rng(seed).standard_normal((2, 3, *model.patch_embed.img_size))
    with minivit.no_grad():
        logits = model.eval()(Tensor(images)).numpy()
    with torch.no_grad():
        expected = reference.eval()(torch.from_numpy(images)).numpy()
    assert relative_error(logits, expected) < 1e-10


def check_against_timm(name, old, new, filter_fn, note):
    """A state dict of timm's model built with `old` loaded into minivit's and timm's models
    built with `new`: the same tables as timm's filter gives, the same logits."""
    state = random_timm(name, 0, **old).state_dict()
    reference = timm.create_model(name, pretrained=False, **new).double().eval()
    filtered = filter_fn(dict(state), reference)
    assert all(filtered[k].shape != state[k].shape
               for k in filtered if k.endswith("relative_position_bias_table"))
    reference.load_state_dict(filtered, strict=True)

    minivit.manual_seed(0)
    model = create_model(name, **new).to(dtype="float64").eval()
    notes = load_pretrained(model, state, notify=lambda _: None)
    assert any(note in line for line in notes), notes
    assert_same_model(model, reference, seed=1)


@pytest.mark.parametrize("old, new, extra", [
    (4, 6, 3), (6, 4, 3), (7, 4, 0), (4, 7, 0), (2, 5, 0), (7, 12, 3), (1, 3, 0), (14, 24, 3)])
def test_the_resize_is_timms(old, new, extra):
    """Up and down, with BEiT's 3 class-token rows and without (Swin): timm's numbers."""
    from timm.layers import resize_rel_pos_bias_table as timm_resize

    table = np.random.default_rng(old * new).standard_normal(((2 * old - 1) ** 2 + extra, 3))
    rows = (2 * new - 1) ** 2 + extra
    expected = timm_resize(torch.from_numpy(table), (new, new), (rows, 3)).numpy()
    ours = resize_rel_pos_bias_table(table, (new, new), extra)
    assert ours.shape == (rows, 3) and ours.dtype == np.float64
    assert relative_error(ours, expected) < 1e-12
    np.testing.assert_array_equal(ours[rows - extra:], table[table.shape[0] - extra:])


@pytest.mark.parametrize("old_size, new_size", [(32, 48), (48, 32)])
def test_a_beit_of_another_image_size_loads_as_timm_loads_it(old_size, new_size):
    """A 4x4 patch grid's tables (7x7 offsets + 3) in a 6x6 grid's model and back."""
    from timm.models.beit import checkpoint_filter_fn

    grids = old_size // 8, new_size // 8
    check_against_timm("beit_base_patch16_224", dict(BEIT, img_size=old_size),
                       dict(BEIT, img_size=new_size), checkpoint_filter_fn,
                       f"from a {grids[0]}x{grids[0]} to a {grids[1]}x{grids[1]} window")


@pytest.mark.parametrize("old_window, new_window", [(4, 8), (4, 2)])
def test_a_swin_of_another_window_size_loads_as_timm_loads_it(old_window, new_window):
    """Stages of 16x16 and 8x8 maps: the windows of both stages change (for 8, stage 1's
    window is its whole map)."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    check_against_timm("swin_tiny_patch4_window7_224", dict(SWIN, window_size=old_window),
                       dict(SWIN, window_size=new_window), checkpoint_filter_fn,
                       f"of 4 block(s) from a {old_window}x{old_window} to a "
                       f"{new_window}x{new_window} window")


def test_a_relative_bias_vit_of_another_image_size_is_resized_as_beit():
    """minivit's rel_pos_bias ViT (BEiT's table layout, a learned pos_embed too): each table
    as timm's function resizes it, the class-token rows kept, pos_embed resampled alongside."""
    from timm.layers import resize_rel_pos_bias_table as timm_resize

    options = dict(patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3,
                   rel_pos_bias=True)
    minivit.manual_seed(0)
    source = create_model("vit_tiny_patch16_224", img_size=16, **options).to(dtype="float64")
    state = source.state_dict()
    model = create_model("vit_tiny_patch16_224", img_size=28, **options).to(dtype="float64")
    notes = load_pretrained(model, state, notify=lambda _: None)
    assert "resampled relative_position_bias_table of 2 block(s) from a 4x4 to a 7x7 window " \
           "(timm's interpolation)" in notes
    assert any(note.startswith("resampled pos_embed from a 4x4 to a 7x7") for note in notes)
    for block in range(2):
        key = f"blocks.{block}.attn.relative_position_bias_table"
        expected = timm_resize(torch.from_numpy(state[key]), (7, 7), (13 * 13 + 3, 2)).numpy()
        assert relative_error(model.state_dict()[key], expected) < 1e-12
    with minivit.no_grad():
        assert model.eval()(Tensor(np.zeros((1, 3, 28, 28)))).shape == (1, 3)


def test_a_beit_resized_in_place_is_timms_set_input_size():
    """resample_pos_embed on a BEiT built for 32x32 images gives timm's set_input_size at
    48x48: every table, and the logits."""
    reference = random_timm("beit_base_patch16_224", 2, **BEIT, img_size=32)
    minivit.manual_seed(0)
    model = create_model("beit_base_patch16_224", **BEIT, img_size=32).to(dtype="float64")
    load_pretrained(model, reference.state_dict())
    reference.set_input_size(img_size=(48, 48))
    model.eval().resample_pos_embed(48)
    assert model.blocks[0].attn.relative_position_bias_table.shape == (11 * 11 + 3, 2)
    assert_same_model(model, reference, seed=3)


def test_a_swin_whose_window_changes_in_place_is_timm_built_at_that_size():
    """set_img_size(8) on a Swin of 32x32 images (maps 16, 8 in 4x4 windows): stage 1's map
    of 2x2 becomes its window, and the model equals timm's built at 8 with the checkpoint
    loaded through its checkpoint_filter_fn."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    options = dict(SWIN, window_size=4)
    source = random_timm("swin_tiny_patch4_window7_224", 4, **options)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False,
                                  **dict(options, img_size=8)).double().eval()
    reference.load_state_dict(checkpoint_filter_fn(source.state_dict(), reference))
    minivit.manual_seed(0)
    model = create_model("swin_tiny_patch4_window7_224", **options).to(dtype="float64").eval()
    load_pretrained(model, source.state_dict())
    model.set_img_size(8)
    assert model.layers[1].blocks[0].window == (2, 2)
    assert_same_model(model, reference, seed=5)
