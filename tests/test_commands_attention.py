"""minivit attention, through cli.main: attention maps and rollout of a checkpoint, for test
images by index and for image files, and its errors.
"""

import re

import numpy as np
import pytest
from helpers_commands import DIGITS_MEAN, DIGITS_STD, assert_png
from helpers_commands import figures, tiny_checkpoint  # noqa: F401 (fixtures)

from minivit.cli import main
from minivit.inspect import attention_rollout
from minivit.tensor import Tensor, no_grad


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
