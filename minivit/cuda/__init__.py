"""The CUDA device layer of the cupy backend: fused kernels, GEMMs, settings, CUDA graphs.

The hot elementwise and row-wise parts of a ViT step each run as ONE kernel instead of a chain
of CuPy calls (each ~18 µs of Python launch overhead plus a full read/write of memory):

    device.py         dispatch (handles, fused_kernels), shared device math and row reductions,
                      every kernel's source and the compile cache
    activation.py     GELU (exact, tanh) elementwise; softmax / log_softmax one block per row
    normalization.py  LayerNorm forward and dx one block per row
    reduction.py      column sums: bias gradients, LayerNorm's dw and db
    loss.py           cross-entropy: log-sum-exp and loss per row, elementwise backward
    attention.py      self-attention: batched cuBLAS GEMMs on the packed qkv + softmax (+ bias)
    position.py       the relative position bias's backward: a scatter-add, no host sync
    optimizer.py      the AdamW update, one elementwise kernel over the flat buffer
    gemm.py           batched-GEMM addresses, cuBLAS through ctypes (for captures and half
                      operands), matmul, the bf16/fp16 operand rounding
    settings.py       TF32, half GEMMs, synchronize, memory_info, PeakMemory, free_memory
    capture.py        CUDA graphs (experimental): capture_step, and the per-step interface

Every kernel works in float32 and float64 (T = float/double; row reductions accumulate in T).
The math of each op is written once, as a comment above its Function in
minivit/functional/<family>.py; the kernels follow the same formulas in the same order, so
they agree with the NumPy path to rounding. The families register these as their "cuda"
implementations (minivit.functional.registry); importing this package does not import CuPy.
"""

from minivit.cuda import (activation, attention, loss, normalization, optimizer,  # noqa: F401
                          position)
from minivit.cuda.capture import (CapturedStep, capture_step, capturing, concatenate, dot,
                                  host_check, per_step, recording, replay_input, replayed,
                                  uniforms)
from minivit.cuda.device import fused_kernels, fused_kernels_enabled, handles
from minivit.cuda.gemm import gemm_operand, matmul, operand_format
from minivit.cuda.reduction import column_sums
from minivit.cuda.settings import (PeakMemory, free_memory, half_gemms, memory_info,
                                   set_half_gemms, set_tf32, synchronize, tf32_enabled)

__all__ = ["CapturedStep", "PeakMemory", "capture_step", "capturing", "column_sums",
           "concatenate", "dot", "free_memory", "fused_kernels", "fused_kernels_enabled",
           "gemm_operand", "half_gemms", "handles", "host_check", "matmul", "memory_info",
           "operand_format", "per_step", "recording", "replay_input", "replayed",
           "set_half_gemms", "set_tf32", "synchronize", "tf32_enabled", "uniforms"]
