"""The inspection commands minivit gradcheck, info, plot and attention, through cli.main."""

import json
import re
import sys

import numpy as np
import pytest

import minivit
import minivit.functional.activation as activation
import minivit.functional.attention as attention_module
import minivit.functional.normalization as normalization
import minivit.commands.attention as attention_command
import minivit.commands.plot as plot_command
from minivit.checkpoint import save_checkpoint
from minivit.cli import main
from minivit.inspect import attention_rollout
from minivit.inspect.opchecks import OP_CHECKS, run_check
from minivit.models import create_model
from minivit.tensor import Tensor, no_grad

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DIGITS_MEAN, DIGITS_STD = 0.3, 0.4


def assert_png(path):
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()


def table_rows(output):
    """{(op, input): result} from the gradcheck table."""
    rows = {}
    for line in output.splitlines():
        parts = line.replace("pass (atol)", "pass(atol)").split()
        if len(parts) == 7 and parts[-1] in ("pass", "pass(atol)", "FAIL"):
            rows[parts[0], parts[1]] = parts[-1]
    return rows


# ---------------------------------------------------------------- gradcheck


REQUIRED_OPS = {
    "linear", "patchify", "scaled_dot_product_attention", "softmax", "log_softmax", "layer_norm",
    "gelu", "gelu_tanh", "cross_entropy", "cross_entropy_soft", "cross_entropy_smoothed",
    "dropout", "drop_path", "concat", "stack", "getitem", "add", "sub", "mul", "div", "neg",
    "power", "exp", "log", "matmul", "sum", "mean", "max", "reshape", "transpose",
    "broadcast_to", "vit", "window_partition", "window_reverse", "roll", "patch_merge", "swin",
}


def test_registry_covers_every_hand_written_op():
    assert REQUIRED_OPS <= set(OP_CHECKS)


def test_gradcheck_command_passes_on_the_real_ops(capsys):
    assert main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert "FAIL" not in out
    assert {op for op, _ in rows} == set(OP_CHECKS)
    assert all(result == "pass" for result in rows.values())
    # the whole ViT: the images and every parameter
    vit_inputs = {name for op, name in rows if op == "vit"}
    assert {"images", "pos_embed", "cls_token", "blocks.1.attn.qkv.weight",
            "head.bias"} <= vit_inputs
    assert len(vit_inputs) == 1 + 4 + 2 * 12 + 4
    assert re.search(rf"all {len(OP_CHECKS)} checks passed", out)


def _softmax_without_the_sum_term(self, grad):
    probs, _ = self.saved  # every softmax implementation saves (p, axis)
    return (probs * grad,)  # p ⊙ dp: drops − p Σ dp ⊙ p


def _layer_norm_without_the_projection_term(self, grad):
    normalized, rstd, weight = self.saved  # every layer_norm implementation saves (x̂, r, w)
    grad_normalized = grad * weight
    grad_x = rstd * (grad_normalized - grad_normalized.mean(axis=-1, keepdims=True))
    leading = tuple(range(grad.ndim - 1))
    return grad_x, (grad * normalized).sum(axis=leading), grad.sum(axis=leading)


def _layer_norm_without_the_mean_term(self, grad):
    normalized, rstd, weight = self.saved
    grad_normalized = grad * weight
    dot = (grad_normalized * normalized).mean(axis=-1, keepdims=True)
    grad_x = rstd * (grad_normalized - normalized * dot)
    leading = tuple(range(grad.ndim - 1))
    return grad_x, (grad * normalized).sum(axis=leading), grad.sum(axis=leading)


@pytest.mark.parametrize("target, broken, ops, failing_input", [
    (activation.Softmax, _softmax_without_the_sum_term, ["softmax"], ("softmax", "x")),
    (normalization.LayerNorm, _layer_norm_without_the_projection_term, ["layer_norm", "vit"],
     ("layer_norm", "x")),
    (normalization.LayerNorm, _layer_norm_without_the_mean_term, ["layer_norm", "vit"],
     ("vit", "images")),
])
def test_gradcheck_command_fails_on_a_broken_backward(monkeypatch, capsys, target, broken, ops,
                                                      failing_input):
    monkeypatch.setattr(target, "backward", broken)
    argv = ["gradcheck"] + [arg for op in ops for arg in ("--op", op)]
    assert main(argv) == 1
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows[failing_input] == "FAIL"
    assert "FAILED" in out
    for op in ops:  # every selected check notices, the whole ViT included
        assert any(result == "FAIL" for (name, _), result in rows.items() if name == op)


