"""The Swin Transformer without a reference framework: bad configurations are named, the
named models have their sizes, weights and checkpoints round-trip, it trains and resumes,
and every command that takes a ViT takes a Swin. (Parity with timm: test_swin_parity.py.)"""

import json

import numpy as np
import pytest
from conftest import stop_after

import minivit
from minivit import Tensor
from minivit.checkpoint import save_checkpoint
from minivit.cli import main
from minivit.errors import MinivitError, WeightsError
from minivit.inspect.swin_cost import swin_cost
from minivit.inspect.window_maps import attention_received
from minivit.io import load_weights
from minivit.models import (SwinTransformer, create_model, load_pretrained, model_config,
                            model_from_checkpoint)
from minivit.models.swin import relative_position_index, shift_mask
from minivit.train import TrainConfig, train

SMALL = dict(img_size=16, patch_size=2, in_chans=1, num_classes=3, embed_dim=8, depths=(2, 2),
             num_heads=(1, 2), window_size=4)  # 8x8 map, 4 shifted windows; then 4x4 = window


def small_model(seed=0, **overrides):
    minivit.manual_seed(seed)
    return create_model("swin_digits", **dict(SMALL, **overrides))


def images(batch=2, size=16, channels=1, seed=1):
    return np.random.default_rng(seed).standard_normal((batch, channels, size, size))


@pytest.mark.parametrize("overrides, message", [
    (dict(depths=(2, 2, 2)), r"depths \(2, 2, 2\) and num_heads \(1, 2\) need one entry per "
                             r"stage; got 3 and 2"),
    (dict(img_size=15), r"image size 15x15 is not a multiple of the patch size 2"),
    (dict(img_size=12), r"stage 0's 6x6 map \(image 12x12, patch 2\) does not tile into 4x4 "
                        r"windows \(window_size 4\)"),
    (dict(img_size=18, window_size=3), r"9x9 patch grid, which the patch merging before "
                                       r"stage 1 cannot halve evenly \(each side must be a "
                                       r"multiple of 2\)"),
    (dict(num_heads=(3, 2)), r"stage 0's width 8 \(embed_dim 8 · 1\) is not divisible by its 3 "
                             r"heads"),
    (dict(depths=(2, 0)), r"every stage needs a block"),
    (dict(window=4), r"unknown model options \['window'\] for swin_digits"),
])
def test_bad_configurations_name_the_numbers(overrides, message):
    with pytest.raises(MinivitError, match=message):
        small_model(**overrides)


def test_bad_configuration_through_the_cli_is_one_line(tmp_path, capsys):
    code = main(["info", "swin_tiny_patch4_window7_224", "--img-size", "100"])
    assert code == 0  # info counts what timm (which pads) would do, and says minivit refuses
    assert "does not tile into 7x7 windows" in capsys.readouterr().out
    code = main(["predict", "--model", "swin_digits", "--weights", str(tmp_path / "none.npz"),
                 str(tmp_path / "x.npy")])
    assert code != 0


def test_relative_position_index_and_shift_mask():
    index = relative_position_index((2, 3))
    assert index.shape == (6, 6) and index.min() == 0 and index.max() == 3 * 5 - 1
    assert (np.diag(index) == (2 - 1) * 5 + (3 - 1)).all()  # offset (0, 0): the table's centre
    mask = shift_mask((4, 4), (2, 2), (1, 1))  # 4 windows; the last one mixes 4 regions
    assert mask.shape == (4, 4, 4)
    assert (mask[0] == 0).all()
    assert sorted(np.unique(mask[3])) == [-100.0, 0.0] and (np.diag(mask[3]) == 0).all()
    assert (mask[3] == -100).sum() == 16 - 4  # each token sees only itself


def test_named_models_and_cost_agree_with_the_built_models():
    for name in ("swin_digits", "swin_mnist", "swin_cifar"):
        model = create_model(name)
        assert swin_cost(model.config).total_params == model.num_parameters()
        assert model(Tensor(np.zeros((1, model.patch_embed.in_chans,
                                      *model.patch_embed.img_size), "float32"))).shape == (1, 10)
    assert model_config("swin_tiny_patch4_window7_224", num_classes=5)["depths"] == (2, 2, 6, 2)


def test_float32_stays_float32_and_every_parameter_gets_a_gradient():
    model = small_model()
    logits = model(Tensor(images().astype("float32")))
    assert logits.dtype == np.float32
    logits.sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == np.float32, name


