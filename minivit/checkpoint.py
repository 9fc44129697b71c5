"""Training checkpoints: one .safetensors (or .npz) file, written atomically.

The file holds the model's weights under timm's names, the optimizer's buffers under
``optimizer.<name>`` (only in ``last``), the moving average of the weights under ``ema.<name>``
(runs with --ema), and JSON metadata under the key "minivit": the model
configuration, the dataset's name/normalisation/class names, the epoch and step reached, the
training configuration and (in ``last``) the optimizer's step count, learning rate and, for
fp16 training, its loss scale. ``best`` checkpoints carry no optimizer state, so they load into
timm/PyTorch as they are.
"""

import json
from pathlib import Path

from minivit.ema import EMA_PREFIX
from minivit.errors import WeightsError
from minivit.io import load_weights, save_weights
from minivit.nn import Module
from minivit.tensor import Tensor

OPTIMIZER_PREFIX = "optimizer."
TRAINING_PREFIXES = (OPTIMIZER_PREFIX, EMA_PREFIX)  # the entries that are not the model's
METADATA_KEY = "minivit"
CHECKPOINT_SUFFIXES = (".safetensors", ".npz")  # the formats of --format


def save_checkpoint(path, model, info, optimizer=None, ema=None):
    """Write model weights (+ optimizer buffers, + the ModelEma's averages) and `info`
    (JSON-serialisable dict) atomically."""
    state = dict(model.state_dict())
    if ema is not None:
        state.update(ema.state_arrays())
    info = dict(info, model_config=model.config)
    if optimizer is not None:
        optimizer_state = optimizer.state_dict()
        for name, array in optimizer_state["arrays"].items():
            state[OPTIMIZER_PREFIX + name] = array
        # step_count, lr and (fp16 training) the loss scale: the JSON-sized rest of the state
        info["optimizer"] = {key: value for key, value in optimizer_state.items()
                             if key != "arrays"}
    save_weights(state, path, metadata={METADATA_KEY: json.dumps(info)})


def read_checkpoint(path):
    """(model_state, optimizer_arrays, info) from a minivit checkpoint; the averaged weights
    (ema.*) are in neither state (see read_checkpoint_parts)."""
    model_state, optimizer_arrays, _, info = read_checkpoint_parts(path)
    return model_state, optimizer_arrays, info


def read_checkpoint_parts(path):
    """(model_state, optimizer_arrays, ema_arrays, info) from a minivit checkpoint; ema_arrays
    keep their "ema." prefix (empty for a run without --ema)."""
    state, metadata = load_weights(path)
    if METADATA_KEY not in metadata:
        raise WeightsError(f"{path} is a weights file but not a minivit checkpoint (it has no "
                           f"'{METADATA_KEY}' metadata, so no model configuration): "
                           f"`minivit predict --weights {path} --model NAME` reads such files, "
                           f"`minivit info NAME` shows a model's shapes")
    info = json.loads(metadata[METADATA_KEY])
    model_state = {k: v for k, v in state.items()
                   if not k.startswith(TRAINING_PREFIXES)}
    optimizer_arrays = {k[len(OPTIMIZER_PREFIX):]: v for k, v in state.items()
                        if k.startswith(OPTIMIZER_PREFIX)}
    ema_arrays = {k: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    return model_state, optimizer_arrays, ema_arrays, info


def save(weights, path, metadata=None):
    """Save a model's weights, or a dict of arrays or Tensors, to a .safetensors or .npz file,
    atomically (as torch.save(model.state_dict(), path)); `metadata` maps str to str."""
    state = weights.state_dict() if isinstance(weights, Module) else {
        name: value.data if isinstance(value, Tensor) else value
        for name, value in dict(weights).items()}
    save_weights(state, path, metadata)


def load(path):
    """The weights of a file or run folder as a dict of NumPy arrays, ready for
    model.load_state_dict (as torch.load): a minivit checkpoint gives its model's weights
    (without the optimizer's state or --ema's average), a run folder those of its best
    checkpoint.
    minivit.models.model_from_checkpoint rebuilds the model as well."""
    state, metadata = load_weights(checkpoint_path(path))
    checkpoint = METADATA_KEY in metadata
    return {name: array for name, array in state.items()
            if not (checkpoint and name.startswith(TRAINING_PREFIXES))}


def checkpoint_path(path):
    """`path` itself, or for a run folder its best checkpoint."""
    path = Path(path)
    return find_checkpoint(path) if path.is_dir() else path


def find_checkpoint(run_dir, name="best"):
    """The `name` checkpoint of a run folder, in whichever format it was written (the newer
    one where a folder holds both, as one reused with another --format by minivit before
    --overwrite could)."""
    existing = [path for path in (Path(run_dir) / f"{name}{suffix}"
                                  for suffix in CHECKPOINT_SUFFIXES) if path.exists()]
    if existing:
        return max(existing, key=lambda path: path.stat().st_mtime_ns)
    method = _pretrain_method(run_dir)
    if method:  # only `last`: an encoder without a classifier
        raise WeightsError(
            f"{run_dir} is a minivit pretrain run ({method}): an encoder without a "
            f"classifier, and no {name} checkpoint. Fine-tune it with `minivit train --init "
            f"{run_dir}` and use that run, or measure its features with `minivit probe "
            f"{run_dir}`")
    raise WeightsError(f"no {name}.safetensors or {name}.npz in {run_dir}: is it a minivit run "
                       f"folder (made by minivit train --out)?")


def _pretrain_method(run_dir):
    """The method ('mae', 'dino') in a run folder's config.json, or None (no such run)."""
    try:
        method = json.loads((Path(run_dir) / "config.json").read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        return None
    return method if isinstance(method, str) else None
