"""Data-parallel scaling on one machine: training images/s with 1 and 2 processes, and the time
of the gradient all-reduce per step for every model minivit ships.

    python scripts/dist_scaling.py                  # everything below, then one table
    python scripts/dist_scaling.py --model vit_mnist --batch 128 --steps 30

runs, each on the same synthetic global batch (float32, AdamW):
  1 process, 1 thread        MINIVIT_NUM_THREADS=1 python dist_scaling.py train
  1 process, 2 threads       MINIVIT_NUM_THREADS=2 python dist_scaling.py train
  2 processes, 1 thread each MINIVIT_NUM_THREADS=1 mpiexec -n 2 python dist_scaling.py train
  all-reduce per model       mpiexec -n 2 python dist_scaling.py allreduce
Needs the dist extra (mpi4py, mpich). Run it on a quiet machine: the numbers are the point.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minivit.functional as F  # noqa: E402
from minivit import backend, cpu, distributed as dist  # noqa: E402
from minivit.inspect.swin_cost import any_model_cost  # noqa: E402
from minivit.models import MODEL_CONFIGS, create_model, model_config  # noqa: E402
from minivit.optim import AdamW  # noqa: E402


def train_speed(args):
    """Rank 0 prints a JSON line: global images/s, and ms per step spent in the all-reduce."""
    cpu.configure()  # BLAS on one thread and minivit's own threads, as `minivit train` runs
    dist.init()
    backend.manual_seed(0)
    model = create_model(args.model)
    optimizer = AdamW(model.named_parameters())
    dist.broadcast_parameters(model)
    dist.average_gradients(optimizer)
    reduce_times = []
    if optimizer.reduce_gradients is not None:
        average = optimizer.reduce_gradients

        def timed_average(grads):
            start = time.perf_counter()
            average(grads)
            reduce_times.append(time.perf_counter() - start)
        optimizer.reduce_gradients = timed_average
    config = model.config
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, config["in_chans"], config["img_size"],
                                  config["img_size"])).astype(np.float32)
    labels = rng.integers(0, config["num_classes"], args.batch)
    x, y = dist.shard(images, labels)
    step_times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(max_grad_norm=1.0)
        loss.item()  # wait for the step to end (on a GPU)
        step_times.append(time.perf_counter() - start)
    del step_times[:args.warmup], reduce_times[:args.warmup]
    step = statistics.median(step_times)  # the all-reduce keeps the ranks in step
    if dist.is_main():
        print(json.dumps({"model": args.model, "processes": dist.world_size(),
                          "batch": args.batch, "images_per_s": args.batch / step,
                          "step_ms": 1e3 * step,
                          "allreduce_ms": 1e3 * statistics.median(reduce_times)
                          if reduce_times else 0.0}))


def allreduce_speed(args):
    """Rank 0 prints a JSON line per model: parameters, ms per all-reduce of its float32
    gradient (median), and the bus bandwidth 2(n-1)/n x bytes / time."""
    dist.init()
    for name in args.models or MODEL_CONFIGS:
        count = any_model_cost(model_config(name)).total_params
        buffer = np.ones(count, np.float32)
        start = time.perf_counter()
        dist.allreduce_sum(buffer)  # warm-up; its time summed over the ranks sets the number
        first = max(dist.sum_over_ranks(time.perf_counter() - start)[0], 1e-6)  # of repeats
        times = []
        for _ in range(max(3, min(50, int(1.0 / first)))):
            start = time.perf_counter()
            dist.allreduce_sum(buffer)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        size = dist.world_size()
        if dist.is_main():
            print(json.dumps({"model": name, "parameters": count, "allreduce_ms": 1e3 * seconds,
                              "bus_GB_s": 2 * (size - 1) / size * buffer.nbytes / seconds / 1e9}))


def launch(args):
    """Run the three training set-ups and the all-reduce sweep; print a table."""
    script = [sys.executable, str(Path(__file__).resolve())]
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    common = ["--model", args.model, "--batch", str(args.batch), "--steps", str(args.steps)]
    runs = [("1 process, 1 thread", "1", script + ["train", *common]),
            ("1 process, 2 threads", "2", script + ["train", *common]),
            ("2 processes, 1 thread each", "1", [mpiexec, "-n", "2", *script, "train", *common])]
    print(f"{args.model}, global batch {args.batch}, {args.steps} timed steps, float32, AdamW")
    for label, threads, command in runs:
        environment = dict(os.environ, MINIVIT_NUM_THREADS=threads)
        result = json.loads(subprocess.run(command, env=environment, capture_output=True,
                                           text=True, check=True).stdout.splitlines()[-1])
        print(f"  {label:<28} {result['images_per_s']:8.1f} images/s  step "
              f"{result['step_ms']:7.1f} ms  all-reduce + wait {result['allreduce_ms']:6.2f} ms")
    print("all-reduce of the float32 gradient, 2 processes (MPI, shared memory):")
    models = ["--models", *args.models] if args.models else []
    output = subprocess.run([mpiexec, "-n", "2", *script, "allreduce", *models],
                            capture_output=True, text=True, check=True).stdout
    for line in output.splitlines():
        result = json.loads(line)
        print(f"  {result['model']:<34} {result['parameters'] / 1e6:8.2f} M parameters "
              f"{result['allreduce_ms']:9.2f} ms  {result['bus_GB_s']:6.2f} GB/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="launch", choices=("launch", "train",
                                                                       "allreduce"))
    parser.add_argument("--model", default="vit_cifar")
    parser.add_argument("--batch", type=int, default=64, help="global batch (default 64)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", nargs="*", help="all-reduce sweep: these models only")
    args = parser.parse_args()
    {"launch": launch, "train": train_speed, "allreduce": allreduce_speed}[args.mode](args)


if __name__ == "__main__":
    main()
