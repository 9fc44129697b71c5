"""Optimizers over one flat parameter buffer, the learning-rate schedule, gradient clipping.

On construction an optimizer copies every parameter into one contiguous buffer and points each
``parameter.data`` at its slice, so an update is a handful of vectorised calls over the whole
model instead of a Python loop over ~100 tensors. (Move the model to its backend/dtype before
creating the optimizer; ``load_state_dict`` copies in place and keeps the views, and ``step``
refuses to run once a parameter's ``.data`` has been replaced.)
"""

import math

import numpy as np

from minivit import backend, cpu, cuda
from minivit.errors import MinivitError

# Parameters that get no weight decay, as in timm: biases, norm weights, embeddings.
_NO_DECAY_NAMES = ("cls_token", "pos_embed")


def decays(name, parameter):
    """True when AdamW's weight decay applies: matrices and kernels, not biases/norms/embeddings."""
    return parameter.ndim >= 2 and name.rsplit(".", 1)[-1] not in _NO_DECAY_NAMES


class FlatOptimizer:
    """Base class: the flat buffers (parameters, gradients, decay mask) and the step protocol."""

    def __init__(self, named_parameters, lr, weight_decay):
        pairs = list(named_parameters)
        for item in pairs:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"{type(self).__name__} takes model.named_parameters(): (name, "
                                f"parameter) pairs, whose names decide which parameters get "
                                f"weight decay (not biases, norms, cls_token or pos_embed); got "
                                f"a {type(item).__name__} (model.parameters()?)")
        named = [(name, p) for name, p in pairs if p.requires_grad]
        if not named:
            raise MinivitError("the optimizer got no parameters that require grad")
        self.names = [name for name, _ in named]
        self.parameters = [p for _, p in named]
        xp = backend.array_module(*(p.data for p in self.parameters))
        dtype = self.parameters[0].dtype
        self.xp, self.lr, self.weight_decay, self.step_count = xp, lr, weight_decay, 0
        self.offsets = [0]
        for p in self.parameters:
            self.offsets.append(self.offsets[-1] + p.size)
        self.flat = xp.empty(self.offsets[-1], dtype=dtype)
        self.flat_grad = xp.zeros_like(self.flat)
        self.decay_mask = xp.zeros_like(self.flat)
        for (name, p), start, stop in zip(named, self.offsets, self.offsets[1:]):
            self.flat[start:stop] = p.data.ravel()
            p.data = self.flat[start:stop].reshape(p.shape)
            self.decay_mask[start:stop] = 1.0 if decays(name, p) else 0.0
        self.views = [p.data for p in self.parameters]  # what step() updates, checked there
        # grads -> None, in place, between gathering and clipping: data-parallel training sets
        # it to average the gradients over processes (minivit.distributed.average_gradients)
        self.reduce_gradients = None

    def _check_views(self):
        """Each parameter's .data must still be its slice of the flat buffer: an update would
        otherwise change the buffer and leave the model as it was, silently."""
        for name, p, view in zip(self.names, self.parameters, self.views):
            if p.data is not view:
                raise MinivitError(f"parameter {name} no longer lives in the optimizer's buffer: "
                                   f"its .data was replaced after the optimizer was made "
                                   f"(model.to(...), resample_pos_embed, p.data = ...). Make the "
                                   f"optimizer after such changes")

    def gather_grads(self):
        """Copy each parameter's gradient into the flat gradient buffer (None counts as 0):
        one concatenate call when every gradient is there (one kernel on the GPU)."""
        grads = [p.grad for p in self.parameters]
        # not while a CUDA graph records: CuPy's concatenate of many arrays copies their
        # addresses from the host, which a capture forbids (the copies below are kernels)
        every = all(g is not None and g.shape == p.shape for g, p in zip(grads, self.parameters))
        if every and not cuda.recording(self.flat_grad):
            self.xp.concatenate([grad.reshape(-1) for grad in grads], out=self.flat_grad)
            return self.flat_grad
        for p, start, stop in zip(self.parameters, self.offsets, self.offsets[1:]):
            if p.grad is None:
                self.flat_grad[start:stop] = 0.0
            else:
                self.flat_grad[start:stop] = p.grad.ravel()
        return self.flat_grad

    def zero_grad(self):
        for p in self.parameters:
            p.grad = None

    def _per_replay(self, values, shape):
        """While a CUDA graph records step(): a device array that holds `values()` (of the
        step count and learning rate then current) in each replay; a number given to a kernel
        would stay at its captured value. Recording runs nothing, so the step count goes back;
        each replay advances it before `values()` is read, as an eager step() does."""
        def refill():
            self.step_count += 1
            return values()

        self.step_count -= 1
        return cuda.replay_input(refill, shape, self.flat.dtype)

    def step(self, max_grad_norm=None):
        """One update from the parameters' .grad. With max_grad_norm, the global gradient norm
        is clipped to it first. Returns the gradient norm before clipping, on the device
        (see clip_grad_norm)."""
        self._check_views()
        grads = self.gather_grads()
        if self.reduce_gradients is not None:
            self.reduce_gradients(grads)
        norm = clip_grad_norm(grads, max_grad_norm)
        self.step_count += 1
        self.update(self.flat, grads)
        return norm

    def update(self, params, grads):
        raise NotImplementedError

    # -- checkpointing -----------------------------------------------------------------------
    def state_arrays(self):
        """Named optimizer buffers, for checkpoints (the parameters themselves are saved apart)."""
        return {}

    def state_dict(self):
        return {"step_count": self.step_count, "lr": self.lr,
                "arrays": {k: backend.to_numpy(v).copy() for k, v in self.state_arrays().items()}}

    def load_state_dict(self, state):
        buffers = self.state_arrays()
        arrays = state.get("arrays", {})
        kind = type(self).__name__
        if set(arrays) != set(buffers):
            raise MinivitError(f"{kind}.load_state_dict: this optimizer keeps "
                               f"{', '.join(sorted(buffers)) or 'no buffers'}, the state holds "
                               f"{', '.join(sorted(arrays)) or 'none'}: it was saved by another "
                               f"optimizer")
        for name, buffer in buffers.items():
            if tuple(arrays[name].shape) != tuple(buffer.shape):
                raise MinivitError(f"{kind}.load_state_dict: {name} holds "
                                   f"{arrays[name].size} values, this optimizer's parameters "
                                   f"{buffer.size}: it was saved for another model")
        self.step_count, self.lr = int(state["step_count"]), float(state["lr"])
        for name, buffer in buffers.items():
            buffer[...] = backend.to_backend(arrays[name], backend.backend_of(buffer))


