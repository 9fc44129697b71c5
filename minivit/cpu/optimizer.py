"""AdamW over the flat parameter buffers, in cache-sized chunks on minivit's threads: the plain
update of minivit.functional.optimizer_update on each chunk, or minivit.cpu.compiled's kernel."""

import numpy as np

from minivit.cpu import pool
from minivit.cpu.pool import CHUNK, blocks, run_tasks, scratch
from minivit.cpu.runtime import compiled


def adamw_update(params, grads, m, v, decay_mask, scalars, steps):
    """One AdamW step over flat buffers, in place; `scalars` as optimizer_update.ADAMW_SCALARS
    names them (numbers), taken in the parameters' type: float32 math stays float32. Each
    chunk runs the compiled kernel, or `steps(np, params, grads, m, v, decay_mask, scalars,
    scratch)` (the family's whole-array update) on the chunk with a scratch buffer."""
    f = params.dtype.type
    scalars = tuple(f(s) for s in scalars)
    kernels = compiled()

    def task(s, e):
        chunk = (params[s:e], grads[s:e], m[s:e], v[s:e], decay_mask[s:e])
        if kernels is None:
            steps(np, *chunk, scalars, scratch(e - s, params.dtype, 8))
            return
        beta1, rest1, beta2, rest2, decay, step_size, inv_bias2, eps = scalars
        kernels.adamw_update(*chunk, beta1, rest1, beta2, rest2, eps, decay, step_size, inv_bias2)

    run_tasks([lambda s=s, e=e: task(s, e) for s, e in blocks(params.size, CHUNK)],
              parallel=params.size >= pool.MIN_PARALLEL)
