"""Is the image-folder loader the bottleneck? Its images/s next to the training step's.

    python scripts/loader_bench.py                                   # vit_cifar, 32x32, CPU
    python scripts/loader_bench.py --model vit_small_patch16_224 --backend cupy --source-size 320

Writes `--images` random JPEGs of --source-size pixels into a temporary ImageFolder tree, then
times (1) one epoch of the training loader (decode, RandomResizedCrop + flip, optionally the
DeiT recipe: --recipe) for each --workers count, and (2) training steps of --model at its own
image size on random batches. The loader keeps up when its images/s exceeds the step's.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from minivit import backend
from minivit.data.pipeline import build_loaders
from minivit.models import model_config
from minivit.train import TrainConfig, build_model, build_optimizer, training_step

RECIPE = dict(randaugment=9.0, reprob=0.25, mixup=0.8, cutmix=1.0)


def write_folder(root, count, size, classes=10):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("train" if i % 5 else "val") / f"class{i // 5 % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size * 5 // 4, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def loader_rate(config):
    loader, _, facts = build_loaders(config, model_config(config.model)["img_size"], 3)
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in loader)
    return count / (time.perf_counter() - start), facts.train_size


def training_rate(config, steps):
    settings = model_config(config.model)
    size = settings["img_size"]
    backend.set_backend(config.backend)
    model, _ = build_model(config, 10, size, 3)
    optimizer = build_optimizer(config, model)
    step = training_step(model, optimizer, config)
    rng = np.random.default_rng(0)
    x = backend.to_backend(rng.standard_normal((config.batch_size, 3, size, size), np.float32))
    y = backend.to_backend(rng.integers(0, 10, config.batch_size))
    step(x, y)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = step(x, y)
    float(loss)  # wait for the device
    return steps * config.batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_cifar")
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--source-size", type=int, default=40, help="pixels of the JPEGs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--recipe", action="store_true", help="RandAugment, erasing, Mixup/CutMix")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed (0: none)")
    parser.add_argument("--backend", default="numpy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        write_folder(Path(folder), args.images, args.source_size)
        for workers in args.workers:
            config = TrainConfig(dataset="folder", data_dir=folder, model=args.model,
                                 batch_size=args.batch_size, workers=workers, backend=args.backend,
                                 **(RECIPE if args.recipe else {}))
            rate, count = loader_rate(config)
            print(f"loader   {workers} worker(s): {rate:8.0f} images/s  ({count} images, "
                  f"{'with' if args.recipe else 'without'} the recipe)")
    if not args.steps:
        return
    config = TrainConfig(model=args.model, batch_size=args.batch_size, backend=args.backend,
                         lr=1e-3, weight_decay=0.05)
    print(f"training {args.model}, batch {args.batch_size}, {args.backend}: "
          f"{training_rate(config, args.steps):8.0f} images/s")


if __name__ == "__main__":
    main()
