"""linear and patchify: the two GEMM layers, both y = x Wᵀ + b over 2-D x (patchify's x is
the image cut into patches). Fast implementations: minivit.cpu.gemm (GEMMs split over
minivit's threads) and minivit.cuda (GEMMs a CUDA graph can record, column-sum bias gradients)."""

from minivit import cuda
from minivit.cpu import gemm as cpu_gemm
from minivit.errors import ShapeError
from minivit.functional.registry import DispatchedFunction, implementation


# -- linear: y = x Wᵀ + b;  dx = dy W,  dW = dyᵀ x,  db = Σ dy  (x flattened to 2-D)
#    Every implementation of the 2-D op "linear" saves (x, W).
class Linear(DispatchedFunction):
    def forward(self, x, weight, bias=None):
        if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
            raise ShapeError(f"linear: input's last dimension must equal weight's in_features; "
                             f"got input {x.shape} and weight {weight.shape} (out, in)")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ShapeError(f"linear: bias must have shape ({weight.shape[0]},), got {bias.shape}")
        self.in_features = weight.shape[1]
        x2d = x.reshape(-1, x.shape[-1])
        y = self.dispatch("linear", (x, weight, bias), x2d, weight, bias)
        return y.reshape(x.shape[:-1] + (weight.shape[0],))

    def backward(self, grad):
        grad_x, grad_w, grad_b = super().backward(grad.reshape(-1, grad.shape[-1]))
        if grad_x is not None:
            grad_x = grad_x.reshape(grad.shape[:-1] + (self.in_features,))
        return grad_x, grad_w, grad_b


@implementation("linear", "cuda")
class _FusedLinear:  # cuda.matmul: CuPy's GEMM, or cuBLAS through ctypes while a graph records
    def forward(x2d, weight, bias):
        y = cuda.matmul(x2d, weight.T)
        if bias is not None:
            y += bias
        return y, (x2d, weight)

    def backward(saved, grad2d, needs):
        x2d, weight = saved
        grad_x = cuda.matmul(grad2d, weight) if needs[0] else None
        grad_w = cuda.matmul(grad2d.T, x2d) if needs[1] else None
        grad_b = cuda.column_sums(grad2d)[0] if needs[2] else None  # one coalesced kernel
        return grad_x, grad_w, grad_b


@implementation("linear", "cpu")
class _SplitLinear:  # row blocks of one GEMM on minivit's threads
    def forward(x2d, weight, bias):
        return cpu_gemm.linear_forward(x2d, weight, bias), (x2d, weight)

    def backward(saved, grad2d, needs):
        x2d, weight = saved
        return cpu_gemm.linear_backward(grad2d, x2d, weight, needs)


@implementation("linear", "plain")
class _PlainLinear:
    def forward(x2d, weight, bias):
        y = x2d @ weight.T
        if bias is not None:
            y += bias
        return y, (x2d, weight)

    def backward(saved, grad2d, needs):
        x2d, weight = saved
        grad_x = grad2d @ weight if needs[0] else None
        grad_w = grad2d.T @ x2d if needs[1] else None
        grad_b = grad2d.sum(axis=0) if needs[2] else None
        return grad_x, grad_w, grad_b


def linear(x, weight, bias=None):
    """y = x @ weight.T + bias over any leading dims; weight is (out_features, in_features)."""
    return Linear()(x, weight, bias)


# -- patchify: Conv2d with kernel = stride = p, as one GEMM over the cut-out patches ------------
#    patches (B·gh·gw, C·p·p) = x cut into p×p tiles;  y = patches Wᵀ + b;
#    dpatches = dy W folded back into the image;  dW = dyᵀ patches;  db = Σ dy
def _to_patches(x, p):
    batch, channels, height, width = x.shape
    grid_h, grid_w = height // p, width // p
    tiles = x.reshape(batch, channels, grid_h, p, grid_w, p).transpose(0, 2, 4, 1, 3, 5)
    return tiles.reshape(batch * grid_h * grid_w, channels * p * p)


def _from_patches(patches, image_shape, p):
    batch, channels, height, width = image_shape
    grid_h, grid_w = height // p, width // p
    tiles = patches.reshape(batch, grid_h, grid_w, channels, p, p).transpose(0, 3, 1, 4, 2, 5)
    return tiles.reshape(image_shape)


class Patchify(DispatchedFunction):
    def forward(self, x, weight, bias, patch_size):
        p = patch_size
        if x.ndim != 4:
            raise ShapeError(f"patchify: expected images (B, C, H, W), got shape {x.shape}")
        if weight.shape[1:] != (x.shape[1], p, p):
            raise ShapeError(f"patchify: weight must be (D, {x.shape[1]}, {p}, {p}) for "
                             f"{x.shape[1]}-channel input and patch {p}; got {weight.shape}")
        if x.shape[2] % p or x.shape[3] % p:
            raise ShapeError(f"patchify: image size {x.shape[2]}x{x.shape[3]} is not a multiple "
                             f"of the patch size {p}: resize or crop to a multiple of {p}")
        self.image_shape, self.patch_size, self.weight_shape = x.shape, p, weight.shape
        weight2d = weight.reshape(weight.shape[0], -1)
        y = self.dispatch("linear", (x, weight, bias), _to_patches(x, p), weight2d, bias)
        grid = (x.shape[2] // p) * (x.shape[3] // p)
        return y.reshape(x.shape[0], grid, weight.shape[0])

    def backward(self, grad):
        grad_p, grad_w, grad_b = super().backward(grad.reshape(-1, grad.shape[-1]))
        grad_x = (_from_patches(grad_p, self.image_shape, self.patch_size)
                  if grad_p is not None else None)
        grad_w = grad_w.reshape(self.weight_shape) if grad_w is not None else None
        return grad_x, grad_w, grad_b


def patchify(x, weight, bias, patch_size):
    """Patch embedding of images x (B, C, H, W) with weight (D, C, p, p): tokens (B, N, D),
    N = (H/p)(W/p) in row-major grid order, the same as timm's Conv2d + flatten + transpose."""
    return Patchify()(x, weight, bias, patch_size=patch_size)
