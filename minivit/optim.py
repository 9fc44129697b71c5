"""Optimizers over one flat parameter buffer, the learning-rate schedule, gradient clipping.

On construction an optimizer copies every parameter into one contiguous buffer and points each
``parameter.data`` at its slice, so an update is a handful of vectorised calls over the whole
model instead of a Python loop over ~100 tensors. (Move the model to its backend/dtype before
creating the optimizer; ``load_state_dict`` copies in place and keeps the views, and ``step``
refuses to run once a parameter's ``.data`` has been replaced.)
"""

import math


from minivit import backend, cuda
from minivit.errors import MinivitError
from minivit.functional import optimizer_update

# Parameters that get no weight decay, as in timm: biases, norm weights, embeddings.
_NO_DECAY_NAMES = ("cls_token", "dist_token", "pos_embed", "pos_embed_row", "pos_embed_col",
                   "pos_embed_cls", "relative_position_bias_table")


def decays(name, parameter):
    """True when AdamW's weight decay applies: matrices and kernels, not biases/norms/embeddings."""
    return parameter.ndim >= 2 and name.rsplit(".", 1)[-1] not in _NO_DECAY_NAMES


class FlatOptimizer:
    """Base class: the flat buffers (parameters, gradients, decay mask) and the step protocol.
    A subclass gives its per-step numbers as step_scalars() (a tuple of `scalar_count`
    numbers) and applies them in update(params, grads, scalars); step() hands them over
    through minivit.cuda.per_step, so a replayed CUDA graph reads each replay's numbers."""

    scalar_count = 0

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
        # a minivit.loss_scale.LossScaler (fp16 training) sets itself here: step() unscales the
        # gradient and skips the update when it is not finite
        self.loss_scaler = None

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
        if all(g is not None and g.shape == p.shape for g, p in zip(grads, self.parameters)):
            return cuda.concatenate([grad.reshape(-1) for grad in grads], out=self.flat_grad)
        for p, start, stop in zip(self.parameters, self.offsets, self.offsets[1:]):
            if p.grad is None:
                self.flat_grad[start:stop] = 0.0
            else:
                self.flat_grad[start:stop] = p.grad.ravel()
        return self.flat_grad

    def zero_grad(self):
        for p in self.parameters:
            p.grad = None

    def _advance(self):
        self.step_count += 1

    def step(self, max_grad_norm=None):
        """One update from the parameters' .grad. With max_grad_norm, the global gradient norm
        is clipped to it first. Returns the gradient norm before clipping, on the device
        (see clip_grad_norm)."""
        return self.step_from(self.step_grads(), max_grad_norm)

    def step_from(self, grads, max_grad_norm=None):
        """step() from the flat gradient of step_grads(), which the caller may have changed
        (DINO clips each parameter's part): unscaled (fp16), skipped when not finite, clipped
        to max_grad_norm, applied. Returns the gradient norm before clipping, as step()."""
        found = False if self.loss_scaler is None else self.loss_scaler.unscale(grads)
        if found is True:  # an eager step whose gradient overflowed: skipped, nothing changes
            return clip_grad_norm(grads)
        norm = clip_grad_norm(grads, max_grad_norm)
        # while a CUDA graph records, `found` is a device flag that the update itself obeys
        self.apply(grads, skip=None if found is False else found)
        return norm

    def step_grads(self):
        """This step's flat gradient: the parameters' .grad gathered (their views checked) and,
        with several processes, averaged (reduce_gradients)."""
        self._check_views()
        grads = self.gather_grads()
        if self.reduce_gradients is not None:
            self.reduce_gradients(grads)
        return grads

    def apply(self, grads, skip=None):
        """Advance the step count and update the parameters from the flat gradient `grads`."""
        scalars = cuda.per_step(self.flat, self.step_scalars, self.scalar_count,
                                advance=self._advance)
        self.update(self.flat, grads, scalars, skip=skip)

    def step_scalars(self):
        """This step's numbers for update() (the step count already advanced)."""
        raise NotImplementedError

    def update(self, params, grads, scalars, skip=None):
        """Apply this step's update; `skip`: None, or a device flag (a loss scaler's, while a
        CUDA graph records) that, when set, leaves params and the optimizer state unchanged."""
        raise NotImplementedError

    # -- checkpointing -----------------------------------------------------------------------
    def state_arrays(self):
        """Named optimizer buffers, for checkpoints (the parameters themselves are saved apart)."""
        return {}

    def state_dict(self):
        """step_count, lr, the buffers (numpy copies) under "arrays" and, for fp16 training,
        the LossScaler's state under "loss_scale"."""
        state = {"step_count": self.step_count, "lr": self.lr,
                 "arrays": {k: backend.to_numpy(v).copy() for k, v in self.state_arrays().items()}}
        if self.loss_scaler is not None:
            state["loss_scale"] = self.loss_scaler.state_dict()
        return state

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
        # a state saved without loss scaling (or before checkpoints kept it) leaves the
        # scaler at its initial scale; one saved with it means nothing to an unscaled run
        if self.loss_scaler is not None and "loss_scale" in state:
            self.loss_scaler.load_state_dict(state["loss_scale"])


