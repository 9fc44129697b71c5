"""What every compiled kernel shares: the @kernel decorator (its numba options), constants of
the argument's type, and float32 / float64 exp and ½erfc picked by type at compile time."""

import math

import llvmlite.ir
import numba
import numpy as np
from numba.extending import intrinsic, overload

from minivit.mathconst import ERFC_P, ERFC_P0, INV_SQRT_2

_FASTMATH = {"nsz", "contract", "reassoc"}


def kernel(function):
    """A serial, GIL-free, cached kernel (see minivit.cpu.compiled)."""
    return numba.njit(nogil=True, cache=True, fastmath=_FASTMATH, error_model="numpy")(function)


def _is_float32(numba_type):
    return isinstance(numba_type, numba.types.Float) and numba_type.bitwidth == 32


# -- typed constants and the float32 / float64 special functions ----------------------------------
def like(x, constant):
    """`constant` as a number of x's type (float32 math stays float32)."""


@overload(like, inline="always")
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


def exp(x):
    """e^x for x <= 0 (float32: the vectorisable approximation above; float64: libm)."""


@overload(exp, inline="always")
def _exp_overload(x):
    if _is_float32(x):
        return lambda x: _exp_nonpositive_f32(x)
    return lambda x: math.exp(x)


# ½ erfc(a/√2) for a >= 0. float64: libm. float32: Numerical Recipes' erfcc (minivit.mathconst,
# relative error < 1.2e-7): t = 1/(1 + z/2), z = a/√2, ½erfc(z) = t·exp(P(t) − z² + ln ½).
@numba.njit(inline="always", fastmath=_FASTMATH, error_model="numpy")
def _half_erfc_f32(a):
    f = np.float32
    t = f(1.0) / (f(1.0) + f(0.5 * INV_SQRT_2) * a)
    p = f(ERFC_P[0])
    for c in ERFC_P[1:]:
        p = p * t + f(c)
    return t * _exp_nonpositive_f32(p * t + f(ERFC_P0) - f(0.5) * a * a)


def half_erfc_over_sqrt2(a):
    """½ erfc(a/√2) = P(X > a) for a standard normal X, a >= 0."""


@overload(half_erfc_over_sqrt2, inline="always")
def _half_erfc_overload(a):
    if _is_float32(a):
        return lambda a: _half_erfc_f32(a)
    return lambda a: 0.5 * math.erfc(a * INV_SQRT_2)
