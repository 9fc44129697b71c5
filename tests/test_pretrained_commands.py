"""The `minivit convert` and `minivit predict` commands (from a checkpoint, or from weights and a
model name). Only the tests that write or read .pth files need torch.
"""

import json
import sys

import numpy as np
import pytest
from helpers_pretrained import small_model

import minivit
from minivit import Tensor
from minivit.checkpoint import save_checkpoint
from minivit.cli import main
from minivit.io import load_weights, save_weights
from minivit.models import create_model, load_pretrained


# -- minivit convert ------------------------------------------------------------------------------
def _bits(state):
    return {k: (v.dtype, v.shape, v.tobytes()) for k, v in state.items()}


def test_convert_round_trip_keeps_values_and_metadata(tmp_path, capsys):
    model = small_model(seed=3)
    src = tmp_path / "ckpt.safetensors"
    save_checkpoint(src, model, {"class_names": list("abcde")})
    original, metadata = load_weights(src)
    assert main(["convert", str(src), str(tmp_path / "a.npz")]) == 0
    assert "metadata kept (minivit)" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "a.npz"), str(tmp_path / "b.safetensors")]) == 0
    back, back_metadata = load_weights(tmp_path / "b.safetensors")
    assert _bits(back) == _bits(original) and back_metadata == metadata


