"""MAE and DINO on tiny models: whole-loss gradient checks (float64, random upstream gradient
through the scalar loss: gradcheck scales it), float32 kept, and the models' bookkeeping (fixed
position embeddings, reference names, masking, teacher EMA, multi-crop)."""

import numpy as np
import pytest

import minivit
from minivit.data.multicrop import MultiCrop, random_resized_crop
from minivit.errors import MinivitError, ShapeError
from minivit.gradcheck import gradcheck
from minivit.models import model_config
from minivit.models.dino import DINO, DINOLoss, class_token_features, update_teacher
from minivit.models.mae import (MaskedAutoencoderViT, patchify_pixels, random_masking,
                                unpatchify_pixels)

TINY = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=8, depth=1, num_heads=2,
            mlp_ratio=2.0)


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def spread_parameters(model, seed):
    """Weights of order one (the initial 0.02-scale ones leave gradients tiny)."""
    rng = np.random.default_rng(seed)
    for name, p in trainable(model).items():
        base = 1.0 if name.endswith("norm.weight") or ".norm" in name and "weight" in name else 0.0
        p.data[...] = base + 0.4 * rng.standard_normal(p.shape)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_loss_gradients(norm_pix_loss):
    minivit.manual_seed(0)
    model = MaskedAutoencoderViT(**TINY, decoder_embed_dim=8, decoder_depth=1,
                                 decoder_num_heads=2, norm_pix_loss=norm_pix_loss)
    model.to(dtype="float64")
    spread_parameters(model, 1)
    rng = np.random.default_rng(2)
    images, noise = rng.standard_normal((2, 1, 8, 8)), rng.random((2, 16))

    def loss():  # the images are also the target (a constant): only the parameters are checked
        return model(images, noise=noise)[0]

    report = gradcheck(loss, parameters=trainable(model), full_check_limit=64, directions=3,
                       rtol=1e-6)
    assert report.passed, str(report)
    assert len(report.inputs) == len(trainable(model))


def test_dino_loss_gradients_through_student_with_local_crops():
    minivit.manual_seed(0)
    student = DINO(dict(model_config("vit_digits", **TINY), num_classes=0), out_dim=6,
                   hidden_dim=8, bottleneck_dim=4).to(dtype="float64")
    spread_parameters(student, 3)
    rng = np.random.default_rng(4)
    crops = [rng.standard_normal((2, 1, 8, 8)) for _ in range(2)] + \
        [rng.standard_normal((2, 1, 4, 4)) for _ in range(2)]
    teacher_out = rng.standard_normal((4, 6))
    dino_loss = DINOLoss(6, teacher_temp=0.5, dtype="float64")
    dino_loss.center = rng.standard_normal((1, 6)) * 0.1

    def loss():
        return dino_loss(student(crops), teacher_out, 0, update_center=False)[0]

    report = gradcheck(loss, parameters=trainable(student), full_check_limit=64,
                       directions=3, rtol=1e-6)
    assert report.passed, str(report)
    assert trainable(student)["backbone.pos_embed"].grad is not None


