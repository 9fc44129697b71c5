"""The compiled AdamW kernel; the chunked NumPy twin is in minivit.cpu.optimizer."""

import math

from minivit.cpu.compiled.common import kernel


# -- AdamW on flat chunks: m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
#    θ ← θ − lr·λ·mask·θ − step_size·m/(√v·inv_bias2 + ε),  step_size = lr/(1−β₁ᵗ)
@kernel
def adamw_update(params, grads, m, v, decay_mask, beta1, rest1, beta2, rest2, eps, decay,
                 step_size, inv_bias2):
    """One step over flat chunks. The scalars come in the parameters' type, with rest1 = 1 − β₁
    and rest2 = 1 − β₂ rounded from float64 (1 − float32(0.999) is off by 5e-5 relative)."""
    for i in range(params.size):
        g = grads[i]
        m_i = beta1 * m[i] + rest1 * g
        v_i = beta2 * v[i] + rest2 * g * g
        m[i] = m_i
        v[i] = v_i
        p = params[i]
        if decay != 0:  # (not p − 0·p: an inf parameter would become NaN)
            p = p - decay * decay_mask[i] * p
        params[i] = p - step_size * m_i / (math.sqrt(v_i) * inv_bias2 + eps)
