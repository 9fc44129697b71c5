"""minivit's CPU threads: a small pool that takes tasks from a shared counter, the blocks and
chunks work is cut into, per-thread scratch buffers, and the size thresholds below which work
stays on one thread.

NumPy releases the GIL inside BLAS and most ufuncs, so blocks of one op run in parallel, and a
thread that is not scheduled in time simply takes no block: nobody spins waiting for it. Each
ufunc call hands the GIL back and forth, so elementwise chunks must be large (64K elements)
and small ops stay on one thread (the thresholds, measured on a quiet 2-core machine).
"""

import itertools
import os
import queue
import threading

import numpy as np

from minivit.cpu.runtime import state

# Thresholds measured on the 2-core machines: below them the GIL hand-offs and smaller BLAS
# calls cost more than the second core gives (a ViT step on 8x8 digits is faster on one).
MIN_SPLIT_MACS = 1 << 24  # multiply-adds of one GEMM
MIN_PARALLEL = 1 << 18  # elements of an elementwise kernel (GELU, products, AdamW)
MIN_PARALLEL_ROWS = 1 << 17  # elements of a row-wise kernel (LayerNorm, softmax, attention)
MIN_BLOCK_ROWS = 256  # rows of one GEMM block (smaller ones run below BLAS's best speed)
CHUNK = 1 << 16  # elements per chunk of the fused elementwise kernels: a few buffers fit in L2


class _Job:
    """Tasks that the caller and the pool's threads take one by one from a shared counter."""

    def __init__(self, tasks):
        self.tasks = tasks
        self.count = len(tasks)
        self.take = itertools.count().__next__  # atomic under the GIL
        self.finish = itertools.count(1).__next__
        self.done = threading.Event()
        self.error = None

    def work(self):
        while True:
            index = self.take()
            if index >= self.count:
                return
            try:
                self.tasks[index]()
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller
                self.error = error
            if self.finish() == self.count:
                self.done.set()


class _Pool:
    def __init__(self):
        self.queue = queue.SimpleQueue()
        self.workers = 0
        self.pid = os.getpid()
        self.lock = threading.Lock()

    def _worker(self):
        while True:
            job = self.queue.get()
            if job is None:
                return
            job.work()

    def run(self, tasks, threads):
        if os.getpid() != self.pid:  # a forked child has none of the parent's threads
            self.__init__()
        with self.lock:
            while self.workers < threads - 1:
                threading.Thread(target=self._worker, name=f"minivit-cpu-{self.workers}",
                                 daemon=True).start()
                self.workers += 1
        job = _Job(tasks)
        for _ in range(min(threads - 1, len(tasks) - 1)):
            self.queue.put(job)
        job.work()
        job.done.wait()
        job.tasks = None  # a helper that takes the job late finds no task: drop the arrays now
        if job.error is not None:
            raise job.error


_pool = _Pool()


def run_tasks(tasks, parallel=True):
    """Run zero-argument callables, spread over minivit's threads (in the calling thread alone
    when `parallel` is false); returns when all are done. Tasks must write disjoint outputs.
    The first exception raised by a task is re-raised."""
    threads = state["threads"]
    if (not parallel or threads <= 1 or len(tasks) <= 1
            or threading.current_thread().name.startswith("minivit-cpu")):
        for task in tasks:
            task()
        return
    _pool.run(tasks, threads)


def blocks(total, block):
    """(start, stop) pairs covering range(total) in pieces of `block` (the last may be shorter)."""
    block = max(1, int(block))
    return [(start, min(start + block, total)) for start in range(0, total, block)]


# Per-thread scratch buffers, reused between calls (no 25 MB temporaries).
_local = threading.local()


def scratch(count, dtype, slot=0):
    """A 1-D scratch array of at least `count` elements for this thread and slot."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (np.dtype(dtype).char, slot)
    buffer = buffers.get(key)
    if buffer is None or buffer.size < count:
        buffer = buffers[key] = np.empty(max(count, 1 << 16), dtype=dtype)
    return buffer[:count]


def flat_chunks(size):
    """Blocks of a flat elementwise op, one task each (chunked again inside the task)."""
    return blocks(size, CHUNK * 4)


def contiguous(array):
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def binary(ufunc, a, b, out=None):
    """ufunc(a, b) for two same-shape arrays, in parallel chunks when large (add, multiply)."""
    if (a.shape != b.shape or a.size < MIN_PARALLEL or state["threads"] <= 1
            or (out is not None and not out.flags.c_contiguous)):
        return ufunc(a, b, out=out) if out is not None else ufunc(a, b)
    shape = a.shape
    a, b = contiguous(a).reshape(-1), contiguous(b).reshape(-1)
    result = np.empty(a.shape, np.result_type(a, b)) if out is None else out.reshape(-1)
    run_tasks([lambda s=s, e=e: ufunc(a[s:e], b[s:e], out=result[s:e])
               for s, e in blocks(a.size, CHUNK * 8)])
    return result.reshape(shape)


def row_blocks(rows, features, target=1 << 16):
    """Row blocks of ~`target` elements (a few such buffers stay in L2)."""
    return blocks(rows, max(8, target // max(features, 1)))


def run_rows(task, rows, features):
    """task(start, stop) over row blocks, on minivit's threads when the rows are many."""
    run_tasks([lambda s=s, e=e: task(s, e) for s, e in row_blocks(rows, features)],
              parallel=rows * features >= MIN_PARALLEL_ROWS)
