"""Compiled CPU kernels (numba): each elementwise or row-wise op in one pass over memory.

NumPy runs GELU as ~30 ufunc calls, each a full pass over a 25 MB activation; PyTorch runs it
as one. These kernels do the same one pass. minivit.cpu.runtime.compiled() imports this
package only when numba is installed (``pip install 'minivit[fast]'``) and MINIVIT_JIT is not
0; without them minivit.cpu keeps its chunked NumPy code, and the results agree to rounding
(tests compare the two). One module per family (activation, normalization, optimizer), the
shared typed helpers in common.py.

- Every kernel is serial and compiled with nogil=True: minivit.cpu calls it on the same
  chunks and row blocks, on the same threads, as its NumPy code, so the thread pool, the
  size thresholds and the fixed summation order (determinism) stay as they are. numba's own
  threading layer is never used.
- One kernel serves float32 and float64: ``like(x, c)`` makes the constant c of x's type, so
  float32 stays float32 (no conversions; float64 sums halved LayerNorm's speed), and
  ``exp``/``half_erfc_over_sqrt2`` pick the float32 approximations or libm's exact float64
  functions by type at compile time. Sums along a row (LayerNorm statistics, softmax denominators, their
  backward dot products) run in the input's type over vector lanes, as PyTorch's; sums down
  many rows (LayerNorm's dw, db) accumulate in float64.
- fastmath allows only FMA contraction, reassociation (vectorised sums) and signed-zero
  freedom: NaN and inf propagate exactly as in NumPy (a NaN loss still stops training).
- cache=True: compiled once per machine (a few seconds), then loaded from numba's cache.
"""

import numba

from minivit.cpu.compiled.activation import (gelu_exact, gelu_tanh, softmax_backward,
                                             softmax_forward)
from minivit.cpu.compiled.normalization import layer_norm_backward, layer_norm_forward
from minivit.cpu.compiled.optimizer import adamw_update

__all__ = ["adamw_update", "gelu_exact", "gelu_tanh", "layer_norm_backward", "layer_norm_forward",
           "numba", "softmax_backward", "softmax_forward"]
