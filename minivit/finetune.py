"""Fine-tuning: start a run from timm or minivit weights, freeze all but the head, and
layer-wise learning-rate decay.

- `load_pretrained_weights(model, path)` copies the weights in by timm's names
  (minivit.pretrained): a new head where the class count differs, pos_embed resampled to the
  model's image size; any other difference (another architecture) is one error naming the keys.
  It returns the provenance the run records (file, SHA-256, what was adapted).
- `freeze_all_but_head(model)`: only head.* trains (a linear probe).
- Layer-wise decay (BEiT, MAE fine-tuning): the parameters of layer i of L + 1 (0: patch and
  position embeddings and the class token; i: block i − 1; L + 1: the final norm and the head)
  train at lr · decay^(L + 1 − i), so the layers near the input, which pretraining made most
  general, move least. `LayerwiseOptimizer` steps one optimizer per rate as one.
"""

import hashlib
import math
from pathlib import Path

from minivit.checkpoint import find_checkpoint
from minivit.errors import MinivitError
from minivit.models import load_pretrained
from minivit.optim import clip_grad_norm


def load_pretrained_weights(model, path, notify=print):
    """Load `path` into `model`; {"path", "sha256", "notes"} of what was loaded."""
    path = Path(path).expanduser()
    if path.is_dir():  # a minivit run folder: its best checkpoint
        path = find_checkpoint(path)
    if not path.is_file():
        raise MinivitError(f"--pretrained {path}: no such file (expected timm or minivit "
                           f"weights: .safetensors, .npz, .pth/.bin, or a minivit run folder)")
    notes = load_pretrained(model, str(path), strict=True, notify=notify)
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path.resolve()), "sha256": digest.hexdigest(), "notes": notes}


def freeze_all_but_head(model):
    """Turn off the gradients of every parameter but head.*; the names still training."""
    if model.head is None:
        raise MinivitError("--freeze trains only the head, and the model has none "
                           "(num_classes=0)")
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("head.")
    return [name for name, p in model.named_parameters() if p.requires_grad]


def layer_index(name, depth):
    """0 for the embeddings and class token, i + 1 for blocks.i, depth + 1 for the rest."""
    if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_scales(model, decay):
    """{parameter name: learning-rate factor decay^(depth + 1 − layer)}."""
    if not 0 < decay <= 1:
        raise MinivitError(f"--layer-decay must lie in (0, 1], e.g. 0.75; got {decay}")
    if not hasattr(model, "blocks"):
        raise MinivitError(f"--layer-decay numbers the blocks of a plain ViT; "
                           f"{type(model).__name__} has stages instead: leave it out")
    depth = len(model.blocks)
    return {name: decay ** (depth + 1 - layer_index(name, depth))
            for name, _ in model.named_parameters()}


class LayerwiseOptimizer:
    """One optimizer (`make(named_parameters, lr=, weight_decay=)`) per learning-rate factor,
    stepped together: the gradient norm is clipped over all of them, and setting `lr` sets
    each group's lr to lr · its factor. State: each group's buffers under "group<i>.<name>"."""

    def __init__(self, make, named_parameters, scales, lr, weight_decay):
        groups = {}
        for name, parameter in named_parameters:
            if parameter.requires_grad:
                groups.setdefault(scales[name], []).append((name, parameter))
        if not groups:
            raise MinivitError("the optimizer got no parameters that require grad")
        self.groups = [(scale, make(pairs, lr=lr * scale, weight_decay=weight_decay))
                       for scale, pairs in sorted(groups.items())]
        self._lr = lr
        self.reduce_gradients = None  # data parallel: as FlatOptimizer's, applied to each group
        self.loss_scaler = None  # fp16 loss scaling is refused with --layer-decay (config)

    @property
    def lr(self):
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = value
        for scale, optimizer in self.groups:
            optimizer.lr = value * scale

    def zero_grad(self):
        for _, optimizer in self.groups:
            optimizer.zero_grad()

    def step(self, max_grad_norm=None):
        """One update of every group; the global gradient norm (before clipping)."""
        grads = []
        for _, optimizer in self.groups:
            grads.append(optimizer.step_grads())  # the groups' own reduce_gradients is None
            if self.reduce_gradients is not None:
                self.reduce_gradients(grads[-1])
        norm = math.sqrt(sum(float(clip_grad_norm(g)) ** 2 for g in grads))
        factor = min(1.0, max_grad_norm / (norm + 1e-6)) if max_grad_norm else 1.0
        for (_, optimizer), g in zip(self.groups, grads):
            if factor < 1.0:
                g *= factor
            optimizer.apply(g)
        return norm

    def state_dict(self):
        arrays = {}
        for index, (_, optimizer) in enumerate(self.groups):
            for name, array in optimizer.state_dict()["arrays"].items():
                arrays[f"group{index}.{name}"] = array
        return {"step_count": self.groups[0][1].step_count, "lr": self._lr, "arrays": arrays}

    def load_state_dict(self, state):
        for index, (_, optimizer) in enumerate(self.groups):
            prefix = f"group{index}."
            arrays = {k[len(prefix):]: v for k, v in state["arrays"].items()
                      if k.startswith(prefix)}
            optimizer.load_state_dict({"step_count": state["step_count"], "lr": state["lr"],
                                       "arrays": arrays})
        self.lr = float(state["lr"])


def describe_trainable(model):
    """'1,290 of 1,234,567 parameters train' for the run's log."""
    total = sum(p.size for _, p in model.named_parameters())
    trained = sum(p.size for _, p in model.named_parameters() if p.requires_grad)
    return f"{trained:,} of {total:,} parameters train"
