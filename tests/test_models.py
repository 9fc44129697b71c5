"""VisionTransformer: timm names and shapes, parameter counts, layer errors, Module API."""

import numpy as np
import pytest

import minivit
import minivit.functional as F
from minivit.errors import DTypeError, MinivitError, ShapeError, WeightsError
from minivit.models import MODEL_CONFIGS, VisionTransformer, create_model
from minivit.nn import Linear

TIMM_PARAMETER_COUNTS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch32_224": 88_224_232,
    "vit_large_patch16_224": 304_326_632,
    "vit_huge_patch14_224": 632_045_800,
}


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224",
                                  "vit_base_patch32_224"])
def test_parameter_counts_match_timm(name):
    assert create_model(name).num_parameters() == TIMM_PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "vit_large_patch16_224",
                                  "vit_huge_patch14_224"])
def test_large_parameter_counts_from_shapes(name):
    # same count from the shapes alone (allocating ViT-H would take seconds and 2.5 GB)
    from minivit.inspect.cost import model_cost
    config = MODEL_CONFIGS[name]
    assert model_cost(dict(config, in_chans=3, num_classes=1000)).total_params \
        == TIMM_PARAMETER_COUNTS[name]


def test_state_dict_names_and_shapes_are_timms():
    model = VisionTransformer(img_size=32, patch_size=4, in_chans=3, num_classes=10,
                              embed_dim=48, depth=2, num_heads=3)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes["patch_embed.proj.weight"] == (48, 3, 4, 4)
    assert shapes["patch_embed.proj.bias"] == (48,)
    assert shapes["cls_token"] == (1, 1, 48)
    assert shapes["pos_embed"] == (1, 65, 48)
    assert shapes["blocks.1.attn.qkv.weight"] == (144, 48)
    assert shapes["blocks.1.attn.proj.weight"] == (48, 48)
    assert shapes["blocks.0.mlp.fc1.weight"] == (192, 48)
    assert shapes["blocks.0.mlp.fc2.weight"] == (48, 192)
    for norm in ("blocks.0.norm1", "blocks.0.norm2", "norm"):
        assert shapes[f"{norm}.weight"] == (48,) and shapes[f"{norm}.bias"] == (48,)
    assert shapes["head.weight"] == (10, 48)
    assert len(shapes) == 4 + 12 * 2 + 4


def test_no_qkv_bias_drops_the_key():
    model = create_model("vit_digits", depth=1, qkv_bias=False)
    assert "blocks.0.attn.qkv.bias" not in model.state_dict()


def test_initialisation_follows_timm():
    minivit.manual_seed(0)
    model = create_model("vit_small_patch16_224", depth=1)
    qkv = model.blocks[0].attn.qkv
    assert abs(float(qkv.weight.data.std()) - 0.02) < 0.001
    assert float(np.abs(qkv.bias.data).max()) == 0.0
    assert abs(float(model.pos_embed.data.std()) - 0.02) < 0.002
    assert float(np.abs(model.cls_token.data).max()) < 1e-5
    assert np.all(model.norm.weight.data == 1) and np.all(model.norm.bias.data == 0)


def test_same_seed_same_weights():
    minivit.manual_seed(3)
    a = create_model("vit_digits").state_dict()
    minivit.manual_seed(3)
    b = create_model("vit_digits").state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_forward_shapes_and_attention_rows_sum_to_one():
    model = create_model("vit_digits", depth=2).eval()
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    logits, attention = model.forward_with_attention(x)
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    assert len(attention) == 2 and attention[0].shape == (3, 4, 17, 17)
    np.testing.assert_allclose(attention[-1].sum(axis=-1), 1.0, rtol=1e-5)
    assert model.blocks[0].attn.attention is None  # not kept on the normal path


@pytest.mark.parametrize("shape, message", [
    ((2, 3, 8, 8), "got (2, 3, 8, 8)"),  # wrong channels
    ((2, 1, 16, 16), "(batch, 1, 8, 8)"),  # wrong size
    ((1, 8, 8), "got (1, 8, 8)"),  # missing batch axis
])
def test_wrong_input_shape_says_expected_and_got(shape, message):
    model = create_model("vit_digits", depth=1)
    with pytest.raises(ShapeError, match=r"expected images of shape") as error:
        model(np.zeros(shape, np.float32))
    assert message in str(error.value)


def test_image_size_not_multiple_of_patch():
    with pytest.raises(ShapeError, match="not a multiple of the patch size"):
        create_model("vit_digits", img_size=9)


def test_unknown_model_and_option():
    with pytest.raises(MinivitError, match="known models"):
        create_model("vit_gigantic")
    with pytest.raises(MinivitError, match="unknown model options"):
        create_model("vit_digits", depht=3)


