"""Pretrained weights: timm/PyTorch checkpoints into a minivit VisionTransformer, and back.

``load_pretrained(model, "vit_base_patch16_224.safetensors")`` reads a timm (or minivit)
state dict from .safetensors, .npz or .pth/.bin, strips wrapper prefixes (``module.``,
``model.``) and copies it into ``model`` by timm's parameter names. Two differences are
bridged, each with a one-line notice:

- another patch grid (image size): ``pos_embed`` is resampled bicubically, exactly as timm's
  ``resample_abs_pos_embed`` (torch's ``interpolate(mode="bicubic", align_corners=False)``),
  and relative position bias tables are resized (below);
- another number of classes (or no head in the file): the model keeps its freshly initialised
  head -- fine-tune it before trusting its outputs.

Names are mapped where the families differ: layer scale as ``blocks.N.gamma_1``/``gamma_2``
(older DeiT-III checkpoints, BEiT) or ``blocks.N.ls1.gamma``/``ls2.gamma`` (timm), whichever
the model has; fixed buffers (BEiT's ``relative_position_index``) are dropped, as they are
rebuilt. Every other difference (missing, unexpected or mis-shaped keys, options minivit
lacks) is one :class:`~minivit.errors.WeightsError` that lists them all.

A relative position bias table learned for another window (BEiT's or a ``rel_pos_bias`` ViT's
patch grid, a Swin stage's window) is resized to the model's exactly as timm's
``resize_rel_pos_bias_table`` when timm loads such a checkpoint (BEiT's class-token rows kept),
with a notice; one of another number of heads (or of a non-square window, which its size does
not tell) is refused with its own message.

``save_torch_weights`` writes a plain PyTorch state dict (``.pth``), which needs torch.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from minivit import io
from minivit.checkpoint import METADATA_KEY, TRAINING_PREFIXES
from minivit.errors import WeightsError
from minivit.functional.position import relative_table_entries
from minivit.models.pos_embed import (relative_table_window, resample_abs_pos_embed,
                                      resize_rel_pos_bias_table)
from minivit.models.timm_keys import check_state_dict
from minivit.tensor import Tensor

__all__ = ["PretrainedWarning", "load_pretrained", "read_state_dict", "save_torch_weights",
           "checkpoint_num_classes"]

_TORCH_HINT = "pip install 'minivit[parity]' (or torch)"


class PretrainedWarning(UserWarning):
    """A checkpoint was adapted to the model (pos_embed resampled, head kept fresh)."""


def _warn(message: str) -> None:
    warnings.warn(message, PretrainedWarning, stacklevel=3)


def read_state_dict(path_or_state) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """(state, metadata, source) from a weights file or an in-memory state dict.

    Values may be NumPy/CuPy arrays, minivit or torch tensors. Wrapper prefixes are stripped,
    and the optimizer buffers and averaged weights of a minivit training checkpoint are dropped.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        state, metadata = io.load_weights(path_or_state)
        source = str(path_or_state)
    elif isinstance(path_or_state, Mapping):
        state = {str(k): _to_numpy(k, v) for k, v in path_or_state.items()}
        metadata, source = {}, "state dict"
    else:
        raise WeightsError(f"expected a weights file path or a state dict (name -> array), "
                           f"got a {type(path_or_state).__name__}")
    if METADATA_KEY in metadata:
        state = {k: v for k, v in state.items() if not k.startswith(TRAINING_PREFIXES)}
    return io.strip_prefixes(state), metadata, source


def _to_numpy(name, value) -> np.ndarray:
    if isinstance(value, Tensor):  # minivit's own (it has .detach too, but no .cpu)
        return value.numpy()
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        return np.asarray(value.numpy())
    if not isinstance(value, np.ndarray) and hasattr(value, "get"):  # CuPy
        value = value.get()
    try:
        return np.asarray(value)
    except Exception as err:
        raise WeightsError(f"state dict entry {name!r} is not an array ({err})") from None


def checkpoint_num_classes(state: Mapping[str, np.ndarray]) -> int | None:
    """The number of classes of a state dict's head (``head.`` as ViT, ``head.fc.`` as timm's
    Swin), 0 without a head, None if unclear."""
    head = "head.fc." if any(k.startswith("head.fc.") for k in state) else "head."
    weight = state.get(head + "weight")
    if weight is None:
        return 0 if head + "bias" not in state else None
    return int(np.shape(weight)[0]) if np.ndim(weight) == 2 else None


