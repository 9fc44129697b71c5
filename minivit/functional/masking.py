"""Token masking ops of the masked autoencoder (MAE): keep a subset of the tokens, and put the
kept tokens back in place with a learned mask token everywhere else.

Both are gathers along the token axis, so each backward is the matching scatter. Index arrays
are integer (batch, count) arrays on the same backend as the tokens; they take no gradient.
"""

import numpy as np

from minivit import backend
from minivit.errors import ShapeError
from minivit.tensor import Function, Tensor


def _batch_rows(ids):
    """(B, 1) batch indices that pair with `ids` (B, K) in fancy indexing x[rows, ids]."""
    return backend.array_module(ids).arange(ids.shape[0])[:, None]


def _check_ids(tokens, ids, what):
    if tokens.ndim != 3 or ids.ndim != 2 or ids.shape[0] != tokens.shape[0]:
        raise ShapeError(f"{what}: expected tokens (batch, length, dim) and integer ids "
                         f"(batch, count); got tokens {tuple(tokens.shape)}, ids "
                         f"{tuple(ids.shape)}")
    if ids.dtype.kind not in "iu":
        raise ShapeError(f"{what}: ids must be integers, got {ids.dtype}")


# -- gather_tokens: y[b, k] = x[b, ids[b, k]];  dx[b, l] = Σ_{k: ids[b, k] = l} dy[b, k] ------
class GatherTokens(Function):
    def forward(self, x, ids):
        _check_ids(x, ids, "gather_tokens")
        self.shape, self.dtype, self.ids = x.shape, x.dtype, ids
        return x[_batch_rows(ids), ids]

    def backward(self, grad):
        grad_x = backend.array_module(grad).zeros(self.shape, dtype=self.dtype)
        backend.scatter_add(grad_x, (_batch_rows(self.ids), self.ids), grad)  # repeats add up
        return (grad_x,)


# -- unshuffle_tokens: y[b, l] = z[b, ids_restore[b, l]] where z = [visible; mask_token × (L−K)]
#    (ids_restore is a permutation of 0..L−1 per row, so this gather is a bijection):
#    dz[b, ids_restore[b, l]] = dy[b, l];  d visible = dz[:, :K];  d mask_token = Σ_b Σ_{j≥K} dz
class UnshuffleTokens(Function):
    def forward(self, visible, mask_token, ids_restore):
        _check_ids(visible, ids_restore, "unshuffle_tokens")
        batch, kept, dim = visible.shape
        length = ids_restore.shape[1]
        if mask_token.shape != (1, 1, dim) or not 0 < kept <= length:
            raise ShapeError(f"unshuffle_tokens: expected a mask token (1, 1, {dim}) and at most "
                             f"{length} visible tokens; got mask token "
                             f"{tuple(mask_token.shape)} and {kept} visible tokens")
        xp = backend.array_module(visible)
        full = xp.concatenate(
            [visible, xp.broadcast_to(mask_token, (batch, length - kept, dim))], axis=1)
        self.kept, self.ids_restore = kept, ids_restore
        return full[_batch_rows(ids_restore), ids_restore]

    def backward(self, grad):
        full = backend.array_module(grad).empty_like(grad)
        full[_batch_rows(self.ids_restore), self.ids_restore] = grad  # a permutation: no repeats
        grad_visible = full[:, :self.kept]
        grad_mask = full[:, self.kept:].sum(axis=(0, 1), keepdims=True) \
            if self.needs_input_grad[1] else None
        return grad_visible, grad_mask, None


def gather_tokens(x, ids):
    """x (B, L, D), integer ids (B, K) -> (B, K, D): row b keeps tokens ids[b] in that order."""
    return GatherTokens()(x, _host_ints_to(ids, x))


def unshuffle_tokens(visible, mask_token, ids_restore):
    """MAE's decoder input: the visible tokens (B, K, D) followed by L − K copies of
    mask_token (1, 1, D), reordered by ids_restore (B, L) so that every token is back at its
    image position (ids_restore = argsort of the shuffle that chose the visible ones)."""
    return UnshuffleTokens()(visible, mask_token, _host_ints_to(ids_restore, visible))


def _host_ints_to(ids, like):
    """Integer index arrays on the tokens' backend (a Tensor's data passes through)."""
    ids = ids.data if isinstance(ids, Tensor) else ids
    data = like.data if isinstance(like, Tensor) else like
    if isinstance(ids, np.ndarray) and backend.backend_of(data) != "numpy":
        return backend.to_backend(ids, backend.backend_of(data))
    return ids
