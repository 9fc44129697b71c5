"""The ops of DINO's projection head: L2 normalisation of feature vectors and the linear layer
with a weight-normalised matrix (W = g · v / ‖v‖ per output row, Salimans & Kingma 2016)."""

from minivit import backend
from minivit.errors import ShapeError
from minivit.tensor import Function

L2_EPS = 1e-12  # torch.nn.functional.normalize's floor under the norm


# -- l2_normalize: y = x / max(‖x‖, ε) along the last axis;
#    dx = (dy − y ⟨y, dy⟩) / ‖x‖ where ‖x‖ > ε, and dy / ε where the floor holds (y = x / ε)
class L2Normalize(Function):
    def forward(self, x):
        xp = backend.array_module(x)
        norm = xp.sqrt((x * x).sum(axis=-1, keepdims=True))
        self.floored = norm <= L2_EPS
        self.norm = xp.maximum(norm, L2_EPS).astype(x.dtype, copy=False)
        self.out = x / self.norm
        return self.out

    def backward(self, grad):
        y = backend.array_module(grad).where(self.floored, 0.0, self.out).astype(grad.dtype,
                                                                                 copy=False)
        return ((grad - y * (y * grad).sum(axis=-1, keepdims=True)) / self.norm,)


# -- weight_norm_linear: y = x Wᵀ, W_o = g_o v_o / ‖v_o‖ (row o of v (out, in), g (out, 1));
#    dW = dyᵀ x,  dx = dy W,  dg_o = ⟨dW_o, v̂_o⟩,  dv_o = (g_o / ‖v_o‖)(dW_o − ⟨dW_o, v̂_o⟩ v̂_o)
class WeightNormLinear(Function):
    def forward(self, x, v, g):
        if v.ndim != 2 or g.shape != (v.shape[0], 1) or x.shape[-1] != v.shape[1]:
            raise ShapeError(f"weight_norm_linear: expected x (..., {v.shape[-1]}), v (out, in) "
                             f"and g (out, 1); got x {tuple(x.shape)}, v {tuple(v.shape)}, "
                             f"g {tuple(g.shape)}")
        xp = backend.array_module(x)
        self.v_norm = xp.sqrt((v * v).sum(axis=1, keepdims=True))
        self.direction = v / self.v_norm
        self.g, self.x = g, x
        self.weight = g * self.direction
        return x @ self.weight.T

    def backward(self, grad):
        x2 = self.x.reshape(-1, self.x.shape[-1])
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = (grad @ self.weight) if self.needs_input_grad[0] else None
        grad_w = g2.T @ x2
        along = (grad_w * self.direction).sum(axis=1, keepdims=True)
        grad_v = (self.g / self.v_norm) * (grad_w - along * self.direction) \
            if self.needs_input_grad[1] else None
        return grad_x, grad_v, along if self.needs_input_grad[2] else None


def l2_normalize(x):
    """x / max(‖x‖₂, 1e-12) along the last axis (torch.nn.functional.normalize)."""
    return L2Normalize()(x)


def weight_norm_linear(x, v, g):
    """x Wᵀ with W = g · v / ‖v‖ row-wise: torch.nn.utils.weight_norm(Linear(bias=False))'s
    forward, with its parameters weight_v = v (out, in) and weight_g = g (out, 1)."""
    return WeightNormLinear()(x, v, g)
