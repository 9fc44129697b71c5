"""layer_norm over the last dimension, with a fused backward."""

from minivit import backend, cpu, cuda
from minivit.errors import ShapeError
from minivit.tensor import Function


# -- layer_norm: x̂ = (x − μ)·r, r = 1/√(σ² + ε);  y = x̂ w + b
#    dx = r (dx̂ − mean(dx̂) − x̂ mean(dx̂ ⊙ x̂)),  dx̂ = dy w;  dw = Σ dy ⊙ x̂;  db = Σ dy
class LayerNorm(Function):
    def forward(self, x, weight, bias, eps=1e-6):
        features = x.shape[-1]
        for name, param in (("weight", weight), ("bias", bias)):
            if param is not None and param.shape != (features,):
                raise ShapeError(f"layer_norm: {name} must have shape ({features},) to match "
                                 f"the input's last dimension; got {param.shape}")
        self.weight = weight
        if cuda.handles(x, weight, bias):  # one CUDA block per row: μ, σ², x̂, y, r in one pass
            out, self.normalized, self.rstd = cuda.layer_norm_forward(x, weight, bias, eps)
            return out
        if cpu.handles(x, weight, bias):  # row blocks on minivit's threads, out= buffers
            out, self.normalized, self.rstd = cpu.layer_norm_forward(x, weight, bias, eps)
            return out
        xp = backend.array_module(x)
        mean = x.mean(axis=-1, keepdims=True)
        centered = x - mean
        variance = (centered * centered).mean(axis=-1, keepdims=True)
        self.rstd = 1.0 / xp.sqrt(variance + eps)
        self.normalized = centered * self.rstd
        self.weight = weight
        out = self.normalized * weight if weight is not None else self.normalized.copy()
        if bias is not None:
            out += bias
        return out

    def backward(self, grad):
        normalized, weight = self.normalized, self.weight
        if cuda.handles(grad, normalized, weight):  # dx: one block per row; dw, db: column sums
            return cuda.layer_norm_backward(grad, normalized, self.rstd, weight,
                                            self.needs_input_grad)
        if cpu.handles(grad, normalized, weight):
            return cpu.layer_norm_backward(grad, normalized, self.rstd, weight,
                                           self.needs_input_grad)
        grad_normalized = grad * weight if weight is not None else grad
        grad_x = None
        if self.needs_input_grad[0]:
            mean_grad = grad_normalized.mean(axis=-1, keepdims=True)
            mean_grad_dot = (grad_normalized * normalized).mean(axis=-1, keepdims=True)
            grad_x = self.rstd * (grad_normalized - mean_grad - normalized * mean_grad_dot)
        leading = tuple(range(grad.ndim - 1))
        grad_w = (grad * normalized).sum(axis=leading) if self.needs_input_grad[1] else None
        grad_b = grad.sum(axis=leading) if self.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def layer_norm(x, weight=None, bias=None, eps=1e-6):
    """Normalise over the last dimension (eps 1e-6 as timm's ViT), then scale and shift."""
    return LayerNorm()(x, weight, bias, eps=eps)
