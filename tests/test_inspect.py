"""minivit.inspect: model cost arithmetic, metrics curves and plots, attention rollout."""

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from minivit.errors import MinivitError, ShapeError
from minivit.inspect import (
    attention_rollout,
    cls_attention_maps,
    curves,
    format_cost,
    map_statistics,
    model_cost,
    parameter_shapes,
    plot_grads,
    plot_runs,
    read_metrics,
    save_attention_comparison,
    save_attention_figure,
    upsample_nearest,
)
from minivit.models import create_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# name: (embed_dim, depth, num_heads, patch_size, timm parameter count with 1000 classes)
TIMM_VITS = {
    "vit_tiny_patch16_224": (192, 12, 3, 16, 5_717_416),
    "vit_small_patch16_224": (384, 12, 6, 16, 22_050_664),
    "vit_base_patch16_224": (768, 12, 12, 16, 86_567_656),
    "vit_base_patch32_224": (768, 12, 12, 32, 88_224_232),
    "vit_large_patch16_224": (1024, 24, 16, 16, 304_326_632),
    "vit_huge_patch14_224": (1280, 32, 16, 14, 632_045_800),
}


def timm_config(name):
    embed_dim, depth, num_heads, patch_size, _ = TIMM_VITS[name]
    return dict(img_size=224, patch_size=patch_size, in_chans=3, num_classes=1000,
                embed_dim=embed_dim, depth=depth, num_heads=num_heads)


# ---------------------------------------------------------------- cost


@pytest.mark.parametrize("name", TIMM_VITS)
def test_parameter_counts_match_timm(name):
    assert model_cost(timm_config(name)).total_params == TIMM_VITS[name][-1]


@pytest.mark.parametrize("name, gmacs", [
    ("vit_base_patch16_224", 17.58), ("vit_small_patch16_224", 4.61), ("vit_large_patch16_224", 61.6),
])
def test_macs_match_published_counts(name, gmacs):
    report = model_cost(timm_config(name))
    assert report.total_macs / 1e9 == pytest.approx(gmacs, rel=0.005)
    assert report.flops == 2 * report.total_macs
    assert report.train_flops == 6 * report.total_macs


def test_tokens_and_attention_size_for_224_patch16():
    report = model_cost(timm_config("vit_base_patch16_224"))
    assert report.grid == (14, 14)
    assert report.num_patches == 196
    assert report.num_tokens == 197
    assert report.attention_shape == (197, 197)
    assert report.attention_entries_per_layer == 12 * 197 * 197
    table = format_cost(report)
    assert "196 patches" in table and "197x197" in table and "86,567,656" in table


def test_parameter_shapes_follow_timm_names():
    shapes = parameter_shapes(timm_config("vit_base_patch16_224"))
    assert shapes["patch_embed.proj.weight"] == (768, 3, 16, 16)
    assert shapes["cls_token"] == (1, 1, 768)
    assert shapes["pos_embed"] == (1, 197, 768)
    assert shapes["blocks.11.attn.qkv.weight"] == (2304, 768)
    assert shapes["blocks.0.mlp.fc1.weight"] == (3072, 768)
    assert shapes["blocks.0.mlp.fc2.weight"] == (768, 3072)
    assert shapes["head.weight"] == (1000, 768)
    assert len(shapes) == 4 + 12 * 12 + 2 + 2


def test_groups_options_and_object_config():
    config = SimpleNamespace(img_size=(8, 12), patch_size=4, in_chans=1, num_classes=0,
                             embed_dim=8, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=False)
    report = model_cost(config)
    assert report.grid == (2, 3) and report.num_tokens == 7
    assert list(report.params) == ["patch_embed", "cls_token+pos_embed", "blocks.0", "blocks.1", "norm"]
    assert report.params["patch_embed"] == 8 * 16 + 8
    assert report.params["cls_token+pos_embed"] == 8 + 7 * 8
    # norm1, qkv (no bias), proj, norm2, fc1 (hidden 16), fc2
    assert report.params["blocks.0"] == 16 + 3 * 64 + 72 + 16 + (16 * 8 + 16) + (8 * 16 + 8)
    assert "head" not in report.macs


def test_activation_memory_follows_documented_formula():
    report = model_cost(dict(img_size=4, patch_size=2, in_chans=1, num_classes=3,
                             embed_dim=4, depth=1, num_heads=2))
    T, D, H, M = 5, 4, 2, 16
    block = 8 * T * D + 2 * T * M + H * T * T + 4 * T
    outside = 1 * 4 * 4 + (T * D + 2 * T) + D + 3
    assert sum(report.block_activations.values()) == 4 * block
    assert report.activation_bytes == 4 * (block + outside)


