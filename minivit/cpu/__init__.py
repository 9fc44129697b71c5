"""The CPU device layer: fast NumPy paths on minivit's own threads (measured on the project's
2-core machines; `minivit bench --profile` shows where a step's time goes).

    runtime.py        switches (MINIVIT_FAST_CPU, MINIVIT_JIT), threads, BLAS, malloc: configure()
    pool.py           the thread pool, blocks and chunks, scratch buffers, size thresholds
    gemm.py           GEMMs split over the threads (linear, patchify)
    activation.py     GELU and softmax, chunked NumPy or numba
    normalization.py  LayerNorm
    attention.py      scaled dot-product attention by (batch, head) blocks
    optimizer.py      AdamW over the flat buffers
    compiled/         the numba kernels of those families (optional: pip install 'minivit[fast]')

The op families in minivit.functional register these as their "cpu" implementations; the
registry (minivit.functional.registry) runs them on NumPy float32/float64 arrays while
``handles`` says so. float64 takes the same chunked kernels with exact erf (scipy's, or libm's
in the compiled kernel), so gradient checks see the exact math.
"""

from minivit.cpu.gemm import matmul
from minivit.cpu.pool import binary, run_tasks
from minivit.cpu.runtime import (blas_info, compiled_kernels, compiled_kernels_available,
                                 compiled_kernels_info, configure, fast_paths, fast_paths_enabled,
                                 handles, memory_info, num_threads, set_blas_threads,
                                 set_num_threads)

__all__ = ["binary", "blas_info", "compiled_kernels", "compiled_kernels_available",
           "compiled_kernels_info", "configure", "fast_paths", "fast_paths_enabled", "handles",
           "matmul", "memory_info", "num_threads", "run_tasks", "set_blas_threads",
           "set_num_threads"]
