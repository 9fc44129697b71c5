"""Hand-written differentiable ops: each one Function, forward and backward side by side.

One module per op family: activation, attention, basic (arithmetic, reductions, shapes),
linear, loss, normalization, regularization, window (Swin's token moves), and
optimizer_update (AdamW's update, not a Function). Each holds its Functions with their math
in one comment, the plain whole-array code, and the registration of its fast implementations
(minivit.cpu.<family> on NumPy, minivit.cuda.<family> on CuPy); registry.py picks one per
call (see its docstring to add an op), and minivit.inspect.opchecks catalogues every op for
gradcheck and the tests.
"""

from minivit.functional.activation import gelu, log_softmax, softmax
from minivit.functional.attention import scaled_dot_product_attention, self_attention
from minivit.functional.basic import (add, broadcast_to, concat, div, exp, getitem, log, matmul, mul, neg,
                                      power, reshape, stack, sub, transpose)
from minivit.functional.basic import reduce_max as max  # noqa: A004 - numpy's names
from minivit.functional.basic import reduce_mean as mean
from minivit.functional.basic import reduce_sum as sum  # noqa: A004
from minivit.functional.linear import linear, patchify
from minivit.functional.loss import cross_entropy
from minivit.functional.masking import gather_tokens, unshuffle_tokens
from minivit.functional.normalization import layer_norm
from minivit.functional.projection import l2_normalize, weight_norm_linear
from minivit.functional.regularization import drop_path, dropout
from minivit.functional.resize import resize_grid
from minivit.functional.window import patch_merge, roll, window_partition, window_reverse

__all__ = [
    "add", "broadcast_to", "concat", "cross_entropy", "div", "drop_path", "dropout", "exp",
    "gather_tokens", "gelu", "getitem", "l2_normalize", "layer_norm", "linear", "log",
    "log_softmax", "matmul", "max", "mean", "mul", "neg", "patch_merge", "patchify", "power",
    "reshape", "resize_grid", "roll", "scaled_dot_product_attention", "self_attention",
    "softmax", "stack", "sub", "sum", "transpose", "unshuffle_tokens", "weight_norm_linear",
    "window_partition", "window_reverse",
]
