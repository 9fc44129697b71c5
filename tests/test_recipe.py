"""The input pipeline and the DeiT recipe: worker-independent batches, Mixup/CutMix targets,
RandAugment, random erasing, the moving average of the weights, and exact resumes."""

import numpy as np
import pytest
from conftest import stop_after

import minivit
from minivit.checkpoint import read_checkpoint_parts
from minivit.cli import main
from minivit.data import Compose, DataLoader, RandomCrop, RandomHorizontalFlip, load_dataset
from minivit.data.mixing import Mixup, RandomErasing, smooth_one_hot
from minivit.data.pipeline import ArrayImages, BatchMaker
from minivit.data.randaugment import OPS, RandAugment
from minivit.data.workers import WorkerLoader
from minivit.ema import ModelEma
from minivit.errors import MinivitError
from minivit.models import create_model
from minivit.train import TrainConfig, train

RECIPE = dict(randaugment=9.0, reprob=0.25, mixup=0.8, cutmix=1.0)


def _batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.copy(), y.copy()) for x, y in loader]


def test_batches_do_not_depend_on_the_number_of_workers():
    data = load_dataset("digits", "train")
    augment = Compose([RandomCrop(8, padding=1), RandomHorizontalFlip()])

    def loader(workers):
        make = BatchMaker(ArrayImages(data.images[:300], augment), data.labels[:300], data.mean,
                          data.std, seed=5, randaugment=RandAugment(9), erasing=RandomErasing(0.5),
                          mixup=Mixup(10))
        return WorkerLoader(300, 32, make, seed=5, workers=workers, prefetch=1)

    reference = _batches(loader(0), 2)
    assert len(reference) == 10 and reference[0][1].shape == (32, 10)
    for workers in (1, 3):
        for (x, y), (x0, y0) in zip(_batches(loader(workers), 2), reference, strict=True):
            np.testing.assert_array_equal(x, x0)
            np.testing.assert_array_equal(y, y0)
    assert not np.array_equal(_batches(loader(2), 3)[0][0], reference[0][0])  # another epoch


def test_without_recipe_the_batches_are_the_data_loaders():
    """The pipeline keeps the batches the training loop had before it (same random streams)."""
    data = load_dataset("digits", "train")
    augment = Compose([RandomCrop(8, padding=1), RandomHorizontalFlip()])
    old = DataLoader(data, 64, shuffle=True, seed=3, augment=augment)
    new = WorkerLoader(len(data), 64, BatchMaker(ArrayImages(data.images, augment), data.labels,
                                                 data.mean, data.std, seed=3), seed=3, workers=2)
    for (x, y), (x0, y0) in zip(_batches(new, 1), _batches(old, 1), strict=True):
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(y, y0)


def test_a_consumer_that_stops_early_leaves_no_thread_running():
    calls = []

    def make(indices, epoch, b):
        calls.append(b)
        return np.zeros(1), indices

    loader = WorkerLoader(100, 1, make, workers=2, prefetch=1)
    for _ in zip(range(3), loader):
        pass
    assert len(calls) < 10  # only the prefetched batches were made


def test_mixup_targets_match_a_hand_computation():
    mixup = Mixup(3, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.3)
    x = np.arange(2 * 1 * 2 * 2, dtype=np.float32).reshape(2, 1, 2, 2)
    mixed, targets = mixup(x, np.array([0, 2]), np.random.default_rng(7))
    rng = np.random.default_rng(7)
    assert rng.random() < 1.0  # the "mix at all" draw (prob 1)
    lam = rng.beta(0.8, 0.8)  # mixup only: no switch draw
    np.testing.assert_allclose(mixed[0], lam * x[0] + (1 - lam) * x[1], rtol=1e-6)
    np.testing.assert_allclose(mixed[1], lam * x[1] + (1 - lam) * x[0], rtol=1e-6)
    on, off = 1 - 0.3 + 0.1, 0.1  # 1 − ε + ε/K, ε/K
    np.testing.assert_allclose(targets[0], [lam * on + (1 - lam) * off, off,
                                            lam * off + (1 - lam) * on], rtol=1e-6)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)


def test_cutmix_targets_are_the_pasted_area():
    mixup = Mixup(4, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    x = np.stack([np.zeros((1, 16, 16)), np.ones((1, 16, 16))]).astype(np.float32)
    for seed in range(20):
        mixed, targets = mixup(x, np.array([1, 3]), np.random.default_rng(seed))
        pasted = mixed[0].mean()  # image 0 is zeros: its ones came from image 1
        np.testing.assert_allclose(targets[0], [0, 1 - pasted, 0, pasted], atol=1e-6)
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    assert np.array_equal(smooth_one_hot(np.array([1]), 4, 0.0), [[0, 1, 0, 0]])


def test_mixup_with_probability_zero_only_smooths():
    x = np.ones((3, 1, 4, 4), np.float32)
    mixed, targets = Mixup(5, prob=0.0, label_smoothing=0.1)(x, np.array([0, 1, 4]),
                                                             np.random.default_rng(0))
    assert mixed is x
    np.testing.assert_allclose(targets, smooth_one_hot(np.array([0, 1, 4]), 5, 0.1))


@pytest.mark.parametrize("name", sorted(OPS))
def test_randaugment_ops_keep_shape_range_and_are_seeded(name):
    image = np.random.default_rng(0).random((3, 9, 7), dtype=np.float32)
    out = OPS[name](image, 10.0, np.random.default_rng(1))
    again = OPS[name](image, 10.0, np.random.default_rng(1))
    assert out.shape == image.shape and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1
    np.testing.assert_array_equal(out, again)
    if name != "identity":
        assert not np.array_equal(out, image)


def test_randaugment_geometry_and_levels():
    image = np.zeros((1, 5, 5), np.float32)
    image[0, 2, 1] = 1.0
    shift = OPS["translate_x"](image, 10.0 / 0.45 / 5 * 2, np.random.default_rng(0))  # ±2 px
    assert shift[0, 2, 3] == 1.0 or shift[0, 2, 4] == 0.5  # moved right, or left: filled grey
    ramp = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4)
    np.testing.assert_array_equal(OPS["solarize"](ramp, 5.0, None),
                                  np.where(ramp >= 0.5, 1 - ramp, ramp))
    assert len(np.unique(OPS["posterize"](ramp, 10.0, None))) <= 16
    np.testing.assert_allclose(OPS["auto_contrast"](ramp * 0.5 + 0.2, 0, None), ramp, atol=1e-6)


