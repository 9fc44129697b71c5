"""Position ops: the learned 2-D (row + column) embedding and the relative position bias
gathered from its table, with the fixed index behind it (BEiT's and Swin's layouts, a plain
NumPy array built once per patch grid). The two ops are Functions with hand-written backwards;
the relative bias's GPU backward is minivit.cuda.position.
(MAE's fixed sine-cosine table is minivit.models.pos_embed.sincos_2d.)"""

import numpy as np

from minivit import backend
from minivit.cuda import position as cuda_position
from minivit.errors import ShapeError
from minivit.functional.registry import DispatchedFunction, implementation
from minivit.tensor import Function


# -- 2-D position embedding: e[i·W + j] = row[i] + col[j]  (row (H, D), col (W, D) -> (H·W, D))
#    d row[i] = Σ_j g[i·W + j];  d col[j] = Σ_i g[i·W + j]   (row and column sums of g)
class PositionEmbedding2d(Function):
    def forward(self, row, col):
        if row.ndim != 2 or col.ndim != 2 or row.shape[1] != col.shape[1]:
            raise ShapeError(f"position_embedding_2d: expected row (H, D) and column (W, D) "
                             f"tables of one width D; got {row.shape} and {col.shape}")
        self.grid = (row.shape[0], col.shape[0])
        return (row[:, None, :] + col[None, :, :]).reshape(-1, row.shape[1])

    def backward(self, grad):
        grid = grad.reshape(self.grid + (grad.shape[-1],))
        return (grid.sum(axis=1) if self.needs_input_grad[0] else None,
                grid.sum(axis=0) if self.needs_input_grad[1] else None)


def position_embedding_2d(row, col):
    """The (H·W, D) embedding of an H×W patch grid (row-major, as the patches) from a row
    table (H, D) and a column table (W, D): e(i, j) = row(i) + col(j)."""
    return PositionEmbedding2d()(row, col)


# -- relative position bias: b[h, n, m] = T[I[n, m], h]   (T (L, heads), I (N, M) fixed ints)
#    dT[l, h] = Σ_{I[n, m] = l} g[h, n, m]: a scatter-add of g through the fixed index (on the
#    CPU one bincount over the pairs (l, h) flattened to l·heads + h, no loop and no np.add.at;
#    on the GPU minivit.cuda.position, which needs no host sync)
class RelativePositionBias(DispatchedFunction):
    def forward(self, table, index):
        _check_index(table, index)
        return self.dispatch("relative_position_bias", (table,), table, index)


def _check_index(table, index):
    """ShapeError unless `index` is an integer (N, M) array within the (entries, heads) table.
    Its values are read only from a host array: a device index is trusted (a copy of a host
    one; the models build theirs with the table and place it once, see nn.Constants)."""
    if table.ndim != 2 or index.ndim != 2 or index.dtype.kind not in "iu":
        raise ShapeError(f"relative_position_bias: expected a table (entries, heads) and "
                         f"an integer index (N, N); got {table.shape} and "
                         f"{index.shape} {index.dtype}")
    if backend.backend_of(index) == "numpy" and index.size \
            and not 0 <= index.min() <= index.max() < table.shape[0]:
        raise ShapeError(f"relative_position_bias: the index reaches entries "
                         f"{index.min()}..{index.max()} of a table of {table.shape[0]}")


@implementation("relative_position_bias", "plain")
class _PlainRelativePositionBias:
    """saved: (index, table shape)."""

    def forward(table, index):
        return table[index].transpose(2, 0, 1), (index, table.shape)  # (heads, N, M)

    def backward(saved, grad, needs):
        index, (entries, heads) = saved
        xp = backend.array_module(grad)
        pairs = (index[..., None] * heads + xp.arange(heads)).ravel()
        sums = xp.bincount(pairs, weights=grad.transpose(1, 2, 0).ravel(),
                           minlength=entries * heads)
        return sums.reshape(entries, heads).astype(grad.dtype, copy=False), None


@implementation("relative_position_bias", "cuda")
class _FusedRelativePositionBias:
    """The plain gather forward; backward the scatter-add kernel. saved: the plain one's."""

    forward = _PlainRelativePositionBias.forward

    def backward(saved, grad, needs):
        index, table_shape = saved
        return cuda_position.relative_position_bias_backward(grad, index, table_shape), None


def relative_position_bias(table, index):
    """The (heads, N, M) attention bias table[index] (moved heads-first), for a learned table
    (entries, heads) and a fixed integer index (N, M) (see relative_position_index) on the
    table's backend: a NumPy index is range-checked on every call, a CuPy one is trusted
    (reading it would stall the GPU: place a host index once, as minivit.nn.Constants does,
    after it passed the check here; an index out of range on the GPU reads and writes out of
    bounds)."""
    return RelativePositionBias()(table, index)


# -- the fixed tables ------------------------------------------------------------------------------
def relative_position_index(grid, class_token=False):
    """(N, N) index into a relative-position table for an H×W patch grid (N = H·W, + 1 with
    the class token). Patch pairs take (dy + H − 1)·(2W − 1) + (dx + W − 1), with (dy, dx) the
    query's row and column minus the key's: (2H − 1)(2W − 1) entries (Swin's layout). With
    class_token (BEiT's layout) the class token comes first and takes three more entries:
    L − 3 as the query of a patch, L − 2 as the key of a patch's query, L − 1 with itself."""
    height, width = grid
    rows, cols = np.divmod(np.arange(height * width), width)
    index = ((rows[:, None] - rows[None, :] + height - 1) * (2 * width - 1)
             + cols[:, None] - cols[None, :] + width - 1)
    if not class_token:
        return index
    entries = relative_table_entries(grid, class_token)
    full = np.empty((index.shape[0] + 1,) * 2, index.dtype)
    full[1:, 1:] = index
    full[0, 1:], full[1:, 0], full[0, 0] = entries - 3, entries - 2, entries - 1
    return full


def relative_table_entries(grid, class_token=False):
    """Rows of the relative-position table that relative_position_index reaches."""
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + (3 if class_token else 0)
