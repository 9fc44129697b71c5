"""Training and inference throughput of minivit, optionally side by side with PyTorch.

``run_benchmark(...)`` (behind ``minivit bench``) builds one of the named configurations,
times full training steps (forward, cross-entropy, backward, AdamW step) and no-grad
inference forwards on random data, and reports images/s, achieved FLOP/s (from
minivit.inspect.cost: 2·MACs per image forward, 3x that for training) and peak memory.

With ``against="torch"`` the same architecture is built in PyTorch (a small timm-layout ViT
defined below, loaded with minivit's initial weights), fed the same batch, and run on the
same number of threads. The two are timed ALTERNATELY in the same process, in several
rounds, and each side's median step time is compared, so that a machine that gets busier or
quieter during the run affects both alike. Before PyTorch is even imported, minivit is timed
alone, so the report shows whether PyTorch's threads (OpenMP workers that spin after each op)
slow NumPy down when both live in one process. Python's cyclic garbage collector is paused
while steps are timed (as timeit does), for both: a collection that lands in one framework's
turn would otherwise be charged to it, and it scans PyTorch's objects too.

PyTorch is imported only here and only when asked for; minivit never needs it to run.
"""

import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

# name -> model arguments (VisionTransformer) and batch size
CONFIGS = {
    "digits": dict(model=dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64,
                              depth=4, num_heads=4), batch=128),
    "cifar": dict(model=dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=192,
                             depth=6, num_heads=3), batch=128),
    "vit_s16": dict(model=dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                               embed_dim=384, depth=12, num_heads=6), batch=64),
    "vit_b16": dict(model=dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                               embed_dim=768, depth=12, num_heads=12), batch=64),
    # a few-millisecond configuration for smoke tests of the command itself
    "tiny": dict(model=dict(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=16,
                            depth=1, num_heads=2), batch=8),
}


# -- the machine ---------------------------------------------------------------------------------
def _cpu_model():
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(backend_name="numpy", torch_module=None):
    """CPU model, cores, load, library versions and the date, as a dict."""
    import scipy

    from minivit import __version__, cpu

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "minivit": __version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        **_cpu_paths_info(cpu),
        "minivit_threads": cpu.num_threads(),
    }
    if backend_name == "cupy":
        import cupy

        device = cupy.cuda.Device()
        properties = cupy.cuda.runtime.getDeviceProperties(device.id)
        info["cupy"] = cupy.__version__
        info["gpu"] = properties["name"].decode() if isinstance(properties["name"], bytes) \
            else str(properties["name"])
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    if torch_module is not None:
        info["torch"] = torch_module.__version__
        info["torch_threads"] = torch_module.get_num_threads()
        info["torch_interop_threads"] = torch_module.get_num_interop_threads()
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    return info


