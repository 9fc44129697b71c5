"""The AdamW update over the optimizer's flat buffers: its math, the plain code and its fast
implementations (CPU: minivit.cpu.optimizer; GPU: minivit.cuda.optimizer). Not a Function (no
gradient flows through an update), but dispatched by the same registry.

The per-step numbers come as ADAMW_SCALARS (adamw_scalars): Python numbers, or on the GPU
while a CUDA graph records, a device array of them (minivit.cuda.per_step) that only the fused
kernel reads.
"""

import math

from minivit import backend
from minivit.cpu import optimizer as cpu_optimizer
from minivit.cuda import optimizer as cuda_optimizer
from minivit.functional.registry import choose, implementation

ADAMW_SCALARS = cuda_optimizer.ADAMW_SCALARS


# -- AdamW (Loshchilov & Hutter): m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
#    θ ← θ − lr·λ·mask·θ − lr·m̂/(√v̂ + ε),  m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)
#    as computed: θ ← θ − decay·mask·θ − step_size·m/(√v·inv_sqrt_bias2 + ε) with the scalars
def adamw_scalars(lr, betas, eps, weight_decay, step):
    """The ADAMW_SCALARS for the 1-based step count `step`: (β₁, 1 − β₁, β₂, 1 − β₂, lr·λ,
    lr/(1 − β₁ᵗ), 1/√(1 − β₂ᵗ), ε)."""
    beta1, beta2 = betas
    return (beta1, 1.0 - beta1, beta2, 1.0 - beta2, lr * weight_decay,
            lr / (1.0 - beta1 ** step), 1.0 / math.sqrt(1.0 - beta2 ** step), eps)


def adamw_update(params, grads, m, v, decay_mask, scalars, scratch):
    """One AdamW step in place over the flat params, m and v. `scratch()`: a buffer of the
    params' size for the plain code (asked for only there, so only there is it made)."""
    choose("adamw", params, grads, m, v, decay_mask).forward(params, grads, m, v, decay_mask,
                                                             scalars, scratch)


@implementation("adamw", "cuda")
class _FusedAdamW:  # the whole update in one kernel
    def forward(params, grads, m, v, decay_mask, scalars, scratch):
        cuda_optimizer.adamw_update(params, grads, m, v, decay_mask, scalars)
        return None, None


def _adamw_steps(xp, params, grads, m, v, decay_mask, scalars, scratch):
    """The update as whole-array operations of module `xp`, with one scratch array."""
    beta1, rest1, beta2, rest2, decay, step_size, inv_sqrt_bias2, eps = scalars
    m *= beta1
    xp.multiply(grads, rest1, out=scratch)
    m += scratch
    v *= beta2
    xp.multiply(grads, grads, out=scratch)
    scratch *= rest2
    v += scratch
    if decay:  # (not p − 0·p: an inf parameter would become NaN)
        xp.multiply(params, decay_mask, out=scratch)
        scratch *= decay
        params -= scratch
    xp.sqrt(v, out=scratch)
    scratch *= inv_sqrt_bias2
    scratch += eps
    xp.divide(m, scratch, out=scratch)
    scratch *= step_size
    params -= scratch


@implementation("adamw", "cpu")
class _ChunkedAdamW:  # the same steps in cache-sized chunks, threaded (or numba's kernel)
    def forward(params, grads, m, v, decay_mask, scalars, scratch):
        cpu_optimizer.adamw_update(params, grads, m, v, decay_mask, scalars, _adamw_steps)
        return None, None


@implementation("adamw", "plain")
class _PlainAdamW:
    def forward(params, grads, m, v, decay_mask, scalars, scratch):
        _adamw_steps(backend.array_module(params), params, grads, m, v, decay_mask, scalars,
                     scratch())
        return None, None