def test_gradcheck_notices_a_forgotten_attention_scale(monkeypatch, capsys):
    """dq and dk without the 1/√d factor (the real backward, whichever path it takes)."""
    original = attention_module.ScaledDotProductAttention.backward

    def without_scale(self, grad):
        grad_q, grad_k, grad_v = original(self, grad)
        return grad_q / self.scale, grad_k / self.scale, grad_v

    monkeypatch.setattr(attention_module.ScaledDotProductAttention, "backward", without_scale)
    assert main(["gradcheck", "--op", "scaled_dot_product_attention", "--op", "softmax"]) == 1
    rows = table_rows(capsys.readouterr().out)
    assert rows["scaled_dot_product_attention", "q"] == "FAIL"
    assert rows["scaled_dot_product_attention", "k"] == "FAIL"
    assert rows["scaled_dot_product_attention", "v"] == "pass"
    assert rows["softmax", "x"] == "pass"


def test_gradcheck_says_which_inputs_passed_on_the_absolute_floor(capsys):
    """With an rtol no float64 difference can meet, the rows that pass do so on atol, and the
    table says so instead of a bare 'pass'."""
    assert main(["gradcheck", "--op", "linear", "--rtol", "1e-14"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows and set(rows.values()) == {"pass(atol)"}
    assert "round-off" in out


def test_gradcheck_unknown_op_lists_the_names(capsys):
    assert main(["gradcheck", "--op", "convolution"]) == 1
    err = capsys.readouterr().err
    assert "unknown op 'convolution'" in err
    assert "layer_norm" in err and "scaled_dot_product_attention" in err and "vit" in err


def test_gradcheck_list_and_seed(capsys):
    assert main(["gradcheck", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(OP_CHECKS)
    assert main(["gradcheck", "--op", "gelu", "--seed", "3"]) == 0
    assert "seed 3" in capsys.readouterr().out


def test_run_check_draws_inputs_from_the_seed():
    first, again, other = (run_check("layer_norm", seed=s) for s in (5, 5, 6))
    errors = [[i.max_abs_error for i in r.inputs] for r in (first, again, other)]
    assert errors[0] == errors[1] != errors[2]


# ---------------------------------------------------------------- info


def parse_info(output):
    total = re.search(r"^total\s+([\d,]+)\s+([\d,]+)$", output, re.M)
    return int(total[1].replace(",", "")), int(total[2].replace(",", ""))


@pytest.mark.parametrize("argv, expected", [
    (["bench", "--config", "tiny", "--batch", "-4"],
     "argument --batch: must be at least 1, got -4"),
    (["bench", "--config", "tiny", "--threads", "0"], "argument --threads: must be at least 1"),
    (["bench", "--steps", "abc"], "argument --steps: expected a whole number, got 'abc'"),
    (["info", "vit_digits", "--img-size", "-16"], "argument --img-size: must be at least 1"),
    (["info", "vit_digits", "--num-classes", "-2"], "argument --num-classes: must be at least 0"),
    (["gradcheck", "--seed", "-1"], "argument --seed: must be at least 0, got -1"),
    (["gradcheck", "--rtol", "nan"], "argument --rtol: must be greater than 0.0, got nan"),
    (["predict", "--checkpoint", "x", "--top-k", "0", "a.npy"], "argument --top-k: must be at "
                                                                  "least 1, got 0")])
def test_out_of_range_numbers_are_usage_errors_naming_the_flag(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_info_vit_base(capsys):
    assert main(["info", "vit_base_patch16_224"]) == 0
    out = capsys.readouterr().out
    params, macs = parse_info(out)
    assert params == 86_567_656
    assert macs / 1e9 == pytest.approx(17.58, rel=0.005)
    assert "196 patches (14x14) + 1 class token = 197" in out
    assert "197x197 per head" in out
    assert re.search(r"^  each block\s+7,087,872\s", out, re.M)
    assert "GFLOPs per image" in out and "activations kept for backward" in out


def test_info_overrides_and_list(capsys):
    assert main(["info", "vit_base_patch16_224", "--img-size", "384", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "576 patches (24x24) + 1 class token = 577" in out
    params, _ = parse_info(out)
    # 10 classes instead of 1000; 577 instead of 197 position embeddings
    assert params == 86_567_656 - 990 * 769 + 380 * 768
    assert main(["info", "--list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^vit_base_patch16_224\s.*\s86,567,656\s", out, re.M)
    assert re.search(r"^vit_huge_patch14_224\s.*\s632,045,800\s", out, re.M)
    assert "vit_digits" in out


def test_info_unknown_model(capsys):
    assert main(["info", "vit_gigantic"]) == 1
    err = capsys.readouterr().err
    assert "vit_gigantic" in err and "vit_base_patch16_224" in err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A run folder with an untrained 2-block digits ViT (dim 16, 2 heads) in best.safetensors."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    minivit.manual_seed(0)
    model = create_model("vit_digits", depth=2, embed_dim=16, num_heads=2).eval()
    info = {"dataset": "digits", "mean": [DIGITS_MEAN], "std": [DIGITS_STD],
            "class_names": [f"digit {k}" for k in range(10)], "epoch": 3, "test_accuracy": 0.25}
    save_checkpoint(run_dir / "best.safetensors", model, info)
    return run_dir, model


def test_info_checkpoint(capsys, tiny_checkpoint):
    run_dir, model = tiny_checkpoint
    for target in (run_dir, run_dir / "best.safetensors"):
        assert main(["info", str(target)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"checkpoint {run_dir / 'best.safetensors'}: dataset digits, epoch 3")
        assert f"{model.num_parameters():,} stored parameters" in out
        assert parse_info(out)[0] == model.num_parameters()
        assert "16 patches (4x4) + 1 class token = 17" in out
        assert "17x17 per head" in out


# ---------------------------------------------------------------- plot


def write_metrics(run_dir, epochs=4, steps_per_epoch=10, offset=0.0):
    """metrics.jsonl in the layout minivit train writes (train/test/grads records)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for epoch in range(1, epochs + 1):
        common = {"epoch": epoch, "step": epoch * steps_per_epoch, "time": 1.5 * epoch}
        records.append(dict(common, split="train", loss=2.0 / epoch + offset,
                            accuracy=0.2 * epoch, lr=1e-3 / epoch, images_per_s=500.0))
        records.append(dict(common, split="test", loss=2.2 / epoch + offset, accuracy=0.18 * epoch))
        records.append(dict(common, split="grads",
                            grad_norms={"patch_embed.proj.weight": 0.1 * epoch,
                                        "head.weight": 0.5 / epoch},
                            update_ratios={"patch_embed.proj.weight": 1e-3,
                                           "head.weight": 2e-3 * epoch}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


@pytest.fixture
def figures(monkeypatch):
    """Record the Figures that the plot functions return to the command."""
    drawn = []

    def recording(function):
        def wrapper(*args, **kwargs):
            figure = function(*args, **kwargs)
            drawn.append(figure)
            return figure
        return wrapper

    for command, name in ((plot_command, "plot_runs"), (plot_command, "plot_grads"),
                          (attention_command, "save_attention_figure")):
        monkeypatch.setattr(command, name, recording(getattr(command, name)))
    return drawn


def lines_by_label(axes):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in axes.get_lines()}


def test_plot_one_run(tmp_path, capsys, figures):
    run_dir = tmp_path / "run_a"
    records = write_metrics(run_dir)
    assert main(["plot", str(run_dir)]) == 0
    assert f"wrote {run_dir / 'curves.png'}" in capsys.readouterr().out
    assert_png(run_dir / "curves.png")
    (figure,) = figures
    loss, accuracy, lr = figure.axes[:3]
    assert [ax.get_title() for ax in (loss, accuracy, lr)] == ["loss", "accuracy", "lr"]
    for split in ("train", "test"):
        rows = [r for r in records if r["split"] == split]
        assert lines_by_label(loss)[f"run_a {split}"] == ([r["step"] for r in rows],
                                                          [r["loss"] for r in rows])
        assert lines_by_label(accuracy)[f"run_a {split}"][1] == [r["accuracy"] for r in rows]
    assert lines_by_label(lr) == {"run_a train": ([10, 20, 30, 40],
                                                  [1e-3 / e for e in range(1, 5)])}


def test_plot_several_runs_by_epoch(tmp_path, monkeypatch, figures):
    monkeypatch.chdir(tmp_path)
    write_metrics(tmp_path / "run_a")
    write_metrics(tmp_path / "run_b", epochs=3, offset=1.0)
    assert main(["plot", "run_a", "run_b", "--x", "epoch"]) == 0
    assert_png(tmp_path / "comparison.png")
    loss = figures[0].axes[0]
    lines = lines_by_label(loss)
    assert set(lines) == {"run_a train", "run_a test", "run_b train", "run_b test"}
    assert lines["run_b test"] == ([1, 2, 3], [2.2 / e + 1.0 for e in (1, 2, 3)])
    assert loss.get_xlabel() == "epoch"
    assert main(["plot", "run_a", "run_b", "--out", "figs/both.png"]) == 0
    assert_png(tmp_path / "figs" / "both.png")


def test_plot_grads(tmp_path, capsys, figures):
    run_dir = tmp_path / "run_g"
    write_metrics(run_dir)
    assert main(["plot", str(run_dir), "--grads"]) == 0
    assert_png(run_dir / "grads.png")
    norms, ratios = figures[0].axes[:2]  # grouped by block: head.weight is the head's group
    assert lines_by_label(norms)["head"][1] == [0.5 / e for e in range(1, 5)]
    assert lines_by_label(ratios)["head"][1] == [2e-3 * e for e in range(1, 5)]
    assert norms.get_yscale() == "log"
    # a run without --log-grads says so
    (tmp_path / "plain" / "metrics.jsonl").parent.mkdir()
    (tmp_path / "plain" / "metrics.jsonl").write_text(json.dumps(
        {"epoch": 1, "step": 1, "split": "train", "loss": 1.0}) + "\n")
    assert main(["plot", str(tmp_path / "plain"), "--grads"]) == 1
    assert "--log-grads" in capsys.readouterr().err


def test_plot_errors(tmp_path, monkeypatch, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 1
    assert "no such run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 1
    assert "metrics.jsonl" in capsys.readouterr().err
    write_metrics(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "curves.pdf")]) == 1
    assert ".png" in capsys.readouterr().err
    # without matplotlib: one clear line, no traceback
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    assert main(["plot", str(tmp_path / "run")]) == 1
    assert "needs matplotlib" in capsys.readouterr().err


# ---------------------------------------------------------------- attention


def test_forward_with_attention_probabilities_and_rollout(tiny_checkpoint):
    _, model = tiny_checkpoint
    images = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with no_grad():
        logits, attentions = model.forward_with_attention(Tensor(images))
    assert logits.shape == (3, 10)
    assert len(attentions) == 2
    for attention in attentions:
        assert attention.shape == (3, 2, 17, 17)
        assert (attention >= 0).all()
        np.testing.assert_allclose(attention.sum(axis=-1), 1.0, rtol=1e-5)
    rollout = attention_rollout(attentions)
    assert rollout.shape == (3, 17, 17)
    np.testing.assert_allclose(rollout.sum(axis=-1), 1.0, rtol=1e-12)
    assert rollout[:, 0, 1:].reshape(3, 4, 4).shape == (3, 4, 4)
    # the attention is only kept while asked for
    assert all(block.attn.attention is None for block in model.blocks)


def test_attention_command_index(tmp_path, monkeypatch, capsys, tiny_checkpoint, figures):
    from minivit.data import load_dataset

    run_dir, model = tiny_checkpoint
    monkeypatch.chdir(tmp_path)
    assert main(["attention", "--checkpoint", str(run_dir), "--index", "0"]) == 0
    out = capsys.readouterr().out
    assert_png(tmp_path / "attention_test_0.png")
    test_set = load_dataset("digits", "test")
    image = test_set.images[0]
    normalised = ((image - DIGITS_MEAN) / DIGITS_STD).astype(np.float32)[None]
    with no_grad():
        logits, attentions = model.forward_with_attention(Tensor(normalised))
    predicted = int(logits.data.argmax())
    assert f"predicted digit {predicted}" in out
    assert f"true digit {test_set.labels[0]}" in out
    # the figure shows the raw input, the last layer's class-token maps per head and the rollout
    (figure,) = figures
    panels = figure.axes
    assert [ax.get_title() for ax in panels[:4]] == ["input", "block 1, head 0",
                                                     "block 1, head 1", "rollout, blocks 0-1"]
    np.testing.assert_allclose(panels[0].get_images()[0].get_array(),
                               (image[0] - image.min()) / np.ptp(image))
    for head in range(2):
        np.testing.assert_allclose(panels[1 + head].get_images()[0].get_array(),
                                   attentions[-1][0, head, 0, 1:].reshape(4, 4), rtol=1e-5)
    rollout = attention_rollout(attentions)[0, 0, 1:].reshape(4, 4)
    overlay = panels[3].get_images()[1].get_array()  # upsampled to 8x8 over the input
    np.testing.assert_allclose(overlay[::2, ::2], rollout, rtol=1e-5)


def test_attention_command_image_files(tmp_path, monkeypatch, capsys, tiny_checkpoint):
    from PIL import Image

    run_dir, _ = tiny_checkpoint
    monkeypatch.chdir(tmp_path)
    pixels = np.random.default_rng(1).random((8, 8))
    np.save("a.npy", pixels.astype(np.float32))
    Image.fromarray((pixels * 255).astype(np.uint8)).save("b.png")
    ckpt = str(run_dir / "best.safetensors")
    assert main(["attention", "--checkpoint", ckpt, "a.npy", "b.png", "--out", "maps/x.png"]) == 0
    out = capsys.readouterr().out
    assert "a.npy: predicted digit" in out and "b.png: predicted digit" in out
    assert_png(tmp_path / "maps" / "x_a.png")
    assert_png(tmp_path / "maps" / "x_b.png")
    # several indices, default names; an index named twice makes one figure
    capsys.readouterr()
    assert main(["attention", "--checkpoint", str(run_dir), "--index", "2", "5", "2",
                 "--split", "train"]) == 0
    assert_png(tmp_path / "attention_train_2.png")
    assert_png(tmp_path / "attention_train_5.png")
    assert capsys.readouterr().out.count("attention_train_2.png") == 1


@pytest.mark.parametrize("argv, message", [
    ([], "give image files or --index"),
    (["--index", "100000"], "out of range"),
    (["wrong.npy"], "wrong.npy: no such file"),
    (["."], ".: is a folder, not an image file; name the image files in it (.npy, .png, .jpg, "
            ".jpeg, .gif, .bmp, .tif, .tiff, .webp)"),
])
def test_attention_command_errors(tmp_path, monkeypatch, capsys, tiny_checkpoint, argv, message):
    run_dir, _ = tiny_checkpoint
    monkeypatch.chdir(tmp_path)
    assert main(["attention", "--checkpoint", str(run_dir)] + argv) == 1
    assert message in capsys.readouterr().err


def test_attention_command_bad_images(tmp_path, monkeypatch, capsys, tiny_checkpoint):
    run_dir, _ = tiny_checkpoint
    monkeypatch.chdir(tmp_path)
    np.save("two.npy", np.zeros((2, 16, 16), dtype=np.float32))
    assert main(["attention", "--checkpoint", str(run_dir), "two.npy"]) == 1
    assert ("two.npy: expected an image array (H,W), (C,H,W) or (N,C,H,W), channels first or "
            "last, with C = 1 or 3 (the model takes 1 channel); got shape (2, 16, 16)") in \
        capsys.readouterr().err
    np.save("bright.npy", np.full((8, 8), 255.0, dtype=np.float32))
    assert main(["attention", "--checkpoint", str(run_dir), "bright.npy"]) == 1
    assert "bright.npy: pixel values must lie in [0, 1] (or be uint8 0..255); found 255 to 255" \
        in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_attention_command_converts_and_splits_arrays(tmp_path, monkeypatch, capsys,
                                                      tiny_checkpoint):
    pytest.importorskip("PIL.Image")
    run_dir, _ = tiny_checkpoint
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(2)
    np.save("rgb.npy", rng.random((16, 16, 3)).astype(np.float32))  # (H, W, C), resized, grey
    np.save("batch.npy", (rng.random((2, 1, 8, 8)) * 255).astype(np.uint8))
    assert main(["attention", "--checkpoint", str(run_dir), "rgb.npy", "batch.npy"]) == 0
    out = capsys.readouterr().out
    for tag, name in (("rgb.npy", "rgb"), ("batch.npy[0]", "batch_0"), ("batch.npy[1]", "batch_1")):
        assert f"{tag}: predicted digit" in out
        assert_png(tmp_path / f"{name}_attention.png")


def test_attention_command_keeps_files_of_the_same_name_apart(tmp_path, monkeypatch, capsys,
                                                               tiny_checkpoint, figures):
    run_dir, _ = tiny_checkpoint
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(3)
    for folder in ("in", "other"):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / "hw.npy", rng.random((8, 8)).astype(np.float32))
    np.save("hw.npy", rng.random((2, 1, 8, 8)).astype(np.float32))
    files = ["in/hw.npy", "other/hw.npy", "hw.npy"]
    assert main(["attention", "--checkpoint", str(run_dir), *files]) == 0
    out = capsys.readouterr().out
    names = ["in_hw_npy", "other_hw_npy", f"{tmp_path.name}_hw_npy_0",
             f"{tmp_path.name}_hw_npy_1"]
    for tag, name in zip(["in/hw.npy", "other/hw.npy", "hw.npy[0]", "hw.npy[1]"], names):
        assert f"{tag}: predicted digit" in out and f"-> {name}_attention.png" in out
        assert_png(tmp_path / f"{name}_attention.png")
    assert len(list(tmp_path.glob("*.png"))) == 4
    # each figure shows its own input
    inputs = [np.load(path) for path in files[:2]] + list(np.load("hw.npy")[:, 0])
    for figure, image in zip(figures, inputs):
        shown = figure.axes[0].get_images()[0].get_array()
        np.testing.assert_allclose(shown, (image - image.min()) / np.ptp(image), rtol=1e-5)
    # the same file twice: numbered; and with --out
    assert main(["attention", "--checkpoint", str(run_dir), "in/hw.npy", "in/hw.npy",
                 "--out", "maps/x.png"]) == 0
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["x_hw_npy_0.png",
                                                                      "x_hw_npy_1.png"]


def test_attention_command_16_bit_png_as_its_8_bit_copy(tmp_path, monkeypatch, capsys,
                                                         tiny_checkpoint, figures):
    from PIL import Image

    run_dir, _ = tiny_checkpoint
    monkeypatch.chdir(tmp_path)
    wide = (np.random.default_rng(4).random((8, 8)) * 65535).round().astype(np.uint16)
    Image.fromarray(wide).save("16.png")
    Image.fromarray((wide / 257).round().astype(np.uint8)).save("8.png")
    assert main(["attention", "--checkpoint", str(run_dir), "16.png", "8.png"]) == 0
    found = re.findall(r"^\d+\.png: predicted (digit \d) \(([\d.]+)%\)",
                       capsys.readouterr().out, re.M)
    assert found[0][0] == found[1][0]
    assert float(found[0][1]) == pytest.approx(float(found[1][1]), abs=0.2)
    # the input as shown, (image - min) / (max - min), and the attention maps agree
    wide_input, narrow_input = (f.axes[0].get_images()[0].get_array() for f in figures)
    shown = (wide - wide.min()) / np.ptp(wide)
    np.testing.assert_allclose(wide_input, shown, rtol=1e-5)
    np.testing.assert_allclose(narrow_input, shown, atol=2 / 255)
    for panel in range(1, 4):
        maps = [f.axes[panel].get_images()[-1].get_array() for f in figures]
        np.testing.assert_allclose(maps[0], maps[1], rtol=1e-2)
