"""timm's ViT state-dict names: check a state dict against a model, naming what does not fit.

``check_state_dict`` reports every missing, unexpected and mis-shaped key at once; keys that
timm writes for options minivit does not implement say which option, and the hints say what
to do when only the image size or the number of classes differs.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from minivit.errors import WeightsError
from minivit.nn.module import state_dict_mismatch

__all__ = ["UNSUPPORTED_TIMM_KEYS", "check_state_dict"]

# Keys a timm VisionTransformer state dict may carry for options minivit does not implement.
# Such a checkpoint needs that module to give the right logits, so it is refused, with the
# reason. Stateless modules (pos_drop, patch_drop, head_drop, norm_pre / fc_norm / ls1 / ls2 /
# q_norm / k_norm when they are Identity) leave no keys and need nothing. minivit supports:
# patch_embed.proj, cls_token, pos_embed, blocks.{i}.{norm1, attn.qkv, attn.proj, norm2,
# mlp.fc1, mlp.fc2}, norm, head.
UNSUPPORTED_TIMM_KEYS = (
    (r"fc_norm\.", "global-average-pool head (global_pool='avg', fc_norm)"),
    (r"reg_token$", "register tokens (reg_tokens > 0)"),
    (r"dist_token$|head_dist\.", "distillation token (DeiT distilled)"),
    (r"patch_embed\.norm\.", "LayerNorm after the patch embedding"),
    (r"norm_pre\.", "LayerNorm before the blocks (pre_norm=True, CLIP)"),
    (r"blocks\.\d+\.ls[12]\.", "LayerScale (init_values, DeiT III)"),
    (r"blocks\.\d+\.attn\.[qk]_norm\.", "query/key normalisation (qk_norm=True)"),
    (r"blocks\.\d+\.(attn|mlp)\.norm\.", "norm inside attention/MLP (scale_attn/mlp_norm)"),
    (r"attn_pool\.", "attention-pool head (global_pool='map')"),
    (r"pre_logits\.", "pre-logits layer (representation_size)"),
)


def _unsupported_reason(key: str) -> str | None:
    return next((why for pattern, why in UNSUPPORTED_TIMM_KEYS if re.match(pattern, key)), None)


def check_state_dict(
    expected: Mapping[str, tuple], state: Mapping[str, np.ndarray], *, source: str = "checkpoint"
) -> None:
    """Check ``state``'s names and shapes against ``expected`` (name -> shape).

    Raises one :class:`~minivit.errors.WeightsError` listing every missing, unexpected and
    mis-shaped key (unexpected keys of timm options minivit lacks say which option), or, when
    no expected key is present at all, saying that ``state`` does not look like a timm ViT.
    """
    if not any(k in state for k in expected):
        raise WeightsError(
            f"{source} does not look like a timm ViT state dict: expected keys like "
            f"{', '.join(list(expected)[:5])}, ...; found keys like "
            f"{', '.join(list(state)[:5]) or '(none)'} ({len(state)} in all). "
            "Check that the file holds ViT weights; wrapper prefixes such as 'module.' or "
            "'model.' can be removed with minivit.io.strip_prefixes"
        )
    missing, unexpected, misshaped = state_dict_mismatch(expected, state)
    if not (missing or unexpected or misshaped):
        return
    lines = [
        f"{source} does not fit the model: {len(missing)} missing, {len(unexpected)} "
        f"unexpected, {len(misshaped)} mis-shaped key(s)"
    ]
    lines += _first(f"  missing: {k}" for k in missing)
    lines += _first(f"  unexpected: {k}" + (f" ({reason}: not supported)" if reason else "")
                    for k, reason in ((k, _unsupported_reason(k)) for k in unexpected))
    lines += _first(f"  mis-shaped: {k}: expected {want}, got {got}" for k, want, got in misshaped)
    names = {k for k, _, _ in misshaped}
    # the hints fit when only the image size or the classes differ, not another architecture
    hinted = names <= {"pos_embed", "head.weight", "head.bias"}
    if hinted and "pos_embed" in names:
        lines.append(
            "  hint: another image size changes pos_embed; resample it with "
            "minivit.models.resample_abs_pos_embed"
        )
    if hinted and names & {"head.weight", "head.bias"}:
        lines.append("  hint: another num_classes changes head.*; drop them to train a new head")
    lines.append(
        "Build the model with the checkpoint's configuration (patch size, embed_dim, depth, "
        "num_heads, num_classes, image size)."
    )
    raise WeightsError("\n".join(lines))


def _first(lines, limit=12):
    """At most `limit` of `lines`, then how many more there were."""
    lines = list(lines)
    if len(lines) <= limit:
        return lines
    return lines[:limit] + [f"  ... and {len(lines) - limit} more like these"]
