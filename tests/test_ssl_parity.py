"""Parity of MAE and DINO with PyTorch twins of their reference code (tests/reference_ssl.py):
the same weights and the same masking noise give the same loss, predictions and mask to 1e-10
in float64 and the same gradients to 1e-8; DINO's head, loss, center and teacher update match
likewise. Relative errors are max|ours − ref| / max|ref| per array."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import minivit  # noqa: E402
from minivit import Tensor  # noqa: E402
from minivit.models.dino import DINOHead, DINOLoss, teacher_momentum, update_teacher  # noqa: E402
from minivit.models.mae import MaskedAutoencoderViT  # noqa: E402
from minivit.models.pos_embed import sincos_2d  # noqa: E402
import reference_ssl as ref  # noqa: E402

MAE_CONFIG = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=2, num_heads=2,
                  decoder_embed_dim=12, decoder_depth=2, decoder_num_heads=3, mlp_ratio=2.0)


def relative_error(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-300))


def randomize(model, seed):
    """Redraw every trainable parameter so that nothing is trivially 0 or 1."""
    rng = np.random.default_rng(seed)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        shape = parameter.shape
        if len(shape) >= 2 and not name.endswith("token"):
            values = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or \
                name.endswith("norm.weight"):
            values = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            values = 0.3 * rng.standard_normal(shape)
        parameter.data[...] = values
    return model


def to_torch(state):
    return {key: torch.from_numpy(np.array(value)) for key, value in state.items()}


@pytest.mark.parametrize("grid", [(2, 2), (3, 5)])
def test_sincos_table_is_the_references(grid):
    ours = sincos_2d(16, grid[0])
    np.testing.assert_allclose(ours, ref.get_2d_sincos_pos_embed(16, grid[0], cls_token=True),
                               rtol=0, atol=1e-15)
    assert sincos_2d(8, grid, class_token=False).shape == (grid[0] * grid[1], 8)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_mae_loss_predictions_and_gradients_match_the_reference(norm_pix_loss):
    minivit.manual_seed(0)
    model = MaskedAutoencoderViT(**MAE_CONFIG, norm_pix_loss=norm_pix_loss).to(dtype="float64")
    randomize(model, 1)
    twin = ref.MaskedAutoencoderViT(**MAE_CONFIG, norm_pix_loss=norm_pix_loss).double()
    twin.load_state_dict(to_torch(model.state_dict()), strict=True)  # the reference's names
    rng = np.random.default_rng(2)
    images = rng.standard_normal((3, 3, 8, 8))
    noise = rng.random((3, 16))

    loss, pred, mask = model(Tensor(images), mask_ratio=0.75, noise=noise)
    loss.backward()
    ref_loss, ref_pred, ref_mask = twin(torch.from_numpy(images), 0.75, torch.from_numpy(noise))
    ref_loss.backward()

    np.testing.assert_array_equal(mask, ref_mask.numpy())
    assert mask.sum() == 3 * 12
    assert relative_error(loss.data, ref_loss.item()) < 1e-10
    assert relative_error(pred.data, ref_pred.detach().numpy()) < 1e-10
    twin_parameters = dict(twin.named_parameters())
    checked = 0
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert relative_error(parameter.grad, twin_parameters[name].grad.numpy()) < 1e-8, name
            checked += 1
        else:
            assert name in ("pos_embed", "decoder_pos_embed")
            assert twin_parameters[name].grad is None
    assert checked == sum(p.requires_grad for p in twin.parameters())


def test_dino_head_matches_the_reference():
    minivit.manual_seed(0)
    head = DINOHead(6, 10, hidden_dim=8, bottleneck_dim=5).to(dtype="float64")
    randomize(head, 3)
    twin = ref.DINOHead(6, 10, hidden_dim=8, bottleneck_dim=5).double()
    twin.load_state_dict(to_torch(head.state_dict()), strict=True)
    x = np.random.default_rng(4).standard_normal((4, 6))
    upstream = np.random.default_rng(5).standard_normal((4, 10))
    out = head(Tensor(x))
    out.backward(upstream)
    ref_out = twin(torch.from_numpy(x))
    ref_out.backward(torch.from_numpy(upstream))
    assert relative_error(out.data, ref_out.detach().numpy()) < 1e-10
    twin_parameters = dict(twin.named_parameters())
    for name, parameter in head.named_parameters():
        if name == "head.last_layer.weight_g" or not parameter.requires_grad:
            continue
        assert relative_error(parameter.grad, twin_parameters[name].grad.numpy()) < 1e-8, name


@pytest.mark.parametrize("crops", [2, 5])
def test_dino_loss_center_and_teacher_update_match_the_reference(crops):
    batch, dim = 3, 7
    rng = np.random.default_rng(crops)
    student = rng.standard_normal((crops * batch, dim))
    teacher = [rng.standard_normal((2 * batch, dim)) for _ in range(2)]
    ours = DINOLoss(dim, teacher_temp=0.07, dtype="float64")
    twin = ref.DINOLoss(dim, crops, teacher_temp=0.07)
    for step in range(2):  # the second step uses the center the first one left
        s = Tensor(student + step, requires_grad=True)
        loss, _ = ours(s, teacher[step], epoch=0)
        loss.backward()
        s_ref = torch.from_numpy(student + step).requires_grad_()
        ref_loss = twin(s_ref, torch.from_numpy(teacher[step]))
        ref_loss.backward()
        assert relative_error(loss.data, ref_loss.item()) < 1e-10
        assert relative_error(s.grad, s_ref.grad.numpy()) < 1e-8
        assert relative_error(ours.center, twin.center.numpy()) < 1e-10
    assert np.abs(ours.center).max() > 0.01

    # the teacher's EMA: the schedule and one update of every parameter
    schedule = ref.momentum_schedule(0.996, 3, 4)
    assert np.allclose([teacher_momentum(i, 12) for i in range(12)], schedule, rtol=0,
                       atol=1e-15)
    minivit.manual_seed(0)
    student_head, teacher_head = (DINOHead(6, 10, 8, 5).to(dtype="float64") for _ in range(2))
    randomize(student_head, 1), randomize(teacher_head, 2)
    student_twin, teacher_twin = ref.DINOHead(6, 10, 8, 5).double(), ref.DINOHead(6, 10, 8, 5).double()
    student_twin.load_state_dict(to_torch(student_head.state_dict()))
    teacher_twin.load_state_dict(to_torch(teacher_head.state_dict()))
    update_teacher(teacher_head, student_head, schedule[5])
    ref.teacher_update(student_twin, teacher_twin, schedule[5])
    expected = teacher_twin.state_dict()
    for name, value in teacher_head.state_dict().items():
        assert relative_error(value, expected[name].numpy()) < 1e-12, name


def test_a_reference_mae_checkpoint_loads_as_an_encoder_for_fine_tuning(tmp_path):
    """The reference saves {'model': state_dict} (main_pretrain.py); its encoder keys load into
    a VisionTransformer by name, the decoder is dropped, the new head stays fresh."""
    from minivit.encoders import load_encoder
    from minivit.models import VisionTransformer

    twin = ref.MaskedAutoencoderViT(**MAE_CONFIG).double()
    path = tmp_path / "checkpoint-399.pth"
    torch.save({"model": twin.state_dict()}, path)
    keys = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
    model = VisionTransformer(**{k: MAE_CONFIG[k] for k in keys}, num_classes=10)
    head_before = model.head.weight.numpy().copy()
    load_encoder(model, path)
    expected = twin.state_dict()
    for name, value in model.state_dict().items():
        if name.startswith("head."):
            continue
        np.testing.assert_allclose(value, expected[name].numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(model.head.weight.numpy(), head_before)