@pytest.mark.parametrize("bad", [
    dict(img_size=30, patch_size=4, embed_dim=8, depth=1, num_heads=2),
    dict(img_size=32, patch_size=4, embed_dim=10, depth=1, num_heads=3),
    dict(img_size=32, patch_size=4, embed_dim=8, depth=1),
])
def test_inconsistent_configs_are_refused(bad):
    with pytest.raises(MinivitError):
        model_cost(bad)


# ---------------------------------------------------------------- metrics and plots

RUN_A = [
    {"epoch": 1, "step": 10, "split": "train", "loss": 2.0, "accuracy": 0.3, "lr": 1e-3, "images_per_s": 500.0, "time": 1.0},
    {"epoch": 1, "step": 10, "split": "test", "loss": 1.8, "accuracy": 0.4, "time": 1.5},
    {"epoch": 1, "step": 10, "split": "grads", "grad_norms": {"blocks.0.attn.qkv.weight": 0.5, "head.weight": 2.0},
     "update_ratios": {"blocks.0.attn.qkv.weight": 1e-3, "head.weight": 2e-3}},
    {"epoch": 2, "step": 20, "split": "train", "loss": 1.5, "accuracy": 0.5, "lr": 5e-4, "images_per_s": 520.0, "time": 2.0},
    {"epoch": 2, "step": 20, "split": "test", "loss": 1.4, "accuracy": 0.6, "time": 2.5},
    {"epoch": 2, "step": 20, "split": "grads", "grad_norms": {"blocks.0.attn.qkv.weight": 0.25, "head.weight": 1.0},
     "update_ratios": {"blocks.0.attn.qkv.weight": 5e-4, "head.weight": 1e-3}},
]
RUN_B = [
    {"epoch": 1, "step": 5, "split": "train", "loss": 2.2, "accuracy": 0.2, "lr": 1e-3, "time": 1.0},
    {"epoch": 1, "step": 5, "split": "test", "loss": 2.1, "accuracy": 0.25, "time": 1.2},
]


