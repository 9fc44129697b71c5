"""The ViT family's options, named models and weights, without PyTorch: parameter counts and
names, what each option computes, resampling, loading by name (layer-scale spellings, fixed
buffers), checkpoints that keep the options, and the errors of bad options.
(tests/test_family_parity.py checks the numbers against the real timm.)"""

import numpy as np
import pytest

import minivit
from minivit import Tensor
from minivit.checkpoint import save_checkpoint
from minivit.errors import MinivitError, ShapeError, WeightsError
from minivit.inspect import cls_attention_maps, parameter_shapes
from minivit.models.pos_embed import resize_rel_pos_bias_table, sincos_2d
from minivit.models import (MODEL_CONFIGS, VisionTransformer, create_model, load_pretrained,
                            model_config, model_from_checkpoint)

# the counts timm 1.0.31 reports (docs: /work/shared/REFERENCES.md, tests/test_family_parity.py)
TIMM_COUNTS = {
    "deit_tiny_patch16_224": 5_717_416,
    "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432,
    "deit_base_distilled_patch16_224": 87_338_192,
    "deit3_small_patch16_224": 22_059_496,
    "beit_base_patch16_224": 86_530_984,
}
SMALL = dict(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=16, depth=2,
             num_heads=2)
VARIANTS = {
    "learn": {},
    "none": dict(pos_embed="none"),
    "sincos": dict(pos_embed="sincos"),
    "2d": dict(pos_embed="2d"),
    "2d_no_embed_class": dict(pos_embed="2d", no_embed_class=True),
    "rel_pos_bias": dict(pos_embed="none", rel_pos_bias=True),
    "avg_fc_norm": dict(global_pool="avg"),
    "avg_no_class_token": dict(global_pool="avg", class_token=False, rel_pos_bias=True),
    "avg_without_fc_norm": dict(global_pool="avg", fc_norm=False),
    "layer_scale": dict(init_values=0.1, no_embed_class=True),
    "distilled": dict(distilled=True),
    "distilled_2d": dict(distilled=True, pos_embed="2d"),
    "beit": dict(beit=True, init_values=0.1, pos_embed="none", rel_pos_bias=True,
                 global_pool="avg"),
    "norm_eps": dict(norm_eps=1e-5),
}


def small(variant, **extra):
    minivit.manual_seed(0)
    return VisionTransformer(**dict(SMALL, **VARIANTS[variant], **extra))


