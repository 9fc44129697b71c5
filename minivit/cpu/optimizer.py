"""AdamW over the flat parameter buffers, in cache-sized chunks on minivit's threads (the math
beside minivit.functional.optimizer_update's plain code), or minivit.cpu.compiled's kernel."""

import numpy as np

from minivit.cpu import pool
from minivit.cpu.pool import CHUNK, blocks, run_tasks, scratch
from minivit.cpu.runtime import compiled


def adamw_update(params, grads, m, v, decay_mask, scalars):
    """One AdamW step over flat buffers, in place; `scalars` as optimizer_update.ADAMW_SCALARS
    names them (numbers). They are taken in the parameters' type: float32 math stays float32."""
    f = params.dtype.type
    beta1, rest1, beta2, rest2, decay, step_size, inv_bias2, eps = (f(s) for s in scalars)
    kernels = compiled()

    def task(s, e):
        if kernels is not None:
            kernels.adamw_update(params[s:e], grads[s:e], m[s:e], v[s:e], decay_mask[s:e],
                                 beta1, rest1, beta2, rest2, eps, decay, step_size, inv_bias2)
            return
        g, ms, vs, ps = grads[s:e], m[s:e], v[s:e], params[s:e]
        tmp = scratch(e - s, params.dtype, 8)
        ms *= beta1
        np.multiply(g, rest1, out=tmp)
        ms += tmp
        vs *= beta2
        np.multiply(g, g, out=tmp)
        tmp *= rest2
        vs += tmp
        if decay:
            np.multiply(ps, decay_mask[s:e], out=tmp)
            tmp *= decay
            ps -= tmp
        np.sqrt(vs, out=tmp)
        tmp *= inv_bias2
        tmp += eps
        np.divide(ms, tmp, out=tmp)
        tmp *= step_size
        ps -= tmp

    run_tasks([lambda s=s, e=e: task(s, e) for s, e in blocks(params.size, CHUNK)],
              parallel=params.size >= pool.MIN_PARALLEL)
