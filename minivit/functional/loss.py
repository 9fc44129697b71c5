"""cross_entropy: log-softmax and negative log-likelihood fused into one Function; its GPU
implementation is minivit.cuda.loss."""

import numpy as np

from minivit import backend, cuda
from minivit.cuda import loss as cuda_loss
from minivit.errors import DTypeError, ShapeError
from minivit.functional.activation import log_softmax_array
from minivit.functional.registry import DispatchedFunction, implementation


def _check_target(target, logits):
    """Raise unless `target` is integer labels (B,) in [0, K) or float soft targets (B, K)."""
    batch, classes = logits.shape
    if target.dtype.kind in "iu":
        if target.shape != (batch,):
            raise ShapeError(f"cross_entropy: integer labels must have shape ({batch},) for "
                             f"logits {logits.shape}; got {target.shape}")
        cuda.host_check(target, lambda: _check_label_range(target, classes))
    elif target.dtype.kind == "f":
        if target.shape != logits.shape:
            raise ShapeError(f"cross_entropy: soft targets must have the logits' shape "
                             f"{logits.shape}; got {target.shape}")
    else:
        raise DTypeError(f"cross_entropy: target must be integer labels or float soft targets; "
                         f"got dtype {target.dtype}")


def _check_label_range(target, classes):
    """(reads the labels on the host: skipped while a CUDA graph records, see cuda.host_check)"""
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= classes:
        raise ValueError(f"cross_entropy: labels must lie in [0, {classes - 1}] for "
                         f"{classes} classes; got values from {low} to {high}")


def _target_distribution(target, logits, label_smoothing):
    """q (B, K): one-hot integer labels or soft targets, smoothed as (1 − ε) q + ε/K."""
    xp = backend.array_module(logits)
    batch, classes = logits.shape
    if target.dtype.kind in "iu":
        q = xp.zeros_like(logits)
        q[xp.arange(batch), target] = 1.0
    else:
        q = target.astype(logits.dtype, copy=False)
    if label_smoothing:
        q = q * (1.0 - label_smoothing) + label_smoothing / classes
    return q


# -- cross_entropy: L = −(1/B) Σ_b Σ_k q_bk log p_bk, p = softmax(x)
#    dx = (p Σ_k q − q)/B;  dq = −log p / B  (for soft targets that need a gradient)
class CrossEntropy(DispatchedFunction):
    def forward(self, logits, target, label_smoothing=0.0):
        if logits.ndim != 2:
            raise ShapeError(f"cross_entropy: logits must be (batch, classes); got {logits.shape}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1); "
                             f"got {label_smoothing}")
        _check_target(target, logits)
        return self.dispatch("cross_entropy", (logits,), logits, target, label_smoothing)


@implementation("cross_entropy", "cuda")
class _FusedCrossEntropy:
    """One CUDA block per row (log-sum-exp and the row's loss); backward one elementwise
    kernel per gradient. saved (minivit.cuda.loss.cross_entropy_forward's): (x, labels or
    None, soft targets or None, row max, row log Σ e^(x − max), row Σq or None, ε)."""

    def forward(logits, target, label_smoothing):
        return cuda_loss.cross_entropy_forward(logits, target, label_smoothing)

    def backward(saved, grad, needs):
        return cuda_loss.cross_entropy_backward(grad, saved, needs[1])


@implementation("cross_entropy", "plain")
class _PlainCrossEntropy:
    """saved: (log p, q, ε)."""

    def forward(logits, target, label_smoothing):
        log_probs = log_softmax_array(logits)
        q = _target_distribution(target, logits, label_smoothing)
        return -(q * log_probs).sum() / logits.shape[0], (log_probs, q, label_smoothing)

    def backward(saved, grad, needs):
        log_probs, q, smoothing = saved
        xp = backend.array_module(grad)
        scale = grad / log_probs.shape[0]
        grad_logits = (xp.exp(log_probs) * q.sum(axis=1, keepdims=True) - q) * scale
        grad_target = -log_probs * (scale * (1.0 - smoothing)) if needs[1] else None
        return grad_logits, grad_target


def cross_entropy(logits, target, label_smoothing=0.0):
    """Mean cross-entropy over the batch. target: integer labels (B,) or soft targets (B, K);
    label_smoothing ε mixes the target with the uniform distribution, as in PyTorch. A list
    of whole numbers is labels, as an integer array is."""
    if isinstance(target, (list, tuple)):
        target = np.asarray(target)  # [0, 4, 2] stays integer (a bare list would become floats)
        if backend.backend_of(getattr(logits, "data", logits)) == "cupy":
            target = backend.to_backend(target, "cupy")
    return CrossEntropy()(logits, target, label_smoothing=label_smoothing)
