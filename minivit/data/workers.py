"""A mini-batch loader that builds batches on worker threads, ahead of the training step.

    loader = WorkerLoader(len(labels), 64, make_batch, seed=0, workers=2)
    for x, y in loader: ...

`make_batch(indices, epoch, b)` builds batch b of an epoch (decoding, augmentation, mixing) from
the dataset indices it gets; it draws its random numbers from generators seeded with
(seed, epoch, b), never from shared state. A whole batch is made by one worker, so the batches,
and every random number in them, are the same with 0 (in the caller's thread), 1 or many
workers, and a resumed run (set_epoch) sees exactly the batches of the uninterrupted one.

Threads, not processes: Pillow's decoding and resizing and NumPy's whole-batch arithmetic run
without the GIL, and threads need no pickling of the dataset or the augmentation.
"""

import math
from collections import deque

import numpy as np

from minivit.errors import DatasetError


class WorkerLoader:
    """Batches of `make_batch` over `num_samples` samples; each pass is one epoch, shuffled
    by `np.random.default_rng([seed, epoch])` (as DataLoader). workers: threads building batches
    (0: build them in the iterating thread); prefetch: batches each worker keeps ready."""

    def __init__(self, num_samples, batch_size, make_batch, shuffle=True, seed=0,
                 drop_last=False, workers=0, prefetch=2):
        if int(batch_size) != batch_size or batch_size < 1:
            raise DatasetError(f"batch_size must be a positive integer, got {batch_size!r}")
        if int(workers) != workers or workers < 0:
            raise DatasetError(f"workers must be a whole number >= 0, got {workers!r}")
        if drop_last and num_samples < batch_size:
            raise DatasetError(f"{num_samples} samples are fewer than batch_size={batch_size}, "
                               f"and drop_last would yield no batch; lower batch_size")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.make_batch, self.shuffle, self.seed = make_batch, shuffle, int(seed)
        self.drop_last, self.workers, self.prefetch = drop_last, int(workers), max(1, prefetch)
        self.epoch = 0
        self.dataset = range(self.num_samples)  # the sample indices (data parallel checks len)

    def set_epoch(self, epoch):
        """Make the next pass epoch `epoch`."""
        self.epoch = int(epoch)

    def __len__(self):
        n, size = self.num_samples, self.batch_size
        return n // size if self.drop_last else math.ceil(n / size)

    def batch_indices(self, epoch):
        """The dataset indices of each batch of `epoch`, in order."""
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
                 if self.shuffle else np.arange(self.num_samples))
        return [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(len(self))]

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        if self.workers == 0:
            return (self.make_batch(indices, epoch, b)
                    for b, indices in enumerate(self.batch_indices(epoch)))
        return self._threaded(epoch)

    def _threaded(self, epoch):
        from concurrent.futures import ThreadPoolExecutor

        jobs = list(enumerate(self.batch_indices(epoch)))
        pending = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="minivit-loader") as pool:
            try:
                for b, indices in jobs:
                    pending.append(pool.submit(self.make_batch, indices, epoch, b))
                    if len(pending) >= self.workers * self.prefetch:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # the consumer stopped early (or failed): drop the batches not started
                for future in pending:
                    future.cancel()
