"""GEMMs on the GPU: batched GEMMs from device arrays of matrix addresses (self-attention reads
q, k, v where they lie in the packed qkv), and cuBLAS through ctypes while a CUDA graph records.

CuPy refuses cuBLAS while a stream is captured: its wrappers' setStream raises "calling cuBLAS
API during stream capture is currently unsupported". cuBLAS itself allows it once the handle
has a workspace of its own (cuBLAS documentation, "CUDA Graphs Support"), so while a capture
is on, minivit's GEMMs call the same libcublas through ctypes on a handle made before the
capture (_DirectCublas), and batch addresses are computed by a kernel (no host-to-device copy
may be recorded).
"""

import os

import numpy as np

from minivit.cuda import capture
from minivit.cuda.device import cupy, elementwise, elementwise_kernel
from minivit.cuda.settings import tf32_enabled

_OP_N, _OP_T = 0, 1
_DEFAULT_MATH, _TF32_TENSOR_OP_MATH = 0, 3  # cublasMath_t
_CUDA_R_32F, _CUDA_R_64F = 0, 1  # cudaDataType
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70  # cublasComputeType_t
_GEMM_DEFAULT = -1  # cublasGemmAlgo_t
_WORKSPACE_BYTES = 32 << 20
pointer_cache = {}  # (address, itemsize, offset, strides, grid) -> device array of addresses
_direct = {"cublas": None}  # the _DirectCublas of this process

# the address of matrix (b, h) = i of a batch grid (B, H): base + size·(offset + b·sb + h·sh)
elementwise_kernel(
    "batch_addresses", "uint64 base, int64 size, int64 offset, int64 sb, int64 sh, int64 heads",
    "uint64 a",
    "a = base + (unsigned long long)(size * (offset + (i / heads) * sb + (i % heads) * sh));")


def batch_pointers(array, offset, strides, grid):
    """Device uint64 array of the addresses array + itemsize · (offset + Σ index_i · stride_i)
    over the batch grid in row-major order. Cached: the same arguments give the same addresses,
    and a training loop's memory pool hands out the same blocks step after step."""
    key = (array.data.ptr, array.itemsize, offset, strides, grid)
    recording = capture.capturing()
    # a graph's addresses live in its own pool and are written by its replays: its own cache
    cache = capture.state["pointers"] if recording else pointer_cache
    pointers = cache.get(key)
    if pointers is None:
        if len(cache) >= 4096 and not recording:
            cache.clear()
        if recording:  # no host-to-device copy may be recorded: a kernel computes them
            (batch, heads), (batch_stride, head_stride) = grid, strides
            pointers = cupy().empty(batch * heads, np.uint64)
            elementwise("batch_addresses")(np.uint64(array.data.ptr), np.int64(array.itemsize),
                                            np.int64(offset), np.int64(batch_stride),
                                            np.int64(head_stride), np.int64(heads), pointers)
        else:
            elements = np.zeros((), np.int64)
            for size, stride in zip(grid, strides):
                elements = np.add.outer(elements, np.arange(size, dtype=np.int64) * stride)
            addresses = (elements.ravel() + offset) * array.itemsize + array.data.ptr
            pointers = cupy().asarray(addresses.astype(np.uint64))
        cache[key] = pointers
    return pointers


def gemm_batched(dtype, count, m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc, alpha=1.0):
    """Row-major C_j = alpha · op(A_j) op(B_j) for j < count, from device arrays of addresses:
    A_j is m×k (stored k×m when trans_a), B_j k×n (stored n×k when trans_b), C_j m×n; ld* are
    the row strides in elements. cuBLAS is column-major, so it is asked for C_jᵀ = op(B_j)ᵀ
    op(A_j)ᵀ. float32 runs on TF32 tensor cores when tf32_enabled()."""
    if capture.capturing():
        _direct_cublas().gemm_batched(dtype, count, m, n, k, a, lda, trans_a, b, ldb, trans_b,
                                      c, ldc, alpha)
        return
    from cupy_backends.cuda.libs import cublas
    handle = cupy().cuda.device.get_cublas_handle()
    single = np.dtype(dtype) == np.float32
    gemm = cublas.sgemmBatched if single else cublas.dgemmBatched
    mode = cublas.getMathMode(handle)
    wanted = _TF32_TENSOR_OP_MATH if single and tf32_enabled() else _DEFAULT_MATH
    if mode != wanted:
        cublas.setMathMode(handle, wanted)
    alpha_beta = np.array([alpha, 0.0], dtype)  # cuBLAS reads them through host pointers
    try:
        gemm(handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, n, m, k,
             alpha_beta.ctypes.data, b.data.ptr, ldb, a.data.ptr, lda,
             alpha_beta.ctypes.data + alpha_beta.itemsize, c.data.ptr, ldc, count)
    finally:
        if mode != wanted:
            cublas.setMathMode(handle, mode)