def load_pretrained(model, path_or_state, strict: bool = True,
                    notify: Callable[[str], object] | None = None, *,
                    metadata: Mapping[str, str] | None = None, source: str | None = None
                    ) -> list[str]:
    """Load timm/PyTorch/minivit weights into ``model`` (a VisionTransformer), in place.

    path_or_state: a .safetensors, .npz, .pth/.pt/.bin file, or a state dict.
    strict: True (default) raises one WeightsError listing every missing, unexpected and
        mis-shaped key; False loads what fits and lists what was skipped in the notes.
    notify: called with each notice (pos_embed resampled, head kept fresh, keys skipped);
        default: ``warnings.warn(..., PretrainedWarning)``.
    metadata, source: for a state dict already read (see :func:`read_state_dict`), its file's
        metadata (a minivit checkpoint's grid of a non-square pos_embed) and name for messages.

    Returns the notices (a list of one-line strings, empty when the weights fit as they are).
    """
    notify = _warn if notify is None else notify
    state, file_metadata, file_source = read_state_dict(path_or_state)
    metadata = file_metadata if metadata is None else metadata
    source = file_source if source is None else source
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    notes = []
    if hasattr(model, "adapt_state_dict"):  # another key layout of the same architecture
        state, notes = model.adapt_state_dict(state)
    if not any(k in state for k in expected):
        check_state_dict(expected, state, source=source)  # "does not look like a timm ViT"
    state = _model_names(state, expected)
    notes += _resize_relative_tables(model, state, expected, source, strict)

    # another patch grid: resample the checkpoint's pos_embed to the model's
    pos = state.get("pos_embed")
    want = expected.get("pos_embed")
    prefix = getattr(model, "pos_prefix_tokens", 1)
    if pos is not None and want is not None and pos.ndim == 3 and pos.shape[0] == 1 \
            and pos.shape[2] == want[2] and pos.shape[1] != want[1]:
        old_grid = _checkpoint_grid(pos.shape[1] - prefix, metadata)
        if old_grid is not None:
            new_grid = tuple(model.patch_embed.grid_size)
            state["pos_embed"] = resample_abs_pos_embed(pos, new_grid, old_grid, prefix)
            notes.append(f"resampled pos_embed from a {old_grid[0]}x{old_grid[1]} to a "
                         f"{new_grid[0]}x{new_grid[1]} patch grid (bicubic) for image size "
                         f"{_size_text(model.patch_embed.img_size)}")

    # another number of classes (or no head in the file): keep the model's fresh head
    head = getattr(model, "HEAD", "head.")  # the classifier's key prefix
    model_classes = expected[head + "weight"][0] if head + "weight" in expected else 0
    ckpt_classes = checkpoint_num_classes(state)
    ckpt_head = state.get(head + "weight")
    features = getattr(model, "num_features", None) or model.config["embed_dim"]
    same_dim = ckpt_head is None or np.shape(ckpt_head)[1:] == (features,)
    fresh_head = ckpt_classes is not None and ckpt_classes != model_classes and same_dim
    if fresh_head:
        heads = (head, "head_dist.")  # a DeiT's distillation head alike
        state = {k: v for k, v in state.items() if not k.startswith(heads)}
        expected = {k: v for k, v in expected.items() if not k.startswith(heads)}
        if model_classes:
            what = f"has {ckpt_classes} classes" if ckpt_classes else "has no head"
            notes.append(f"{source} {what}, the model {model_classes}: keeping the model's "
                         "freshly initialised head (train it before trusting its outputs)")
        else:
            notes.append(f"{source}'s head ({ckpt_classes} classes) is not used: the model has "
                         "no head (num_classes=0)")

    if strict:
        check_state_dict(expected, state, source=source)
    else:
        skipped = [k for k in state
                   if k not in expected or tuple(np.shape(state[k])) != expected[k]]
        absent = [k for k in expected if k not in state]
        state = {k: v for k, v in state.items() if k not in skipped}
        for what, keys in (("skipped {} key(s) that do not fit the model", skipped),
                           ("{} parameter(s) missing from the weights keep their initial "
                            "values", absent)):
            if keys:
                more = ", ..." if len(keys) > 8 else ""
                notes.append(what.format(len(keys)) + ": " + ", ".join(keys[:8]) + more)
    model.load_state_dict(state, strict=False)
    for note in notes:
        notify(note)
    return notes


# layer scale's two spellings: timm's VisionTransformer (ls1.gamma) and BEiT / old DeiT-III (gamma_1)
_LAYER_SCALE = re.compile(r"(blocks\.\d+\.)(?:ls([12])\.gamma|gamma_([12]))$")
# fixed buffers some checkpoints carry: rebuilt by the model, never loaded
_FIXED_BUFFERS = re.compile(r"blocks\.\d+\.attn\.(relative_position_index|k_bias)$")


