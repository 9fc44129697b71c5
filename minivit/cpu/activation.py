"""GELU and softmax on minivit's threads: chunked NumPy with out= buffers, or the numba
kernels of minivit.cpu.compiled on the same chunks when they are on.

The elementwise and row-wise work costs as much as the GEMMs. It runs in cache-sized chunks
with `out=` buffers (no 25 MB temporaries) and row statistics as GEMVs (a keepdims reduction
over 64-element rows costs NumPy 3x more). float32 GELU takes Φ from ½·erfc in Numerical
Recipes' erfcc form (minivit.mathconst; relative error < 1.2e-7) instead of scipy's
double-precision erf: y = max(x, 0) − |x|·½erfc(|x|/√2) has no cancellation in either tail
(GELU relative error < 1.1e-6 for x > −3, < 4.5e-6 down to x = −8; the plain float32
x·½(1 + erf(x/√2)) is off by 1e-5 at x = −3 and 5% at x = −5). float64 keeps scipy's exact erf.
"""

import numpy as np

from minivit.cpu import pool
from minivit.cpu.pool import (CHUNK, binary, contiguous, flat_chunks, run_rows, run_tasks,
                              scratch)
from minivit.cpu.runtime import compiled
from minivit.mathconst import (ERFC_P, ERFC_P0, INV_SQRT_2, INV_SQRT_2PI, LOG_INV_SQRT_2PI,
                               SQRT_2_OVER_PI, TANH_COEFF)


# -- gelu, exact: y = x Φ(x);  dy/dx = Φ(x) + x φ(x) -----------------------------------------------
# float32: with a = |x|, z = a/√2, e = ½ erfc(z) (minivit.mathconst's erfcc form), Φ(x) = e for
# x < 0 and 1 − e for x >= 0, and y = max(x, 0) − a·e with no cancellation in either tail.
def half_erfc_float32(a, out, t, u):
    """out = ½ erfc(a/√2) for a float32 chunk a >= 0, with scratch t, u of a's size.
    Leaves t = 1/(1 + a/(2√2)) and u = a²/2 (for callers that want φ)."""
    f = np.float32
    np.multiply(a, f(0.5 * INV_SQRT_2), out=t)
    t += f(1.0)
    np.divide(f(1.0), t, out=t)
    np.multiply(t, f(ERFC_P[0]), out=out)
    for c in ERFC_P[1:]:
        out += f(c)
        out *= t
    out += f(ERFC_P0)
    np.square(a, out=u)
    u *= f(0.5)  # (exact; squaring a/√2 instead would round twice)
    out -= u
    np.exp(out, out=out)
    out *= t
    return out


_SIGN_BIT = np.uint32(0x80000000)


def _gelu_exact_chunk(x, y, d):
    """y = x Φ(x) and, when d is not None, d = Φ(x) + x φ(x), for one chunk."""
    n = x.size
    if x.dtype == np.float64:
        from scipy.special import erf
        cdf = scratch(n, x.dtype, 1)
        np.multiply(x, INV_SQRT_2, out=cdf)
        erf(cdf, out=cdf)
        cdf += 1.0
        cdf *= 0.5
        np.multiply(x, cdf, out=y)
        if d is not None:
            pdf = scratch(n, x.dtype, 2)
            np.multiply(x, x, out=pdf)
            pdf *= -0.5
            np.exp(pdf, out=pdf)
            pdf *= INV_SQRT_2PI
            pdf *= x
            np.add(cdf, pdf, out=d)
        return
    f = np.float32
    a, e, t, u = (scratch(n, x.dtype, slot) for slot in (1, 2, 3, 4))
    np.abs(x, out=a)
    np.minimum(a, f(1e30), out=a)  # gelu(±inf) = inf, 0 rather than inf − inf·0 = NaN
    half_erfc_float32(a, e, t, u)                  # e = ½ erfc(|x|/√2), u = x²/2
    if d is not None:
        # x φ(x) + ½ = x exp(−x²/2 + ln(1/√(2π))) + ½
        np.subtract(f(LOG_INV_SQRT_2PI), u, out=u)
        np.exp(u, out=u)
        u *= x
        u += f(0.5)
        # Φ − ½ = sign(x)(½ − e): copy x's sign bit onto ½ − e >= 0 (integer views: a fraction
        # of np.copysign's cost)
        np.subtract(f(0.5), e, out=t)
        bits = t.view(np.uint32)
        np.bitwise_and(x.view(np.uint32), _SIGN_BIT, out=a.view(np.uint32))
        np.bitwise_or(bits, a.view(np.uint32), out=bits)
        np.add(t, u, out=d)
        np.abs(x, out=a)
        np.minimum(a, f(1e30), out=a)
    np.multiply(a, e, out=a)
    np.maximum(x, f(0.0), out=y)
    y -= a


# -- gelu, tanh:  y = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³);
#                dy/dx = ½(1 + tanh u) + ½x(1 − tanh²u) √(2/π)(1 + 3·0.044715x²)