# -- AdamW (Loshchilov & Hutter): the math and its implementations are in
#    minivit.functional.optimizer_update
class AdamW(FlatOptimizer):
    scalar_count = len(optimizer_update.ADAMW_SCALARS)

    def __init__(self, named_parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.05):
        super().__init__(named_parameters, lr, weight_decay)
        self.betas, self.eps = betas, eps
        self.m = self.xp.zeros_like(self.flat)
        self.v = self.xp.zeros_like(self.flat)
        self.scratch = None  # the plain NumPy/CuPy update's temporary, made on first use

    def step_scalars(self):
        return optimizer_update.adamw_scalars(self.lr, self.betas, self.eps, self.weight_decay,
                                              self.step_count)

    def update(self, params, grads, scalars, skip=None):
        optimizer_update.adamw_update(params, grads, self.m, self.v, self.decay_mask, scalars,
                                      self._scratch, skip)

    def _scratch(self):
        if self.scratch is None:
            self.scratch = self.xp.empty_like(self.flat)
        return self.scratch

    def state_arrays(self):
        return {"m": self.m, "v": self.v}


# -- SGD with momentum: b ← μb + g + λ·mask·θ;  θ ← θ − lr·b --------------------------------------
class SGD(FlatOptimizer):
    scalar_count = 1

    def __init__(self, named_parameters, lr=0.01, momentum=0.9, weight_decay=0.0):
        super().__init__(named_parameters, lr, weight_decay)
        self.momentum = momentum
        self.buffer = self.xp.zeros_like(self.flat)

    def step_scalars(self):
        return (self.lr,)

    def update(self, params, grads, scalars, skip=None):
        if skip is not None:
            raise MinivitError("fp16 loss scaling inside a CUDA graph needs AdamW (its fused "
                               "update can skip a step on the device); use --optimizer adamw, "
                               "or leave out --cuda-graph with sgd")
        buffer = self.buffer
        buffer *= self.momentum
        buffer += grads
        if self.weight_decay:
            buffer += self.weight_decay * self.decay_mask * params
        params -= scalars[0] * buffer

    def state_arrays(self):
        return {"momentum": self.buffer}


def clip_grad_norm(grads, max_norm=None):
    """Global L2 norm of a flat gradient, on the gradient's device (a 0-d CuPy array; a NumPy
    scalar on the CPU: float() it to print or log); with max_norm, scale the gradient in place
    by min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ does (a NaN norm
    makes every entry NaN). Nothing here reads a value on the host, so a GPU step never waits
    for the GPU (float(norm) would)."""
    xp = backend.array_module(grads)
    # dot: no temporary the size of the model (cuda.dot: also while a CUDA graph records)
    norm = xp.sqrt(cuda.dot(grads, grads)) if grads.ndim == 1 else xp.sqrt((grads * grads).sum())
    if max_norm:
        grads *= xp.minimum(1.0, max_norm / (norm + 1e-6))
    return norm


def warmup_cosine(step, total_steps, base_lr, warmup_steps=0, min_lr=0.0):
    """Linear warmup from 0 to base_lr over warmup_steps, then cosine decay to min_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))
