"""The ViT family against the real timm (float64, random weights): DeiT distilled, DeiT-III,
BEiT, and plain ViTs with global_pool='avg' + fc_norm, without a class token, and with layer
scale: the same create_model call in both, the same weights, logits equal to 1e-10 and every
parameter gradient to 1e-8 (relative to the largest entry). A model built with nn.LayerNorm's
defaults (eps 1e-5) and saved with torch.save loads with norm_eps=1e-5 and gives its logits.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import minivit  # noqa: E402
import minivit.functional as F  # noqa: E402
from minivit import Tensor  # noqa: E402
from minivit.models import create_model  # noqa: E402

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
AT_224 = dict(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=5)
CASES = {
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", SMALL, {}),
    "deit3_small": ("deit3_small_patch16_224", SMALL, {}),
    "beit_base": ("beit_base_patch16_224", SMALL, {}),
    "vit_avg_fc_norm": ("vit_tiny_patch16_224", SMALL, dict(global_pool="avg", fc_norm=True)),
    "vit_avg_no_class_token": ("vit_tiny_patch16_224", SMALL,
                               dict(global_pool="avg", class_token=False)),
    "vit_layer_scale_no_qkv_bias": ("vit_tiny_patch16_224", SMALL,
                                    dict(init_values=0.5, qkv_bias=False, no_embed_class=True)),
    "beit_base_224": ("beit_base_patch16_224", AT_224, {}),
    "deit_tiny_distilled_224": ("deit_tiny_distilled_patch16_224", AT_224, {}),
}


def relative_error(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-300))


def randomize(model, seed=0):
    """Every parameter redrawn so that nothing is trivially 0 or 1: norm weights near 1,
    matrices ~ N(0, 1/fan_in), tokens, embeddings, tables, biases and layer scales O(0.1-1)."""
    rng = np.random.default_rng(seed)
    for name, parameter in model.named_parameters():
        shape = parameter.shape
        if "norm" in name and name.endswith("weight"):
            values = 1.0 + 0.2 * rng.standard_normal(shape)
        elif len(shape) == 2 and "relative_position" not in name:
            values = rng.standard_normal(shape) / np.sqrt(shape[1])
        elif len(shape) == 4:
            values = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        else:
            values = 0.5 * rng.standard_normal(shape)
        parameter.data[...] = values
    return model


def make_pair(case):
    name, size, options = CASES[case]
    minivit.manual_seed(0)
    ours = randomize(create_model(name, **size, **options).to(dtype="float64"))
    reference = timm.create_model(name, pretrained=False, **size, **options).double()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()},
                              strict=True)
    return ours, reference


def images(size, batch=2, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, size["img_size"], size["img_size"]))


@pytest.mark.parametrize("case", CASES)
def test_logits_and_gradients_match_timm(case):
    ours, reference = make_pair(case)
    size = CASES[case][1]
    x = images(size)
    assert ours.num_parameters() == sum(p.numel() for p in reference.parameters())

    with minivit.no_grad():
        logits = ours.eval()(Tensor(x)).data
    with torch.no_grad():
        expected = reference.eval()(torch.from_numpy(x)).numpy()
    assert relative_error(logits, expected) < 1e-10

    labels = np.arange(x.shape[0]) % size["num_classes"]
    loss = F.cross_entropy(ours.train()(Tensor(x)), labels)
    ours.zero_grad()
    loss.backward()
    ref_loss = torch.nn.functional.cross_entropy(reference.train()(torch.from_numpy(x)),
                                                 torch.from_numpy(labels))
    ref_loss.backward()
    assert relative_error(loss.data, ref_loss.detach().numpy()) < 1e-10
    ref_params = dict(reference.named_parameters())
    errors = {name: relative_error(p.grad, ref_params[name].grad.numpy())
              for name, p in ours.named_parameters()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-8, f"{worst}: {errors[worst]:.2e}"


def test_distilled_training_returns_both_heads_as_timm():
    ours, reference = make_pair("deit_tiny_distilled")
    x = images(SMALL)
    ours.distilled_training = True
    reference.set_distilled_training(True)
    with minivit.no_grad():
        cls, dist = ours.train()(Tensor(x))
    with torch.no_grad():
        ref_cls, ref_dist = reference.train()(torch.from_numpy(x))
    assert relative_error(cls.data, ref_cls.numpy()) < 1e-10
    assert relative_error(dist.data, ref_dist.numpy()) < 1e-10
    assert relative_error(cls.data, dist.data) > 1e-3  # two different heads


def test_layer_norm_defaults_model_saved_with_torch_save_loads_with_norm_eps(tmp_path):
    """nn.LayerNorm's default eps 1e-5 (PyTorch tutorial code with timm's names): its
    torch.save'd state_dict loads with norm_eps=1e-5 and gives its logits exactly; with
    timm's 1e-6 it would not."""
    from timm.models.vision_transformer import VisionTransformer

    reference = VisionTransformer(norm_layer=torch.nn.LayerNorm, in_chans=3,
                                  **SMALL).double().eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0.0, 0.3)
    path = tmp_path / "tutorial.pth"
    torch.save(reference.state_dict(), path)
    x = images(SMALL)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    results = {}
    for eps in (1e-5, 1e-6):
        model = create_model("vit_tiny_patch16_224", pretrained=str(path), norm_eps=eps,
                             **SMALL).to(dtype="float64").eval()
        model.load_state_dict({k: v.numpy() for k, v in torch.load(path).items()})
        with minivit.no_grad():
            results[eps] = relative_error(model(Tensor(x)).data, expected)
    assert results[1e-5] < 1e-10
    assert results[1e-6] > 1e-8