def test_float32_stays_float32():
    minivit.manual_seed(0)
    mae = MaskedAutoencoderViT(**TINY, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
    loss, pred, mask = mae(np.zeros((2, 1, 8, 8), np.float32))
    loss.backward()
    assert loss.dtype == pred.dtype == mask.dtype == np.float32
    assert all(p.grad.dtype == np.float32 for p in trainable(mae).values())
    dino = DINO(dict(model_config("vit_digits", **TINY), num_classes=0), 6, 8, 4)
    out = dino([np.ones((2, 1, 8, 8), np.float32), np.ones((2, 1, 4, 4), np.float32)])
    assert out.dtype == np.float32


def test_mae_masking_and_patch_order():
    ids_keep, ids_restore, mask = random_masking(3, 10, 0.75)
    assert ids_keep.shape == (3, 2) and mask.sum() == 3 * 8
    assert (np.take_along_axis(mask, ids_keep, axis=1) == 0).all()
    for row in ids_restore:
        assert sorted(row) == list(range(10))
    images = np.arange(2 * 3 * 4 * 6, dtype=float).reshape(2, 3, 4, 6)
    patches = patchify_pixels(images, 2)
    # patch (row 0, col 1), pixel (0, 1), channels fastest: images[:, c, 0, 3]
    np.testing.assert_array_equal(patches[:, 1, 3:6], images[:, :, 0, 3])
    np.testing.assert_array_equal(unpatchify_pixels(patches, 2, (2, 3), 3), images)


def test_mae_names_and_fixed_position_embeddings():
    minivit.manual_seed(0)
    mae = MaskedAutoencoderViT(**TINY, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
    names = set(mae.state_dict())
    assert {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "decoder_embed.weight",
            "decoder_blocks.0.attn.qkv.weight", "decoder_norm.weight",
            "decoder_pred.weight"} <= names
    assert not mae.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    assert "head.weight" not in names


def test_mae_refuses_bad_mask_ratios():
    for ratio in (0.0, 1.0, -0.5, float("nan"), 0.99):
        with pytest.raises(MinivitError, match="mask ratio"):
            MaskedAutoencoderViT(**TINY, decoder_embed_dim=8, decoder_depth=1,
                                 decoder_num_heads=2, mask_ratio=ratio)


def test_position_embedding_is_resized_for_small_crops():
    minivit.manual_seed(0)
    dino = DINO(dict(model_config("vit_digits", **TINY), num_classes=0), 6, 8, 4)
    features = class_token_features(dino.backbone, np.ones((2, 1, 4, 4), np.float32))
    assert features.shape == (2, 8)
    with pytest.raises(ShapeError, match="whole number of 2x2 patches"):
        class_token_features(dino.backbone, np.ones((1, 1, 5, 5), np.float32))


def test_teacher_update_is_the_ema():
    minivit.manual_seed(0)
    student, teacher = (DINO(dict(model_config("vit_digits", **TINY), num_classes=0), 6, 8, 4)
                        for _ in range(2))
    before = teacher.state_dict()
    update_teacher(teacher, student, 0.9)
    for name, value in teacher.state_dict().items():
        np.testing.assert_allclose(value, 0.9 * before[name] + 0.1 * student.state_dict()[name],
                                   rtol=1e-6, atol=1e-7)


def test_multicrop_views_and_errors():
    rng = np.random.default_rng(0)
    images = rng.random((3, 1, 8, 8)).astype(np.float32)
    views = MultiCrop(8, 2, 3, 4, (0.5,), (0.25,), flip=False)(images, rng)
    assert [v.shape for v in views] == [(3, 1, 8, 8)] * 2 + [(3, 1, 4, 4)] * 3
    assert all(v.dtype == np.float32 for v in views)
    whole = random_resized_crop(images, rng, 8, (1.0, 1.0))  # no crop fits: the whole image
    np.testing.assert_allclose(whole, images, atol=1e-6)
    with pytest.raises(MinivitError, match="local crop size must be a positive multiple of "
                                           "the patch size 2, got 5"):
        MultiCrop(8, 2, 2, 5, (0.5,), (0.25,), flip=False)


@pytest.mark.parametrize("channels", [1, 3])
def test_multicrop_of_a_part_of_the_batch_is_that_part_of_the_whole_batchs(channels):
    """A data-parallel process crops only its rows, with the random numbers of the whole
    batch: flips, boxes, jitter, grey-scale and solarisation as one process would draw them."""
    images = np.random.default_rng(1).random((7, channels, 8, 8)).astype(np.float32)
    multicrop = MultiCrop(8, 2, 2, 4, (0.5,) * channels, (0.25,) * channels, flip=True)
    whole = multicrop(images, np.random.default_rng(2))
    for rows in (slice(0, 3), slice(3, 7)):
        part = multicrop(images, np.random.default_rng(2), rows)
        for part_view, whole_view in zip(part, whole, strict=True):
            np.testing.assert_array_equal(part_view, whole_view[rows])
