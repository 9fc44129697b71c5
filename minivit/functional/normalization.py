"""layer_norm over the last dimension: the Function, its plain code and its fast implementations
(CPU: minivit.cpu.normalization; GPU: minivit.cuda.normalization)."""

from minivit import backend
from minivit.cpu import normalization as cpu_normalization
from minivit.cuda import normalization as cuda_normalization
from minivit.errors import ShapeError
from minivit.functional.registry import DispatchedFunction, implementation


# -- layer_norm: x̂ = (x − μ)·r, r = 1/√(σ² + ε);  y = x̂ w + b
#    dx = r (dx̂ − mean(dx̂) − x̂ mean(dx̂ ⊙ x̂)),  dx̂ = dy w;  dw = Σ dy ⊙ x̂;  db = Σ dy
#    Every implementation saves (x̂, r, w): r has the shape of x with its last axis 1.
class LayerNorm(DispatchedFunction):
    def forward(self, x, weight, bias, eps=1e-6):
        features = x.shape[-1]
        for name, param in (("weight", weight), ("bias", bias)):
            if param is not None and param.shape != (features,):
                raise ShapeError(f"layer_norm: {name} must have shape ({features},) to match "
                                 f"the input's last dimension; got {param.shape}")
        return self.dispatch("layer_norm", (x, weight, bias), x, weight, bias, eps)


def layer_norm(x, weight=None, bias=None, eps=1e-6):
    """Normalise over the last dimension (eps 1e-6 as timm's ViT), then scale and shift."""
    return LayerNorm()(x, weight, bias, eps=eps)


def _kernels_of(module):
    """The implementation running `module`'s layer_norm_forward/_backward: minivit.cuda's one
    CUDA block per row (μ, σ², x̂, y, r in one pass; dw, db as column sums) or minivit.cpu's
    row blocks on minivit's threads (out= buffers; numba inside when installed)."""
    class Kernels:
        def forward(x, weight, bias, eps):
            out, normalized, rstd = module.layer_norm_forward(x, weight, bias, eps)
            return out, (normalized, rstd, weight)

        def backward(saved, grad, needs):
            return module.layer_norm_backward(grad, *saved, needs)
    return Kernels


implementation("layer_norm", "cuda")(_kernels_of(cuda_normalization))
implementation("layer_norm", "cpu")(_kernels_of(cpu_normalization))


@implementation("layer_norm", "plain")
class _PlainLayerNorm:
    def forward(x, weight, bias, eps):
        xp = backend.array_module(x)
        mean = x.mean(axis=-1, keepdims=True)
        centered = x - mean
        variance = (centered * centered).mean(axis=-1, keepdims=True)
        rstd = 1.0 / xp.sqrt(variance + eps)
        normalized = centered * rstd
        out = normalized * weight if weight is not None else normalized.copy()
        if bias is not None:
            out += bias
        return out, (normalized, rstd, weight)

    def backward(saved, grad, needs):
        normalized, rstd, weight = saved
        grad_normalized = grad * weight if weight is not None else grad
        grad_x = None
        if needs[0]:
            mean_grad = grad_normalized.mean(axis=-1, keepdims=True)
            mean_grad_dot = (grad_normalized * normalized).mean(axis=-1, keepdims=True)
            grad_x = rstd * (grad_normalized - mean_grad - normalized * mean_grad_dot)
        leading = tuple(range(grad.ndim - 1))
        grad_w = (grad * normalized).sum(axis=leading) if needs[1] else None
        grad_b = grad.sum(axis=leading) if needs[2] else None
        return grad_x, grad_w, grad_b
