"""Training and inference throughput of minivit, optionally side by side with PyTorch.

``run_benchmark(...)`` (behind ``minivit bench``) builds one of the named configurations,
times full training steps (forward, cross-entropy, backward, AdamW step) and no-grad
inference forwards on random data, and reports images/s, achieved FLOP/s (from
minivit.inspect.cost: 2·MACs per image forward, 3x that for training) and peak memory.

With ``against="torch"`` the same architecture is built in PyTorch (minivit.torch_reference,
loaded with minivit's initial weights), fed the same batch, and run on the same number of
threads. The two are timed ALTERNATELY in the same process, in several
rounds, and each side's median step time is compared, so that a machine that gets busier or
quieter during the run affects both alike. Before PyTorch is even imported, minivit is timed
alone, so the report shows whether PyTorch's threads (OpenMP workers that spin after each op)
slow NumPy down when both live in one process. Python's cyclic garbage collector is paused
while steps are timed (as timeit does), for both: a collection that lands in one framework's
turn would otherwise be charged to it, and it scans PyTorch's objects too.

PyTorch is imported only when asked for; minivit never needs it to run.
"""

import gc
import statistics
import time

import numpy as np

from minivit import backend, cpu
from minivit.bench.machine import machine_info, peak_rss_bytes, traced_peak_bytes
from minivit.bench.profile import profile_ops
from minivit.bench.runners import MinivitRunner, TorchRunner
from minivit.errors import MinivitError
from minivit.inspect.swin_cost import any_model_cost
from minivit.models import model_config
from minivit.precision import set_precision
from minivit.torch_reference import import_torch

# name -> the model (a create_model name, with overrides) and the batch size
CONFIGS = {
    "digits": dict(model="vit_digits", batch=128),
    "cifar": dict(model="vit_cifar", batch=128),
    "vit_s16": dict(model="vit_small_patch16_224", batch=64),
    "vit_b16": dict(model="vit_base_patch16_224", batch=64),
    # a few-millisecond configuration for smoke tests of the command itself
    "tiny": dict(model="vit_digits", overrides=dict(patch_size=4, num_classes=5, embed_dim=16,
                                                    depth=1, num_heads=2), batch=8),
}


def config_model_args(config):
    """The VisionTransformer arguments of a benchmark configuration."""
    if config not in CONFIGS:
        raise MinivitError(f"unknown bench configuration {config!r}; known: {', '.join(CONFIGS)}")
    return model_config(CONFIGS[config]["model"], **CONFIGS[config].get("overrides", {}))


