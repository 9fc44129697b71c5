"""The training loop learns: AdamW and SGD with their own defaults, gradient logging, float64,
the augmentation recorded in config.json; unknown optimizers and datasets are refused.
"""

import dataclasses
import json

import numpy as np
import pytest
from helpers_train import quick_config, read_metrics

import minivit
from minivit.checkpoint import find_checkpoint, read_checkpoint
from minivit.errors import MinivitError
from minivit.io import load_weights
from minivit.train import OPTIMIZER_DEFAULTS, train


def test_short_training_learns(tmp_path):
    summary = train(quick_config(tmp_path, epochs=4))
    records = read_metrics(tmp_path / "run")
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    assert train_losses[-1] < 0.7 * train_losses[0]
    assert summary["test_accuracy"] > 0.5  # chance is 0.1
    assert {"epoch", "step", "time", "lr", "images_per_s"} <= set(records[0])
    assert (tmp_path / "run" / "best.safetensors").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 4


def test_sgd_has_its_own_defaults_and_learns(tmp_path):
    """AdamW's lr and decoupled decay left SGD at chance accuracy (its decay is an L2 term):
    --optimizer sgd without --lr/--weight-decay takes SGD's own, and learns."""
    assert OPTIMIZER_DEFAULTS == {"adamw": {"lr": 2e-3, "weight_decay": 0.05},
                                  "sgd": {"lr": 0.1, "weight_decay": 5e-4}}
    # unset until train() resolves them, so that switching the optimizer switches them too
    config = dataclasses.replace(quick_config(tmp_path, lr=None), optimizer="sgd", epochs=6)
    train(config)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["lr"], saved["weight_decay"]) == (0.1, 5e-4)  # the values it trained with
    train_losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert train_losses[-1] < 0.85 * train_losses[0]
    train(quick_config(tmp_path, "given", optimizer="sgd", lr=0.3, epochs=1))
    saved = json.loads((tmp_path / "given" / "config.json").read_text())
    assert (saved["lr"], saved["weight_decay"]) == (0.3, 5e-4)


def test_unknown_optimizer_or_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(MinivitError, match="unknown optimizer 'rmsprop'; known: adamw, sgd"):
        train(quick_config(tmp_path, optimizer="rmsprop", lr=None))
    with pytest.raises(MinivitError, match="unknown dataset 'imagenet'"):
        train(quick_config(tmp_path, dataset="imagenet"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_log_grads_records_each_epochs_last_step(tmp_path):
    train(quick_config(tmp_path, log_grads=True, clip_grad=1.0))
    grads = [r for r in read_metrics(tmp_path / "run") if r["split"] == "grads"]
    assert [r["epoch"] for r in grads] == [1, 2, 3]
    names = {name for name, _ in minivit.models.create_model("vit_digits").named_parameters()}
    for record in grads:
        norms, ratios = record["grad_norms"], record["update_ratios"]
        assert set(norms) == set(ratios) == names
        assert all(np.isfinite(list(norms.values()))) and all(v > 0 for v in ratios.values())
        # the per-parameter norms make up the step's gradient, clipped to --clip-grad
        assert 0 < np.sqrt(sum(v * v for v in norms.values())) <= 1.0 + 1e-5


def test_float64_training_step(tmp_path):
    summary = train(quick_config(tmp_path, epochs=1, dtype="float64"))
    state, _ = load_weights(tmp_path / "run" / "last.safetensors")
    assert state["pos_embed"].dtype == np.float64
    assert summary["epoch"] == 1


def test_config_records_the_augmentation_actually_applied(tmp_path):
    summary = train(quick_config(tmp_path, epochs=1, batch_size=256, augment=True))
    assert summary["epoch"] == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["augment"] is False
    _, _, info = read_checkpoint(find_checkpoint(tmp_path / "run", "last"))
    assert info["train_config"]["augment"] is False  # digits get none