def _gelu_tanh_chunk(x, y, d):
    n = x.size
    f = x.dtype.type
    s, th = scratch(n, x.dtype, 1), scratch(n, x.dtype, 2)
    np.multiply(x, x, out=s)                       # s = x²
    np.multiply(s, f(TANH_COEFF), out=th)
    th += f(1.0)
    th *= x
    th *= f(SQRT_2_OVER_PI)
    np.tanh(th, out=th)                            # th = tanh u
    if d is not None:
        g = scratch(n, x.dtype, 3)
        np.multiply(th, th, out=g)
        np.subtract(f(1.0), g, out=g)              # 1 − tanh²u
        g *= x
        s *= f(3.0 * TANH_COEFF)
        s += f(1.0)
        s *= f(0.5 * SQRT_2_OVER_PI)
        g *= s
        np.add(th, f(1.0), out=d)
        d *= f(0.5)
        d += g
    th += f(1.0)
    np.multiply(x, th, out=y)
    y *= f(0.5)


def gelu_forward(x, approximate="none", need_grad=True):
    """(y, dy/dx) of GELU for a NumPy array (dy/dx None unless need_grad): chunked, with
    scratch buffers, on minivit's threads."""
    kernels = compiled()
    if kernels is not None:  # one pass per chunk; no scratch
        kernel = kernels.gelu_tanh if approximate == "tanh" else kernels.gelu_exact
    else:
        kernel = _gelu_tanh_chunk if approximate == "tanh" else _gelu_exact_chunk
    flat = contiguous(x).reshape(-1)
    y = np.empty_like(flat)
    d = np.empty_like(flat) if need_grad else None

    chunk = CHUNK if kernels is None else max(flat.size, 1)  # ufunc chains: L2-sized chunks

    def task(s, e):
        for cs in range(s, e, chunk):
            ce = min(cs + chunk, e)
            kernel(flat[cs:ce], y[cs:ce], None if d is None else d[cs:ce])

    run_tasks([lambda s=s, e=e: task(s, e) for s, e in flat_chunks(flat.size)],
              parallel=flat.size >= pool.MIN_PARALLEL)
    return y.reshape(x.shape), (None if d is None else d.reshape(x.shape))


def gelu_backward(grad, derivative):
    """dx = dy ⊙ gelu'(x), in parallel chunks, written over `derivative` (the caller's own
    saved array, dropped after backward: no new 25 MB buffer to fault in)."""
    if grad.shape != derivative.shape:
        return np.multiply(grad, derivative)
    return binary(np.multiply, grad, derivative, out=derivative)


# -- softmax over the last axis: p = eˣ / Σ eˣ;  dx = p ⊙ (dp − Σ dp ⊙ p) --------------------------
def softmax_rows(x, p, scale=None):
    """p = softmax(scale · x) along the last axis (scale > 0; x, p C-contiguous). The compiled
    kernel needs p and x to be distinct arrays: on overlapping ones LLVM's run-time check picks
    its scalar loop (2.7x slower); the NumPy code also runs in place (p is x)."""
    kernels = compiled()
    if kernels is not None:
        kernels.softmax_forward(x.reshape(-1, x.shape[-1]), p.reshape(-1, p.shape[-1]),
                                 p.dtype.type(1.0 if scale is None else scale))
        return
    if p is not x:
        p[...] = x
    p -= p.max(axis=-1, keepdims=True)
    if scale is not None:
        p *= p.dtype.type(scale)
    np.exp(p, out=p)
    total = row_sums(p)
    np.divide(p.dtype.type(1.0), total, out=total)
    p *= total


def row_sums(a):
    """Σ over the last axis, keepdims, as one GEMV with a ones vector (a keepdims reduction
    over short rows costs NumPy several times more)."""
    if a.flags.c_contiguous:
        flat = a.reshape(-1, a.shape[-1])
        return np.matmul(flat, np.ones(a.shape[-1], a.dtype)).reshape(a.shape[:-1] + (1,))
    return np.add.reduce(a, axis=-1, keepdims=True)


def softmax_forward(x):
    features = x.shape[-1]
    x2 = contiguous(x).reshape(-1, features)
    out = np.empty_like(x2)

    def task(s, e):
        softmax_rows(x2[s:e], out[s:e])

    run_rows(task, out.shape[0], features)
    return out.reshape(x.shape)


def softmax_backward(probs, grad):
    features = probs.shape[-1]
    p2 = contiguous(probs).reshape(-1, features)
    g2 = contiguous(grad).reshape(-1, features)
    out = np.empty_like(g2)
    kernels = compiled()

    def task(s, e):
        if kernels is not None:
            kernels.softmax_backward(p2[s:e], g2[s:e], out[s:e], p2.dtype.type(1.0))
            return
        ps, dx = p2[s:e], out[s:e]
        np.multiply(g2[s:e], ps, out=dx)
        dot = row_sums(dx)
        np.subtract(g2[s:e], dot, out=dx)
        dx *= ps

    run_rows(task, p2.shape[0], features)
    return out.reshape(probs.shape)
