"""Hand-written differentiable ops: each one Function, forward and backward side by side.

One module per op family: activation, attention, basic (arithmetic, broadcasting),
reduction (sum, mean, max), shape (reshape, transpose, indexing, concat, stack), linear, loss,
normalization, regularization, window (Swin's token moves), and optimizer_update (AdamW's
update, not a Function). Each holds its Functions with their math
in one comment, the plain whole-array code, and the registration of its fast implementations
(minivit.cpu.<family> on NumPy, minivit.cuda.<family> on CuPy); registry.py picks one per
call (see its docstring to add an op), and minivit.inspect.opchecks catalogues every op for
gradcheck and the tests.
"""

from minivit.functional.activation import gelu, log_softmax, softmax
from minivit.functional.attention import scaled_dot_product_attention, self_attention
from minivit.functional.basic import add, broadcast_to, div, exp, log, matmul, mul, neg, power, sub
from minivit.functional.linear import linear, linear_gelu, patchify
from minivit.functional.loss import cross_entropy
from minivit.functional.masking import gather_tokens, unshuffle_tokens
from minivit.functional.normalization import layer_norm
from minivit.functional.position import position_embedding_2d, relative_position_bias
from minivit.functional.projection import batch_norm, l2_normalize, weight_norm_linear
from minivit.functional.reduction import reduce_max as max  # noqa: A004 - numpy's names
from minivit.functional.reduction import reduce_mean as mean
from minivit.functional.reduction import reduce_sum as sum  # noqa: A004
from minivit.functional.regularization import drop_path, dropout
from minivit.functional.resize import resize_grid
from minivit.functional.shape import concat, getitem, reshape, stack, transpose
from minivit.functional.window import patch_merge, roll, window_partition, window_reverse

__all__ = [
    "add", "batch_norm", "broadcast_to", "concat", "cross_entropy", "div", "drop_path", "dropout", "exp",
    "gather_tokens", "gelu", "getitem", "l2_normalize", "layer_norm", "linear", "linear_gelu",
    "log", "log_softmax", "matmul", "max", "mean", "mul", "neg", "patch_merge", "patchify",
    "position_embedding_2d", "power", "relative_position_bias", "reshape", "resize_grid", "roll",
    "scaled_dot_product_attention", "self_attention", "softmax", "stack", "sub", "sum",
    "transpose", "unshuffle_tokens", "weight_norm_linear", "window_partition", "window_reverse",
]
