"""The input pipeline of a training run: where images come from, how they are augmented, mixed
and normalised, on how many worker threads.

A batch is made in this order, each step drawing from generators seeded with (seed, epoch,
batch), so that batches are reproducible and independent of the number of workers:

    source       in-memory arrays (+ the dataset's default augmentation), or image files
                 decoded by Pillow: RandomResizedCrop + horizontal flip to train, the centre
                 crop (crop_pct of the shorter side) resized to the model's size to evaluate
    RandAugment  (randaugment > 0)   on [0, 1] images
    normalise    (x − mean) / std: the dataset's own constants for the built-in datasets; for
                 image folders ImageNet's for the ImageNet-sized models, 0.5 / 0.5 for the
                 small ones (or as --norm says); recorded in the checkpoints
    erasing      (reprob > 0)
    Mixup/CutMix (mixup or cutmix > 0)  labels become soft targets (B, K), smoothing folded in
"""

import dataclasses
import os

import numpy as np

from minivit.data.augment import default_augmentation
from minivit.data.datasets import load_dataset
from minivit.data.folder import load_image_folder, open_image
from minivit.data.mixing import Mixup, RandomErasing
from minivit.data.randaugment import RandAugment
from minivit.data.subset import stratified_fraction
from minivit.data.workers import WorkerLoader
from minivit.errors import DatasetError

NORMALIZATIONS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                  "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
IMAGENET_CROP_PCT = 0.875  # timm's evaluation crop for the ImageNet ViTs
RRC_RATIO = (3 / 4, 4 / 3)
EVAL_BATCH_SIZE = 256
RECIPE_FIELDS = ("randaugment", "reprob", "mixup", "cutmix", "ema")
# The recipe a dataset trains with where its flags are not given (the rest: off). The 8x8
# digits overfit (100% train accuracy by epoch 60, test ~96%); CutMix, which pastes whole 2x2
# patches of another digit, lifts the last epoch's test accuracy to 97-98% (docs/own-images.md).
RECIPE_DEFAULTS = {"digits": {"cutmix": 1.0}}


@dataclasses.dataclass
class DataFacts:
    """What the model, the checkpoints and the run's header need to know about its data."""
    name: str  # the training split's, e.g. "digits-train"
    num_classes: int
    channels: int
    image_size: int
    mean: tuple
    std: tuple
    class_names: list
    train_size: int
    test_size: int  # the whole test split's, before a data-parallel process takes its part
    skipped: list  # (path, reason) of the unreadable image files left out
    augmented: bool  # whether the source augments (the built-in datasets: their default)


def recipe_defaults(dataset, augment=True, resume=False):
    """{recipe field: value} a run takes where its flag is not given: RECIPE_DEFAULTS, nothing
    with --no-augment, and nothing for a resumed run whose config predates the recipe."""
    chosen = RECIPE_DEFAULTS.get(dataset, {}) if augment and not resume else {}
    return {name: chosen.get(name, 0.0) for name in RECIPE_FIELDS}


def pipeline_option_checks(config):
    """(field, holds, expected) of the input pipeline's and the recipe's TrainConfig options,
    for train's checks."""
    return (("img_size", config.img_size is None or config.img_size >= 1, "at least 1"),
            ("workers", config.workers is None or config.workers >= 0, "at least 0"),
            ("randaugment", 0 <= config.randaugment <= 10, "in [0, 10] (0: off)"),
            ("reprob", 0 <= config.reprob <= 1, "in [0, 1] (0: off)"),
            ("mixup", config.mixup >= 0, "at least 0 (0: off)"),
            ("cutmix", config.cutmix >= 0, "at least 0 (0: off)"),
            ("ema", 0 <= config.ema < 1, "in [0, 1) (0: off)"))


def folder_normalization(norm, image_size, channels):
    """(mean, std) of `channels` values: --norm's, else ImageNet's for models of 224 pixels or
    more (timm's ImageNet ViTs), else 0.5 / 0.5."""
    norm = norm or ("imagenet" if image_size >= 224 else "inception")
    if norm not in NORMALIZATIONS:
        raise DatasetError(f"unknown normalisation {norm!r}; known: {', '.join(NORMALIZATIONS)}")
    mean, std = NORMALIZATIONS[norm]
    if channels == 1:  # a grey model: the channel average, as timm does
        return (sum(mean) / 3,), (sum(std) / 3,)
    return mean, std


