"""Data-parallel training over MPI (mpi4py) and, on GPUs, NCCL (CuPy's cupy.cuda.nccl).

ChainerMN's design: mpiexec starts N processes (ranks); each builds the same model, rank 0's
parameters are broadcast to the others, every rank takes its share of each global batch (all
ranks draw the same seeded order), and after backward the gradients are averaged over the
ranks in the optimizer's one flat gradient buffer by one all-reduce per step. Every rank then
applies the same update, so N processes train the model one process would. Only rank 0 writes.

    from minivit import distributed as dist
    dist.init()                                 # after minivit.set_backend(...), before the model
    dist.broadcast_parameters(model)
    dist.average_gradients(optimizer)           # each optimizer.step() all-reduces first
    for images, labels in dist.shard_loader(loader):   # this rank's part of each global batch

Collectives: MPI Allreduce in place on NumPy arrays; on CuPy arrays an NCCL all-reduce when
NCCL is there and every rank has a GPU of its own, otherwise MPI over host copies. Without
mpiexec (no launcher variables in the environment) nothing is imported and every function
acts as for the only process of a run (rank 0 of 1).
"""

import contextlib
import os
import sys
import time
import traceback

import numpy as np

from minivit import backend, cpu, cuda
from minivit.errors import MinivitError

INSTALL_HINT = "pip install -e '.[dist]' (mpi4py and the mpich MPI library)"
# Set in every process by the launchers: MPICH/Intel MPI (hydra), Open MPI, PMIx (srun).
LAUNCHER_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
ABORT_GRACE_SECONDS = 1.0  # between the last message and MPI_Abort (_Group.say_and_end_all)


def launched_by_mpiexec():
    """The launcher variable that says this process was started by mpiexec (or srun), or None."""
    return next((name for name in LAUNCHER_VARIABLES if name in os.environ), None)


def _import_mpi(variable):
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise MinivitError(f"this process was started by mpiexec ({variable} is set) for "
                           f"data-parallel training, which needs mpi4py ({error}): "
                           f"{INSTALL_HINT}; or run without mpiexec for one process") from None
    return MPI


class _Group:
    """The processes of a run. Without MPI: one process, and every collective is the identity."""

    def __init__(self, comm=None, mpi=None):
        self.comm, self.mpi = comm, mpi
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        local = comm.Split_type(mpi.COMM_TYPE_SHARED) if comm is not None else None
        self.local_rank = local.Get_rank() if local is not None else 0
        self.local_size = local.Get_size() if local is not None else 1
        self.transport = "mpi" if comm is not None else None
        self.nccl = None  # (cupy.cuda.nccl, NcclCommunicator) on the NCCL path
        self.on_gpus = False  # use_gpus() has run
        self.share = 1.0 / self.size  # this rank's part of the last batch shard() split

    # -- set-up on GPUs ---------------------------------------------------------------------
    def use_gpus(self):
        """Put this rank on the GPU of its local rank; NCCL when every rank has a GPU of its
        own (NCCL refuses two ranks on one GPU) and cupy.cuda.nccl works, on all ranks alike."""
        cupy = backend.xp()
        count = cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(self.local_rank % count).use()
        self.on_gpus = True
        nccl = _nccl_module() if self.local_size <= count else None
        if not self.comm.allreduce(nccl is not None, op=self.mpi.LAND):
            self.transport = "mpi (host copies)"
            return
        unique_id = self.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
        self.nccl = nccl, nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self.transport = "nccl"

    # -- collectives ------------------------------------------------------------------------
    def allreduce_sum(self, array):
        """Sum `array` (contiguous, NumPy or CuPy) over the ranks, in place."""
        if self.comm is None:
            return
        if self.nccl is not None and backend.backend_of(array) == "cupy":
            nccl, communicator = self.nccl
            kinds = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                     np.dtype(np.float64): nccl.NCCL_FLOAT64}
            communicator.allReduce(array.data.ptr, array.data.ptr, array.size,
                                   kinds[array.dtype], nccl.NCCL_SUM,
                                   backend.xp().cuda.get_current_stream().ptr)
        elif backend.backend_of(array) == "cupy":
            host = array.get()
            self.comm.Allreduce(self.mpi.IN_PLACE, host, op=self.mpi.SUM)
            array.set(host)
        else:
            self.comm.Allreduce(self.mpi.IN_PLACE, array, op=self.mpi.SUM)

    def broadcast(self, array):
        """Overwrite `array` on every rank with rank 0's, in place (through the host)."""
        if self.comm is None:
            return
        host = np.ascontiguousarray(backend.to_numpy(array))
        self.comm.Bcast(host, root=0)
        array[...] = backend.to_backend(host, backend.backend_of(array))

    def average(self, grads):
        """The optimizer's flat gradient -> the mean gradient of the global batch: each rank's
        weighted by its share of the batch (1/size when batches split evenly), then summed."""
        if cuda.recording(grads):
            raise MinivitError("data-parallel training does not record CUDA graphs: leave out "
                               "--cuda-graph when running under mpiexec")
        if self.share != 1.0:
            grads *= self.share
        self.allreduce_sum(grads)

    def abort(self, message):
        """Print `message` naming this rank, then end every rank of the run (MPI_Abort): the
        others may be waiting in a collective for this one, and would wait forever."""
        self.say_and_end_all(f"minivit: error on rank {self.rank} of {self.size}: {message}\n"
                             f"minivit: stopping all {self.size} processes", 1)

    def say_and_end_all(self, text, status):
        """Print `text` to stderr, then end every rank with exit status `status` (MPI_Abort)."""
        print(text, file=sys.stderr, flush=True)
        # mpiexec passes a process's output on through its proxy, and an abort can end the
        # proxy before it has: seen on a loaded machine as an empty stderr. Give it a moment.
        time.sleep(ABORT_GRACE_SECONDS)
        self.comm.Abort(status)
        os._exit(status)  # MPICH's Abort has been seen to return when two ranks abort at once


