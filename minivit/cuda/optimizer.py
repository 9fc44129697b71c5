"""The AdamW update on the GPU: one elementwise kernel over the flat parameter buffer (param, m,
v in place). Its scalars come as kernel arguments, or from a device array that a replayed CUDA
graph reads (see minivit.cuda.capture.per_step)."""

import numpy as np

from minivit.cuda import capture
from minivit.cuda.device import cupy, elementwise, elementwise_kernel

# AdamW (minivit.functional.optimizer_update): m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
#   θ ← θ − lr·λ·mask·θ − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)
ADAMW_SCALARS = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "decay", "step_size",
                 "inv_sqrt_bias2", "eps")
_ADAMW_MATH = ("const T mi = beta1 * m + one_minus_beta1 * grad;\n"
               "const T vi = beta2 * v + (grad * grad) * one_minus_beta2;\n"
               "m = mi;\n"
               "v = vi;\n"
               "const T p = param - (param * mask) * decay;\n"
               "param = p - (mi / (mv_sqrt(vi) * inv_sqrt_bias2 + eps)) * step_size;")

elementwise_kernel("adamw", "T grad, T mask, " + ", ".join(f"T {name}" for name in ADAMW_SCALARS),
                   "T param, T m, T v", _ADAMW_MATH)
elementwise_kernel("adamw_device_scalars", "T grad, T mask, raw T scalars", "T param, T m, T v",
                   "".join(f"const T {name} = scalars[{index}];\n"
                           for index, name in enumerate(ADAMW_SCALARS)) + _ADAMW_MATH)


def adamw_update(params, grads, m, v, decay_mask, scalars):
    """One AdamW step over flat buffers in one kernel; params, m and v are updated in place.
    `scalars`: the ADAMW_SCALARS as numbers, or a device array of them (read by the kernel
    when it runs: what a replayed CUDA graph needs, see CapturedStep)."""
    if isinstance(scalars, tuple):
        dtype_scalar = params.dtype.type
        elementwise("adamw")(grads, decay_mask, *(dtype_scalar(s) for s in scalars), params,
                             m, v)
    else:
        elementwise("adamw_device_scalars")(grads, decay_mask, scalars, params, m, v)


@capture.before_capture
def _prepare():
    """Compile and load the device-scalar kernel, which only a capture runs (on throwaway
    one-element buffers)."""
    cp = cupy()
    for dtype in (np.float32, np.float64):
        params, grads, m, v, mask = (cp.zeros(1, dtype) for _ in range(5))
        adamw_update(params, grads, m, v, mask, cp.ones(len(ADAMW_SCALARS), dtype))