def test_state_dict_round_trip_and_one_error_for_misfits(tmp_path):
    model = small_model(seed=0).to(dtype="float64")
    other = small_model(seed=1).to(dtype="float64")
    load_pretrained(other, model.state_dict())
    x = Tensor(images())
    np.testing.assert_array_equal(other(x).numpy(), model(x).numpy())

    state = model.state_dict()
    state.pop("layers.1.downsample.reduction.weight")
    state["layers.0.blocks.0.attn.qkv.weight"] = np.zeros((24, 4))
    state["layers.0.extra.weight"] = np.zeros(3)
    with pytest.raises(WeightsError) as error:
        load_pretrained(other, state)
    text = str(error.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in text
    assert "layers.1.downsample.reduction.weight" in text and "expected (24, 8), got (24, 4)" in text

    # a bias table of a 2x2 window is resized (tests/test_relative_resize_parity.py: as timm)
    state = dict(model.state_dict(), **{"layers.0.blocks.0.attn.relative_position_bias_table":
                                        np.ones((9, 1))})
    notes = load_pretrained(other, state, notify=lambda note: None)
    assert notes == ["resampled relative_position_bias_table of 1 block(s) from a 2x2 to a 4x4 "
                     "window (timm's interpolation)"]
    np.testing.assert_array_equal(other.state_dict()["layers.0.blocks.0.attn."
                                                     "relative_position_bias_table"], 1.0)


def test_another_number_of_classes_keeps_a_fresh_head():
    model = small_model()
    fresh = small_model(seed=1, num_classes=7)
    head = fresh.head.fc.weight.numpy()
    notes = load_pretrained(fresh, model.state_dict(), notify=lambda note: None)
    assert any("3 classes" in note for note in notes)
    np.testing.assert_array_equal(fresh.head.fc.weight.numpy(), head)
    np.testing.assert_array_equal(fresh.layers[1].blocks[1].mlp.fc2.weight.numpy(),
                                  model.layers[1].blocks[1].mlp.fc2.weight.numpy())


def test_checkpoint_rebuilds_the_swin(tmp_path):
    model = small_model().eval()
    save_checkpoint(tmp_path / "best.safetensors", model, {"dataset": "digits"})
    loaded, info = model_from_checkpoint(tmp_path / "best.safetensors")
    assert isinstance(loaded, SwinTransformer) and loaded.config == model.config
    x = Tensor(images().astype("float32"))
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_probe_of_a_swin_run_says_it_reads_vit_encoders(tmp_path, capsys):
    save_checkpoint(tmp_path / "best.safetensors", small_model(), {"dataset": "digits"})
    assert main(["probe", str(tmp_path), "--linear-epochs", "0"]) == 1
    assert "holds a Swin Transformer: probe reads the encoder of a ViT" in \
        capsys.readouterr().err


def test_set_img_size_rebuilds_masks_and_resizes_the_tables_of_a_window_change():
    model = small_model().to(dtype="float64").eval()
    state = model.state_dict()
    model.set_img_size(32)  # stage 0: 16x16 map in 4x4 windows, stage 1: 8x8 (windows as before)
    at32 = small_model(img_size=32).to(dtype="float64").eval()
    load_pretrained(at32, state)
    x = Tensor(images(size=32))
    np.testing.assert_array_equal(model(x).numpy(), at32(x).numpy())

    model.set_img_size(4)  # maps 2x2 and 1x1, smaller than the 4x4 windows: windows = maps
    assert model.layers[0].blocks[1].window == (2, 2) and model.layers[0].blocks[1].shift == (0, 0)
    assert model.layers[0].blocks[0].attn.relative_position_bias_table.shape == (9, 1)
    assert model.layers[1].blocks[1].attn.relative_position_bias_table.shape == (1, 2)
    at4 = small_model(img_size=4).to(dtype="float64").eval()
    notes = load_pretrained(at4, state, notify=lambda note: None)  # the same tables as loading
    assert notes == [f"resampled relative_position_bias_table of 2 block(s) from a 4x4 to a "
                     f"{side}x{side} window (timm's interpolation)" for side in (2, 1)]
    x = Tensor(images(size=4))
    np.testing.assert_array_equal(model(x).numpy(), at4(x).numpy())


def test_attention_received_puts_each_window_back_and_undoes_the_shift():
    # probabilities whose column j is j: every token of a window receives its own index
    probs = np.broadcast_to(np.arange(4.0), (2 * 4, 1, 4, 4))  # 2 images, 4 windows of 2x2
    maps = attention_received(probs, 2, (4, 4), (2, 2))
    assert maps.shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(maps[0, 0, :2, :2], [[0, 1], [2, 3]])
    shifted = attention_received(probs, 2, (4, 4), (2, 2), shift=(1, 1))
    np.testing.assert_array_equal(shifted, np.roll(maps, (1, 1), axis=(2, 3)))


def test_swin_trains_and_resumes_exactly(tmp_path):
    options = dict(dataset="digits", model="swin_digits", epochs=2, warmup=1, lr=2e-3,
                   batch_size=32, drop_path=0.1, label_smoothing=0.1, augment=False,
                   progress=False)
    summary = train(TrainConfig(out=str(tmp_path / "straight"), **options))
    assert summary["test_accuracy"] > 0.2  # chance is 0.1 (seed 0 gives 0.25)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "resumed"), **options), on_epoch_end=stop_after(1))
    train(TrainConfig(out=str(tmp_path / "resumed"), resume=True, **options))
    straight, _ = load_weights(tmp_path / "straight" / "last.safetensors")
    resumed, _ = load_weights(tmp_path / "resumed" / "last.safetensors")
    for key in straight:
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)

    # the commands that read a run take it as they take a ViT's
    run = str(tmp_path / "straight")
    assert main(["eval", "--checkpoint", run]) == 0
    np.save(tmp_path / "digit.npy", np.random.default_rng(0).uniform(size=(8, 8)))
    assert main(["predict", "--checkpoint", run, str(tmp_path / "digit.npy")]) == 0
    assert main(["info", run]) == 0
    out = tmp_path / "attention.png"
    assert main(["attention", "--checkpoint", run, "--index", "0", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["convert", run + "/best.safetensors", str(tmp_path / "best.npz")]) == 0


def test_info_lists_and_sweeps(tmp_path, capsys):
    assert main(["info", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "swin_tiny_patch4_window7_224" in listing and "28,288,354" in listing
    assert main(["info", "swin_tiny_patch4_window7_224"]) == 0
    text = capsys.readouterr().out
    assert "layers.3" in text and "4.491 GMACs" in text
    out = tmp_path / "sweep.png"
    assert main(["info", "--sweep", "--plot", str(out)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows][0] == "224" and rows[-1][0] == "1024"
    vit, swin = [float(row[1]) for row in rows], [float(row[4]) for row in rows]
    # ViT's MACs grow faster than the image area, Swin's with it (both ×(1024/224)² ≈ 20.9)
    assert vit[-1] / vit[0] > 30 and 18 < swin[-1] / swin[0] < 24
    assert out.exists()


def test_bench_a_swin_against_timm(capsys):
    pytest.importorskip("timm")
    assert main(["bench", "--model", "swin_digits", "--against", "torch", "--steps", "1",
                 "--rounds", "1", "--warmup-steps", "0", "--batch", "4", "--threads", "1",
                 "--mode", "infer", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_abs_logit_difference"] < 1e-4 and result["params"] == 209_958


@pytest.mark.skipif(not minivit.backend.cupy_available(),
                    reason="cupy backend: CuPy or a CUDA GPU is not available")
def test_swin_on_the_cupy_backend_matches_numpy(tmp_path):
    """Logits and every gradient on the cupy backend equal NumPy's (float64), float32 stays
    float32 there, and a short training run on the GPU learns."""
    x, upstream = images(), np.random.default_rng(2).standard_normal((2, 3))
    results = {}
    for name in ("numpy", "cupy"):
        minivit.set_backend(name)
        model = small_model().to(dtype="float64")
        logits = model(Tensor(minivit.backend.to_backend(x)))
        logits.backward(minivit.backend.to_backend(upstream))
        results[name] = [logits.numpy()] + [p.grad.get() if name == "cupy" else p.grad
                                             for p in model.parameters()]
    for ours, reference in zip(results["cupy"], results["numpy"]):
        np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-12)
    model = small_model()
    out = model(Tensor(minivit.backend.to_backend(x.astype("float32"))))
    assert out.dtype == np.float32
    summary = train(TrainConfig(out=str(tmp_path / "gpu"), dataset="digits", model="swin_digits",
                                epochs=2, batch_size=32, warmup=1, augment=False,
                                progress=False, backend="cupy"))
    assert summary["test_accuracy"] > 0.2
