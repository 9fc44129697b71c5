"""Helpers shared by tests against the real timm (import after pytest.importorskip("timm")):
a timm model with random float64 weights, and the relative error the parity tests assert."""

import numpy as np
import timm
import torch


def relative_error(ours, ref):
    """max |ours − ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-300))


def random_timm(name, seed, **kwargs):
    """timm's model in float64, eval mode, every parameter redrawn (LayerNorm weights near 1,
    matrices N(0, 1/fan_in), vectors and bias tables O(0.1-1)), so none is trivially 0 or 1."""
    torch.manual_seed(seed)
    reference = timm.create_model(name, pretrained=False, drop_path_rate=0.0, **kwargs)
    reference = reference.double().eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for key, parameter in reference.named_parameters():
            shape = tuple(parameter.shape)
            if "norm" in key and key.endswith("weight"):
                values = 1.0 + 0.2 * rng.standard_normal(shape)
            elif key.endswith("relative_position_bias_table"):
                values = rng.standard_normal(shape)
            elif len(shape) >= 2:
                values = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
            else:
                values = 0.1 * rng.standard_normal(shape)
            parameter.copy_(torch.from_numpy(values))
    return reference