class FolderImages:
    """`source(indices, rng)` -> (B, C, S, S) float32 in [0, 1] from image files: train=True
    RandomResizedCrop(scale=(min_scale, 1), ratio 3/4..4/3) + flip, else the centre crop."""

    def __init__(self, paths, channels, size, train, crop_pct, min_scale=0.08):
        self.paths, self.channels, self.size = paths, channels, size
        self.train, self.crop_pct, self.min_scale = train, crop_pct, min_scale

    def _random_box(self, width, height, rng):
        """torchvision's RandomResizedCrop box: 10 tries at a random area and aspect ratio,
        else the centre crop clipped to the ratio range."""
        area = width * height
        log_ratio = np.log(RRC_RATIO)
        for _ in range(10):
            target = area * rng.uniform(self.min_scale, 1.0)
            ratio = np.exp(rng.uniform(*log_ratio))
            w, h = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
        ratio = width / height
        w, h = ((width, int(round(width / RRC_RATIO[0]))) if ratio < RRC_RATIO[0] else
                (int(round(height * RRC_RATIO[1])), height) if ratio > RRC_RATIO[1] else
                (width, height))
        w, h = min(w, width), min(h, height)
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def _centre_box(self, width, height):
        side = min(width, height) * self.crop_pct
        left, top = (width - side) / 2, (height - side) / 2
        return left, top, left + side, top + side

    def read(self, path, rng):
        """One image, (C, S, S) float32 in [0, 1]."""
        from PIL import Image

        try:
            image = open_image(path, self.channels)
        except (OSError, ValueError, SyntaxError) as error:
            raise DatasetError(f"{path} could be read when the folder was scanned, but no "
                               f"longer: {error}. Was it changed during the run?") from None
        box = (self._random_box(*image.size, rng) if self.train else
               self._centre_box(*image.size))
        image = image.resize((self.size, self.size), Image.BICUBIC, box=box)
        array = np.asarray(image, dtype=np.float32) / np.float32(255)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if self.train and rng.random() < 0.5:
            array = array[:, :, ::-1]
        return array

    def __call__(self, indices, rng):
        return np.stack([self.read(self.paths[i], rng) for i in indices])

    def part(self, start, stop):
        return FolderImages(self.paths[start:stop], self.channels, self.size, self.train,
                            self.crop_pct, self.min_scale)


class ArrayImages:
    """`source(indices, rng)` from an in-memory ArrayDataset, with its augmentation."""

    def __init__(self, images, augment):
        self.images, self.augment = images, augment

    def __call__(self, indices, rng):
        x = self.images[indices]  # fancy indexing: a fresh copy, safe to change in place
        if self.augment is not None:
            x = np.ascontiguousarray(self.augment(x, rng), np.float32)
        return x

    def part(self, start, stop):
        return ArrayImages(self.images[start:stop], self.augment)


class BatchMaker:
    """make_batch(indices, epoch, b) for WorkerLoader: the steps of the module's docstring."""

    def __init__(self, source, labels, mean, std, seed, randaugment=None, erasing=None,
                 mixup=None):
        channels = len(mean)
        self.source, self.labels, self.seed = source, labels, seed
        self.mean = np.asarray(mean, np.float32).reshape(1, channels, 1, 1)
        self.inv_std = (1.0 / np.asarray(std, np.float32)).reshape(1, channels, 1, 1)
        self.randaugment, self.erasing, self.mixup = randaugment, erasing, mixup

    def __call__(self, indices, epoch, b):
        # the source's stream is DataLoader's (seed, epoch, b); the recipe draws from its own,
        # so that turning a recipe step on leaves the crops and flips as they were
        x = self.source(indices, np.random.default_rng([self.seed, epoch, b]))
        recipe_rng = np.random.default_rng([self.seed, epoch, b, 1])
        if self.randaugment is not None:
            x = self.randaugment(x, recipe_rng)
        x -= self.mean
        x *= self.inv_std
        y = self.labels[indices]
        if self.erasing is not None:
            x = self.erasing(x, recipe_rng)
        if self.mixup is not None:
            x, y = self.mixup(x, y, recipe_rng)
        return x, y


def default_workers(dataset):
    """Image folders decode files: a thread per core (up to 4); in-memory arrays need none."""
    return min(4, os.cpu_count() or 1) if dataset == "folder" else 0


