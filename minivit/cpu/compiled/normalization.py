"""Compiled LayerNorm kernels; the chunked NumPy twins are in minivit.cpu.normalization."""

import math

from minivit.cpu.compiled.common import kernel, like


# -- layer_norm over rows: x̂ = (x − μ)·r, r = 1/√(σ² + ε);  y = x̂ w + b
#    dx = r (dx̂ − mean(dx̂) − x̂ mean(dx̂ ⊙ x̂)),  dx̂ = dy w;  dw = Σ dy ⊙ x̂;  db = Σ dy
@kernel
def layer_norm_forward(x, weight, bias, eps, out, normalized, rstd):
    """Rows of 2-D x: out = y, normalized = x̂, rstd[i] = r (w, b may be None)."""
    rows, features = x.shape
    for i in range(rows):
        total = like(x[i, 0], 0.0)
        for j in range(features):
            total += x[i, j]
        mean = total / like(total, features)
        squares = like(x[i, 0], 0.0)
        for j in range(features):
            centered = x[i, j] - mean
            squares += centered * centered
        r = like(mean, 1.0) / math.sqrt(squares / like(mean, features) + like(mean, eps))
        rstd[i] = r
        for j in range(features):
            value = (x[i, j] - mean) * r
            normalized[i, j] = value
            if weight is not None:
                value = value * weight[j]
            if bias is not None:
                value = value + bias[j]
            out[i, j] = value


@kernel
def layer_norm_backward(grad, normalized, rstd, weight, grad_x, grad_w, grad_b):
    """For rows of 2-D grad: grad_x (or None); adds Σ dy ⊙ x̂ into grad_w and Σ dy into grad_b
    (float64 accumulators of this block, or None)."""
    rows, features = grad.shape
    for i in range(rows):
        if grad_w is not None:
            for j in range(features):
                grad_w[j] += grad[i, j] * normalized[i, j]
        if grad_b is not None:
            for j in range(features):
                grad_b[j] += grad[i, j]
        if grad_x is None:
            continue
        mean_grad = like(grad[i, 0], 0.0)
        mean_dot = like(grad[i, 0], 0.0)
        for j in range(features):
            g = grad[i, j] * weight[j] if weight is not None else grad[i, j]
            mean_grad += g
            mean_dot += g * normalized[i, j]
        mean_grad /= like(mean_grad, features)
        mean_dot /= like(mean_dot, features)
        r = rstd[i]
        for j in range(features):
            g = grad[i, j] * weight[j] if weight is not None else grad[i, j]
            grad_x[i, j] = r * (g - mean_grad - normalized[i, j] * mean_dot)