def write_run(folder, records, extra_lines=()):
    folder.mkdir(parents=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def png_size(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.importorskip("PIL.Image").open(path) as image:
        return image.size


def figure_pixels(fig):
    return tuple(int(round(v)) for v in fig.get_size_inches() * fig.dpi)


def test_curves_extracts_the_series(tmp_path):
    records = read_metrics(write_run(tmp_path / "run_a", RUN_A, extra_lines=[""]))
    assert records == RUN_A
    series = curves(records)
    assert series["loss"] == {"train": ([10, 20], [2.0, 1.5]), "test": ([10, 20], [1.8, 1.4])}
    assert series["accuracy"] == {"train": ([10, 20], [0.3, 0.5]), "test": ([10, 20], [0.4, 0.6])}
    assert series["lr"] == {"train": ([10, 20], [1e-3, 5e-4])}
    assert series["grad_norms"] == {"blocks.0.attn.qkv.weight": ([10, 20], [0.5, 0.25]),
                                    "head.weight": ([10, 20], [2.0, 1.0])}
    assert series["update_ratios"]["head.weight"] == ([10, 20], [2e-3, 1e-3])
    assert "time" not in series and "epoch" not in series
    assert curves(records, x="epoch")["loss"]["test"] == ([1, 2], [1.8, 1.4])


def test_curves_needs_the_x_field():
    with pytest.raises(MinivitError, match="record 2 .*'step'"):
        curves([{"step": 1, "loss": 1.0}, {"epoch": 1, "loss": 0.5}])
    with pytest.raises(MinivitError, match="x must be"):
        curves([], x="batch")


def test_model_cost_takes_the_model_itself():
    model = create_model("vit_digits")
    assert model_cost(model).total_params == sum(p.size for _, p in model.named_parameters())
    assert model_cost(model).total_params == model_cost(model.config).total_params


def test_malformed_metrics_line_names_file_and_line(tmp_path):
    run = write_run(tmp_path / "run", RUN_B, extra_lines=['{"step": 7, "loss": '])
    with pytest.raises(MinivitError, match=r"metrics\.jsonl, line 3: malformed JSON"):
        read_metrics(run)
    (run / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(MinivitError, match="line 2: expected a JSON object"):
        read_metrics(run)


def test_binary_or_empty_metrics_file_is_a_clear_error(tmp_path):
    binary = tmp_path / "weights.safetensors"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(MinivitError, match="weights.safetensors is not a metrics file"):
        read_metrics(binary)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("\n")
    with pytest.raises(MinivitError, match="has no records"):
        read_metrics(tmp_path / "empty")


def test_missing_metrics_file(tmp_path):
    with pytest.raises(MinivitError, match="cannot read metrics file .*metrics.jsonl"):
        read_metrics(tmp_path)


def test_plot_runs_draws_every_run_and_split(tmp_path):
    run_a = write_run(tmp_path / "run_a", RUN_A)
    run_b = write_run(tmp_path / "run_b", RUN_B)
    out = tmp_path / "curves.png"
    fig = plot_runs([run_a, run_b], out)
    assert png_size(out) == figure_pixels(fig) == (3 * 450, 350)
    loss, accuracy, lr = fig.axes
    assert [line.get_label() for line in loss.get_lines()] == ["run_a train", "run_a test", "run_b train", "run_b test"]
    np.testing.assert_array_equal(loss.get_lines()[1].get_xdata(), [10, 20])
    np.testing.assert_array_equal(loss.get_lines()[1].get_ydata(), [1.8, 1.4])
    np.testing.assert_array_equal(accuracy.get_lines()[2].get_ydata(), [0.2])
    np.testing.assert_array_equal(lr.get_lines()[0].get_ydata(), [1e-3, 5e-4])
    assert loss.get_lines()[0].get_color() == loss.get_lines()[1].get_color() != loss.get_lines()[2].get_color()


def test_plot_runs_marks_a_quantity_nobody_logged(tmp_path):
    run = write_run(tmp_path / "run", RUN_B)
    fig = plot_runs([run], tmp_path / "out.png", what=("loss", "top5"), x="epoch")
    assert len(fig.axes[1].get_lines()) == 0
    assert "no 'top5' records" in [t.get_text() for t in fig.axes[1].texts]


def test_plot_grads(tmp_path):
    out = tmp_path / "grads.png"
    fig = plot_grads(write_run(tmp_path / "run_a", RUN_A), out)
    assert png_size(out) == figure_pixels(fig)
    norms, ratios, norms_by_type, _ = fig.axes  # rows: by block, by layer type
    assert norms.get_yscale() == "log"
    assert [line.get_label() for line in norms.get_lines()] == ["block 0", "head"]
    assert [line.get_label() for line in norms_by_type.get_lines()] == ["attn.qkv", "head"]
    np.testing.assert_array_equal(norms.get_lines()[1].get_ydata(), [2.0, 1.0])
    np.testing.assert_array_equal(ratios.get_lines()[0].get_ydata(), [1e-3, 5e-4])
    with pytest.raises(MinivitError, match="no gradient records"):
        plot_grads(write_run(tmp_path / "run_b", RUN_B), out)


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", RUN_B)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MinivitError, match=r"pip install 'minivit\[plot\]'"):
        plot_runs([run], tmp_path / "out.png")


# ---------------------------------------------------------------- attention rollout


def random_attention(rng, shape):
    scores = rng.normal(size=shape)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.9])
def test_rollout_shape_and_rows_sum_to_one(fusion, discard_ratio):
    rng = np.random.default_rng(0)
    layers = [random_attention(rng, (2, 3, 5, 5)).astype(np.float32) for _ in range(4)]
    result = attention_rollout(layers, discard_ratio=discard_ratio, head_fusion=fusion)
    assert result.shape == (2, 5, 5)
    np.testing.assert_allclose(result.sum(axis=-1), 1.0, rtol=1e-12)
    assert (result >= 0).all()


def test_identity_attention_gives_identity_rollout():
    layers = [np.broadcast_to(np.eye(4), (2, 3, 4, 4)) for _ in range(3)]
    np.testing.assert_array_equal(attention_rollout(layers), np.broadcast_to(np.eye(4), (2, 4, 4)))


def test_rollout_matches_hand_computation():
    # Layer 1: two heads whose mean is [[.5, .5], [.2, .8]]; with the identity and
    # renormalised: [[.75, .25], [.1, .9]]. Layer 2: [[1, 0], [.4, .6]] -> [[1, 0], [.2, .8]].
    layer1 = np.array([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.4, 0.6]]]])
    layer2 = np.broadcast_to([[1.0, 0.0], [0.4, 0.6]], (1, 2, 2, 2))
    expected = np.array([[1.0, 0.0], [0.2, 0.8]]) @ np.array([[0.75, 0.25], [0.1, 0.9]])
    np.testing.assert_allclose(expected, [[0.75, 0.25], [0.23, 0.77]])
    np.testing.assert_allclose(attention_rollout([layer1, layer2])[0], expected)
    # max over the heads of layer 1: [[1, 1], [.4, 1]] + I -> rows [2, 1] / 3 and [.4, 2] / 2.4
    np.testing.assert_allclose(attention_rollout([layer1], head_fusion="max")[0], [[2 / 3, 1 / 3], [1 / 6, 5 / 6]])
    # discarding the lowest quarter zeroes the 0.2: [[1.5, .5], [0, 1.8]] -> [[.75, .25], [0, 1]]
    np.testing.assert_allclose(attention_rollout([layer1], discard_ratio=0.25)[0], [[0.75, 0.25], [0.0, 1.0]])


