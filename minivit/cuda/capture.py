"""CUDA graphs (experimental): record a step once, replay it (~2 µs per kernel instead of
~18 µs of Python launching each).

A graph cannot hold what reads or writes the host during the step. The device layer takes care
of that in one place each, so that ops and optimizers need no "if recording" branch:
- GEMMs: CuPy refuses cuBLAS while a stream is captured, so minivit.cuda.gemm calls the same
  libcublas through ctypes on a handle of its own, and computes batch addresses with a kernel;
- numbers that change every step (an optimizer's learning rate and step count, dropout's
  random draws) come through ``per_step`` and ``uniforms``: eagerly the numbers themselves,
  while recording a device array that each replay's host code refills (``replay_input``);
- host checks of device values (cross-entropy's label range) go through ``host_check``,
  which skips them while recording (the eager warm-up ran them);
- ``concatenate`` and ``dot`` take the forms a capture allows while one is on.

Modules with something a capture cannot make (a cuBLAS handle, kernels only a capture runs)
register it with ``before_capture``; CapturedStep runs those before recording.
"""

import contextlib

import numpy as np

from minivit import backend
from minivit.cuda.device import cupy

# while a CapturedStep records: its replay inputs, its batch-address cache (minivit.cuda.gemm),
# and the allocator in use before the capture
state = {"inputs": None, "pointers": None, "allocator": None}
_preparations = []  # callables run before each capture (see before_capture)


def before_capture(prepare):
    """Register `prepare()` to run before every capture (decorator); returns it."""
    _preparations.append(prepare)
    return prepare


def capturing():
    """True while the current CuPy stream is being captured into a CUDA graph (never on ROCm,
    where CuPy's is_capturing raises)."""
    cp = cupy()
    return not cp.cuda.runtime.is_hip and cp.cuda.get_current_stream().is_capturing()


def recording(array):
    """True when `array` is a CuPy array and a CUDA graph is being recorded: the test behind
    every capture branch, all in this module and minivit.cuda.gemm (False for NumPy arrays,
    without touching CuPy)."""
    return backend.backend_of(array) == "cupy" and capturing()


def replay_input(values, shape, dtype):
    """While a CapturedStep records: a device array of `shape` and `dtype` for the graph to
    read, which the CapturedStep fills with `values()` (NumPy) before each replay: for values a
    replay must not keep at their captured value. Its memory is not from the graph's pool,
    whose blocks the graph reuses: a temporary that a replay writes and frees before this array
    is read could share its block and overwrite what the host put there."""
    if state["inputs"] is None:
        raise RuntimeError("a CUDA graph is being recorded, but not by minivit's "
                           "cuda.capture_step: record steps that use minivit's optimizers, "
                           "dropout or drop_path with it (it refills their device values before "
                           "each replay)")
    cp = cupy()
    with cp.cuda.using_allocator(state["allocator"]):
        array = cp.empty(shape, dtype)
    state["inputs"].append((array, values))
    return array


# -- the one interface for per-step values and host work ------------------------------------------
def per_step(like, values, count, advance=None):
    """The `count` numbers `values()` gives for this step, on `like`'s device: eagerly
    `advance()` (when given) runs and then the tuple of numbers is returned; while a CUDA
    graph records, nothing runs now and a device array of them is returned instead, which
    every replay refills after running `advance()` (so a step counter advances once per
    replay, as it does once per eager step)."""
    if not recording(like):
        if advance is not None:
            advance()
        return tuple(values())

    def refill():
        if advance is not None:
            advance()
        return values()

    return replay_input(refill, (count,), like.dtype)


def uniforms(like, shape, dtype):
    """Uniform [0, 1) numbers of `shape` and `dtype` on `like`'s backend (minivit's seeded
    generator of that backend); while a CUDA graph records, drawn on the host (the NumPy
    generator) before each replay: new numbers in every replay."""
    if recording(like):
        return replay_input(lambda: backend.random_generator("numpy").random(shape), shape,
                            dtype)
    return backend.random_generator(backend.backend_of(like)).random(shape, dtype=dtype)


def host_check(like, check):
    """Run `check()`, which reads device values on the host, unless a CUDA graph records
    (a replay cannot; the eager warm-up checked the captured step's values)."""
    if not recording(like):
        check()


def concatenate(arrays, out):
    """xp.concatenate of 1-D arrays into `out`; while a CUDA graph records, one copy kernel per
    array (CuPy's concatenate of many arrays copies their addresses from the host)."""
    if not recording(out):
        return backend.array_module(out).concatenate(arrays, out=out)
    start = 0
    for array in arrays:
        out[start:start + array.size] = array
        start += array.size
    return out


def dot(a, b):
    """a · b of 1-D arrays; while a CUDA graph records, without cuBLAS (CuPy's dot would call
    it, and CuPy refuses cuBLAS in a capture)."""
    if recording(a):
        return (a * b).sum()
    return backend.array_module(a).dot(a, b)


