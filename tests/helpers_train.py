"""Helpers shared by the training tests (tests/test_train_*.py, test_train_output.py): a small,
quick training configuration and reading a run's metrics."""

import json

from minivit.train import TrainConfig

# A small, quick configuration: 2-block digits model, a few epochs.
QUICK = dict(dataset="digits", model="vit_digits", epochs=3, warmup=1, lr=2e-3, batch_size=32,
             drop_path=0.0, label_smoothing=0.0, augment=False, progress=False)


def quick_config(tmp_path, name="run", **overrides):
    return TrainConfig(**dict(QUICK, out=str(tmp_path / name), **overrides))


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
