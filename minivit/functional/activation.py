"""softmax, log_softmax and gelu: the Functions, their plain code and their fast implementations
(CPU: minivit.cpu.activation; GPU: minivit.cuda.activation)."""

from minivit import backend
from minivit.cpu import activation as cpu_activation
from minivit.cuda import activation as cuda_activation
from minivit.functional.registry import DispatchedFunction, choose, implementation
from minivit.mathconst import INV_SQRT_2, INV_SQRT_2PI, SQRT_2_OVER_PI, TANH_COEFF
from minivit.tensor import is_grad_enabled


def _over_last_axis(x, *rest, axis=-1):
    """The fused row kernels work along the last axis only."""
    return x.ndim > 0 and axis in (-1, x.ndim - 1)


# -- softmax: p = eˣ / Σ eˣ;  dx = p ⊙ (dp − Σ dp ⊙ p)   (every implementation saves (p, axis))
class Softmax(DispatchedFunction):
    def forward(self, x, axis=-1):
        return self.dispatch("softmax", (x,), x, axis=axis)


def softmax(x, axis=-1):
    return Softmax()(x, axis=axis)


def row_softmax(x):
    """softmax over the last axis of a raw array, by the implementation that runs on it:
    (p, that implementation), whose backward((p, -1), dp, (True,)) gives dx (for attention,
    which keeps both so that its backward runs the softmax its forward ran)."""
    impl = choose("softmax", x, axis=-1)
    return impl.forward(x, axis=-1)[0], impl


@implementation("softmax", "cuda", accepts=_over_last_axis)
class _FusedSoftmax:  # one CUDA block per row
    def forward(x, axis=-1):
        p = cuda_activation.softmax(x)
        return p, (p, axis)

    def backward(saved, grad, needs):
        return (cuda_activation.softmax_backward(saved[0], grad),)


@implementation("softmax", "cpu", accepts=_over_last_axis)
class _ChunkedSoftmax:  # row blocks on minivit's threads
    def forward(x, axis=-1):
        p = cpu_activation.softmax_forward(x)
        return p, (p, axis)

    def backward(saved, grad, needs):
        return (cpu_activation.softmax_backward(saved[0], grad),)


@implementation("softmax", "plain")
class _PlainSoftmax:
    def forward(x, axis=-1):
        xp = backend.array_module(x)
        e = xp.exp(x - x.max(axis=axis, keepdims=True))
        e /= e.sum(axis=axis, keepdims=True)
        return e, (e, axis)

    def backward(saved, grad, needs):
        p, axis = saved
        return (p * (grad - (grad * p).sum(axis=axis, keepdims=True)),)


# -- log_softmax: y = x − log Σ eˣ;  dx = dy − softmax(x) Σ dy   (saved: (y, axis)) -------------
class LogSoftmax(DispatchedFunction):
    def forward(self, x, axis=-1):
        return self.dispatch("log_softmax", (x,), x, axis=axis)


def log_softmax(x, axis=-1):
    return LogSoftmax()(x, axis=axis)


def log_softmax_array(x, axis=-1):
    """log_softmax of a raw array (cross-entropy's)."""
    return choose("log_softmax", x, axis=axis).forward(x, axis=axis)[0]


@implementation("log_softmax", "plain")
class _PlainLogSoftmax:
    def forward(x, axis=-1):
        xp = backend.array_module(x)
        shifted = x - x.max(axis=axis, keepdims=True)
        shifted -= xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        return shifted, (shifted, axis)

    def backward(saved, grad, needs):
        y, axis = saved
        xp = backend.array_module(grad)
        return (grad - xp.exp(y) * grad.sum(axis=axis, keepdims=True),)


@implementation("log_softmax", "cuda", accepts=_over_last_axis)
class _FusedLogSoftmax(_PlainLogSoftmax):  # the forward in one CUDA block per row
    def forward(x, axis=-1):
        y = cuda_activation.softmax(x, log=True)
        return y, (y, axis)


# -- gelu, exact: y = x Φ(x), Φ(x) = ½(1 + erf(x/√2));  dy/dx = Φ(x) + x φ(x), φ = e^(−x²/2)/√(2π)
# -- gelu, tanh:  y = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³);
#                dy/dx = ½(1 + tanh u) + ½x(1 − tanh²u) √(2/π)(1 + 3·0.044715x²)
class GELU(DispatchedFunction):
    def forward(self, x, approximate="none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
        need_grad = is_grad_enabled() and self.needs_input_grad[0]
        return self.dispatch("gelu", (x,), x, approximate=approximate, need_grad=need_grad)


def gelu(x, approximate="none"):
    """GELU; approximate="none" is the exact erf form (timm/PyTorch default), "tanh" the
    tanh approximation."""
    return GELU()(x, approximate=approximate)


@implementation("gelu", "cuda")
class _FusedGELU:
    """One CUDA kernel each way (erff/erf, tanhf/tanh). saved: (x, approximate); backward
    recomputes Φ (or tanh u) from x."""

    def forward(x, approximate, need_grad):
        return cuda_activation.gelu_forward(x, approximate), (x, approximate)

    def backward(saved, grad, needs):
        x, approximate = saved
        return (cuda_activation.gelu_backward(grad, x, approximate),)


@implementation("gelu", "cpu")
class _ChunkedGELU:
    """Chunks on minivit's threads (float32: the erfc-based Φ of minivit.cpu.activation).
    saved: dy/dx, computed in the same pass (None without a gradient); backward writes dx
    over it."""

    def forward(x, approximate, need_grad):
        return cpu_activation.gelu_forward(x, approximate, need_grad)

    def backward(derivative, grad, needs):
        return (cpu_activation.gelu_backward(grad, derivative),)


@implementation("gelu", "plain")
class _PlainGELU:
    """saved: (x, approximate, Φ(x) or tanh u)."""

    def forward(x, approximate, need_grad):
        xp = backend.array_module(x)
        if approximate == "tanh":
            t = xp.tanh(SQRT_2_OVER_PI * (x + TANH_COEFF * x ** 3))
            return 0.5 * x * (1.0 + t), (x, approximate, t)
        cdf = 0.5 * (1.0 + backend.erf(x * INV_SQRT_2))
        return x * cdf, (x, approximate, cdf)

    def backward(saved, grad, needs):
        x, approximate, kept = saved
        if approximate == "tanh":
            du = SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_COEFF * x * x)
            return (grad * (0.5 * (1.0 + kept) + 0.5 * x * (1.0 - kept * kept) * du),)
        pdf = INV_SQRT_2PI * backend.array_module(grad).exp(-0.5 * x * x)
        return (grad * (kept + x * pdf),)
