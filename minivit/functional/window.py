"""The Swin Transformer's token moves: window partition and reverse, cyclic shift, and patch
merging's 2×2 gather. Each is a permutation of its input's elements, so each backward is the
inverse permutation of the incoming gradient (no arithmetic, exact in any dtype). Feature
maps are NHWC, (B, H, W, C), as timm's Swin keeps them. The plain code is all there is: these
copies take a few percent of a Swin step on the CPU (`minivit bench --model swin_digits
--profile`), so no fast implementation is registered."""

from minivit import backend
from minivit.errors import ShapeError
from minivit.tensor import Function


def pair(size):
    """(h, w) of a size given as one int or a pair."""
    return (size, size) if isinstance(size, int) else tuple(size)


def _check_map(name, shape, window):
    if len(shape) != 4:
        raise ShapeError(f"{name}: expected a feature map (B, H, W, C); got shape {shape}")
    height, width = shape[1:3]
    if window[0] < 1 or window[1] < 1 or height % window[0] or width % window[1]:
        raise ShapeError(f"{name}: a {height}x{width} map does not tile into "
                         f"{window[0]}x{window[1]} windows")


def _partition(x, window):
    """(B, H, W, C) -> (B·nW, wh·ww, C), windows in row-major order, tokens row-major inside."""
    batch, height, width, channels = x.shape
    wh, ww = window
    tiles = x.reshape(batch, height // wh, wh, width // ww, ww, channels)
    return tiles.transpose(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, channels)


def _reverse(windows, window, height, width):
    """The inverse of _partition: (B·nW, wh·ww, C) -> (B, H, W, C)."""
    wh, ww = window
    channels = windows.shape[-1]
    tiles = windows.reshape(-1, height // wh, width // ww, wh, ww, channels)
    return tiles.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


# -- window partition: windows[b·nW + i·(W/ww) + j, u·ww + v] = x[b, i·wh + u, j·ww + v]
#    (a permutation; dx = the gradient put back where each token came from: _reverse)
class WindowPartition(Function):
    def forward(self, x, window):
        self.window = pair(window)
        _check_map("window_partition", x.shape, self.window)
        self.size = x.shape[1:3]
        return _partition(x, self.window)

    def backward(self, grad):
        return (_reverse(grad, self.window, *self.size),)


# -- window reverse: the inverse permutation of window partition; dwindows = partition(dy)
class WindowReverse(Function):
    def forward(self, windows, window, height, width):
        self.window = pair(window)
        wh, ww = self.window
        _check_map("window_reverse", (1, height, width, 1), self.window)
        if windows.ndim != 3 or windows.shape[1] != wh * ww or \
                windows.shape[0] % ((height // wh) * (width // ww)):
            raise ShapeError(f"window_reverse: expected windows (B·{(height // wh) * (width // ww)}"
                             f", {wh * ww}, C) of a {height}x{width} map; got {windows.shape}")
        return _reverse(windows, self.window, height, width)

    def backward(self, grad):
        return (_partition(grad, self.window),)


# -- cyclic shift (roll): y[..., (i + s) mod n, ...] = x[..., i, ...] along each axis;
#    dx = roll(dy, −s)
class Roll(Function):
    def forward(self, x, shifts, axes):
        self.shifts, self.axes = tuple(shifts), tuple(axes)
        return backend.array_module(x).roll(x, self.shifts, self.axes)

    def backward(self, grad):
        xp = backend.array_module(grad)
        return (xp.roll(grad, tuple(-s for s in self.shifts), self.axes),)


# -- patch merging's gather: y[b, i, j, (v·2 + u)·C + c] = x[b, 2i + u, 2j + v, c]
#    (timm's reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5): channel blocks x(0,0),
#    x(1,0), x(0,1), x(1,1)); dx = the gradient's blocks put back at their 2×2 positions
class PatchMerge(Function):
    def forward(self, x):
        if x.ndim != 4 or x.shape[1] % 2 or x.shape[2] % 2:
            raise ShapeError(f"patch_merge: expected a (B, H, W, C) map with even H and W; got "
                             f"shape {x.shape}")
        batch, height, width, channels = self.shape = x.shape
        blocks = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
        return blocks.transpose(0, 1, 3, 4, 2, 5).reshape(batch, height // 2, width // 2,
                                                          4 * channels)

    def backward(self, grad):
        batch, height, width, channels = self.shape
        blocks = grad.reshape(batch, height // 2, width // 2, 2, 2, channels)
        return (blocks.transpose(0, 1, 4, 2, 3, 5).reshape(self.shape),)


def window_partition(x, window):
    """Cut a (B, H, W, C) map into non-overlapping windows (int or (wh, ww)): (B·nW, wh·ww, C),
    windows and the tokens inside them in row-major order (timm's window_partition, flattened)."""
    return WindowPartition()(x, window=window)


def window_reverse(windows, window, height, width):
    """Put (B·nW, wh·ww, C) windows back into the (B, H, W, C) map they came from."""
    return WindowReverse()(windows, window=window, height=height, width=width)


def roll(x, shifts, axes):
    """Cyclic shift by `shifts` along `axes` (numpy.roll, torch.roll)."""
    if isinstance(shifts, int):
        shifts, axes = (shifts,), (axes,)
    return Roll()(x, shifts=shifts, axes=axes)


def patch_merge(x):
    """Swin's 2×2 gather: (B, H, W, C) -> (B, H/2, W/2, 4C), the four neighbours' channels
    concatenated in timm's order (top-left, bottom-left, top-right, bottom-right)."""
    return PatchMerge()(x)
