"""linear and patchify: the two GEMM layers."""

from minivit import cpu, cuda
from minivit.errors import ShapeError
from minivit.tensor import Function


def _product(a, b):
    """a @ b of 2-D arrays; on CuPy through cuda.matmul (which a CUDA graph can record)."""
    return cuda.matmul(a, b) if cuda.handles(a, b) else a @ b


def _bias_grad(grad2d):
    """db = Σ dy over the rows. On CuPy one coalesced kernel (CuPy's own sum(axis=0) reads
    each column with a row-sized stride)."""
    return cuda.column_sums(grad2d)[0] if cuda.handles(grad2d) else grad2d.sum(axis=0)


# -- linear: y = x Wᵀ + b;  dx = dy W,  dW = dyᵀ x,  db = Σ dy  (x flattened to 2-D) ------------
class Linear(Function):
    def forward(self, x, weight, bias=None):
        if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
            raise ShapeError(f"linear: input's last dimension must equal weight's in_features; "
                             f"got input {x.shape} and weight {weight.shape} (out, in)")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ShapeError(f"linear: bias must have shape ({weight.shape[0]},), got {bias.shape}")
        self.x2d = x.reshape(-1, x.shape[-1])
        self.weight = weight
        if cpu.handles(x, weight, bias):  # row blocks of one GEMM on minivit's threads
            y = cpu.linear_forward(self.x2d, weight, bias)
        else:
            y = _product(self.x2d, weight.T)
            if bias is not None:
                y += bias
        return y.reshape(x.shape[:-1] + (weight.shape[0],))

    def backward(self, grad):
        grad2d = grad.reshape(-1, grad.shape[-1])
        if cpu.handles(grad2d, self.x2d, self.weight):
            grad_x, grad_w, grad_b = cpu.linear_backward(grad2d, self.x2d, self.weight,
                                                         self.needs_input_grad)
            if grad_x is not None:
                grad_x = grad_x.reshape(grad.shape[:-1] + (self.weight.shape[1],))
            return grad_x, grad_w, grad_b
        grad_x = _product(grad2d, self.weight).reshape(grad.shape[:-1] + (self.weight.shape[1],)) \
            if self.needs_input_grad[0] else None
        grad_w = _product(grad2d.T, self.x2d) if self.needs_input_grad[1] else None
        grad_b = _bias_grad(grad2d) if self.needs_input_grad[2] else None
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


class Patchify(Function):
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
        self.image_shape, self.patch_size, self.weight = x.shape, p, weight
        self.patches = _to_patches(x, p)
        weight2d = weight.reshape(weight.shape[0], -1)
        if cpu.handles(x, weight, bias):
            y = cpu.linear_forward(self.patches, weight2d, bias)
        else:
            y = _product(self.patches, weight2d.T)
            if bias is not None:
                y += bias
        grid = (x.shape[2] // p) * (x.shape[3] // p)
        return y.reshape(x.shape[0], grid, weight.shape[0])

    def backward(self, grad):
        grad2d = grad.reshape(-1, grad.shape[-1])
        weight2d = self.weight.reshape(self.weight.shape[0], -1)
        if cpu.handles(grad2d, self.patches, weight2d):
            grad_p, grad_w, grad_b = cpu.linear_backward(grad2d, self.patches, weight2d,
                                                         self.needs_input_grad)
            grad_x = (_from_patches(grad_p, self.image_shape, self.patch_size)
                      if grad_p is not None else None)
            grad_w = grad_w.reshape(self.weight.shape) if grad_w is not None else None
            return grad_x, grad_w, grad_b
        grad_x = (_from_patches(_product(grad2d, weight2d), self.image_shape, self.patch_size)
                  if self.needs_input_grad[0] else None)
        grad_w = (_product(grad2d.T, self.patches).reshape(self.weight.shape)
                  if self.needs_input_grad[1] else None)
        grad_b = _bias_grad(grad2d) if self.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def patchify(x, weight, bias, patch_size):
    """Patch embedding of images x (B, C, H, W) with weight (D, C, p, p): tokens (B, N, D),
    N = (H/p)(W/p) in row-major grid order, the same as timm's Conv2d + flatten + transpose."""
    return Patchify()(x, weight, bias, patch_size=patch_size)
