"""Fine-tuning: from a run of another class count and image size, onto an image folder;
freezing, layer-wise decay, provenance, and the error for another architecture."""

import json

import numpy as np
import pytest

import minivit
from minivit.checkpoint import read_checkpoint, read_checkpoint_parts
from minivit.cli import main
from minivit.data import load_dataset
from minivit.errors import MinivitError, WeightsError
from minivit.finetune import LayerwiseOptimizer, layer_index, layer_scales
from minivit.models import create_model
from minivit.optim import AdamW
from minivit.train import TrainConfig, train

Image = pytest.importorskip("PIL.Image")

QUICK = dict(model="vit_digits", warmup=0, batch_size=64, drop_path=0.0, progress=False)


def digits_folder(root, classes, per_class=12, size=16):
    """The first `per_class` train digits of each class as PNGs, upscaled to size x size, in
    root/train/<name>/ and root/val/<name>/ (halves)."""
    data = load_dataset("digits", "train")
    for label in classes:
        members = np.flatnonzero(data.labels == label)[:per_class]
        for i, index in enumerate(members):
            split = "train" if i % 2 == 0 else "val"
            folder = root / split / f"digit {label}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (data.images[index, 0] * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.NEAREST).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A 10-class run on the 8x8 digits (1 epoch)."""
    out = tmp_path_factory.mktemp("source") / "run"
    train(TrainConfig(dataset="digits", epochs=1, out=str(out), **QUICK))
    return out


def test_finetune_from_another_class_count_and_image_size(tmp_path, source_run, capsys):
    data = digits_folder(tmp_path / "data", classes=(3, 5, 8))
    out = tmp_path / "tuned"
    code = main(["train", "--dataset", "folder", "--data-dir", str(data), "--img-size", "16",
                 "--pretrained", str(source_run), "--model", "vit_digits", "--epochs", "2",
                 "--warmup", "0", "--ema", "0.9", "--out", str(out), "--quiet"])
    assert code == 0
    notes = capsys.readouterr().err
    assert "resampled pos_embed from a 4x4 to a 8x8 patch grid" in notes
    assert "has 10 classes, the model 3" in notes
    state, _, info = read_checkpoint(out / "last.safetensors")
    assert state["head.weight"].shape == (3, 64) and state["pos_embed"].shape == (1, 65, 64)
    assert info["class_names"] == ["digit 3", "digit 5", "digit 8"]
    assert info["pretrained"]["path"] == str((source_run / "best.safetensors").resolve())
    assert len(info["pretrained"]["sha256"]) == 64 and len(info["pretrained"]["notes"]) == 2
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained"] == str(source_run) and config["img_size"] == 16
    assert config["class_names"] == info["class_names"]
    assert config["mean"] == list(info["mean"]) == [0.5] and config["std"] == [0.5]
    # evaluation reads the run's folder and split, with the averaged weights too
    assert main(["eval", "--checkpoint", str(out), "--ema"]) == 0
    assert "data-test: 18 images" in capsys.readouterr().out
    # predict prints the folder's class names
    image = sorted((data / "val" / "digit 5").iterdir())[0]
    assert main(["predict", "--checkpoint", str(out), str(image), "--top-k", "1"]) == 0
    assert "digit" in capsys.readouterr().out


def test_pretrained_weights_are_loaded_before_training(source_run):
    config = TrainConfig(dataset="digits", pretrained=str(source_run), **QUICK)
    from minivit.train import build_model

    model, provenance = build_model(config, 10, 8, 1, notify=lambda message: None)
    source = read_checkpoint(source_run / "best.safetensors")[0]
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, source[name])
    assert provenance["notes"] == []


def test_another_architecture_is_an_error_naming_the_keys(tmp_path, source_run):
    with pytest.raises(WeightsError, match=r"mis-shaped: patch_embed.proj.weight.*"
                                           r"expected \(96, 1, 4, 4\)"):
        train(TrainConfig(dataset="digits", pretrained=str(source_run), out=str(tmp_path / "x"),
                          **dict(QUICK, model="vit_mnist")))


def test_freeze_trains_only_the_head(tmp_path, source_run):
    out = tmp_path / "probe"
    train(TrainConfig(dataset="digits", pretrained=str(source_run), freeze=True, epochs=1,
                      out=str(out), **QUICK))
    before = read_checkpoint(source_run / "best.safetensors")[0]
    after, optimizer, _, _ = read_checkpoint_parts(out / "last.safetensors")
    changed = sorted(name for name in after if not np.array_equal(after[name], before[name]))
    assert changed == ["head.bias", "head.weight"]
    assert optimizer["m"].size == 64 * 10 + 10  # the optimizer holds the head alone


def test_layer_scales_follow_beit():
    minivit.manual_seed(0)
    model = create_model("vit_digits", depth=2)
    scales = layer_scales(model, 0.5)
    assert [layer_index(n, 2) for n in ("cls_token", "patch_embed.proj.weight",
                                         "blocks.1.mlp.fc1.weight", "norm.weight")] == [0, 0, 2, 3]
    assert scales["pos_embed"] == 0.125 and scales["blocks.0.attn.qkv.weight"] == 0.25
    assert scales["blocks.1.norm1.bias"] == 0.5 and scales["head.weight"] == 1.0


def test_layerwise_optimizer_with_decay_one_is_plain_adamw():
    minivit.manual_seed(0)
    models = [create_model("vit_digits", depth=2) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    plain = AdamW(models[0].named_parameters(), lr=1e-2, weight_decay=0.05)
    grouped = LayerwiseOptimizer(AdamW, models[1].named_parameters(),
                                 layer_scales(models[1], 1.0), 1e-2, 0.05)
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = {name: rng.standard_normal(p.shape).astype(np.float32)
                 for name, p in models[0].named_parameters()}
        for model, optimizer in zip(models, (plain, grouped)):
            for name, p in model.named_parameters():
                p.grad = grads[name].copy()
            optimizer.step(max_grad_norm=1.0)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-6, atol=1e-7, err_msg=name)
    restored = LayerwiseOptimizer(AdamW, models[1].named_parameters(),
                                  layer_scales(models[1], 1.0), 1.0, 0.05)
    restored.load_state_dict(grouped.state_dict())
    assert restored.lr == 1e-2 and restored.groups[0][1].step_count == 3


def test_layer_decay_slows_the_early_layers(tmp_path, source_run):
    out = tmp_path / "decayed"
    train(TrainConfig(dataset="digits", pretrained=str(source_run), layer_decay=0.1, epochs=1,
                      out=str(out), **QUICK))
    before = read_checkpoint(source_run / "best.safetensors")[0]
    after = read_checkpoint(out / "last.safetensors")[0]

    def moved(name):
        return np.abs(after[name] - before[name]).max()

    assert moved("patch_embed.proj.weight") < 0.01 * moved("head.weight")
    # resuming a layer-decay run restores each group's buffers
    train(TrainConfig(dataset="digits", pretrained=str(source_run), layer_decay=0.1, epochs=2,
                      out=str(out), resume=True, **QUICK))


def test_layer_decay_refuses_options_that_need_one_optimizer(tmp_path):
    with pytest.raises(MinivitError, match="--layer-decay steps one optimizer per learning rate"):
        train(TrainConfig(dataset="digits", layer_decay=0.5, log_grads=True,
                          out=str(tmp_path / "x"), **QUICK))


def test_layer_decay_of_a_swin_is_refused():
    with pytest.raises(MinivitError, match="--layer-decay numbers the blocks of a plain ViT"):
        layer_scales(create_model("swin_digits"), 0.75)
