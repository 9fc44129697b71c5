"""GPU settings and tools: TF32 for float32 GEMMs, synchronisation, memory use."""

import os
import sys

import numpy as np

from minivit.cuda.device import cupy


def set_tf32(enabled=True):
    """Let float32 matmuls (cuBLAS GEMMs behind @, matmul, dot, tensordot, and the batched
    self-attention GEMMs) use TF32 tensor cores (GPUs of compute capability >= 8.0: A100,
    H100, ...). float64 is never affected.

    How: CuPy picks the cuBLAS compute type of every GEMM it runs from
    cupy._core._routines_linalg.get_compute_type(dtype); we set it with its set_compute_type
    (COMPUTE_TYPE_TF32 -> CUBLAS_COMPUTE_32F_FAST_TF32, COMPUTE_TYPE_DEFAULT -> CUBLAS_COMPUTE_32F),
    the same switch CuPy's environment variable CUPY_TF32=1 sets at the first float32 GEMM.
    CuPy passes that compute type explicitly to cublasGemmEx, so the handle's math mode does not
    reach its GEMMs; minivit's own batched attention GEMMs (legacy sgemmBatched, which has no
    compute type) read tf32_enabled() and set the math mode around each call (minivit.cuda.gemm.gemm_batched).
    CUPY_TF32 is set too, so the choice also holds where CuPy is not imported yet or has no
    set_compute_type. Returns whether TF32 is now on (tf32_enabled())."""
    os.environ["CUPY_TF32"] = "1" if enabled else "0"
    try:
        from cupy._core import _routines_linalg as linalg
        compute_type = linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT
        linalg.set_compute_type(np.float32, compute_type)  # warns and keeps FP32 below sm_80
    except (ImportError, AttributeError):
        return bool(enabled)  # only the environment variable: read at CuPy's first GEMM
    except Exception:  # noqa: BLE001 - CUDA errors: no usable GPU, nothing to switch
        return False
    return tf32_enabled()


def tf32_enabled():
    """Whether float32 GEMMs may use TF32 (per CuPy's compute type, or CUPY_TF32 before it)."""
    try:
        from cupy._core import _routines_linalg as linalg
        return linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_TF32
    except Exception:  # noqa: BLE001 - CuPy missing or no GPU
        return os.environ.get("CUPY_TF32", "0").strip() not in ("", "0")


# -- timing and memory ------------------------------------------------------------------------
def synchronize():
    """Wait for all queued GPU work (for timing); a no-op where CuPy was never imported."""
    if "cupy" in sys.modules:
        sys.modules["cupy"].cuda.Device().synchronize()


def memory_info():
    """Bytes of GPU memory CuPy's default pool has handed out ("used") and holds ("held")."""
    pool = cupy().get_default_memory_pool()
    return {"used": int(pool.used_bytes()), "held": int(pool.total_bytes())}


class PeakMemory:
    """Context manager: the most bytes in use at once from CuPy's memory pool while it is open
    (``.bytes``; arrays alive before it count), as torch.cuda.max_memory_allocated counts.
    A cupy.cuda.MemoryHook follows every malloc and free of the pool in this thread."""

    def __enter__(self):
        cp = cupy()
        tracker = self

        class Hook(cp.cuda.MemoryHook):
            name = "minivit_peak_memory"

            def malloc_postprocess(self, **kwargs):
                tracker.used += kwargs["mem_size"]
                tracker.bytes = max(tracker.bytes, tracker.used)

            def free_postprocess(self, **kwargs):
                tracker.used -= kwargs["mem_size"]

        self.used = self.bytes = int(cp.get_default_memory_pool().used_bytes())
        self.hook = Hook()
        self.hook.__enter__()
        return self

    def __exit__(self, *exc_info):
        self.hook.__exit__(*exc_info)


def free_memory():
    """Return the default pool's unused blocks to the driver (between benchmarks)."""
    cp = cupy()
    cp.get_default_memory_pool().free_all_blocks()
    cp.get_default_pinned_memory_pool().free_all_blocks()
