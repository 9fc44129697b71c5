"""cross_entropy: log-softmax and negative log-likelihood fused into one Function."""

import numpy as np

from minivit import backend, cuda
from minivit.errors import DTypeError, ShapeError
from minivit.functional.activation import log_softmax_array
from minivit.tensor import Function


def _check_target(target, logits, check_range=True):
    """Raise unless `target` is integer labels (B,) in [0, K) or float soft targets (B, K)."""
    batch, classes = logits.shape
    if target.dtype.kind in "iu":
        if target.shape != (batch,):
            raise ShapeError(f"cross_entropy: integer labels must have shape ({batch},) for "
                             f"logits {logits.shape}; got {target.shape}")
        if not check_range:
            return
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= classes:
            raise ValueError(f"cross_entropy: labels must lie in [0, {classes - 1}] for "
                             f"{classes} classes; got values from {low} to {high}")
    elif target.dtype.kind == "f":
        if target.shape != logits.shape:
            raise ShapeError(f"cross_entropy: soft targets must have the logits' shape "
                             f"{logits.shape}; got {target.shape}")
    else:
        raise DTypeError(f"cross_entropy: target must be integer labels or float soft targets; "
                         f"got dtype {target.dtype}")


def _target_distribution(target, logits, label_smoothing):
    """q (B, K): one-hot integer labels or soft targets, smoothed as (1 − ε) q + ε/K."""
    _check_target(target, logits)
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
class CrossEntropy(Function):
    def forward(self, logits, target, label_smoothing=0.0):
        if logits.ndim != 2:
            raise ShapeError(f"cross_entropy: logits must be (batch, classes); got {logits.shape}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1); "
                             f"got {label_smoothing}")
        self.cuda_saved = None
        if cuda.handles(logits):  # one CUDA block per row: log-sum-exp and the row's loss
            # the label range is read on the host, which a CUDA graph being recorded forbids
            _check_target(target, logits, check_range=not cuda.recording(logits))
            loss, self.cuda_saved = cuda.cross_entropy_forward(logits, target, label_smoothing)
            return loss
        self.log_probs = log_softmax_array(logits)
        self.q = _target_distribution(target, logits, label_smoothing)
        self.smoothing = label_smoothing
        batch = logits.shape[0]
        return -(self.q * self.log_probs).sum() / batch

    def backward(self, grad):
        if self.cuda_saved is not None:  # one elementwise kernel per gradient
            return cuda.cross_entropy_backward(grad, self.cuda_saved, self.needs_input_grad[1])
        xp = backend.array_module(grad)
        batch = self.log_probs.shape[0]
        scale = grad / batch
        probs = xp.exp(self.log_probs)
        grad_logits = (probs * self.q.sum(axis=1, keepdims=True) - self.q) * scale
        grad_target = None
        if self.needs_input_grad[1]:
            grad_target = -self.log_probs * (scale * (1.0 - self.smoothing))
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