def _loaded_library(prefix):
    """The path of the shared library named prefix* that this process has loaded (Linux)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith(prefix):
                return path
    return None


class _DirectCublas:
    """libcublas's GEMMs through ctypes, on a handle and workspace of minivit's own."""

    def __init__(self):
        import ctypes

        from cupy_backends.cuda.libs import cublas  # noqa: F401 - loads libcublas
        path = _loaded_library("libcublas.so")
        if path is None:
            raise RuntimeError("CUDA graph capture needs libcublas, which CuPy has not loaded")
        self.ctypes, self.lib = ctypes, ctypes.CDLL(path)
        handle = ctypes.c_void_p()
        self._check(self.lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self.handle = handle
        self.workspace = cupy().empty(_WORKSPACE_BYTES, np.uint8)  # kept alive with the handle
        i, p = ctypes.c_int, ctypes.c_void_p
        self.lib.cublasGemmEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
        self.lib.cublasGemmBatchedEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i,
                                                 i, i, i, i]

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def _call(self, name, dtype, alpha, m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc,
              *count):
        """cublas`name` (GemmEx, or GemmBatchedEx with `count`) for row-major C = alpha · op(A)
        op(B), the conventions of gemm_batched: cuBLAS is asked for Cᵀ = op(B)ᵀ op(A)ᵀ. The
        handle is bound to the current stream, and the workspace set again (cublasSetStream
        resets it to cuBLAS's own pool, whose allocations a graph must not record)."""
        ctypes = self.ctypes
        if np.dtype(dtype) == np.float64:
            data, compute, scalar = _CUDA_R_64F, _COMPUTE_64F, np.float64
        else:
            data, scalar = _CUDA_R_32F, np.float32
            compute = _COMPUTE_32F_FAST_TF32 if tf32_enabled() else _COMPUTE_32F
        alpha_beta = np.array([alpha, 0.0], scalar)  # read through host pointers, at capture
        self._check(self.lib.cublasSetStream_v2(
            self.handle, ctypes.c_void_p(cupy().cuda.get_current_stream().ptr)),
            "cublasSetStream")
        self._check(self.lib.cublasSetWorkspace_v2(
            self.handle, ctypes.c_void_p(self.workspace.data.ptr),
            ctypes.c_size_t(_WORKSPACE_BYTES)), "cublasSetWorkspace")
        self._check(getattr(self.lib, f"cublas{name}")(
            self.handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, n, m, k,
            alpha_beta.ctypes.data, b, data, ldb, a, data, lda,
            alpha_beta.ctypes.data + alpha_beta.itemsize, c, data, ldc, *count, compute,
            _GEMM_DEFAULT), f"cublas{name}")

    def gemm(self, dtype, m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc):
        """Row-major C = op(A) op(B) for device addresses a, b, c."""
        self._call("GemmEx", dtype, 1.0, m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc)

    def gemm_batched(self, dtype, count, m, n, k, a, lda, trans_a, b, ldb, trans_b, c, ldc,
                     alpha=1.0):
        """gemm_batched's product (device arrays of addresses a, b, c) through ctypes."""
        self._call("GemmBatchedEx", dtype, alpha, m, n, k, a.data.ptr, lda, trans_a, b.data.ptr,
                   ldb, trans_b, c.data.ptr, ldc, count)


def _direct_cublas():
    """The one _DirectCublas of this process (made outside any capture: see CapturedStep)."""
    if _direct["cublas"] is None:
        _direct["cublas"] = _DirectCublas()
    return _direct["cublas"]


@capture.before_capture
def _prepare():
    """What a capture cannot make: the cuBLAS handle and workspace, and the address kernel
    compiled and loaded (a warm-up step never runs it)."""
    _direct_cublas()
    elementwise("batch_addresses")(np.uint64(0), np.int64(1), np.int64(0), np.int64(0),
                                   np.int64(0), np.int64(1), cupy().empty(1, np.uint64))


def _matrix(array):
    """(address, leading dimension, transposed) of a 2-D array for _DirectCublas.gemm: row-major
    with unit column stride, or the transpose of one (a Fortran-ordered block, a .T view)."""
    rows, cols = array.shape
    step_rows, step_cols = (stride // array.itemsize for stride in array.strides)
    if step_cols == 1 and step_rows >= max(cols, 1):
        return array.data.ptr, step_rows, False
    if step_rows == 1 and step_cols >= max(rows, 1):
        return array.data.ptr, step_cols, True
    return None


def matmul(a, b):
    """a @ b for 2-D CuPy arrays: CuPy's matmul, or while a CUDA graph records, one cuBLAS GEMM
    through ctypes (CuPy's would refuse)."""
    if not capture.capturing():
        return a @ b
    if _matrix(a) is None:
        a = cupy().ascontiguousarray(a)
    if _matrix(b) is None:
        b = cupy().ascontiguousarray(b)
    left, right = _matrix(a), _matrix(b)
    out = cupy().empty((a.shape[0], b.shape[1]), a.dtype)
    _direct_cublas().gemm(a.dtype, a.shape[0], b.shape[1], a.shape[1], left[0], left[1],
                          left[2], right[0], right[1], right[2], out.data.ptr, b.shape[1])
    return out