def test_random_erasing_fills_one_rectangle_per_image():
    x = np.zeros((8, 2, 20, 20), np.float32)
    out = RandomErasing(prob=1.0)(x, np.random.default_rng(0))
    assert not x.any()  # the input is not changed
    for image in out:
        rows, cols = np.nonzero(image[0])
        area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert 0.02 * 400 * 0.8 <= area <= 400 / 3 * 1.2
        assert np.count_nonzero(image[0]) == area  # one filled rectangle
    assert np.array_equal(RandomErasing(prob=0.0)(x, np.random.default_rng(0)), x)


def test_ema_equals_its_formula():
    minivit.manual_seed(0)
    model = create_model("vit_digits", depth=1)
    ema = ModelEma(model, 0.9)
    names = [name for name, _ in model.named_parameters()]
    expected = {name: p.data.astype(np.float64) for name, p in model.named_parameters()}
    rng = np.random.default_rng(0)
    for _ in range(3):
        for name, p in model.named_parameters():
            p.data[...] = rng.standard_normal(p.shape)
            expected[name] = 0.9 * expected[name] + 0.1 * p.data
        ema.update(model)
    raw = {name: p.data.copy() for name, p in model.named_parameters()}
    with ema.applied(model):
        for name, p in model.named_parameters():
            np.testing.assert_allclose(p.data, expected[name], rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.data, raw[name])  # put back
    assert set(ema.state_arrays()) == {"ema." + name for name in names}
    with pytest.raises(MinivitError, match="must lie in"):
        ModelEma(model, 1.0)


def test_resume_restores_ema_loader_and_augmentation_exactly(tmp_path):
    """A run stopped after epoch 1 and resumed ends where the uninterrupted one does, bit for
    bit: weights, optimizer, averaged weights and the metrics."""
    config = dict(dataset="digits", model="vit_digits", epochs=2, warmup=1, batch_size=256,
                  drop_path=0.1, ema=0.9, workers=2, progress=False, **RECIPE)
    train(TrainConfig(**config, out=str(tmp_path / "whole")))
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**config, out=str(tmp_path / "split")), on_epoch_end=stop_after(1))
    train(TrainConfig(**dict(config, workers=0), out=str(tmp_path / "split"), resume=True))
    whole = read_checkpoint_parts(tmp_path / "whole" / "last.safetensors")
    split = read_checkpoint_parts(tmp_path / "split" / "last.safetensors")
    for part, part0 in zip(whole[:3], split[:3]):
        assert part.keys() == part0.keys() and part
        for key in part:
            np.testing.assert_array_equal(part[key], part0[key], err_msg=key)
    records = [(tmp_path / run / "metrics.jsonl").read_text().splitlines()
               for run in ("whole", "split")]
    strip = [[line.split('"time"')[0] + line.split('"time"')[1].split(",", 1)[1]
              for line in lines if '"split": "train"' not in line] for lines in records]
    assert strip[0] == strip[1]
    assert any('"test_ema"' in line for line in strip[0])


def test_recipe_defaults_are_recorded_and_stay_off_for_older_runs():
    from minivit.data.pipeline import RECIPE_DEFAULTS, recipe_defaults

    assert recipe_defaults("digits") == dict(
        {"randaugment": 0.0, "reprob": 0.0, "mixup": 0.0, "cutmix": 0.0, "ema": 0.0},
        **RECIPE_DEFAULTS["digits"])
    assert not any(recipe_defaults("digits", augment=False).values())
    assert not any(recipe_defaults("digits", resume=True).values())  # saved before the recipe
    assert not any(recipe_defaults("cifar10").values())


def test_a_default_digits_run_records_its_recipe(tmp_path, capsys):
    import json

    train(TrainConfig(epochs=1, out=str(tmp_path / "a"), progress=False, batch_size=256))
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["cutmix"] == 1.0 and saved["mixup"] == 0.0 and saved["ema"] == 0.0
    train(TrainConfig(epochs=1, out=str(tmp_path / "b"), progress=False, batch_size=256,
                      cutmix=0.0, ema=0.5))
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["cutmix"] == 0.0 and saved["ema"] == 0.5
    # eval --ema evaluates the averaged weights the run evaluated
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").open()]
    averaged = next(r["accuracy"] for r in records if r["split"] == "test_ema")
    assert main(["eval", "--checkpoint", str(tmp_path / "b"), "--ema"]) == 0
    assert f"accuracy {averaged:.4f}" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path / "a"), "--ema"]) == 1
    assert "holds no averaged weights (ema.*)" in capsys.readouterr().err
