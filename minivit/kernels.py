"""Compiled CPU kernels (numba): each elementwise or row-wise op in one pass over memory.

NumPy runs GELU as ~30 ufunc calls, each a full pass over a 25 MB activation; PyTorch runs it
as one. These kernels do the same one pass. They are loaded by minivit.cpu only when numba
is installed (``pip install 'minivit[fast]'``) and MINIVIT_JIT is not 0; without them
minivit.cpu keeps its chunked NumPy code, and the results agree to rounding (tests compare
the two).

- Every kernel is serial and compiled with nogil=True: minivit.cpu calls it on the same
  chunks and row blocks, on the same threads, as its NumPy code, so the thread pool, the
  size thresholds and the fixed summation order (determinism) stay as they are. numba's own
  threading layer is never used.
- One kernel serves float32 and float64: ``_like(x, c)`` makes the constant c of x's type, so
  float32 stays float32 (no conversions; float64 sums halved LayerNorm's speed), and
  ``_exp``/``_half_erfc_over_sqrt2`` pick the float32 approximations or libm's exact float64 functions by
  type at compile time. Sums along a row (LayerNorm statistics, softmax denominators, their
  backward dot products) run in the input's type over vector lanes, as PyTorch's; sums down
  many rows (LayerNorm's dw, db) accumulate in float64.
- fastmath allows only FMA contraction, reassociation (vectorised sums) and signed-zero
  freedom: NaN and inf propagate exactly as in NumPy (a NaN loss still stops training).
- cache=True: compiled once per machine (a few seconds), then loaded from numba's cache.
"""

import math

import llvmlite.ir
import numba
import numpy as np
from numba.extending import intrinsic, overload

_FASTMATH = {"nsz", "contract", "reassoc"}


def _kernel(function):
    return numba.njit(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")(function)


def _is_float32(numba_type):
    return isinstance(numba_type, numba.types.Float) and numba_type.bitwidth == 32


# -- typed constants and the float32 / float64 special functions ----------------------------------
def _like(x, constant):
    """`constant` as a number of x's type (float32 math stays float32)."""


@overload(_like, inline="always")
def _like_overload(x, constant):
    if _is_float32(x):
        return lambda x, constant: np.float32(constant)
    return lambda x, constant: np.float64(constant)


# exp for x <= 0 in float32: 2ⁿ·e^r with n = round(x/ln 2), |r| <= ln2/2, e^r by its degree-6
# Taylor polynomial (truncation < 2e-7; < 2.5e-7 with float32 rounding), 2ⁿ built from its
# exponent bits. Unlike libm's expf, LLVM vectorises it. Below ln(2⁻¹²⁶) the result flushes to
# 0 (true values are subnormal or 0).
_EXP_LOWEST = -87.33  # ≈ ln(2⁻¹²⁶)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE-754 bit pattern is the int32 `bits` (a free register move)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvmlite.ir.FloatType())
    return numba.types.float32(numba.types.int32), codegen


@numba.njit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _exp_nonpositive_f32(x):
    f = np.float32
    clamped = min(max(x, f(_EXP_LOWEST)), f(0.0))  # NaN becomes a bound: the exponent stays valid
    n = np.floor(clamped * f(1.4426950408889634) + f(0.5))
    r = clamped - n * f(0.693359375) - n * f(-2.12194440e-4)  # ln 2 in two parts (Cody-Waite)
    p = f(1.0 / 720.0)
    for c in (1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * r + f(c)
    result = p * _float32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))  # 2ⁿ
    result = f(0.0) if x < f(_EXP_LOWEST) else result
    return x if x != x else result  # NaN in, NaN out


def _exp(x):
    """e^x for x <= 0 (float32: the vectorisable approximation above; float64: libm)."""


@overload(_exp, inline="always")
def _exp_overload(x):
    if _is_float32(x):
        return lambda x: _exp_nonpositive_f32(x)
    return lambda x: math.exp(x)


# ½ erfc(a/√2) for a >= 0. float64: libm. float32: Numerical Recipes' erfcc (Chebyshev fit,
# relative error < 1.2e-7): t = 1/(1 + z/2), z = a/√2, ½erfc(z) = t·exp(P(t) − z² + ln ½).
_ERFC_P = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806,
           0.09678418, 0.37409196, 1.00002368)  # highest power of t first; times t, plus P0
_ERFC_P0 = -1.26551223 + math.log(0.5)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_LOG_INV_SQRT_2PI = -0.5 * math.log(2.0 * math.pi)


@numba.njit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _half_erfc_f32(a):
    f = np.float32
    t = f(1.0) / (f(1.0) + f(0.5 * _INV_SQRT_2) * a)
    p = f(_ERFC_P[0])
    for c in _ERFC_P[1:]:
        p = p * t + f(c)
    return t * _exp_nonpositive_f32(p * t + f(_ERFC_P0) - f(0.5) * a * a)


def _half_erfc_over_sqrt2(a):
    """½ erfc(a/√2) = P(X > a) for a standard normal X, a >= 0."""


@overload(_half_erfc_over_sqrt2, inline="always")
def _half_erfc_overload(a):
    if _is_float32(a):
        return lambda a: _half_erfc_f32(a)
    return lambda a: 0.5 * math.erfc(a * _INV_SQRT_2)