# -- AdamW (Loshchilov & Hutter): m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;
#    θ ← θ − lr·λ·mask·θ − lr·m̂/(√v̂ + ε),  m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)
class AdamW(FlatOptimizer):
    def __init__(self, named_parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.05):
        super().__init__(named_parameters, lr, weight_decay)
        self.betas, self.eps = betas, eps
        self.m = self.xp.zeros_like(self.flat)
        self.v = self.xp.zeros_like(self.flat)
        self.scratch = None  # the plain NumPy/CuPy update's temporary, made on first use

    def update(self, params, grads):
        xp, (beta1, beta2), t = self.xp, self.betas, self.step_count
        m, v = self.m, self.v
        if cuda.handles(params, grads, m, v, self.decay_mask):  # the whole update: one kernel
            def scalars():
                return cuda.adamw_scalars(self.lr, beta1, beta2, self.eps, self.weight_decay,
                                          self.step_count)

            cuda.adamw_update(params, grads, m, v, self.decay_mask,
                              self._per_replay(scalars, (len(cuda.ADAMW_SCALARS),))
                              if cuda.recording(params) else scalars())
            return
        if cpu.handles(params, grads, m, v):  # the same steps in cache-sized chunks, threaded
            cpu.adamw_update(params, grads, m, v, self.decay_mask, self.lr, beta1, beta2,
                             self.eps, self.weight_decay, t)
            return
        if self.scratch is None:
            self.scratch = xp.empty_like(self.flat)
        scratch = self.scratch
        m *= beta1
        m += (1.0 - beta1) * grads
        v *= beta2
        xp.multiply(grads, grads, out=scratch)
        scratch *= 1.0 - beta2
        v += scratch
        if self.weight_decay:
            xp.multiply(params, self.decay_mask, out=scratch)
            scratch *= self.lr * self.weight_decay
            params -= scratch
        step_size = self.lr / (1.0 - beta1 ** t)
        xp.sqrt(v, out=scratch)
        scratch *= 1.0 / math.sqrt(1.0 - beta2 ** t)
        scratch += self.eps
        xp.divide(m, scratch, out=scratch)
        scratch *= step_size
        params -= scratch

    def state_arrays(self):
        return {"m": self.m, "v": self.v}


# -- SGD with momentum: b ← μb + g + λ·mask·θ;  θ ← θ − lr·b --------------------------------------
class SGD(FlatOptimizer):
    def __init__(self, named_parameters, lr=0.01, momentum=0.9, weight_decay=0.0):
        super().__init__(named_parameters, lr, weight_decay)
        self.momentum = momentum
        self.buffer = self.xp.zeros_like(self.flat)

    def update(self, params, grads):
        buffer = self.buffer
        buffer *= self.momentum
        buffer += grads
        if self.weight_decay:
            buffer += self.weight_decay * self.decay_mask * params
        # in a CUDA graph the learning rate is a device value, refilled before each replay
        lr = self._per_replay(lambda: self.lr, ()) if cuda.recording(params) else self.lr
        params -= lr * buffer

    def state_arrays(self):
        return {"momentum": self.buffer}


def clip_grad_norm(grads, max_norm=None):
    """Global L2 norm of a flat gradient, on the gradient's device (a 0-d CuPy array; a NumPy
    scalar on the CPU: float() it to print or log); with max_norm, scale the gradient in place
    by min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ does (a NaN norm
    makes every entry NaN). Nothing here reads a value on the host, so a GPU step never waits
    for the GPU (float(norm) would)."""
    xp = backend.array_module(grads)
    # dot: no temporary the size of the model; not while a CUDA graph records (dot is cuBLAS
    # through CuPy, which refuses to run then)
    norm = xp.sqrt(xp.dot(grads, grads)) if grads.ndim == 1 and not cuda.recording(grads) else \
        xp.sqrt((grads * grads).sum())
    if max_norm:
        grads *= xp.minimum(1.0, max_norm / (norm + 1e-6))
    return norm


def warmup_cosine(step, total_steps, base_lr, warmup_steps=0, min_lr=0.0):
    """Linear warmup from 0 to base_lr over warmup_steps, then cosine decay to min_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))
