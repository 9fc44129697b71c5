"""softmax, log_softmax and gelu."""

import math

from minivit import backend, cpu, cuda
from minivit.tensor import Function, is_grad_enabled


def softmax_array(x, axis=-1):
    """Max-subtracted softmax on a raw array (shared by softmax, attention, cross-entropy)."""
    if cuda.handles(x) and x.ndim and axis in (-1, x.ndim - 1):
        return cuda.softmax(x)  # fused: one CUDA block per row
    if cpu.handles(x) and x.ndim and axis in (-1, x.ndim - 1):
        return cpu.softmax_forward(x)  # row blocks on minivit's threads
    xp = backend.array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    e = xp.exp(shifted)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def log_softmax_array(x, axis=-1):
    """Max-subtracted log-softmax on a raw array: x - max - log Σ exp(x - max)."""
    if cuda.handles(x) and x.ndim and axis in (-1, x.ndim - 1):
        return cuda.softmax(x, log=True)
    xp = backend.array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)
    shifted -= xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    return shifted


def softmax_backward_array(probs, grad, axis=-1):
    """dx = p ⊙ (dp − Σ dp ⊙ p) for p = softmax(x)."""
    if cuda.handles(probs, grad) and probs.ndim and axis in (-1, probs.ndim - 1):
        return cuda.softmax_backward(probs, grad)
    if cpu.handles(probs, grad) and probs.ndim and axis in (-1, probs.ndim - 1):
        return cpu.softmax_backward(probs, grad)
    return probs * (grad - (grad * probs).sum(axis=axis, keepdims=True))


# -- softmax: p = eˣ / Σ eˣ;  dx = p ⊙ (dp − Σ dp ⊙ p) ------------------------------------------
class Softmax(Function):
    def forward(self, x, axis=-1):
        self.axis = axis
        self.probs = softmax_array(x, axis)
        return self.probs

    def backward(self, grad):
        return (softmax_backward_array(self.probs, grad, self.axis),)


def softmax(x, axis=-1):
    return Softmax()(x, axis=axis)


# -- log_softmax: y = x − log Σ eˣ;  dx = dy − softmax(x) Σ dy ---------------------------------
class LogSoftmax(Function):
    def forward(self, x, axis=-1):
        self.axis = axis
        self.out = log_softmax_array(x, axis)
        return self.out

    def backward(self, grad):
        xp = backend.array_module(grad)
        return (grad - xp.exp(self.out) * grad.sum(axis=self.axis, keepdims=True),)


def log_softmax(x, axis=-1):
    return LogSoftmax()(x, axis=axis)


# -- gelu, exact: y = x Φ(x), Φ(x) = ½(1 + erf(x/√2));  dy/dx = Φ(x) + x φ(x), φ = e^(−x²/2)/√(2π)
# -- gelu, tanh:  y = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³);
#                dy/dx = ½(1 + tanh u) + ½x(1 − tanh²u) √(2/π)(1 + 3·0.044715x²)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_COEFF = 0.044715


class GELU(Function):
    def forward(self, x, approximate="none"):
        xp = backend.array_module(x)
        self.x, self.approximate, self.derivative = x, approximate, None
        self.fused = cuda.handles(x)
        if self.fused:  # one CUDA kernel (erff/erf, tanhf/tanh); backward recomputes from x
            return cuda.gelu_forward(x, approximate)
        if cpu.handles(x) and approximate in ("none", "tanh"):
            # chunked on minivit's threads; keeps only dy/dx (float32: erfc-based Φ, see cpu.py)
            need_grad = is_grad_enabled() and self.needs_input_grad[0]
            out, self.derivative = cpu.gelu_forward(x, approximate, need_grad)
            del self.x
            return out
        if approximate == "tanh":
            self.t = xp.tanh(_SQRT_2_OVER_PI * (x + _TANH_COEFF * x ** 3))
            return 0.5 * x * (1.0 + self.t)
        if approximate != "none":
            raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.cdf = 0.5 * (1.0 + backend.erf(x * _INV_SQRT_2))
        return x * self.cdf

    def backward(self, grad):
        if self.derivative is not None:
            return (cpu.gelu_backward(grad, self.derivative),)
        xp = backend.array_module(grad)
        x = self.x
        if self.fused:
            return (cuda.gelu_backward(grad, x, self.approximate),)
        if self.approximate == "tanh":
            t = self.t
            du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_COEFF * x * x)
            return (grad * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du),)
        pdf = _INV_SQRT_2PI * xp.exp(-0.5 * x * x)
        return (grad * (self.cdf + x * pdf),)


def gelu(x, approximate="none"):
    """GELU; approximate="none" is the exact erf form (timm/PyTorch default), "tanh" the
    tanh approximation."""
    return GELU()(x, approximate=approximate)