def _time_steps(step, count):
    """Wall-clock seconds of each of `count` calls of step(), with the cyclic garbage collector
    paused (a collection first, so none is pending)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times
    finally:
        if was_enabled:
            gc.enable()


def _summary(times, batch, flops_per_image):
    median = statistics.median(times)
    return {"images_per_s": batch / median, "step_ms": 1e3 * median,
            "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
            "steps": len(times), "flop_per_s": flops_per_image * batch / median}


def _measure_memory(runner, mode, on_gpu):
    """Peak memory of one step of `mode`: on the GPU the peak of bytes in use and the bytes
    the allocator holds (runner.gpu_memory); on the CPU, for minivit, the peak of live NumPy
    arrays (tracemalloc)."""
    step = runner.train_step if mode == "train" else runner.infer_step
    if on_gpu:
        return runner.gpu_memory(step)
    if runner.name == "minivit":
        return {"peak_array_bytes": traced_peak_bytes(step)}
    return {}


def run_benchmark(config="digits", batch=None, steps=10, warmup_steps=2, rounds=3,
                  backend_name="numpy", dtype="float32", against=None, threads=None, tf32=False,
                  modes=("train", "infer"), profile=False, log=None, full_last_block=False,
                  cuda_graph=False, model=None, precision="fp32"):
    """Benchmark one named configuration; returns a JSON-ready dict (see `format_report`).

    steps: timed steps per round, mode and framework; rounds: how many times minivit and
    PyTorch take turns (only with against="torch"); threads: minivit's threads, NumPy BLAS
    and PyTorch intra-op threads (default: the CPUs this process may use); profile: also
    time every op of minivit's steps (profile_ops), after the timed runs; full_last_block:
    minivit computes every token in the last block, as PyTorch/timm do (like-for-like work);
    cuda_graph: minivit's steps are recorded once as CUDA graphs and replayed (GPU only,
    experimental; PyTorch stays eager); model: any named model (minivit info --list) instead of
    a configuration, without stochastic depth, batch 32 by default (a Swin's reference is
    timm's SwinTransformer); precision: minivit.precision's fp32, tf32, bf16 or fp16
    (GPU), PyTorch the same through autocast (and a GradScaler for fp16); tf32=True is
    precision "tf32"."""
    log = log or (lambda message: None)
    for name, value, lowest in (("--steps", steps, 1), ("--rounds", rounds, 1),
                                ("--warmup-steps", warmup_steps, 0), ("--batch", batch, 1),
                                ("--threads", threads, 1)):
        if value is not None and value < lowest:
            raise MinivitError(f"{name} must be at least {lowest}, got {value}")
    if model is not None:
        config, model_args, default_batch = model, model_config(model, drop_path_rate=0.0), 32
    else:
        model_args, default_batch = config_model_args(config), CONFIGS[config]["batch"]
    batch = batch or default_batch
    backend.set_backend(backend_name)
    on_gpu = backend_name == "cupy"
    if threads is not None:
        cpu.set_num_threads(threads)
    threads = cpu.num_threads()
    if cuda_graph and (not on_gpu or profile):
        raise MinivitError("--cuda-graph applies to the GPU (--backend cupy) only, and not "
                           "with --profile (a replayed graph has no ops to time)")
    if tf32:
        if not on_gpu:
            raise MinivitError("--tf32 applies to the GPU (--backend cupy) only")
        if precision not in ("fp32", "tf32"):
            raise MinivitError(f"--tf32 and --precision {precision} ask for two precisions: "
                               f"give one")
        precision = "tf32"
    set_precision(precision, backend_name, dtype)

    cost = any_model_cost(model_args)
    flops = {"train": cost.train_flops, "infer": cost.flops}
    result = {"config": config, "model": model_args, "batch": batch, "dtype": dtype,
              "backend": backend_name, "threads": threads, "tf32": precision == "tf32",
              "precision": precision,
              "full_last_block": bool(full_last_block), "cuda_graph": bool(cuda_graph),
              "steps": steps, "warmup_steps": warmup_steps, "rounds": rounds,
              "flops_per_image": {"forward": cost.flops, "train": cost.train_flops},
              "params": cost.total_params, "against": against}

    log(f"building minivit {config} (batch {batch}, {dtype}, {backend_name})")
    mini = MinivitRunner(model_args, batch, dtype, full_last_block=full_last_block,
                         cuda_graph=cuda_graph, loss_scaling=precision == "fp16")
    # minivit alone first: PyTorch is not even imported yet
    alone = {}
    for mode in modes:
        step = mini.train_step if mode == "train" else mini.infer_step
        _time_steps(step, warmup_steps)
        alone[mode] = _time_steps(step, steps)
        log(f"minivit {mode} alone: {batch / statistics.median(alone[mode]):.1f} images/s")
    memory = {"minivit": {mode: _measure_memory(mini, mode, on_gpu) for mode in modes}}
    result["peak_rss_bytes_minivit_alone"] = peak_rss_bytes()

    torch = runner = None
    if against == "torch":
        torch = import_torch("--against torch", instead="leave out --against")
        device = "cuda" if on_gpu else "cpu"
        if on_gpu:
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
        else:
            torch.set_num_threads(threads)
        runner = TorchRunner(torch, model_args, mini.model.state_dict(), mini.images,
                             mini.labels, device=device, dtype=dtype, precision=precision)
        check = np.abs(mini.logits() - runner.logits()).max()
        result["max_abs_logit_difference"] = float(check)
    elif against is not None:
        raise MinivitError(f"--against: only 'torch' is supported, got {against!r}")

    timings = {"minivit": {}, "torch": {}}
    for mode in modes:
        mini_step = mini.train_step if mode == "train" else mini.infer_step
        if runner is None:
            timings["minivit"][mode] = alone[mode]
            continue
        torch_step = runner.train_step if mode == "train" else runner.infer_step
        _time_steps(mini_step, warmup_steps)  # again: measuring memory emptied the GPU pool
        _time_steps(torch_step, warmup_steps)
        mini_times, torch_times = [], []
        for index in range(rounds):  # take turns; alternate who goes first
            pair = [(mini_step, mini_times), (torch_step, torch_times)]
            for step, times in (pair if index % 2 == 0 else pair[::-1]):
                times.extend(_time_steps(step, steps))
        timings["minivit"][mode], timings["torch"][mode] = mini_times, torch_times
        log(f"{mode}: minivit {batch / statistics.median(mini_times):.1f}, torch "
            f"{batch / statistics.median(torch_times):.1f} images/s")

    result["minivit"] = {mode: dict(_summary(timings["minivit"][mode], batch, flops[mode]),
                                    **memory["minivit"][mode]) for mode in modes}
    result["minivit_alone"] = {mode: _summary(alone[mode], batch, flops[mode]) for mode in modes}
    if runner is not None:
        torch_memory = {mode: _measure_memory(runner, mode, on_gpu) for mode in modes}
        result["torch"] = {mode: dict(_summary(timings["torch"][mode], batch, flops[mode]),
                                      **torch_memory[mode]) for mode in modes}
        result["ratio"] = {mode: result["minivit"][mode]["images_per_s"]
                           / result["torch"][mode]["images_per_s"] for mode in modes}
    result["peak_rss_bytes"] = peak_rss_bytes()
    if profile:
        result["profile"] = {mode: profile_ops(mini, mode, steps=max(1, min(steps, 5)))
                             for mode in modes}
    result["machine"] = machine_info(backend_name, torch)
    return result