def test_rollout_refuses_bad_arguments():
    layer = np.full((1, 1, 3, 3), 1 / 3)
    with pytest.raises(MinivitError, match="head_fusion"):
        attention_rollout([layer], head_fusion="median")
    with pytest.raises(MinivitError, match="discard_ratio"):
        attention_rollout([layer], discard_ratio=1.0)
    with pytest.raises(ShapeError):
        attention_rollout([layer, np.full((1, 1, 4, 4), 0.25)])
    with pytest.raises(MinivitError, match="at least one"):
        attention_rollout([])


def test_cls_attention_maps():
    rng = np.random.default_rng(1)
    attn = random_attention(rng, (2, 3, 7, 7))
    maps = cls_attention_maps(attn, (2, 3))
    assert maps.shape == (2, 3, 2, 3)
    np.testing.assert_array_equal(maps[1, 2].ravel(), attn[1, 2, 0, 1:])
    with pytest.raises(ShapeError):
        cls_attention_maps(attn, 3)


def test_upsample_nearest():
    grid = np.array([[1, 2], [3, 4]])
    np.testing.assert_array_equal(upsample_nearest(grid, (4, 4)), np.kron(grid, np.ones((2, 2), int)))
    np.testing.assert_array_equal(upsample_nearest(grid, (3, 3)), [[1, 1, 2], [1, 1, 2], [3, 3, 4]])


@pytest.mark.parametrize("channels", [1, 3])
def test_save_attention_figure(tmp_path, channels):
    rng = np.random.default_rng(2)
    attn = random_attention(rng, (1, 3, 17, 17))
    heads = cls_attention_maps(attn, 4)[0]
    rollout_map = cls_attention_maps(attention_rollout([attn, attn])[:, None], 4)[0, 0]
    image = rng.normal(size=(channels, 16, 16))
    out = tmp_path / "attention.png"
    fig = save_attention_figure(image, heads, rollout_map, out, title="digit 3")
    assert png_size(out) == figure_pixels(fig)
    assert len(fig.axes) == 6  # input, 3 heads, rollout, the rollout's colour bar
    np.testing.assert_array_equal(fig.axes[2].get_images()[0].get_array(), heads[1])
    overlay = fig.axes[4].get_images()[-1].get_array()
    assert overlay.shape == (16, 16)
    np.testing.assert_array_equal(overlay, upsample_nearest(rollout_map, (16, 16)))
    assert "digit 3" in [text.get_text() for text in fig.findobj(pytest.importorskip("matplotlib.text").Text)]
    with pytest.raises(ShapeError):
        save_attention_figure(image, heads, rollout_map[:2], out)


def test_map_statistics_of_uniform_peaked_and_ink_shaped_maps():
    rng = np.random.default_rng(3)
    images = rng.uniform(size=(1, 1, 4, 6))  # a 2x3 grid of 2x2 patches
    ink = images[0, 0].reshape(2, 2, 3, 2).mean(axis=(1, 3))
    peaked = np.zeros((2, 3))
    peaked[1, 2] = 1.0
    maps = np.stack([np.ones((2, 3)), peaked, 3 * ink + 1, -ink + 2])[None]  # (1, 4, 2, 3)
    entropy, correlation = map_statistics(maps, images)
    assert entropy.shape == correlation.shape == (1, 4)
    np.testing.assert_allclose(entropy[0, :2], [1.0, 0.0], atol=1e-12)
    assert 0 < entropy[0, 2] < 1
    np.testing.assert_allclose(correlation[0, [0, 2, 3]], [0.0, 1.0, -1.0], atol=1e-12)


def test_save_attention_comparison_draws_a_row_per_model_and_image(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.uniform(size=(2, 1, 8, 8))
    rows = {}
    for name, heads in (("a", 2), ("b", 3)):
        attn = random_attention(rng, (2, heads, 17, 17))
        rows[name] = (cls_attention_maps(attn, 4),
                      cls_attention_maps(attention_rollout([attn])[:, None], 4)[:, 0])
    out = tmp_path / "compare.png"
    fig = save_attention_comparison(images, rows, out, titles=["#0", "#1"])
    assert png_size(out) == figure_pixels(fig)
    ncols = 3 + 3  # input, mean, the most heads (3), rollout
    assert len(fig.axes) == 2 * 2 * ncols
    row = fig.axes[3 * ncols:4 * ncols]  # image 1, model b
    np.testing.assert_array_equal(row[1].get_images()[0].get_array(), rows["b"][0][1].mean(axis=0))
    np.testing.assert_array_equal(row[4].get_images()[0].get_array(), rows["b"][0][1, 2])
    assert row[1].get_images()[0].get_clim() == (0.0, rows["b"][0][1].max())
    assert [t.get_text() for t in row[0].texts] == ["#1\nb"]
    assert not fig.axes[4].get_images()  # model a has 2 heads: its third head panel is empty