# -- memory ----------------------------------------------------------------------------------------
def peak_rss_bytes():
    """The process's peak resident set size so far (getrusage; kilobytes on Linux)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def traced_peak_bytes(step):
    """Peak bytes of memory allocated through Python's allocator tracker during step() —
    NumPy registers every array buffer with tracemalloc, so on the CPU this is the peak of
    live arrays (activations, gradients, temporaries) plus Python objects. Slows Python down:
    used in an untimed step only."""
    import tracemalloc

    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        step()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was_tracing:
            tracemalloc.stop()


# -- minivit -----------------------------------------------------------------------------------------
class MinivitRunner:
    """A model, an AdamW optimizer and one fixed random batch; train_step() / infer_step()."""

    name = "minivit"

    def __init__(self, model_args, batch, dtype="float32", seed=0, full_last_block=False,
                 cuda_graph=False):
        import minivit
        from minivit import backend
        from minivit.models import model_from_config
        from minivit.optim import AdamW

        self.backend = backend.get_backend()
        minivit.manual_seed(seed)
        self.model = model_from_config(model_args).to(dtype=dtype)
        self.model.full_last_block = full_last_block
        self.optimizer = AdamW(self.model.named_parameters(), lr=1e-4, weight_decay=0.05)
        rng = np.random.default_rng(seed)
        size, chans = model_args["img_size"], model_args["in_chans"]
        self.images = rng.standard_normal((batch, chans, size, size)).astype(dtype)
        self.labels = rng.integers(0, model_args["num_classes"], batch)
        self.x = backend.to_backend(self.images)
        self.y = backend.to_backend(self.labels)
        self.cuda_graph, self.graphs = cuda_graph, {}  # mode -> cuda.CapturedStep

    def sync(self):
        if self.backend == "cupy":
            from minivit import cuda
            cuda.synchronize()

    def _train(self):
        import minivit.functional as F

        self.model.train()
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def _infer(self):
        from minivit.tensor import no_grad

        self.model.eval()
        with no_grad():
            self.model(self.x)

    def _step(self, mode, body):
        """body() eagerly, or with cuda_graph its CUDA graph (recorded on the first call)."""
        if self.cuda_graph:
            if mode not in self.graphs:
                from minivit import cuda
                self.graphs[mode] = cuda.capture_step(body)
            self.graphs[mode]()
        else:
            body()
        self.sync()

    def train_step(self):
        self._step("train", self._train)

    def infer_step(self):
        self._step("infer", self._infer)

    def logits(self):
        from minivit import backend
        from minivit.tensor import no_grad

        self.model.eval()
        with no_grad():
            return np.asarray(backend.to_numpy(self.model(self.x).data), dtype=np.float64)

    def gpu_memory(self, step):
        """GPU memory over one call of step(): the peak of bytes in use (arrays alive, as
        torch.cuda.max_memory_allocated counts) and what CuPy's pool then holds (freed blocks
        it keeps for reuse included, as torch.cuda.max_memory_reserved counts). With CUDA
        graphs, of the same step run eagerly (a graph's memory is a pool of its own)."""
        from minivit import cuda
        if self.cuda_graph:
            body = self._train if step == self.train_step else self._infer
            step = lambda: (body(), self.sync())  # noqa: E731
        cuda.free_memory()
        with cuda.PeakMemory() as peak:
            step()
        return {"peak_gpu_bytes": peak.bytes, "gpu_pool_bytes": cuda.memory_info()["held"]}


# -- PyTorch (only with --against torch) ------------------------------------------------------------
def import_torch():
    """Import PyTorch, or raise a MinivitError that says how to get it."""
    from minivit.errors import MinivitError

    try:
        import torch
    except ImportError as error:
        raise MinivitError(f"--against torch needs PyTorch, which is not installed ({error}): "
                           f"pip install torch (or 'minivit[parity]'), or leave out --against")
    return torch


def build_torch_swin(model_args):
    """timm's own SwinTransformer (needs timm): minivit's Swin has its names and computation."""
    from minivit.errors import MinivitError

    try:
        from timm.models.swin_transformer import SwinTransformer
    except ImportError as error:
        raise MinivitError(f"--against torch for a Swin model runs timm's SwinTransformer, and "
                           f"timm is not installed ({error}): pip install 'minivit[parity]'")
    return SwinTransformer(**model_args)


def build_torch_vit(torch, model_args):
    """timm's VisionTransformer layout in plain PyTorch: Conv2d patch embedding, class token,
    learned position embedding, pre-norm blocks (LayerNorm eps 1e-6, fused qkv, exact GELU,
    F.scaled_dot_product_attention as timm uses), final norm, linear head on the class token.
    Parameter names equal timm's and minivit's, so minivit's state_dict loads as it is."""
    nn, functional = torch.nn, torch.nn.functional
    dim, heads = model_args["embed_dim"], model_args["num_heads"]
    hidden = int(dim * model_args.get("mlp_ratio", 4.0))
    patch, size, chans = model_args["patch_size"], model_args["img_size"], model_args["in_chans"]
    qkv_bias = model_args.get("qkv_bias", True)

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(chans, dim, patch, stride=patch)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            batch, tokens, _ = x.shape
            qkv = self.qkv(x).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            x = functional.scaled_dot_product_attention(q, k, v)
            return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

        def forward(self, x):
            return self.fc2(functional.gelu(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention()
            self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp()

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class VisionTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = PatchEmbed()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, (size // patch) ** 2 + 1, dim))
            self.blocks = nn.Sequential(*[Block() for _ in range(model_args["depth"])])
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.head = nn.Linear(dim, model_args["num_classes"])

        def forward(self, x):
            x = self.patch_embed(x)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            return self.head(self.norm(self.blocks(x))[:, 0])

    return VisionTransformer()


class TorchRunner:
    name = "torch"

    def __init__(self, torch, model_args, state_dict, images, labels, device="cpu",
                 dtype="float32"):
        self.torch, self.device = torch, device
        torch_dtype = getattr(torch, dtype)
        model = build_torch_swin(model_args) if "depths" in model_args \
            else build_torch_vit(torch, model_args)
        self.model = model.to(device=device, dtype=torch_dtype)
        self.model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                                    for k, v in state_dict.items()})
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05)
        self.x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)

    def sync(self):
        if self.device != "cpu":
            self.torch.cuda.synchronize()

    def train_step(self):
        self.model.train()
        loss = self.torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.sync()

    def infer_step(self):
        self.model.eval()
        with self.torch.no_grad():
            self.model(self.x)
        self.sync()

    def logits(self):
        self.model.eval()
        with self.torch.no_grad():
            return self.model(self.x).double().cpu().numpy()

    def gpu_memory(self, step):
        """The peak of allocated and of reserved GPU bytes over one call of step()."""
        cuda = self.torch.cuda
        cuda.empty_cache()
        cuda.reset_peak_memory_stats()
        step()
        return {"peak_gpu_bytes": int(cuda.max_memory_allocated()),
                "gpu_pool_bytes": int(cuda.max_memory_reserved())}