def build_loaders(config, model_image_size, model_channels, test_part=None):
    """(train_loader, test_loader, DataFacts) for a TrainConfig. Image folders are read at the
    model's size and channels; the built-in datasets at their own. test_part: a function
    (count) -> (start, stop) choosing this process's part of the test set (data parallel)."""
    workers = default_workers(config.dataset) if config.workers is None else config.workers
    if config.dataset == "folder":
        if config.train_fraction != 1:
            raise DatasetError("--train-fraction subsamples the built-in datasets; for an image "
                               "folder, put the images to train on in its train/ folder")
        splits = load_image_folder(config.data_dir, config.val_fraction, config.seed,
                                   config.strict, workers)
        train_split, test_split = splits["train"], splits["test"]
        size, channels = model_image_size, model_channels
        mean, std = folder_normalization(config.norm, size, channels)
        crop_pct = IMAGENET_CROP_PCT if size >= 224 else 1.0
        train_source = FolderImages(train_split.paths, channels, size, config.augment, crop_pct)
        test_source = FolderImages(test_split.paths, channels, size, False, crop_pct)
        class_names, name = train_split.class_names, train_split.name
        train_labels, test_labels = train_split.labels, test_split.labels
        skipped = train_split.skipped + test_split.skipped
        augmented = config.augment
    else:
        train_set = stratified_fraction(load_dataset(config.dataset, "train", config.data_dir),
                                        config.train_fraction, config.seed)
        test_set = load_dataset(config.dataset, "test", config.data_dir)
        channels, size = train_set.images.shape[1], train_set.images.shape[2]
        mean, std = train_set.mean, train_set.std
        augment = default_augmentation(config.dataset) if config.augment else None
        train_source, test_source = ArrayImages(train_set.images, augment), \
            ArrayImages(test_set.images, None)
        class_names, name = train_set.class_names, train_set.name
        skipped, augmented = [], augment is not None
        train_labels, test_labels = train_set.labels, test_set.labels
    num_classes, test_size = len(class_names), len(test_labels)
    if test_part is not None:
        start, stop = test_part(len(test_labels))
        test_source, test_labels = test_source.part(start, stop), test_labels[start:stop]
    mixup = None
    if config.mixup or config.cutmix:
        mixup = Mixup(num_classes, config.mixup, config.cutmix,
                      label_smoothing=config.label_smoothing)
    train_batches = BatchMaker(
        train_source, train_labels, mean, std, config.seed,
        RandAugment(config.randaugment) if config.randaugment else None,
        RandomErasing(config.reprob) if config.reprob else None, mixup)
    test_batches = BatchMaker(test_source, test_labels, mean, std, config.seed)
    train_loader = WorkerLoader(len(train_labels), config.batch_size, train_batches,
                                shuffle=True, seed=config.seed, workers=workers)
    test_loader = WorkerLoader(len(test_labels), EVAL_BATCH_SIZE, test_batches, shuffle=False,
                               workers=workers)
    facts = DataFacts(name, num_classes, channels, size, tuple(mean), tuple(std), class_names,
                      len(train_labels), test_size, skipped, augmented)
    return train_loader, test_loader, facts


def folder_eval_loader(info, split, data_dir=None, batch_size=EVAL_BATCH_SIZE):
    """(loader, split) to evaluate a checkpoint trained on an image folder: the folder (or
    `data_dir`) and split of its run, read with the evaluation transform at the model's size,
    normalised with the mean/std it was trained with."""
    train_config, model_config = info["train_config"], info["model_config"]
    folder = data_dir or train_config["data_dir"]
    splits = load_image_folder(folder, train_config["val_fraction"], train_config["seed"],
                               strict=False, workers=default_workers("folder"))
    chosen = splits[split]
    if chosen.class_names != info["class_names"]:
        raise DatasetError(f"{folder} holds the classes {', '.join(chosen.class_names)}; the "
                           f"checkpoint was trained on {', '.join(info['class_names'])}")
    size = model_config["img_size"]
    size = size if isinstance(size, int) else size[0]
    source = FolderImages(chosen.paths, model_config["in_chans"], size, False,
                          IMAGENET_CROP_PCT if size >= 224 else 1.0)
    batches = BatchMaker(source, chosen.labels, info["mean"], info["std"], 0)
    return WorkerLoader(len(chosen), batch_size, batches, shuffle=False,
                        workers=default_workers("folder")), chosen