def test_load_state_dict_strict_reports_every_problem():
    model = create_model("vit_digits", depth=1)
    state = model.state_dict()
    del state["norm.weight"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["head.weight"] = np.zeros((5, 64), np.float32)
    with pytest.raises(WeightsError) as error:
        model.load_state_dict(state)
    text = str(error.value)
    assert "norm.weight" in text and "extra.weight" in text and "head.weight" in text
    assert "does not fit the model" in text and "another num_classes" in text  # timm's check


def test_non_strict_load_still_refuses_a_mis_shaped_key():
    model = create_model("vit_digits", depth=1)
    before = model.pos_embed.numpy()
    state = model.state_dict()
    state["head.weight"] = np.zeros((5, 64), np.float32)
    state["pos_embed"] = np.ones_like(before)
    with pytest.raises(WeightsError, match=r"head.weight: expected \(10, 64\), got \(5, 64\)"):
        model.load_state_dict(state, strict=False)
    np.testing.assert_array_equal(model.pos_embed.numpy(), before)  # nothing loaded
    del state["head.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["head.weight"] and unexpected == []
    np.testing.assert_array_equal(model.pos_embed.numpy(), np.ones_like(before))


def test_any_module_strict_load_names_every_problem_and_loads_nothing():
    """A module other than the ViT gets the generic check (no timm hints)."""
    layer = Linear(3, 2)
    before = layer.weight.numpy()
    state = {"weight": np.ones((2, 4), np.float32), "extra": np.zeros(1, np.float32)}
    with pytest.raises(WeightsError) as error:
        layer.load_state_dict(state)
    text = str(error.value)
    assert text.startswith("load_state_dict: 1 mis-shaped key(s), 1 missing, 1 unexpected")
    assert "missing bias" in text and "unexpected extra" in text
    assert "weight: expected (2, 3), got (2, 4)" in text and "timm" not in text
    np.testing.assert_array_equal(layer.weight.numpy(), before)
    state = {"weight": np.ones((2, 3), np.float32), "extra": np.zeros(1, np.float32)}
    assert layer.load_state_dict(state, strict=False) == (["bias"], ["extra"])
    np.testing.assert_array_equal(layer.weight.numpy(), np.ones((2, 3)))


def test_load_state_dict_copies_in_place():
    source = create_model("vit_digits", depth=1)
    target = create_model("vit_digits", depth=1)
    view = target.pos_embed.data
    target.load_state_dict(source.state_dict())
    assert target.pos_embed.data is view
    np.testing.assert_array_equal(view, source.pos_embed.data)


def test_train_eval_and_to_dtype():
    model = create_model("vit_digits", depth=1, drop_path_rate=0.5)
    assert model.eval().blocks[0].training is False
    assert model.train().blocks[0].mlp.training is True
    model.to(dtype="float64")
    assert {p.dtype for p in model.parameters()} == {np.dtype("float64")}
    x = np.random.default_rng(0).random((2, 1, 8, 8))
    model.eval()
    np.testing.assert_array_equal(model(x).data, model(x).data)  # eval: no drop-path noise


def test_module_repr_lists_layers():
    text = repr(create_model("vit_digits", depth=1))
    assert "PatchConv2d(1, 64, kernel_size=2, stride=2)" in text and "Linear(64, 192" in text


def test_whole_model_gradient_check():
    minivit.manual_seed(0)
    model = create_model("vit_digits", depth=1, embed_dim=8, num_heads=2).to(dtype="float64")
    x = np.random.default_rng(1).random((2, 1, 8, 8))
    labels = np.array([3, 7])

    def loss(image):
        return F.cross_entropy(model(image), labels)

    report = minivit.gradcheck(loss, x, parameters=dict(model.named_parameters()),
                               names=["image"], full_check_limit=64, directions=3)
    assert report.passed, str(report)
    assert len(report.inputs) == 1 + len(model.parameters())


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_forward_computes_only_the_class_token_in_the_last_block_with_the_same_results(
        drop_path):
    """forward skips the last block's work for the tokens the head never reads; the logits
    and every gradient equal the full computation's (timm's) in float64."""
    model = create_model("vit_digits", depth=3, drop_path_rate=drop_path).to(dtype="float64")
    images = np.random.default_rng(0).random((6, 1, 8, 8))
    labels = np.array([0, 1, 2, 3, 4, 5])
    results = {}
    for full in (False, True):
        model.full_last_block = full
        minivit.manual_seed(3)  # the same drop-path draws on both paths
        for parameter in model.parameters():
            parameter.grad = None
        logits = model(minivit.Tensor(images))
        F.cross_entropy(logits, labels).backward()
        results[full] = logits.data, {n: p.grad for n, p in model.named_parameters()}
    np.testing.assert_allclose(results[False][0], results[True][0], rtol=1e-13, atol=1e-15)
    for name, grad in results[True][1].items():
        scale = np.abs(grad).max()
        np.testing.assert_allclose(results[False][1][name], grad, rtol=1e-12, atol=1e-14 * scale,
                                   err_msg=name)
    # the shortcut really is taken: the last block's MLP saw only the class token
    seen = []
    original = model.blocks[-1].mlp.forward
    model.blocks[-1].mlp.forward = lambda x: seen.append(x.shape) or original(x)
    model.full_last_block = False
    model(minivit.Tensor(images))
    assert seen == [(6, 1, 64)]


@pytest.mark.parametrize("option, value, expected", [
    ("img_size", -16, "img_size must be at least 1, got -16"),
    ("img_size", (32, 0), "img_size must be at least 1, got 0"),
    ("patch_size", 0, "patch_size must be at least 1, got 0"),
    ("num_classes", -2, "num_classes must be at least 0, got -2"),
    ("depth", 0, "depth must be at least 1, got 0"),
    ("embed_dim", 0, "embed_dim must be at least 1, got 0"),
    ("in_chans", 0, "in_chans must be at least 1, got 0"),
    ("mlp_ratio", float("nan"), "mlp_ratio must be greater than 0, got nan")])
def test_sizes_no_vit_has_are_refused(option, value, expected):
    options = dict(img_size=32, patch_size=16, embed_dim=24, depth=1, num_heads=3)
    with pytest.raises(MinivitError, match=expected):
        VisionTransformer(**dict(options, **{option: value}))
    assert VisionTransformer(**dict(options, num_classes=0)).head is None  # 0: no head


def test_images_of_another_dtype_than_the_model_are_a_clear_error():
    model = create_model("vit_digits", depth=1)  # float32
    with pytest.raises(DTypeError, match=r"expected float32 images .* got float64: cast them"):
        model(np.zeros((2, 1, 8, 8)))  # used to run in float64 and fail in Linear.backward


# -- optimizers: misuse that used to fail silently -----------------------------------------------
def test_optimizers_want_named_parameters():
    from minivit.optim import SGD, AdamW

    model = create_model("vit_digits", depth=1)
    for optimizer in (AdamW, SGD):
        with pytest.raises(TypeError, match=r"takes model.named_parameters\(\).*model.parameters"):
            optimizer(model.parameters(), lr=0.1)


def test_a_parameter_replaced_after_the_optimizer_was_made_is_a_clear_error():
    import minivit.functional as F
    from minivit.optim import AdamW

    model = create_model("vit_digits", depth=1)
    optimizer = AdamW(model.named_parameters())
    model.to(dtype="float64")  # gives every parameter a new array
    F.cross_entropy(model(np.zeros((2, 1, 8, 8))), np.array([0, 1])).backward()
    with pytest.raises(MinivitError, match="no longer lives in the optimizer's buffer"):
        optimizer.step()


def test_optimizer_state_of_another_optimizer_or_model_is_a_clear_error():
    from minivit.optim import SGD, AdamW

    model = create_model("vit_digits", depth=1)
    adamw_state = AdamW(model.named_parameters()).state_dict()
    with pytest.raises(MinivitError, match="keeps momentum, the state holds m, v"):
        SGD(model.named_parameters()).load_state_dict(adamw_state)
    bigger = AdamW(create_model("vit_digits", depth=2).named_parameters()).state_dict()
    with pytest.raises(MinivitError, match="saved for another model"):
        AdamW(model.named_parameters()).load_state_dict(bigger)


@pytest.mark.parametrize("name, options", [("beit_digits", dict(depth=2)),
                                           ("vit_digits", dict(depth=2, rel_pos_bias=True)),
                                           ("swin_digits", {})])
def test_a_relative_position_index_is_placed_once_per_model_not_per_forward(monkeypatch, name,
                                                                            options):
    """The fixed index (and Swin's masks) reach a backend once (nn.Constants): on the GPU a
    copy per forward would cost a host-to-device copy per block and break a CUDA-graph
    capture. NumPy stands in for the device: "placing" an array copies it, once."""
    from minivit.nn import module

    placed, indexes_used = [], []
    real_to_backend, real_bias = module.backends.to_backend, F.relative_position_bias

    def to_backend(array, name=None):  # a copy, as to a device; a placed array stays
        if any(array is copy for copy in placed):
            return real_to_backend(array, name)
        placed.append(array.copy())
        return placed[-1]

    def relative_position_bias(table, index):
        indexes_used.append(index)
        return real_bias(table, index)

    monkeypatch.setattr(module.backends, "to_backend", to_backend)
    monkeypatch.setattr(F, "relative_position_bias", relative_position_bias)
    model = create_model(name, **options)
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    for _ in range(3):
        F.cross_entropy(model(x), np.array([0, 1])).backward()
    blocks = len(indexes_used) // 3
    assert blocks >= 2
    assert [id(index) for index in indexes_used] == [id(index) for index in
                                                     indexes_used[:blocks]] * 3
    placed_indexes = [array for array in placed if array.dtype.kind in "iu"]
    assert len(placed_indexes) == blocks
    assert all(any(index is copy for copy in placed_indexes) for index in indexes_used)