# -- timing ------------------------------------------------------------------------------------------
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
                  cuda_graph=False, model=None):
    """Benchmark one named configuration; returns a JSON-ready dict (see `format_report`).

    steps: timed steps per round, mode and framework; rounds: how many times minivit and
    PyTorch take turns (only with against="torch"); threads: minivit's threads, NumPy BLAS
    and PyTorch intra-op threads (default: the CPUs this process may use); profile: also
    time every op of minivit's steps (profile_ops), after the timed runs; full_last_block:
    minivit computes every token in the last block, as PyTorch/timm do (like-for-like work);
    cuda_graph: minivit's steps are recorded once as CUDA graphs and replayed (GPU only,
    experimental; PyTorch stays eager); model: a named model (create_model's names, a Swin
    included; batch 32 by default, no stochastic depth) instead of a configuration."""
    from minivit import backend, cpu
    from minivit.errors import MinivitError
    from minivit.inspect.cost import model_cost
    from minivit.inspect.swin_cost import swin_cost

    log = log or (lambda message: None)
    if model is not None:
        from minivit.models import model_config

        config, model_args, default_batch = model, model_config(model, drop_path_rate=0.0), 32
    elif config in CONFIGS:
        model_args, default_batch = dict(CONFIGS[config]["model"]), CONFIGS[config]["batch"]
    else:
        raise MinivitError(f"unknown bench configuration {config!r}; known: {', '.join(CONFIGS)}")
    for name, value, lowest in (("--steps", steps, 1), ("--rounds", rounds, 1),
                                ("--warmup-steps", warmup_steps, 0), ("--batch", batch, 1),
                                ("--threads", threads, 1)):
        if value is not None and value < lowest:
            raise MinivitError(f"{name} must be at least {lowest}, got {value}")
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
        from minivit import cuda
        cuda.set_tf32(True)

    cost = swin_cost(model_args) if "depths" in model_args else model_cost(model_args)
    flops = {"train": cost.train_flops, "infer": cost.flops}
    result = {"config": config, "model": model_args, "batch": batch, "dtype": dtype,
              "backend": backend_name, "threads": threads, "tf32": bool(tf32),
              "full_last_block": bool(full_last_block), "cuda_graph": bool(cuda_graph),
              "steps": steps, "warmup_steps": warmup_steps, "rounds": rounds,
              "flops_per_image": {"forward": cost.flops, "train": cost.train_flops},
              "params": cost.total_params, "against": against}

    log(f"building minivit {config} (batch {batch}, {dtype}, {backend_name})")
    mini = MinivitRunner(model_args, batch, dtype, full_last_block=full_last_block,
                         cuda_graph=cuda_graph)
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
        torch = import_torch()
        device = "cuda" if on_gpu else "cpu"
        if on_gpu:
            torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
            torch.backends.cudnn.allow_tf32 = bool(tf32)
        else:
            torch.set_num_threads(threads)
        runner = TorchRunner(torch, model_args, mini.model.state_dict(), mini.images,
                             mini.labels, device=device, dtype=dtype)
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


# -- per-op profile ------------------------------------------------------------------------------------
GEMM_OPS = ("Linear", "Patchify", "MatMul")
ATTENTION_OPS = ("SelfAttention", "ScaledDotProductAttention")


def _function_classes():
    from minivit.tensor import Function

    found, stack = set(), [Function]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                stack.append(sub)
    return found


