"""Numerical constants shared by an op's plain code and its CPU and CUDA kernels (one home)."""

import math

INV_SQRT_2 = 1.0 / math.sqrt(2.0)  # Φ(x) = ½(1 + erf(x/√2))
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)  # φ(x) = e^(−x²/2)/√(2π)
LOG_INV_SQRT_2PI = math.log(INV_SQRT_2PI)

# gelu, tanh form: u = √(2/π)(x + 0.044715x³)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_COEFF = 0.044715

# ½ erfc(z) in Numerical Recipes' erfcc form (Chebyshev fit, relative error < 1.2e-7 for every
# z >= 0): with t = 1/(1 + z/2),  ½ erfc(z) = t · exp(−z² + P(t) + ln ½),
# P(t) = −1.26551223 + t(1.00002368 + t(0.37409196 + ...)). The float32 GELU of both CPU paths.
ERFC_P = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806,
          0.09678418, 0.37409196, 1.00002368)  # highest power of t first; times t, plus P0
ERFC_P0 = -1.26551223 + math.log(0.5)  # the constant term, with the ½ folded in