# -- gelu, exact: y = x Φ(x);  dy/dx = Φ(x) + x φ(x).  With a = |x| and e = ½erfc(a/√2) = Φ(−a):
#    y = max(x, 0) − a·e (no cancellation in either tail), Φ(x) = e for x < 0 and 1 − e else.
#    (As in PyTorch, dy/dx at ±inf is NaN: inf·φ(inf) = inf·0.)
@_kernel
def gelu_exact(x, y, derivative):
    """y[i] = gelu(x[i]) and, unless derivative is None, derivative[i] = gelu'(x[i]); 1-D."""
    for i in range(x.size):
        v = x[i]
        a = min(abs(v), _like(v, 1e30))  # gelu(±inf) = inf, 0 rather than inf − inf·0 = NaN
        e = _half_erfc_over_sqrt2(a)
        y[i] = max(v, _like(v, 0.0)) - a * e
        if derivative is not None:
            cdf = _like(v, 1.0) - e if v >= _like(v, 0.0) else e
            pdf = _exp(_like(v, _LOG_INV_SQRT_2PI) - _like(v, 0.5) * v * v)
            derivative[i] = cdf + v * pdf


# -- gelu, tanh: y = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³);
#    dy/dx = ½(1 + tanh u) + ½x(1 − tanh²u) √(2/π)(1 + 3·0.044715x²)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_COEFF = 0.044715


@_kernel
def gelu_tanh(x, y, derivative):
    for i in range(x.size):
        v = x[i]
        th = math.tanh(_like(v, _SQRT_2_OVER_PI) * (v + _like(v, _TANH_COEFF) * v * v * v))
        y[i] = _like(v, 0.5) * v * (_like(v, 1.0) + th)
        if derivative is not None:
            one = _like(v, 1.0)
            du = _like(v, _SQRT_2_OVER_PI) * (one + _like(v, 3 * _TANH_COEFF) * v * v)
            derivative[i] = _like(v, 0.5) * ((one + th) + v * (one - th * th) * du)


# -- layer_norm over rows: x̂ = (x − μ)·r, r = 1/√(σ² + ε);  y = x̂ w + b
#    dx = r (dx̂ − mean(dx̂) − x̂ mean(dx̂ ⊙ x̂)),  dx̂ = dy w;  dw = Σ dy ⊙ x̂;  db = Σ dy
@_kernel
def layer_norm_forward(x, weight, bias, eps, out, normalized, rstd):
    """Rows of 2-D x: out = y, normalized = x̂, rstd[i] = r (w, b may be None)."""
    rows, features = x.shape
    for i in range(rows):
        total = _like(x[i, 0], 0.0)
        for j in range(features):
            total += x[i, j]
        mean = total / _like(total, features)
        squares = _like(x[i, 0], 0.0)
        for j in range(features):
            centered = x[i, j] - mean
            squares += centered * centered
        r = _like(mean, 1.0) / math.sqrt(squares / _like(mean, features) + _like(mean, eps))
        rstd[i] = r
        for j in range(features):
            value = (x[i, j] - mean) * r
            normalized[i, j] = value
            if weight is not None:
                value = value * weight[j]
            if bias is not None:
                value = value + bias[j]
            out[i, j] = value


@_kernel
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
        mean_grad = _like(grad[i, 0], 0.0)
        mean_dot = _like(grad[i, 0], 0.0)
        for j in range(features):
            g = grad[i, j] * weight[j] if weight is not None else grad[i, j]
            mean_grad += g
            mean_dot += g * normalized[i, j]
        mean_grad /= _like(mean_grad, features)
        mean_dot /= _like(mean_dot, features)
        r = rstd[i]
        for j in range(features):
            g = grad[i, j] * weight[j] if weight is not None else grad[i, j]
            grad_x[i, j] = r * (g - mean_grad - normalized[i, j] * mean_dot)


# -- softmax over rows: p = e^(s·x) / Σ e^(s·x) (s > 0);  dx = s·p ⊙ (dp − Σ dp ⊙ p)
@_kernel
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
            out[i, j] = _exp((x[i, j] - top) * scale)
        total = _like(top, 0.0)
        for j in range(features):  # a separate loop: fused with the exps it ran 1.5x slower
            total += out[i, j]
        inverse = _like(top, 1.0) / total
        for j in range(features):
            out[i, j] = out[i, j] * inverse


@_kernel
def softmax_backward(probs, grad, out, scale):
    """out = scale · p ⊙ (dp − Σ dp ⊙ p) over rows (out must not overlap grad, as above)."""
    rows, features = probs.shape
    for i in range(rows):
        dot = _like(grad[i, 0], 0.0)
        for j in range(features):
            dot += grad[i, j] * probs[i, j]
        for j in range(features):
            out[i, j] = scale * probs[i, j] * (grad[i, j] - dot)


# -- AdamW on flat chunks: m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
#    θ ← θ − lr·λ·mask·θ − step_size·m/(√v·inv_bias2 + ε),  step_size = lr/(1−β₁ᵗ)
@_kernel
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
