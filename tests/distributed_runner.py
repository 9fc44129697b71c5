"""`minivit COMMAND` for tests/test_distributed.py, run by mpiexec: python distributed_runner.py
COMMAND ARGS (train or pretrain).

On every rank but 0 an audit hook refuses (and reports) any write under --out: only rank 0
may write the run folder. MINIVIT_TEST_FAIL="RANK:STEP:KIND" makes rank RANK fail at its
STEP-th training step (counted from 1 over the whole run): KIND "raise" raises an exception,
"nan" returns a NaN loss as a diverged step would, "interrupt" raises KeyboardInterrupt there
alone (Ctrl-C taken by one rank while the others wait in a collective). Rank 0 ends by printing the transport.
"""

import os
import sys
from pathlib import Path

import numpy as np

import minivit.pretrain
import minivit.train.loop
from minivit import distributed as dist
from minivit.cli import main

RANK = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def refuse_writes_under(folder):
    def hook(event, args):
        if event == "open" and args[0] is not None:
            mode, flags = args[1], args[2]
            writes = any(c in mode for c in "wxa+") if mode else bool(flags & WRITE_FLAGS)
            paths = [args[0]] if writes else []
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate"):
            paths = [args[0], args[1]] if event == "os.rename" else [args[0]]
        else:
            return
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)) and Path(os.fsdecode(path)).resolve(
                    ).is_relative_to(folder):
                raise PermissionError(f"rank {RANK} wrote {path} ({event}): only rank 0 may "
                                      f"write the run folder")

    sys.addaudithook(hook)


def failing_step(step_function, step_number, kind):
    """`step_function` (returning (loss, anything)) failing at its `step_number`-th call."""
    calls = []

    def maybe_failing(*args):
        calls.append(1)
        loss, other = step_function(*args)
        if len(calls) == step_number:
            if kind == "raise":
                raise RuntimeError(f"injected failure at step {step_number}")
            if kind == "interrupt":
                raise KeyboardInterrupt
            loss = np.float64("nan")
        return loss, other
    return maybe_failing


def fail_at(command, step_number, kind):
    if command == "train":
        make_step = minivit.train.loop.training_step
        minivit.train.loop.training_step = (  # the Trainer's step, whatever its arguments
            lambda *args: failing_step(make_step(*args), step_number, kind))
    else:
        for method in minivit.pretrain.METHODS.values():  # MAE's and DINO's steps
            method.step = failing_step(method.step, step_number, kind)


if __name__ == "__main__":
    command, *argv = sys.argv[1:]
    if RANK != 0:
        refuse_writes_under(Path(argv[argv.index("--out") + 1]).resolve())
    failing = os.environ.get("MINIVIT_TEST_FAIL")
    if failing:
        rank, step_number, kind = failing.split(":")
        if int(rank) == RANK:
            fail_at(command, int(step_number), kind)
    status = main([command, *argv])
    if dist.is_main():
        print(f"data parallel: {dist.describe()}")  # which transport ran, for the GPU test
    sys.exit(status)