def _model_names(state, expected):
    """The state dict with layer-scale keys spelt as the model spells them, fixed buffers
    dropped."""
    renamed = {}
    for key, value in state.items():
        if _FIXED_BUFFERS.match(key):
            continue
        match = _LAYER_SCALE.match(key)
        if match and key not in expected:
            which = match.group(2) or match.group(3)
            for name in (f"{match.group(1)}ls{which}.gamma", f"{match.group(1)}gamma_{which}"):
                if name in expected:
                    key = name
        renamed[key] = value
    return renamed


def _resize_relative_tables(model, state, expected, source, strict):
    """Resize, in ``state``, the relative position bias tables learned for another window (a
    ViT's or BEiT's patch grid, a Swin stage's window) to the model's, as timm's checkpoint
    filters do; return the notices. A table that cannot be resized (another number of heads,
    a non-square window its size does not tell) is refused in words (strict), or left for the
    caller to skip."""
    resized = {}  # (old window, new window) -> the tables resized so
    for name, module in model.named_modules():
        key = f"{name}.relative_position_bias_table"  # the model itself has none
        if key not in state or key not in expected or np.shape(state[key]) == expected[key]:
            continue
        table, (rows, heads) = state[key], expected[key]
        extra = rows - relative_table_entries(module.window)  # BEiT's class-token rows
        old = relative_table_window(np.shape(table)[0], extra) if np.ndim(table) == 2 else None
        if np.ndim(table) != 2 or np.shape(table)[1] != heads or old is None:
            if strict:
                raise WeightsError(f"{source}: {key} has shape {tuple(np.shape(table))}, the "
                                   f"model's {(rows, heads)}: " + _unresizable(np.shape(table),
                                                                               heads, extra))
            continue
        state[key] = resize_rel_pos_bias_table(table, module.window, extra, old)
        resized.setdefault((old, module.window), []).append(key)
    return [f"resampled relative_position_bias_table of {len(keys)} block(s) from a "
            f"{old[0]}x{old[1]} to a {new[0]}x{new[1]} window (timm's interpolation)"
            for (old, new), keys in resized.items()]


def _unresizable(shape, heads, extra):
    """Why a relative position bias table of ``shape`` cannot be resized for the model."""
    if len(shape) != 2 or shape[1] != heads:
        got = f"{shape[1]} heads" if len(shape) == 2 else f"{len(shape)} dimensions"
        return (f"a table of {got} cannot serve the model's {heads} heads; build the model "
                f"with the checkpoint's num_heads")
    return (f"a table of {shape[0]} rows is not (2w-1)^2{f' + {extra}' if extra else ''} "
            f"offsets of a square window, so its window is unknown; build the model at the "
            f"checkpoint's image size (or window size)")


def _checkpoint_grid(num_patches: int, metadata: Mapping[str, str]) -> tuple[int, int] | None:
    """The checkpoint's patch grid: square if the count is a square, else from minivit's
    metadata (model_config), else unknown."""
    side = int(np.sqrt(num_patches)) if num_patches > 0 else 0
    for s in (side - 1, side, side + 1):
        if s > 0 and s * s == num_patches:
            return (s, s)
    if METADATA_KEY in metadata:
        try:
            config = json.loads(metadata[METADATA_KEY])["model_config"]
            size, patch = config["img_size"], config["patch_size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            grid = (size[0] // patch, size[1] // patch)
        except (ValueError, KeyError, TypeError):
            return None
        if grid[0] * grid[1] == num_patches:
            return grid
    return None


def _size_text(size) -> str:
    size = tuple(size)
    return f"{size[0]}" if size[0] == size[1] else f"{size[0]}x{size[1]}"


def save_torch_weights(state: Mapping[str, object], path) -> None:
    """Write ``state`` as a plain PyTorch state dict (``torch.save``) atomically; needs torch.

    The file loads with ``torch.load(path, weights_only=True)`` and
    ``model.load_state_dict(...)`` in timm. Metadata has no place in it.
    """
    path = Path(path)
    try:
        import torch
    except ImportError:
        raise WeightsError(f"cannot write {path}: writing .pth needs PyTorch: {_TORCH_HINT}; "
                           "or write .safetensors, which timm and PyTorch read too") from None
    tensors = {}
    for name, value in state.items():
        array = np.ascontiguousarray(_to_numpy(name, value))
        if array.dtype.kind not in "biuf":
            raise WeightsError(f"cannot write {path}: entry {name!r} has dtype {array.dtype}")
        tensors[str(name)] = torch.from_numpy(array.copy())

    def write(tmp):
        try:
            torch.save(tensors, tmp)
        except RuntimeError as err:  # how torch.save reports a failed write (a full disk)
            raise OSError(str(err)) from None

    try:
        io.atomic_write(path, write)
    except OSError as err:
        raise WeightsError(f"cannot write {path}: {err.strerror or err}; check that its folder "
                           "exists, is writable and has room") from None