def images(batch=2, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal((batch, 1, 8, 8)).astype(dtype)


@pytest.mark.parametrize("name", sorted(TIMM_COUNTS))
def test_named_models_have_timms_parameter_counts(name):
    shapes = parameter_shapes(model_config(name))
    assert sum(int(np.prod(shape)) for shape in shapes.values()) == TIMM_COUNTS[name]


@pytest.mark.parametrize("name", [n for n, config in MODEL_CONFIGS.items()
                                  if "depths" not in config and config["img_size"] < 64])
def test_small_named_models_build_with_the_shapes_info_reports(name):
    model = create_model(name)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        parameter_shapes(model.config)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_keeps_float32_and_its_shapes_match_info(variant):
    model = small(variant)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        parameter_shapes(model.config)
    x = Tensor(images(dtype=np.float32))
    logits = model.train()(x)
    assert logits.shape == (2, 3) and logits.dtype == np.float32
    logits.sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == np.float32, name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_last_block_shortcut_gives_timms_full_computation(variant):
    """forward computes only the prefix tokens in the last block ('token' pooling): the same
    logits and gradients as every token in full."""
    model = small(variant).to(dtype="float64").train()
    results = []
    for full in (False, True):
        model.full_last_block = full
        model.zero_grad()
        logits = model(Tensor(images()))
        (logits * Tensor(np.arange(6.0).reshape(2, 3))).sum().backward()
        results.append((logits.data, [p.grad.copy() for p in model.parameters()]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for fast, full in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(fast, full, rtol=1e-10, atol=1e-12)


def test_position_options_compute_what_they_say():
    x = images()
    learn, none_ = small("learn").to(dtype="float64"), small("none").to(dtype="float64")
    assert not any("pos_embed" in name for name, _ in none_.named_parameters())
    # sincos: a fixed table, zeros for the class token, not a parameter
    sincos = small("sincos").to(dtype="float64")
    table = sincos.position_embedding(Tensor(x))
    np.testing.assert_array_equal(table[0, 0], 0.0)
    np.testing.assert_allclose(table[0, 1:], sincos_2d(16, (4, 4), class_token=False))
    # 2d: the class token's own vector, then row(i) + col(j)
    model = small("2d").to(dtype="float64")
    position = model.position_embedding(Tensor(x)).data
    row, col = model.pos_embed_row.data, model.pos_embed_col.data
    np.testing.assert_array_equal(position[0, 0], model.pos_embed_cls.data[0, 0])
    np.testing.assert_allclose(position[0, 1 + 2 * 4 + 3], row[2] + col[3], rtol=1e-15)
    assert learn.pos_embed.shape == (1, 17, 16)


def test_distilled_model_averages_its_heads_and_returns_both_when_distilling():
    model = small("distilled").to(dtype="float64").eval()
    features = model.forward_features(Tensor(images()))
    cls = model.head(features[:, 0]).data
    dist = model.head_dist(features[:, 1]).data
    np.testing.assert_allclose(model(Tensor(images())).data, (cls + dist) / 2, rtol=1e-12)
    model.distilled_training = True
    both = model.train()(Tensor(images()))
    assert isinstance(both, tuple) and len(both) == 2
    np.testing.assert_allclose(both[1].data, dist, rtol=1e-12)
    assert model.num_prefix_tokens == 2 and model.pos_embed.shape == (1, 18, 16)


@pytest.mark.parametrize("variant, prefix", [("distilled", 2), ("avg_no_class_token", 0),
                                             ("learn", 1)])
def test_attention_maps_know_the_prefix_tokens(variant, prefix):
    model = small(variant).to(dtype="float64").eval()
    _, attentions = model.forward_with_attention(Tensor(images()))
    assert attentions[-1].shape == (2, 2, 16 + prefix, 16 + prefix)
    maps = cls_attention_maps(attentions[-1], (4, 4), prefix)
    assert maps.shape == (2, 2, 4, 4)
    expected = attentions[-1][:, :, 0, prefix:] if prefix else \
        attentions[-1].mean(axis=2)[:, :, prefix:]
    np.testing.assert_allclose(maps.reshape(2, 2, 16), expected)


@pytest.mark.parametrize("options, match", [
    (dict(global_pool="max"), "global_pool must be one of token, avg; got 'max'"),
    (dict(pos_embed="rope"), "pos_embed must be one of learn, none, sincos, 2d"),
    (dict(class_token=False), "without one \\(class_token=False\\) use global_pool='avg'"),
    (dict(distilled=True, global_pool="avg"), "distilled=True \\(DeiT\\) reads the class"),
    (dict(distilled=True, rel_pos_bias=True), "serves one class token at most"),
    (dict(init_values=0.0), "init_values \\(layer scale\\) must be greater than 0"),
    (dict(pos_embed="sincos", embed_dim=18, num_heads=2), "divisible by 4, got 18"),
])
def test_options_that_do_not_fit_are_clear_errors(options, match):
    with pytest.raises(MinivitError, match=match):
        VisionTransformer(**dict(SMALL, **options))


def test_create_model_takes_timms_keywords_and_pretrained_false():
    model = create_model("deit3_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                         embed_dim=32, depth=2, num_heads=2, num_classes=10)
    assert model.config["no_embed_class"] and model.config["init_values"] == 1e-6
    assert model.pos_embed.shape == (1, 16, 32)
    with pytest.raises(MinivitError, match="unknown model options \\['window_size'\\]"):
        create_model("beit_base_patch16_224", window_size=7)


# -- image size --------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["learn", "distilled", "layer_scale", "2d", "sincos", "none"])
def test_resampling_to_another_image_size(variant):
    model = small(variant).to(dtype="float64")
    before = model.state_dict()
    model.resample_pos_embed(12)
    assert model.patch_embed.grid_size == (6, 6)
    out = model.eval()(Tensor(np.zeros((1, 1, 12, 12))))
    assert out.shape == (1, 3)
    if variant == "sincos":
        np.testing.assert_allclose(model.position_embedding(out)[0, 1:],
                                   sincos_2d(16, (6, 6), class_token=False))
    if variant in ("learn", "distilled"):  # the prefix tokens' entries are kept
        prefix = model.num_prefix_tokens
        np.testing.assert_array_equal(model.pos_embed.data[:, :prefix],
                                      before["pos_embed"][:, :prefix])
        assert model.pos_embed.shape == (1, prefix + 36, 16)
    if variant == "2d":
        assert model.pos_embed_row.shape == (6, 16) and model.pos_embed_col.shape == (6, 16)


@pytest.mark.parametrize("variant, extra", [("rel_pos_bias", 3), ("avg_no_class_token", 0)])
def test_a_relative_bias_model_resizes_its_tables_to_another_image_size(variant, extra):
    """In place (timm's set_input_size) and on loading (timm's checkpoint filter), the same
    tables: BEiT's 3 class-token rows kept (none without a class token)."""
    model = small(variant).to(dtype="float64")
    before = model.state_dict()
    model.resample_pos_embed(12)
    key = "blocks.1.attn.relative_position_bias_table"
    table = model.state_dict()[key]
    assert table.shape == (11 * 11 + extra, 2)
    np.testing.assert_array_equal(table, resize_rel_pos_bias_table(before[key], (6, 6), extra))
    np.testing.assert_array_equal(table[121:], before[key][49:])
    assert model.eval()(Tensor(np.zeros((1, 1, 12, 12)))).shape == (1, 3)

    bigger = small(variant, img_size=12).to(dtype="float64")
    notes = load_pretrained(bigger, before, notify=lambda _: None)
    assert notes[0] == ("resampled relative_position_bias_table of 2 block(s) from a 4x4 to a "
                        "6x6 window (timm's interpolation)")
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(bigger.state_dict()[name], value, err_msg=name)


def test_relative_tables_that_cannot_be_resized_are_refused_clearly():
    """Another number of heads (the other weights may fit), or a non-square window (which
    the table's size does not tell): refused, or skipped with strict=False."""
    state = small("rel_pos_bias", num_heads=4).state_dict()  # 4 heads of width 4
    model = small("rel_pos_bias", img_size=12)
    with pytest.raises(WeightsError, match=r"blocks.0.attn.relative_position_bias_table has "
                                           r"shape \(52, 4\), the model's \(124, 2\): a "
                                           r"table of 4 heads cannot serve the model's 2 heads"):
        load_pretrained(model, state)
    notes = load_pretrained(model, state, strict=False, notify=lambda _: None)
    assert notes == ["skipped 2 key(s) that do not fit the model: blocks.0.attn."
                     "relative_position_bias_table, blocks.1.attn.relative_position_bias_table"]
    with pytest.raises(WeightsError, match=r"a table of 80 rows is not \(2w-1\)\^2 \+ 3 "
                                           r"offsets of a square window"):
        load_pretrained(model, small("rel_pos_bias", img_size=(8, 12)).state_dict())
    with pytest.raises(WeightsError, match="cannot tell the window of a relative position "
                                           "bias table of 10 rows"):
        resize_rel_pos_bias_table(np.zeros((10, 2)), (3, 3))
    with pytest.raises(WeightsError, match=r"a 2x3 window has 3\*5 \+ 3 rows; got 52"):
        resize_rel_pos_bias_table(np.zeros((52, 2)), (3, 3), 3, old_window=(2, 3))


# -- weights by name -----------------------------------------------------------------------------
def test_layer_scale_loads_from_either_spelling():
    """Older DeiT-III checkpoints spell layer scale gamma_1/gamma_2, timm ls1.gamma/ls2.gamma."""
    source = small("layer_scale")
    state = source.state_dict()
    renamed = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v
               for k, v in state.items()}
    assert "blocks.0.gamma_1" in renamed
    target = small("layer_scale")
    for parameter in target.parameters():
        parameter.data[...] = 0
    assert load_pretrained(target, renamed) == []
    for name, value in target.state_dict().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)


def test_beit_weights_drop_the_fixed_index_and_name_what_does_not_fit():
    model = small("beit")
    state = model.state_dict()
    state["blocks.0.attn.relative_position_index"] = np.zeros((17, 17), np.int64)
    assert load_pretrained(small("beit"), state) == []
    # a plain ViT given BEiT's weights: each key named, with the option it needs
    with pytest.raises(WeightsError) as info:
        load_pretrained(small("learn"), model.state_dict())
    message = str(info.value)
    assert "unexpected: blocks.0.attn.q_bias (BEiT's q and v biases (beit=True)" in message
    assert "relative position bias (rel_pos_bias=True)" in message
    assert "missing: pos_embed" in message and "missing: blocks.0.attn.qkv.bias" in message


def test_another_number_of_classes_keeps_both_fresh_heads():
    source = small("distilled", num_classes=5)
    target = small("distilled")
    notes = load_pretrained(target, source.state_dict(), notify=lambda note: None)
    assert any("keeping the model's freshly initialised head" in note for note in notes)


@pytest.mark.parametrize("variant", ["distilled_2d", "beit", "sincos", "avg_no_class_token"])
def test_checkpoints_keep_the_options(tmp_path, variant):
    model = small(variant)
    save_checkpoint(tmp_path / "best.safetensors", model, {"epoch": 1})
    loaded, _ = model_from_checkpoint(tmp_path)
    assert loaded.config == model.config
    x = Tensor(images(dtype=np.float32))
    np.testing.assert_array_equal(loaded(x).data, model.eval()(x).data)


def test_predict_resizes_the_relative_tables_of_a_checkpoint(tmp_path, capsys):
    from minivit.cli import main

    model = small("rel_pos_bias")
    save_checkpoint(tmp_path / "best.safetensors", model,
                    {"epoch": 1, "mean": [0.5], "std": [0.5], "class_names": ["a", "b", "c"]})
    image = np.random.default_rng(0).random((12, 12)).astype(np.float32)
    np.save(tmp_path / "image.npy", image)
    assert main(["predict", "--checkpoint", str(tmp_path), "--img-size", "12", "--top-k", "3",
                 str(tmp_path / "image.npy")]) == 0
    captured = capsys.readouterr()
    assert "note: resized the relative position bias tables of 2 block(s) to image size 12" \
        in captured.err  # this model has no position embedding
    model.resample_pos_embed(12)
    with minivit.no_grad():
        logits = model.eval()(Tensor((image[None, None] - 0.5) / 0.5)).data[0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    best = ["a", "b", "c"][int(probs.argmax())]
    assert f"{probs.max():.4f}  {best}" in captured.out
