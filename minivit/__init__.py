"""minivit: Vision Transformers on a small hand-written autograd engine (NumPy/CuPy)."""

from minivit.backend import get_backend, manual_seed, set_backend
# the engine first: the ops, layers and checkpoints below build on it
from minivit.tensor import Function, Tensor, is_grad_enabled, no_grad
from minivit.checkpoint import load, save
from minivit.creation import ones, randn, zeros  # and minivit.tensor(...): see creation
from minivit.gradcheck import gradcheck

__version__ = "0.1.0"

__all__ = ["Function", "Tensor", "get_backend", "gradcheck", "is_grad_enabled", "load",
           "manual_seed", "no_grad", "ones", "randn", "save", "set_backend", "zeros",
           "__version__"]
