"""The numerical precision of a run: `--precision` on the command line, `set_precision` and
`using_precision` in Python.

    fp32   float32 throughout (the default)
    tf32   float32, with GEMMs on TF32 tensor cores (GPU; the same as cuda.set_tf32(True))
    bf16   GEMMs (linear, patchify, the batched attention GEMMs) with bfloat16 operands and
           fp32 accumulation and output (GPU); the weights and optimizer state (fp32 master
           copies), LayerNorm statistics, softmax, the loss and gradient reductions stay
           float32. bfloat16 has float32's exponent range: no loss scaling.
    fp16   as bf16 with float16 operands; float16 overflows above 65504 and flushes small
           gradients to zero, so training scales the loss dynamically (minivit.loss_scale).

The half formats and TF32 need the cupy backend and float32 weights; on the CPU (numpy) minivit
computes in fp32, or in float64 with --dtype float64, and anything else is a MinivitError.
"""

import contextlib

from minivit import backend
from minivit.cuda import settings as cuda_settings
from minivit.errors import MinivitError
from minivit.loss_scale import LossScaler

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_state = {"name": "fp32"}


def check_precision(name, backend_name, dtype="float32"):
    """Raise a MinivitError unless precision `name` works on `backend_name` with `dtype`."""
    if name not in PRECISIONS:
        raise MinivitError(f"unknown precision {name!r}: expected one of {', '.join(PRECISIONS)}")
    if name == "fp32":
        return
    if backend_name != "cupy":
        raise MinivitError(f"--precision {name} needs the GPU (--backend cupy); on the CPU "
                           f"({backend_name} backend) minivit computes in fp32 (--precision "
                           f"fp32, the default) or in float64 (--dtype float64)")
    if str(dtype) != "float32":
        raise MinivitError(f"--precision {name} runs float32 weights' GEMMs in {name}; got "
                           f"--dtype {dtype}: use --dtype float32 with it, or --precision fp32")


def set_precision(name, backend_name=None, dtype="float32"):
    """Compute in precision `name` from now on (see the module doc); `backend_name` defaults
    to the current backend, `dtype` is the weights' (checked by check_precision)."""
    backend_name = backend_name or backend.get_backend()
    check_precision(name, backend_name, dtype)
    if backend_name == "cupy":  # (on the CPU: nothing to switch, and CuPy stays unimported)
        cuda_settings.set_tf32(name == "tf32")
    cuda_settings.set_half_gemms(name if name in cuda_settings.HALF_FORMATS else None)
    _state["name"] = name


def get_precision():
    """The precision set last ("fp32" unless set_precision or using_precision changed it)."""
    return _state["name"]


@contextlib.contextmanager
def using_precision(name, backend_name=None, dtype="float32"):
    """Within this block compute in precision `name` (set_precision), then return to the one
    before."""
    previous = get_precision()
    set_precision(name, backend_name, dtype)
    try:
        yield
    finally:
        set_precision(previous, backend_name)  # (a precision other than fp32 had float32)


def prepare_training(name, backend_name, dtype, optimizer):
    """set_precision(name, ...) for a training run; with fp16, also a LossScaler attached to
    `optimizer` (returned; None otherwise)."""
    set_precision(name, backend_name, dtype)
    return LossScaler(optimizer) if name == "fp16" else None
