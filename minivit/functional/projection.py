"""The ops of DINO's projection head: batch normalisation of its hidden layers (the reference's
use_bn_in_head), L2 normalisation of feature vectors and the linear layer with a
weight-normalised matrix (W = g · v / ‖v‖ per output row, Salimans & Kingma 2016)."""

from minivit import backend
from minivit.errors import ShapeError
from minivit.tensor import Function

L2_EPS = 1e-12  # torch.nn.functional.normalize's floor under the norm


def summed_over_processes(sums, count, sum_over_processes):
    """(sums, count): sums over this process's rows (an array) and their count (None where only
    the sums matter: nothing is read back to the host), added up over the processes of a
    data-parallel run by one in-place all-reduce, `sum_over_processes(array)`; None (one
    process): as they are."""
    if sum_over_processes is None:
        return sums, count
    if count is None:
        sums = sums.copy()
        sum_over_processes(sums)
        return sums, None
    xp = backend.array_module(sums)
    buffer = xp.concatenate([sums.ravel(), xp.asarray([count], dtype=sums.dtype)])
    sum_over_processes(buffer)
    return buffer[:-1].reshape(sums.shape), int(round(float(buffer[-1])))


# -- batch_norm (training mode: the batch's statistics over axis 0, biased variance):
#    x̂ = (x − μ)·r, r = 1/√(σ² + ε);  y = x̂ w + b
#    dx = r (dx̂ − mean₀(dx̂) − x̂ mean₀(dx̂ ⊙ x̂)),  dx̂ = dy w;  dw = Σ₀ dy ⊙ x̂;  db = Σ₀ dy
#    Synchronised (data parallel, the reference's SyncBatchNorm): the batch is the rows of all
#    processes, so μ, σ² and the two means of the backward are sums over every process's rows
#    (`sum_over_processes`, an in-place all-reduce) divided by the global row count; dw, db
#    stay this process's sums (the optimizer's all-reduce adds them up).
class BatchNorm(Function):
    def forward(self, x, weight, bias, eps=1e-5, sum_over_processes=None):
        if x.ndim != 2 or weight.shape != (x.shape[1],) or bias.shape != (x.shape[1],):
            raise ShapeError(f"batch_norm: expected x (batch ≥ 2, C) with weight and bias (C,); "
                             f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias "
                             f"{tuple(bias.shape)}")
        xp = backend.array_module(x)
        self.sum_over_processes = sum_over_processes
        sums, self.count = summed_over_processes(x.sum(axis=0, keepdims=True), len(x),
                                                 sum_over_processes)
        if self.count < 2:
            raise ShapeError(f"batch_norm: expected x (batch ≥ 2, C) with weight and bias (C,); "
                             f"got a batch of {self.count} (x {tuple(x.shape)})")
        centered = x - sums / self.count
        squares, _ = summed_over_processes((centered * centered).sum(axis=0, keepdims=True),
                                           None, sum_over_processes)
        self.rstd = (1.0 / xp.sqrt(squares / self.count + eps)).astype(x.dtype, copy=False)
        self.normalized, self.weight = centered * self.rstd, weight
        return self.normalized * weight + bias

    def backward(self, grad):
        x_hat = self.normalized
        grad_hat = grad * self.weight
        grad_x = None
        if self.needs_input_grad[0]:
            xp = backend.array_module(grad)
            sums, _ = summed_over_processes(xp.stack([grad_hat.sum(axis=0),
                                                      (grad_hat * x_hat).sum(axis=0)]),
                                            None, self.sum_over_processes)
            mean_hat, mean_hat_x = sums / self.count
            grad_x = self.rstd * (grad_hat - mean_hat - x_hat * mean_hat_x)
        return grad_x, (grad * x_hat).sum(axis=0), grad.sum(axis=0)


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


def batch_norm(x, weight, bias, eps=1e-5, sum_over_processes=None):
    """torch.nn.BatchNorm1d's training-mode forward on (B, C): each channel normalised with
    the batch's mean and biased variance, then scaled and shifted (no running statistics).
    `sum_over_processes(array)`: an in-place sum over the processes of a data-parallel run
    (minivit.distributed.allreduce_sum), making the batch all processes' rows together, as
    torch.nn.SyncBatchNorm does; None: this process's rows only."""
    return BatchNorm()(x, weight, bias, eps=eps, sum_over_processes=sum_over_processes)


def l2_normalize(x):
    """x / max(‖x‖₂, 1e-12) along the last axis (torch.nn.functional.normalize)."""
    return L2Normalize()(x)


def weight_norm_linear(x, v, g):
    """x Wᵀ with W = g · v / ‖v‖ row-wise: torch.nn.utils.weight_norm(Linear(bias=False))'s
    forward, with its parameters weight_v = v (out, in) and weight_g = g (out, 1)."""
    return WeightNormLinear()(x, v, g)