def _nccl_module():
    """cupy.cuda.nccl when CuPy was built with NCCL and it loads, else None."""
    try:
        from cupy.cuda import nccl
    except ImportError:
        return None
    return nccl if getattr(nccl, "available", True) else None


_group = _Group()


def init():
    """Join the run mpiexec started (once; later calls return at once). Call it after the
    backend is chosen and before the model is built: on the GPU it puts each rank on the GPU of
    its local rank. Without mpiexec it does nothing and the process is rank 0 of 1. Under
    mpiexec, an exception that escapes a rank ends every rank (see failing_together)."""
    global _group
    variable = launched_by_mpiexec()
    if variable is None:
        return
    if _group.comm is None:
        mpi = _import_mpi(variable)
        _group = _Group(mpi.COMM_WORLD, mpi)
        sys.excepthook = _abort_on_uncaught
        if "MINIVIT_NUM_THREADS" not in os.environ:  # the processes on a machine share its cores
            cpu.set_num_threads(cpu.num_threads() // _group.local_size)
    if backend.get_backend() == "cupy" and not _group.on_gpus:
        _group.use_gpus()


def _abort_on_uncaught(kind, error, trace):
    """sys.excepthook under mpiexec: an uncaught exception on one rank ends them all."""
    if issubclass(kind, KeyboardInterrupt) or _group.size == 1:
        sys.__excepthook__(kind, error, trace)
        return
    _group.abort("".join(traceback.format_exception(kind, error, trace)))


def rank():
    """This process's number, 0 .. world_size() - 1 (0 without mpiexec)."""
    return _group.rank


def world_size():
    """The number of processes of the run (1 without mpiexec)."""
    return _group.size


def local_rank():
    """This process's number among those on its machine (it picks the GPU)."""
    return _group.local_rank


def is_main():
    """True on rank 0, the one process that prints progress and writes files."""
    return _group.rank == 0


def describe():
    """'2 processes, gradients all-reduced over nccl', for the log (transport: mpi, nccl,
    'mpi (host copies)', or None without mpiexec)."""
    processes = "1 process" if _group.size == 1 else f"{_group.size} processes"
    return f"{processes}, gradients all-reduced over {_group.transport}"


def broadcast_parameters(model):
    """Give every rank rank 0's parameters (call once, before training)."""
    for parameter in model.parameters():
        _group.broadcast(parameter.data)


def average_gradients(optimizer):
    """Make each optimizer.step() average the gradients over the ranks (one all-reduce of its
    flat gradient buffer) before clipping and updating. Returns the optimizer."""
    optimizer.reduce_gradients = _group.average if _group.comm is not None else None
    return optimizer


def shard_bounds(count):
    """(start, stop): this rank's contiguous part of `count` items, the parts differing in size
    by at most one; MinivitError when a rank would get nothing."""
    if count < _group.size:
        raise MinivitError(f"a batch of {count} cannot be shared by {_group.size} processes: "
                           f"each needs at least one image")
    return count * _group.rank // _group.size, count * (_group.rank + 1) // _group.size


def shard_rows(count):
    """The slice of this rank's rows of a global batch of `count`. Also sets the weight of this
    rank's gradient in the next average: its share of the batch, so that a last batch that
    does not split evenly still gives the gradient of the whole batch."""
    start, stop = shard_bounds(count)
    _group.share = (stop - start) / count
    return slice(start, stop)


def shard(*arrays):
    """This rank's part of a global batch (each array split along its first axis; one array
    in, one out), its gradient weighed as shard_rows says."""
    rows = shard_rows(len(arrays[0]))
    parts = tuple(array[rows] for array in arrays)
    return parts[0] if len(parts) == 1 else parts


def share_of_loss(loss):
    """`loss` (this rank's mean over its rows) times its rows' share of the global batch, and
    the next gradient average made a plain sum: the weighting of shard_rows moved before
    backward. Needed where ranks exchange values inside the forward pass (a synchronised batch
    norm): its backward adds up the other ranks' gradients, which must already be weighed.
    One process: `loss` itself."""
    share, _group.share = _group.share, 1.0
    return loss if share == 1.0 else loss * share


def check_batch_size(batch_size, dataset_size):
    """MinivitError unless every global batch of an epoch splits over the ranks: the batch size
    a multiple of the number of processes, the epoch's last batch at least one per process."""
    size = _group.size
    if batch_size % size:
        raise MinivitError(f"--batch-size is the global batch, split evenly over the {size} "
                           f"processes: it must be a multiple of {size}, got {batch_size}")
    last = dataset_size % batch_size
    if 0 < last < size:
        raise MinivitError(f"the last batch of each epoch holds {last} of the {dataset_size} "
                           f"training images, fewer than the {size} processes: choose a "
                           f"--batch-size that leaves none or at least {size}")


class _ShardedLoader:
    """A DataLoader whose batches are this rank's parts of the loader's (global) batches."""

    def __init__(self, loader):
        check_batch_size(loader.batch_size, len(loader.dataset))
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __iter__(self):
        return (shard(images, labels) for images, labels in self.loader)


def shard_loader(loader):
    """`loader` (a minivit DataLoader, its batch_size the global batch) yielding this rank's
    part of each batch; itself without mpiexec."""
    return _ShardedLoader(loader) if _group.comm is not None else loader


def shard_dataset(dataset):
    """This rank's contiguous part of an ArrayDataset (for evaluation: the counts are then
    summed with sum_over_ranks); the dataset itself without mpiexec."""
    if _group.comm is None:
        return dataset
    start, stop = shard_bounds(len(dataset))
    return type(dataset)(dataset.images[start:stop], dataset.labels[start:stop],
                         dataset.num_classes, dataset.class_names, dataset.mean, dataset.std,
                         f"{dataset.name} (part {_group.rank + 1} of {_group.size})")


def allreduce_sum(array):
    """Sum a contiguous NumPy or CuPy array over the ranks, in place (one all-reduce)."""
    _group.allreduce_sum(array)


def sum_over_ranks(*numbers):
    """The sums over the ranks of `numbers` (losses, counts), as a tuple of the same types."""
    if _group.comm is None:
        return numbers
    totals = np.array(numbers, dtype=np.float64)
    allreduce_sum(totals)
    return tuple(type(number)(total) for number, total in zip(numbers, totals))


def rank_seed(seed):
    """A seed for this rank's dropout/drop-path numbers: `seed` (an int or a list of ints) with
    the rank appended when there are several processes, so that ranks draw different masks;
    `seed` itself for one process, which keeps single-process runs as they were."""
    if _group.size == 1:
        return seed
    return [*(seed if isinstance(seed, (list, tuple)) else [seed]), _group.rank]


@contextlib.contextmanager
def failing_together():
    """Around a run's work: with several processes, an exception on one rank prints its
    message (a MinivitError's text, else the traceback), naming the rank, and ends every rank
    at once (MPI_Abort) instead of leaving them waiting in a collective. One process: the
    exception goes on as usual. Ctrl-C is left alone: mpiexec delivers it to every rank, and
    the command ends the run with `interrupted`."""
    try:
        yield
    except Exception as error:
        if _group.comm is None or _group.size == 1:
            raise
        _group.abort(str(error) if isinstance(error, MinivitError) else traceback.format_exc())


def interrupted(message):
    """After Ctrl-C (KeyboardInterrupt): print `message` (what the run folder keeps, how to go
    on) and return the exit status 130. With several processes this never returns: mpiexec
    delivers Ctrl-C to every rank, but a rank blocked in a collective cannot take it, and a
    rank that just exits leaves the others waiting for it for ever. So rank 0 prints and ends
    every rank (MPI_Abort); the others wait longer first, then do the same in case rank 0 is
    the one stuck (the message is the same on every rank)."""
    if _group.comm is None or _group.size == 1:
        print(message, file=sys.stderr, flush=True)
        return 130
    if _group.rank != 0:
        time.sleep(3 * ABORT_GRACE_SECONDS)
    _group.say_and_end_all(message, 130)
