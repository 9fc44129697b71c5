"""An exponential moving average of a model's weights (Polyak averaging, timm's ModelEmaV2).

After every optimizer step:  θ_ema ← d · θ_ema + (1 − d) · θ,   θ_ema starting at θ.

`with ema.applied(model):` puts the averaged weights into the model in place (the optimizer's
views of the parameters stay valid) and puts the trained ones back afterwards, so evaluation
and checkpoints of the average use the ordinary model code.
"""

import contextlib

from minivit import backend
from minivit.errors import MinivitError

EMA_PREFIX = "ema."  # the averaged weights' names in a checkpoint: ema.<parameter name>


class ModelEma:
    def __init__(self, model, decay):
        if not 0 < decay < 1:
            raise MinivitError(f"--ema DECAY must lie in (0, 1), e.g. 0.999; got {decay}")
        self.decay = float(decay)
        self.shadow = {name: p.data.copy() for name, p in model.named_parameters()}

    def update(self, model):
        """One averaging step with the model's current weights."""
        decay = self.decay
        for name, p in model.named_parameters():
            shadow = self.shadow[name]
            shadow *= decay
            shadow += (1.0 - decay) * p.data

    @contextlib.contextmanager
    def applied(self, model):
        """The model holds the averaged weights inside the block, its own ones after it."""
        saved = {name: p.data.copy() for name, p in model.named_parameters()}
        try:
            for name, p in model.named_parameters():
                p.data[...] = self.shadow[name]
            yield model
        finally:
            for name, p in model.named_parameters():
                p.data[...] = saved[name]

    def state_arrays(self):
        """{"ema.<name>": NumPy array}: what a checkpoint stores."""
        return {EMA_PREFIX + name: backend.to_numpy(array) for name, array in
                self.shadow.items()}

    def load_state_arrays(self, arrays, source):
        """Restore the averages from a checkpoint's ema.* arrays (exactly, in place)."""
        missing = sorted(set(self.shadow) - {k[len(EMA_PREFIX):] for k in arrays})
        if missing:
            raise MinivitError(f"{source} holds no averaged weights for "
                               f"{', '.join(EMA_PREFIX + name for name in missing[:5])}: it was "
                               f"written by a run without --ema")
        for name, shadow in self.shadow.items():
            shadow[...] = backend.to_backend(arrays[EMA_PREFIX + name],
                                             backend.backend_of(shadow))