# -- recording and replaying ----------------------------------------------------------------------
class CapturedStep:
    """EXPERIMENTAL: `fn(*static_inputs)` recorded once as a CUDA graph and replayed.

    Replaying costs ~2 µs per kernel instead of ~18 µs of Python per launch. A whole training
    step may be captured: forward, cross-entropy, backward and optimizer.step() (see the
    section comment above for how GEMMs, attention and AdamW take part). Rules for `fn`:
    - fixed shapes: it always reads `static_inputs` (CuPy arrays); call the CapturedStep with
      new arrays of the same shapes and it copies them in before the replay;
    - no host synchronisation inside: no .item(), float()/int()/bool() of a device value, no
      printing device arrays, no NumPy transfer; integer labels are not range-checked in
      replays (the eager warm-up checked the captured ones);
    - Python numbers given to a kernel are frozen at capture, except the optimizers' learning
      rate and AdamW's step count, which each replay takes from the optimizer as an eager
      step() would (the optimizer's step_count advances once per replay);
    - random numbers: dropout and drop_path draw their uniforms on the host (minivit's NumPy
      generator, see minivit.manual_seed) into a replay_input: new masks in every replay, from
      another generator than eager steps use (one host copy of the mask's size per replay);
    - fused kernels on (MINIVIT_FUSED_KERNELS=0 sends the GEMMs to CuPy's cuBLAS wrappers,
      which refuse to run in a capture);
    - the returned objects are the captured outputs: every replay overwrites them in place.
    Before capture `fn` runs `warmup` (≥ 1) times eagerly (compiling kernels; this work is real:
    a training step trains, and the last run's outputs are kept as `warmup_outputs`). Memory
    allocated during capture comes from a private pool kept alive with the graph, so replays
    never write into memory handed to anyone else; what the host writes before each replay
    (replay_input) lives outside that pool.
    tests/test_cuda_graphs.py checks on a GPU that a captured ViT training step and a captured AdamW
    step give exactly what the same eager steps give (float64)."""

    def __init__(self, fn, *static_inputs, warmup=1):
        if warmup < 1:
            raise ValueError(f"capture_step: warmup must be at least 1 (an eager run compiles "
                             f"the kernels a capture cannot), got {warmup}")
        cp = cupy()
        self.fn, self.inputs = fn, static_inputs
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.pool = cp.cuda.MemoryPool()
        caller = cp.cuda.get_current_stream()
        self.stream.wait_event(caller.record())
        with self.stream:
            for _ in range(warmup):
                self.warmup_outputs = fn(*static_inputs)
        for prepare in _preparations:  # what a capture cannot make
            prepare()
        cp.cuda.get_current_stream().synchronize()
        self.replay_inputs, self.pointers = state["inputs"], state["pointers"] = [], {}
        state["allocator"] = cp.cuda.get_allocator()
        try:
            with cp.cuda.using_allocator(self.pool.malloc), self.stream:
                self.stream.begin_capture()
                try:
                    self.outputs = fn(*static_inputs)
                except BaseException:
                    with contextlib.suppress(Exception):  # the capture is invalid anyway
                        self.stream.end_capture()
                    raise
                self.graph = self.stream.end_capture()
        finally:
            state["inputs"] = state["pointers"] = state["allocator"] = None
        self.stream.synchronize()

    def __call__(self, *inputs):
        """Copy `inputs` into the static inputs (None or the same array: keep), refill the
        step's replay_input arrays, replay the graph after the caller's queued work (the
        previous replay included), and return the outputs."""
        cp = cupy()
        caller = cp.cuda.get_current_stream()
        for static, new in zip(self.inputs, inputs):
            if new is not None and new is not static:
                static[...] = cp.asarray(new)
        for array, values in self.replay_inputs:
            array.set(np.asarray(values(), array.dtype).reshape(array.shape), stream=caller)
        self.stream.wait_event(caller.record())
        self.graph.launch(stream=self.stream)
        caller.wait_event(self.stream.record())
        return self.outputs


def capture_step(fn, *static_inputs, warmup=1):
    """EXPERIMENTAL: record fn(*static_inputs) as a CUDA graph; see CapturedStep for the rules."""
    return CapturedStep(fn, *static_inputs, warmup=warmup)


def replayed(step, batch_size):
    """`step(x, y)` as a function that records a CUDA graph on its first full batch (of
    `batch_size` samples: that call runs eagerly, as the capture's warm-up) and replays the
    graph for every later full batch; other batch sizes run eagerly. A replay's outputs are
    overwritten by the next one."""
    graph = None

    def run(x, y):
        nonlocal graph
        if len(y) != batch_size:
            return step(x, y)
        if graph is None:
            graph = capture_step(step, x, y)
            return graph.warmup_outputs
        return graph(x, y)
    return run