def profile_ops(runner, mode="train", steps=3):
    """Wall time per op over `steps` minivit steps: forward and backward of every Function
    class, the optimizer step, and the rest ("engine + Python": graph bookkeeping, tensor
    creation, the loss's .item(), ...). Returns {"total": s, "ops": {name: s}, "groups": {...}}
    with seconds per step."""
    from collections import defaultdict

    totals = defaultdict(float)
    patched = []
    # on the GPU an op only queues kernels: wait for them, or the time lands on the next op
    # that synchronises (a .item(), the label check) instead of the op that did the work
    sync = runner.sync if getattr(runner, "backend", "numpy") == "cupy" else (lambda: None)

    def timed(function, key):
        def wrapper(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                sync()
                totals[key] += time.perf_counter() - start
        return wrapper

    for cls in _function_classes():
        for method in ("forward", "backward"):
            if method in vars(cls):
                original = vars(cls)[method]
                setattr(cls, method, timed(original, f"{cls.__name__}.{method}"))
                patched.append((cls, method, original))
    optimizer_step = runner.optimizer.step
    runner.optimizer.step = timed(optimizer_step, "optimizer.step")
    step = runner.train_step if mode == "train" else runner.infer_step
    try:
        step()  # warm
        totals.clear()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        total = (time.perf_counter() - start) / steps
    finally:
        for cls, method, original in patched:
            setattr(cls, method, original)
        runner.optimizer.step = optimizer_step
    ops = {key: value / steps for key, value in sorted(totals.items(), key=lambda kv: -kv[1])}
    groups = defaultdict(float)
    for key, value in ops.items():
        name = key.split(".")[0]
        group = ("GEMM (linear, patchify, matmul)" if name in GEMM_OPS else
                 "attention (batched GEMMs + softmax)" if name in ATTENTION_OPS else
                 "optimizer (AdamW)" if name == "optimizer" else
                 "elementwise/row-wise ops")
        groups[group] += value
    groups["engine + Python (the rest)"] = total - sum(ops.values())
    return {"mode": mode, "total": total, "ops": ops, "groups": dict(groups)}


def _cpu_paths_info(cpu):
    """What minivit did to BLAS, which CPU kernels ran, and malloc; with the fast paths off
    (MINIVIT_FAST_CPU=0) none of them, and blas_info() is not called: it would set BLAS's
    threads after the timed runs."""
    if not cpu.fast_paths_enabled():
        off = "not used: fast CPU paths off (MINIVIT_FAST_CPU=0)"
        return {"blas": "left as it is: fast CPU paths off (MINIVIT_FAST_CPU=0)",
                "compiled_kernels": off, "memory": "malloc left as it is"}
    return {"blas": cpu.blas_info(), "compiled_kernels": cpu.compiled_kernels_info(),
            "memory": cpu.memory_info()}


def format_profile(profile, batch):
    lines = [f"per-op profile, {profile['mode']}: {1e3 * profile['total']:.1f} ms per step "
             f"({batch / profile['total']:.1f} images/s with the timers on)"]
    for name, value in sorted(profile["groups"].items(), key=lambda item: -item[1]):
        lines.append(f"  {name:<40}{1e3 * value:>9.1f} ms {100 * value / profile['total']:>5.1f}%")
    lines.append("  by op:")
    for name, value in profile["ops"].items():
        if value >= 0.002 * profile["total"]:
            lines.append(f"    {name:<38}{1e3 * value:>9.2f} ms {100 * value / profile['total']:>5.1f}%")
    return "\n".join(lines)


# -- report ------------------------------------------------------------------------------------------
def _human(value, unit):
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(value) < 1000:
            return f"{value:.3g} {prefix}{unit}"
        value /= 1000
    return f"{value:.3g} E{unit}"


def _mib(value):
    """Bytes as MiB (KiB below 1 MiB, so that a small model's peak does not read 0)."""
    return f"{value / 2**20:.0f} MiB" if value >= 2**20 else f"{value / 2**10:.0f} KiB"


def _blas_line(blas):
    """"openblas 0.3.31 (libscipy_openblas), 1 thread (set by minivit)" from blas_info()."""
    if isinstance(blas, str):
        return blas
    libraries = ", ".join(blas["libraries"]) or "not found by threadpoolctl"
    if not blas["controlled"]:
        return f"{libraries}, threads left as they are"
    return f"{libraries}, {_count(blas['threads'], 'thread')} (set by minivit)"


def _count(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "s")


def format_report(result):
    """The human-readable table of a run_benchmark() result."""
    machine = result["machine"]
    lines = [f"minivit bench: {result['config']} (batch {result['batch']}, {result['dtype']}, "
             f"backend {result['backend']}, {_count(result['threads'], 'thread')}"
             + (", TF32" if result["tf32"] else "")
             + (", CUDA graphs" if result.get("cuda_graph") else "")
             + (", full last block" if result.get("full_last_block") else "") + ")",
             f"machine: {machine.get('gpu') or machine['cpu']}, {machine['usable_cores']} usable "
             f"cores of {machine['cores']}, load {', '.join(f'{x:.1f}' for x in machine['load_average'] or [])}",
             "versions: " + ", ".join(f"{k} {machine[k]}" for k in
                                      ("minivit", "python", "numpy", "scipy", "cupy", "torch")
                                      if k in machine),
             f"BLAS: {_blas_line(machine['blas'])}; compiled CPU kernels: "
             f"{machine['compiled_kernels']}; memory: {machine['memory']}; date {machine['date']}"]
    if "max_abs_logit_difference" in result:
        lines.append(f"same weights and batch: max |logits minivit - torch| = "
                     f"{result['max_abs_logit_difference']:.2e}")
    lines.append("")
    header = f"{'mode':<7}{'minivit img/s':>15}{'FLOP/s':>15}"
    if "torch" in result:
        header += f"{'torch img/s':>14}{'FLOP/s':>15}{'ratio':>8}"
    header += f"{'peak memory':>14}"
    if result["backend"] == "cupy" and "torch" in result:
        header += f"{'torch peak':>14}"
    lines.append(header)
    for mode in result["minivit"]:
        mini = result["minivit"][mode]
        row = f"{mode:<7}{mini['images_per_s']:>15.1f}{_human(mini['flop_per_s'], 'FLOP/s'):>15}"
        if "torch" in result:
            other = result["torch"][mode]
            row += (f"{other['images_per_s']:>14.1f}{_human(other['flop_per_s'], 'FLOP/s'):>15}"
                    f"{result['ratio'][mode]:>7.2f}x")
        peak = mini.get("peak_gpu_bytes", mini.get("peak_array_bytes", 0))
        row += f"{_mib(peak):>14}"
        if "torch" in result and "peak_gpu_bytes" in result["torch"][mode]:
            row += f"{_mib(result['torch'][mode]['peak_gpu_bytes']):>14}"
        lines.append(row)
    if "torch" in result:
        alone = result["minivit_alone"]
        lines.append("")
        lines.append("minivit alone (before PyTorch was imported): " + ", ".join(
            f"{mode} {alone[mode]['images_per_s']:.1f} img/s" for mode in alone)
            + "; the table's minivit column was measured taking turns with PyTorch")
        lines.append("ratio = minivit / PyTorch images/s, medians of "
                     f"{result['rounds']} alternating rounds x {result['steps']} steps")
    for mode, profile in result.get("profile", {}).items():
        lines.append("")
        lines.append(format_profile(profile, result["batch"]))
    if result["backend"] == "cupy":
        held = ", ".join(f"{mode} {_mib(result['minivit'][mode]['gpu_pool_bytes'])}"
                         + (f" (torch {_mib(result['torch'][mode]['gpu_pool_bytes'])})"
                            if "torch" in result else "") for mode in result["minivit"])
        lines.append("peak memory: the most GPU bytes in use at once during one step (CuPy "
                     "pool's used bytes; PyTorch: torch.cuda.max_memory_allocated); held by the "
                     f"pool after it (reserved): {held}")
    else:
        lines.append("peak memory: live NumPy arrays at the peak of one step (tracemalloc, "
                     "untimed step); process peak RSS "
                     f"{_mib(result['peak_rss_bytes_minivit_alone'])} with minivit alone, "
                     f"{_mib(result['peak_rss_bytes'])} at the end")
    return "\n".join(lines)


def main_json(result):
    return json.dumps(result, indent=2, default=float)


if __name__ == "__main__":  # python -m minivit.bench CONFIG
    report = run_benchmark(sys.argv[1] if len(sys.argv) > 1 else "digits", against="torch",
                           log=lambda m: print(m, file=sys.stderr))
    print(format_report(report))
