"""Dynamic loss scaling for fp16 training, as PyTorch's GradScaler (init 2¹⁶, growth 2, backoff
½, interval 2000):

    scaler = LossScaler(optimizer)      # attaches itself: optimizer.step() unscales and checks
    optimizer.zero_grad()
    scaler.backward(loss)               # backward from s·L instead of L
    optimizer.step(max_grad_norm=1.0)   # g ← g/s on the flat gradient; an inf/NaN skips the step
    scaler.update()                     # on the host: s·½ after a skip, s·2 after 2000 good steps

Why: fp16 gradients below 2⁻²⁴ round to zero; backward from s·L lifts them by s, and the
optimizer divides its flat fp32 gradient by s before clipping and updating. A step whose
gradient is not finite (found = ¬finite(Σ g²): an inf or NaN anywhere makes the sum so, as does
a gradient norm above ~1.8e19) changes nothing of the optimizer: parameters, moments and step
count stay. Scales are powers of two, so scaling is exact in binary floating point: the
unscaled gradients equal an unscaled run's unless something overflowed or fell below the
smallest normal number.

In a CUDA graph (minivit.cuda.capture_step): s and 1/s come through cuda.per_step (each replay
takes the host's current scale), `found` is written into a device flag the scaler owns, the
optimizer's fused update reads that flag and leaves everything as it was when it is set, and
update() reads it after the replay (the one host read per step; the training loop reads the
loss then anyway). A replay advances the optimizer's step count before it knows, so update()
gives a skipped replay's step back.
"""

from minivit import backend, cuda
from minivit.errors import MinivitError


class LossScaler:
    """Dynamic loss scale for `optimizer` (a minivit.optim optimizer), attached to it on
    construction (optimizer.loss_scaler); see the module doc for the protocol."""

    def __init__(self, optimizer, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000):
        for name, ok, expected in (("init_scale", init_scale > 0, "positive"),
                                   ("growth_factor", growth_factor > 1, "greater than 1"),
                                   ("backoff_factor", 0 < backoff_factor < 1, "in (0, 1)"),
                                   ("growth_interval", growth_interval >= 1, "at least 1")):
            if not ok:
                raise MinivitError(f"LossScaler: {name} must be {expected}, got "
                                   f"{locals()[name]}")
        self.optimizer, self.scale = optimizer, float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.good_steps = growth_interval, 0
        self.found = None  # device flag (0-d bool): the last step's gradient was not finite
        self.replayed = False  # the last step was a CUDA graph's replay (see update)
        optimizer.loss_scaler = self

    def backward(self, loss):
        """loss.backward() from scale · 1 (the seed, read per replay in a CUDA graph)."""
        seed = cuda.per_step(loss.data, lambda: (self.scale,), 1)
        if isinstance(seed, tuple):
            grad = backend.array_module(loss.data).full(loss.shape, seed[0], loss.dtype)
        else:
            grad = seed.reshape(loss.shape)
        loss.backward(grad)

    def unscale(self, grads):
        """grads ← grads / scale in place (the optimizer's flat gradient, after any
        all-reduce); returns whether it holds an inf or NaN: a bool, or while a CUDA graph
        records, the device flag (nothing may be read on the host then)."""
        recording = cuda.recording(grads)
        inverse = cuda.per_step(grads, self._replay_inverse, 1)
        if not recording:  # an eager step (per_step has just called _replay_inverse)
            self.replayed = False
        grads *= inverse[0] if isinstance(inverse, tuple) else inverse
        xp = backend.array_module(grads)
        if self.found is None:  # made by the first (eager) step: a graph's replays write it
            self.found = xp.zeros((), bool)
        xp.logical_not(xp.isfinite(cuda.dot(grads, grads)), out=self.found)
        return self.found if recording else bool(self.found)

    def _replay_inverse(self):
        """1/scale for this step: called by per_step in an eager step, and before each replay
        of a recorded one (which is how update() knows a replay ran; recording sets nothing)."""
        self.replayed = True
        return (1.0 / self.scale,)

    def update(self):
        """After each optimizer step, on the host: halve the scale (backoff) when the step's
        gradient was not finite, else count a good step and grow the scale after
        `growth_interval` of them in a row. Returns whether the step was skipped."""
        if self.found is None:
            raise MinivitError("LossScaler.update() comes after optimizer.step(), which has "
                               "not run yet")
        skipped = bool(self.found)
        if skipped:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            if self.replayed:  # its replay advanced the step count before the check
                self.optimizer.step_count -= 1
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0
        return skipped

    # -- checkpointing (through the optimizer's state_dict, which holds it under "loss_scale")
    def state_dict(self):
        """What a resume needs to go on exactly: the scale and the run of good steps."""
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state):
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def scaled_backward(loss, optimizer):
    """loss.backward(), through the optimizer's LossScaler when it has one."""
    if optimizer.loss_scaler is None:
        loss.backward()
    else:
        optimizer.loss_scaler.backward(loss)


def current_scale(optimizer):
    """The factor the optimizer's gradients carry before its step unscales them (1 unscaled)."""
    return 1.0 if optimizer.loss_scaler is None else optimizer.loss_scaler.scale


def updating_scale(step, optimizer):
    """`step(*args)` followed, when the optimizer has a LossScaler, by its update() on the
    host (after an eager step or a CUDA graph's replay alike)."""
    if optimizer.loss_scaler is None:
        return step

    def run(*args):
        result = step(*args)
        optimizer.loss_scaler.update()
        return result
    return run