def test_convert_through_pth(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    src = tmp_path / "w.npz"
    state = small_model(seed=3).state_dict()
    save_weights(state, src, metadata={"k": "v"})
    assert main(["convert", str(src), str(tmp_path / "w.pth")]) == 0
    assert "metadata not kept" in capsys.readouterr().out
    loaded = torch.load(tmp_path / "w.pth", weights_only=True)
    assert _bits({k: v.numpy() for k, v in loaded.items()}) == _bits(state)
    assert main(["convert", str(tmp_path / "w.pth"), str(tmp_path / "w.safetensors")]) == 0
    assert _bits(load_weights(tmp_path / "w.safetensors")[0]) == _bits(state)


def test_convert_refuses_to_overwrite_without_force(tmp_path, capsys):
    src, dst = tmp_path / "w.npz", tmp_path / "w.safetensors"
    save_weights(small_model().state_dict(), src)
    dst.write_bytes(b"keep me")
    assert main(["convert", str(src), str(dst)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert dst.read_bytes() == b"keep me"
    assert main(["convert", str(src), str(dst), "--force"]) == 0
    assert _bits(load_weights(dst)[0]) == _bits(load_weights(src)[0])


def test_convert_errors(tmp_path, capsys, monkeypatch):
    src = tmp_path / "w.npz"
    save_weights(small_model().state_dict(), src)
    assert main(["convert", str(src), str(tmp_path / "w.onnx")]) == 1
    assert "unsupported suffix '.onnx'" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.npz"), str(tmp_path / "x.npz")]) == 1
    assert "no such file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    assert main(["convert", str(src), str(tmp_path / "w.pth")]) == 1
    err = capsys.readouterr().err
    assert "writing .pth needs PyTorch" in err and err.count("\n") == 1
    assert not (tmp_path / "w.pth").exists()


# -- minivit predict --checkpoint -----------------------------------------------------------------
CLASSES = [f"class_{i}" for i in range(5)]


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny 'trained' checkpoint: 1-channel 8x8 images, 5 classes."""
    model = small_model(seed=4, img_size=8, patch_size=2, in_chans=1)
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, model, {"dataset": "digits", "mean": [0.25], "std": [0.5],
                                  "class_names": CLASSES})
    return path, model


def parse_predictions(out):
    """{file: [(probability, label), ...]} from predict's output."""
    result, current = {}, None
    for line in out.splitlines():
        if not line.startswith(" "):
            current = line.rstrip(":")
            result[current] = []
        else:
            probability, label = line.split()
            result[current].append((float(probability), label))
    return result


def expected_top(model, images, mean, std):
    with minivit.no_grad():
        logits = model.eval()(Tensor(((images - mean) / std).astype(np.float32))).data
    return [CLASSES[i] for i in logits.argmax(axis=1)]


def test_predict_checkpoint_npy(tmp_path, checkpoint, capsys):
    path, model = checkpoint
    rng = np.random.default_rng(0)
    single = rng.random((8, 8))
    batch = rng.random((3, 1, 8, 8)).astype(np.float32)
    as_uint8 = (rng.random((1, 8, 8)) * 255).astype(np.uint8)
    for name, array in (("single.npy", single), ("batch.npy", batch), ("u8.npy", as_uint8)):
        np.save(tmp_path / name, array)
    files = [str(tmp_path / n) for n in ("single.npy", "batch.npy", "u8.npy")]
    assert main(["predict", "--checkpoint", str(tmp_path), *files, "--top-k", "3"]) == 0
    predictions = parse_predictions(capsys.readouterr().out)
    names = [files[0], f"{files[1]}[0]", f"{files[1]}[1]", f"{files[1]}[2]", files[2]]
    assert list(predictions) == names
    images = np.concatenate([single[None, None], batch, as_uint8[None] / 255.0])
    top = expected_top(model, images, 0.25, 0.5)
    for name, label in zip(names, top):
        rows = predictions[name]
        assert len(rows) == 3 and rows[0][1] == label
        probabilities = [p for p, _ in rows]
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(0 < p <= 1 for p in probabilities)


def test_predict_checkpoint_png(tmp_path, checkpoint, capsys):
    Image = pytest.importorskip("PIL.Image")
    path, model = checkpoint
    rng = np.random.default_rng(1)
    rgb = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).resize((16, 12)).save(tmp_path / "big.png")
    assert main(["predict", "--checkpoint", str(path), str(tmp_path / "rgb.png"),
                 str(tmp_path / "big.png")]) == 0
    predictions = parse_predictions(capsys.readouterr().out)
    assert len(predictions) == 2 and all(len(rows) == 5 for rows in predictions.values())
    grey = np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255
    top = expected_top(model, grey[None, None], 0.25, 0.5)
    assert predictions[str(tmp_path / "rgb.png")][0][1] == top[0]
    assert sum(p for p, _ in predictions[str(tmp_path / "rgb.png")]) == pytest.approx(1, abs=1e-3)


def test_predict_without_pillow_says_how_to_install(tmp_path, checkpoint, capsys, monkeypatch):
    path, _ = checkpoint
    (tmp_path / "x.png").write_bytes(b"\x89PNG not really")
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert main(["predict", "--checkpoint", str(path), str(tmp_path / "x.png")]) == 1
    assert "reading .png images needs Pillow: pip install 'minivit[images]'" in \
        capsys.readouterr().err


def test_predict_input_errors(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    np.save(tmp_path / "bad.npy", np.full((8, 8), 3.0))
    np.save(tmp_path / "flat.npy", np.zeros(64))
    (tmp_path / "x.gif").write_bytes(b"GIF89a")  # a header, no image
    (tmp_path / "x.h5").write_bytes(b"HDF")
    for name, message in (("bad.npy", "pixel values must lie in [0, 1]"),
                          ("flat.npy", "expected an image array (H,W), (C,H,W) or (N,C,H,W)"),
                          ("x.gif", "x.gif: cannot read the image"),
                          ("x.h5", "unsupported file type '.h5'"),
                          ("none.npy", "no such file")):
        assert main(["predict", "--checkpoint", str(path), str(tmp_path / name)]) == 1
        assert message in capsys.readouterr().err
    assert main(["predict", "--weights", str(path), str(tmp_path / "bad.npy")]) == 1
    assert "--weights needs --model" in capsys.readouterr().err


# -- minivit predict --weights --model ------------------------------------------------------------
@pytest.fixture
def imagenet_weights(tmp_path):
    """Random weights of vit_tiny_patch16_224 made at image size 64 with 1000 classes."""
    minivit.manual_seed(5)
    model = create_model("vit_tiny_patch16_224", img_size=64)
    path = tmp_path / "tiny.safetensors"
    save_weights(model.state_dict(), path)
    return path, model


def test_predict_weights_imagenet_style(tmp_path, imagenet_weights, capsys):
    Image = pytest.importorskip("PIL.Image")
    path, model = imagenet_weights
    rng = np.random.default_rng(2)
    photo = (rng.random((50, 40, 3)) * 255).astype(np.uint8)  # portrait: height 50, width 40
    Image.fromarray(photo).save(tmp_path / "photo.png")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"name {i}\n" for i in range(1000)))
    assert main(["predict", "--weights", str(path), "--model", "vit_tiny_patch16_224",
                 "--img-size", "64", "--labels", str(labels), str(tmp_path / "photo.png")]) == 0
    out = capsys.readouterr().out
    rows = parse_predictions(out.replace("name ", "name_"))[str(tmp_path / "photo.png")]
    assert len(rows) == 5

    # the same by hand: shorter side to floor(64 / 0.875) = 73, centre crop 64, ImageNet stats
    resized = Image.fromarray(photo).resize((73, 91), Image.BICUBIC)  # 91 = int(73 * 50 / 40)
    top, left = int(round((91 - 64) / 2)), int(round((73 - 64) / 2))
    crop = np.asarray(resized.crop((left, top, left + 64, top + 64)), np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = ((crop - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
    with minivit.no_grad():
        logits = model.eval()(Tensor(x)).data[0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    expected = np.argsort(probs)[::-1][:5]
    assert [label for _, label in rows] == [f"name_{i}" for i in expected]
    assert [p for p, _ in rows] == pytest.approx(probs[expected], abs=1e-4)


def test_predict_weights_resamples_and_reads_num_classes(tmp_path, imagenet_weights, capsys):
    path, _ = imagenet_weights
    np.save(tmp_path / "x.npy", np.random.default_rng(3).random((3, 40, 48)).astype(np.float32))
    assert main(["predict", "--weights", str(path), "--model", "vit_tiny_patch16_224",
                 "--img-size", "32", "--top-k", "2", str(tmp_path / "x.npy")]) == 0
    captured = capsys.readouterr()
    assert "note: resampled pos_embed from a 4x4 to a 2x2 patch grid" in captured.err
    rows = parse_predictions(captured.out)[str(tmp_path / "x.npy")]
    assert len(rows) == 2 and all(0 <= int(label) < 1000 for _, label in rows)

    assert main(["predict", "--weights", str(path), "--model", "vit_tiny_patch16_224",
                 "--img-size", "32", "--num-classes", "10", str(tmp_path / "x.npy")]) == 0
    captured = capsys.readouterr()
    assert "has 1000 classes, the model 10: keeping the model's freshly initialised head" in \
        captured.err
    assert len(parse_predictions(captured.out)[str(tmp_path / "x.npy")]) == 5


def test_predict_weights_errors(tmp_path, imagenet_weights, capsys):
    path, _ = imagenet_weights
    np.save(tmp_path / "x.npy", np.zeros((3, 64, 64), np.float32))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-1000])
    assert main(["predict", "--weights", str(truncated), "--model", "vit_tiny_patch16_224",
                 str(tmp_path / "x.npy")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minivit predict: error: cannot read") and "truncated" in err

    assert main(["predict", "--weights", str(path), "--model", "vit_small_patch16_224",
                 "--img-size", "64", str(tmp_path / "x.npy")]) == 1
    err = capsys.readouterr().err
    assert "mis-shaped: cls_token: expected (1, 1, 384), got (1, 1, 192)" in err

    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    assert main(["predict", "--weights", str(path), "--model", "vit_tiny_patch16_224",
                 "--img-size", "64", "--labels", str(labels), str(tmp_path / "x.npy")]) == 1
    assert "has 2 names, the model has 1000 classes" in capsys.readouterr().err
    labels.write_bytes(bytes(range(256)))  # e.g. an image given as --labels
    assert main(["predict", "--weights", str(path), "--model", "vit_tiny_patch16_224",
                 "--img-size", "64", "--labels", str(labels), str(tmp_path / "x.npy")]) == 1
    assert "is not a text file: expected one class name per line" in capsys.readouterr().err


def test_checkpoint_metadata_is_json(checkpoint):
    path, _ = checkpoint
    info = json.loads(load_weights(path)[1]["minivit"])
    assert info["class_names"] == CLASSES


def test_predict_weights_resizes_relative_position_tables(tmp_path, capsys):
    """BEiT weights of 8x8 digits (a 4x4 patch grid) read at 12x12: the tables resized."""
    minivit.manual_seed(7)
    path = tmp_path / "beit.safetensors"
    save_weights(create_model("beit_digits").state_dict(), path)
    image = np.random.default_rng(4).random((12, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", image)
    assert main(["predict", "--weights", str(path), "--model", "beit_digits", "--img-size", "12",
                 "--top-k", "3", str(tmp_path / "x.npy")]) == 0
    captured = capsys.readouterr()
    assert "note: resampled relative_position_bias_table of 4 block(s) from a 4x4 to a 6x6 " \
           "window" in captured.err
    rows = parse_predictions(captured.out)[str(tmp_path / "x.npy")]
    model = create_model("beit_digits", img_size=12).eval()
    load_pretrained(model, path, notify=lambda _: None)
    with minivit.no_grad():
        logits = model(Tensor(((image - 0.5) / 0.5)[None, None])).data[0].astype(np.float64)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    best = np.argsort(probs)[::-1][:3]
    assert [label for _, label in rows] == [str(i) for i in best]
    assert [p for p, _ in rows] == pytest.approx(probs[best], abs=1e-4)
