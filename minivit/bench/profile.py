"""Where a step's time goes: wall time per op (forward and backward of every Function), the
optimizer step and the rest, through the engine's hook point (minivit.tensor.op_hook)."""

import time
from collections import defaultdict

from minivit.tensor import op_hook

GEMM_OPS = ("Linear", "Patchify", "MatMul")
ATTENTION_OPS = ("SelfAttention", "ScaledDotProductAttention")


def profile_ops(runner, mode="train", steps=3):
    """Wall time per op over `steps` minivit steps: forward and backward of every Function
    class, the optimizer step, and the rest ("engine + Python": graph bookkeeping, tensor
    creation, the loss's .item(), ...). Returns {"total": s, "ops": {name: s}, "groups": {...}}
    with seconds per step."""
    totals = defaultdict(float)
    # on the GPU an op only queues kernels: wait for them, or the time lands on the next op
    # that synchronises (a .item(), the label check) instead of the op that did the work
    sync = runner.sync if getattr(runner, "backend", "numpy") == "cupy" else (lambda: None)

    def timed(key, method, *args, **kwargs):
        sync()
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            sync()
            totals[key] += time.perf_counter() - start

    def time_op(function, phase, method, arrays, options):
        return timed(f"{type(function).__name__}.{phase}", method, *arrays, **options)

    optimizer_step = runner.optimizer.step
    runner.optimizer.step = lambda *args, **kwargs: timed("optimizer.step", optimizer_step,
                                                          *args, **kwargs)
    step = runner.train_step if mode == "train" else runner.infer_step
    try:
        with op_hook(time_op):
            step()  # warm
            totals.clear()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            total = (time.perf_counter() - start) / steps
    finally:
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
