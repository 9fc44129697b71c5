"""Compiled GELU (exact and tanh) and softmax kernels; the chunked NumPy twins are in
minivit.cpu.activation."""

import math

from minivit.cpu.compiled.common import exp, half_erfc_over_sqrt2, kernel, like
from minivit.mathconst import LOG_INV_SQRT_2PI, SQRT_2_OVER_PI, TANH_COEFF


# -- gelu, exact: y = x Φ(x);  dy/dx = Φ(x) + x φ(x).  With a = |x| and e = ½erfc(a/√2) = Φ(−a):
#    y = max(x, 0) − a·e (no cancellation in either tail), Φ(x) = e for x < 0 and 1 − e else.
#    (As in PyTorch, dy/dx at ±inf is NaN: inf·φ(inf) = inf·0.)
@kernel
def gelu_exact(x, y, derivative):
    """y[i] = gelu(x[i]) and, unless derivative is None, derivative[i] = gelu'(x[i]); 1-D."""
    for i in range(x.size):
        v = x[i]
        a = min(abs(v), like(v, 1e30))  # gelu(±inf) = inf, 0 rather than inf − inf·0 = NaN
        e = half_erfc_over_sqrt2(a)
        y[i] = max(v, like(v, 0.0)) - a * e
        if derivative is not None:
            cdf = like(v, 1.0) - e if v >= like(v, 0.0) else e
            pdf = exp(like(v, LOG_INV_SQRT_2PI) - like(v, 0.5) * v * v)
            derivative[i] = cdf + v * pdf


# -- gelu, tanh: y = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³);
#    dy/dx = ½(1 + tanh u) + ½x(1 − tanh²u) √(2/π)(1 + 3·0.044715x²)
@kernel
def gelu_tanh(x, y, derivative):
    for i in range(x.size):
        v = x[i]
        th = math.tanh(like(v, SQRT_2_OVER_PI) * (v + like(v, TANH_COEFF) * v * v * v))
        y[i] = like(v, 0.5) * v * (like(v, 1.0) + th)
        if derivative is not None:
            one = like(v, 1.0)
            du = like(v, SQRT_2_OVER_PI) * (one + like(v, 3 * TANH_COEFF) * v * v)
            derivative[i] = like(v, 0.5) * ((one + th) + v * (one - th * th) * du)


# -- softmax over rows: p = e^(s·x) / Σ e^(s·x) (s > 0);  dx = s·p ⊙ (dp − Σ dp ⊙ p)
@kernel
def softmax_forward(x, out, scale):
    """out = softmax(scale · x) over the rows of 2-D x. out must not overlap x: for arrays
    that may overlap, LLVM's run-time check sends the loops to their scalar versions (an
    in-place call ran 2.7x slower)."""
    rows, features = x.shape
    for i in range(rows):
        top = x[i, 0]
        for j in range(1, features):
            top = max(top, x[i, j])
        for j in range(features):
            out[i, j] = exp((x[i, j] - top) * scale)
        total = like(top, 0.0)
        for j in range(features):  # a separate loop: fused with the exps it ran 1.5x slower
            total += out[i, j]
        inverse = like(top, 1.0) / total
        for j in range(features):
            out[i, j] = out[i, j] * inverse


@kernel
def softmax_backward(probs, grad, out, scale):
    """out = scale · p ⊙ (dp − Σ dp ⊙ p) over rows (out must not overlap grad, as above)."""
    rows, features = probs.shape
    for i in range(rows):
        dot = like(grad[i, 0], 0.0)
        for j in range(features):
            dot += grad[i, j] * probs[i, j]
        for j in range(features):
            out[i, j] = scale * probs[i, j] * (grad[i, j] - dot)
