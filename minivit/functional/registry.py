"""The kernel registry: every implementation of every op, and the one place that picks one.

An op (a name such as "gelu") has up to three implementations, tried in this order:

    device   runs on                                        switched off by
    "cuda"   CuPy float32/float64 arrays: fused CUDA kernels  MINIVIT_FUSED_KERNELS=0,
             (minivit.cuda.<family>)                          cuda.fused_kernels(False)
    "cpu"    NumPy float32/float64 arrays: chunked kernels on MINIVIT_FAST_CPU=0,
             minivit's threads, numba inside when installed   cpu.fast_paths(False)
             (minivit.cpu.<family>; MINIVIT_JIT=0 or cpu.compiled_kernels(False) keeps NumPy)
    "plain"  anything: the whole-array NumPy/CuPy code in the family module (the reference)

`choose(op, *arrays, **options)` returns the first implementation whose device takes every
non-None array (``cuda.handles`` / ``cpu.handles``, one dtype) and whose `accepts`, if any,
says yes to the same arguments (softmax: only over the last axis).

An implementation is a class with two plain functions, side by side:

    forward(*args, **options) -> (output, saved)
    backward(saved, grad, needs) -> tuple of input gradients (None where needs[i] is false)

`saved` is fixed per implementation (its docstring says what it holds), and a Function keeps
the implementation its forward chose: backward always runs the same implementation's
backward, whatever the switches say by then (Chainer's forward_cpu/forward_gpu discipline).
`DispatchedFunction` does this bookkeeping.

Adding an op with fast paths (say in minivit/functional/window.py):

    class WindowPartition(DispatchedFunction):          # the Function, its math in a comment
        def forward(self, x, size):
            return self.dispatch("window_partition", (x,), x, size)

    @implementation("window_partition", "plain")         # the reference, in the same module
    class _Plain:
        def forward(x, size): ...                       # -> (out, saved)
        def backward(saved, grad, needs): ...           # -> (dx,)

    @implementation("window_partition", "cuda")          # optional: kernels from
    class _Fused:                                       # minivit/cuda/window.py
        ...

Every op needs a "plain" implementation. An option or input that only some implementations
support goes to every forward all the same; the others decline it through `accepts`, so the
plain code runs instead of a kernel that would ignore it (softmax's kernels: the last axis):

    @implementation("softmax", "cuda", accepts=_over_last_axis)

`implementations(op)` lists what is registered; `choose` is the only place that decides.
The tests read minivit.inspect.opchecks (the op catalogue): give the op an entry there, and
every implementation is checked against the plain one, by gradcheck, and in float32, with the
CPU kernels on and off (numba on and off), and on the GPU where there is one.
"""

from minivit import cpu, cuda
from minivit.tensor import Function

DEVICES = ("cuda", "cpu", "plain")
_DEVICE_TESTS = {"cuda": cuda.handles, "cpu": cpu.handles, "plain": None}
_implementations = {}  # op -> [implementation class], in DEVICES order


def implementation(op, device, accepts=None):
    """Class decorator: register the class's forward/backward as `op`'s implementation on
    `device` ("cuda", "cpu" or "plain"); `accepts(*arrays, **options)` may narrow when it runs."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: expected one of {', '.join(DEVICES)}")

    def register(cls):
        cls.op, cls.device, cls.accepts = op, device, staticmethod(accepts) if accepts else None
        cls.handles = _DEVICE_TESTS[device]
        found = [impl for impl in _implementations.get(op, []) if impl.device != device]
        found.append(cls)
        _implementations[op] = sorted(found, key=lambda impl: DEVICES.index(impl.device))
        return cls
    return register


def implementations(op=None):
    """{op: [implementation classes]} (or one op's list), for tests and `minivit info`."""
    if op is not None:
        return list(_implementations[op])
    return {name: list(impls) for name, impls in _implementations.items()}


def choose(op, *arrays, **options):
    """The implementation of `op` that runs on `arrays` with `options` (see the module doc)."""
    for impl in _implementations[op]:
        if impl.handles is not None and not impl.handles(*arrays):
            continue
        if impl.accepts is not None and not impl.accepts(*arrays, **options):
            continue
        return impl
    raise LookupError(f"op {op!r} has no implementation for these arrays (no 'plain' one?)")


class DispatchedFunction(Function):
    """A Function whose forward runs the implementation `choose` picks, keeping it (self.impl)
    and what it saved (self.saved); backward hands both back to that implementation."""

    def dispatch(self, op, arrays, *args, **options):
        """choose(op, *arrays, **options), then its forward(*args, **options)."""
        self.impl = choose(op, *arrays, **options)
        out, self.saved = self.impl.forward(*args, **options)
        return out

    def backward(self, grad):
        return self.impl.backward(self.saved, grad, self.needs_input_grad)
