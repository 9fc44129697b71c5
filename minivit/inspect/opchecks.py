"""The op catalogue: every hand-written op with the inputs it is checked on. `minivit gradcheck`,
the op tests (tests/test_ops_catalogue.py: layouts, float32, the plain code), and the CuPy
tests (tests/test_cuda_*.py) all read OP_CHECKS; a new op gets one entry here.

OP_CHECKS maps a name to an OpCheck: the function to check (`fn(*inputs) -> Tensor`), and its
inputs as Input specs (shape, kind of values, memory layout), from which `build(rng)` draws
host arrays (float64; integer arrays such as class labels pass through gradcheck as they
are). `run_check` moves the inputs to the current backend and runs `minivit.gradcheck` with a
random upstream gradient. The whole small models (minivit.inspect.model_checks, registered
after the ops) have no Input specs: they build their inputs from the model (`whole_model`).
OP_CHECKS itself, Input, OpCheck, register, get_check and run_check live in
minivit.inspect.opcheck_base (importable from here too).

Inputs are drawn where each op is smooth and well conditioned: no ties for max, positive
values for log and non-integer powers, denominators away from zero, softmax/attention
scores of order one. Some inputs are non-contiguous views (transposed, strided) on purpose.
The dropout checks reseed minivit's generator (minivit.manual_seed) on every call, so that
every evaluation of the function draws the same mask.
"""

import minivit.functional as F
from minivit import backend
# `minivit gradcheck` and the tests import get_check and run_check from here, with the catalogue
from minivit.inspect.opcheck_base import (OP_CHECKS, Input, OpCheck,  # noqa: F401
                                          get_check, register, run_check)
from minivit.functional.position import relative_position_index

DROPOUT_SEED = 1234


# -- the layers' ops ----------------------------------------------------------------------------
@register("linear", "x Wᵀ + b over leading dims (x transposed in memory)",
          Input("x", (2, 3, 4), layout="transposed"), Input("weight", (5, 4)),
          Input("bias", (5,)))
def _linear(x, weight, bias):
    return F.linear(x, weight, bias)


@register("linear_no_bias", "x Wᵀ without a bias", Input("x", (3, 4)), Input("weight", (2, 4)))
def _linear_no_bias(x, weight):
    return F.linear(x, weight)


@register("linear_gelu", "gelu(x Wᵀ + b), the MLP's first layer as one op",
          Input("x", (2, 3, 4), layout="transposed"), Input("weight", (5, 4)),
          Input("bias", (5,)))
def _linear_gelu(x, weight, bias):
    return F.linear_gelu(x, weight, bias)


@register("linear_gelu_tanh", "gelu_tanh(x Wᵀ + b)", Input("x", (3, 4)),
          Input("weight", (5, 4)), Input("bias", (5,)))
def _linear_gelu_tanh(x, weight, bias):
    return F.linear_gelu(x, weight, bias, approximate="tanh")


@register("patchify", "stride-p convolution as one GEMM, (B, C, H, W) -> (B, N, D)",
          Input("x", (2, 2, 4, 6)), Input("weight", (3, 2, 2, 2)), Input("bias", (3,)))
def _patchify(x, weight, bias):
    return F.patchify(x, weight, bias, 2)


@register("scaled_dot_product_attention", "softmax(q kᵀ/√d) v, (B, heads, N, d)",
          Input("q", (2, 2, 4, 3)), Input("k", (2, 2, 4, 3)), Input("v", (2, 2, 4, 3)))
def _attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


@register("self_attention", "multi-head attention from packed qkv (B, N, 3·D) to (B, N, D)",
          Input("qkv", (2, 5, 12)))
def _self_attention(qkv):
    return F.self_attention(qkv, 2)


@register("self_attention_queries", "self-attention of the first 2 of 5 tokens (queries=2)",
          Input("qkv", (2, 5, 12)))
def _self_attention_queries(qkv):
    return F.self_attention(qkv, 2, queries=2)


@register("attention_bias", "softmax(q kᵀ/√d + B) v, B (heads, N, N) broadcast over the batch",
          Input("q", (2, 2, 4, 3)), Input("k", (2, 2, 4, 3)), Input("v", (2, 2, 4, 3)),
          Input("bias", (2, 4, 4)))
def _attention_bias(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, bias=bias)


@register("self_attention_bias", "packed-qkv attention with a (B, 1, N, N) bias, first 2 of 5 "
          "tokens asking", Input("qkv", (2, 5, 12)), Input("bias", (2, 1, 5, 5)))
def _self_attention_bias(qkv, bias):
    return F.self_attention(qkv, 2, bias=bias, queries=2)


@register("self_attention_relative_bias", "packed-qkv attention with a (heads, N, N) relative "
          "position bias broadcast over the batch", Input("qkv", (2, 5, 12)),
          Input("bias", (2, 5, 5)))
def _self_attention_relative_bias(qkv, bias):
    return F.self_attention(qkv, 2, bias=bias)


@register("position_embedding_2d", "e(i, j) = row(i) + col(j), (H, D), (W, D) -> (H·W, D)",
          Input("row", (3, 4)), Input("col", (2, 4), layout="transposed"))
def _position_embedding_2d(row, col):
    return F.position_embedding_2d(row, col)


@register("relative_position_bias", "BEiT's table (entries, heads) gathered to (heads, N, N) "
          "through a fixed index", Input("table", (12, 2)),
          Input("index", (5, 5), kind="index", values=tuple(map(tuple, relative_position_index(
              (2, 2), class_token=True).tolist()))))
def _relative_position_bias(table, index):
    return F.relative_position_bias(table, index)


@register("softmax", "max-subtracted softmax over the last axis",
          Input("x", (3, 5), scale=2.0))
def _softmax(x):
    return F.softmax(x, axis=-1)


@register("softmax_axis0", "softmax over the first axis of a strided view",
          Input("x", (4, 3), scale=2.0, layout="strided"))
def _softmax_axis0(x):
    return F.softmax(x, axis=0)


@register("log_softmax", "x − log Σ eˣ over the last axis", Input("x", (3, 5), scale=2.0))
def _log_softmax(x):
    return F.log_softmax(x, axis=-1)


@register("log_softmax_axis0", "log_softmax over the first axis",
          Input("x", (3, 4, 2), scale=2.0))
def _log_softmax_axis0(x):
    return F.log_softmax(x, axis=0)


@register("layer_norm", "normalise over the last dim, then scale and shift (eps 1e-6)",
          Input("x", (2, 3, 6), scale=2.0, shift=1.0),
          Input("weight", (6,), scale=0.5, shift=1.0), Input("bias", (6,)))
def _layer_norm(x, weight, bias):
    return F.layer_norm(x, weight, bias)


@register("gelu", "exact GELU, x Φ(x)", Input("x", (3, 7), scale=2.0))
def _gelu(x):
    return F.gelu(x, approximate="none")


@register("gelu_tanh", "GELU, tanh approximation", Input("x", (3, 7), scale=2.0))
def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


_LOGITS = Input("logits", (4, 5), scale=2.0)


@register("cross_entropy", "fused log-softmax + NLL, integer labels",
          _LOGITS, Input("target", (4,), kind="labels", classes=5))
def _cross_entropy(logits, target):
    return F.cross_entropy(logits, target)


@register("cross_entropy_soft", "soft targets, label smoothing 0.2 (gradient of both inputs)",
          _LOGITS, Input("target", (4, 5), kind="probabilities"))
def _cross_entropy_soft(logits, target):
    return F.cross_entropy(logits, target, label_smoothing=0.2)


@register("cross_entropy_smoothed", "cross-entropy, integer labels, label smoothing 0.1",
          _LOGITS, Input("target", (4,), kind="labels", classes=5))
def _cross_entropy_smoothed(logits, target):
    return F.cross_entropy(logits, target, label_smoothing=0.1)


@register("dropout", "dropout p=0.3, training, fixed seed", Input("x", (4, 6)))
def _dropout(x):
    backend.manual_seed(DROPOUT_SEED)
    return F.dropout(x, 0.3, training=True)


@register("drop_path", "stochastic depth p=0.5, training, fixed seed", Input("x", (6, 3, 4)))
def _drop_path(x):
    backend.manual_seed(DROPOUT_SEED)
    return F.drop_path(x, 0.5, training=True)


# -- shape ops ------------------------------------------------------------------------------------
@register("concat", "join along an existing axis", Input("a", (2, 1, 3)), Input("b", (2, 3, 3)),
          Input("c", (2, 2, 3), layout="transposed"))
def _concat(a, b, c):
    return F.concat([a, b, c], axis=1)


@register("stack", "join along a new axis",
          Input("a", (2, 3)), Input("b", (2, 3)), Input("c", (2, 3)))
def _stack(a, b, c):
    return F.stack([a, b, c], axis=1)


@register("getitem", "fancy indexing with repeated indices (scatter-add backward)",
          Input("a", (3, 5)), Input("index", (5,), kind="index", values=(4, 0, 4, 2, 4)))
def _getitem(a, index):
    return F.getitem(a, (slice(1, None), index))


@register("getitem_slice", "basic indexing: a negative-step slice and an integer",
          Input("a", (4, 3, 6)))
def _getitem_slice(a):
    return F.getitem(a, (slice(None, None, -2), 1, slice(1, 5)))


@register("reshape", "reshape", Input("a", (2, 3, 4), layout="transposed"))
def _reshape(a):
    return F.reshape(a, (4, 6))


@register("transpose", "permute axes (negative axes)", Input("a", (2, 3, 4)))
def _transpose(a):
    return F.transpose(a, (-1, 0, 1))


@register("broadcast_to", "broadcast (3, 1, 2) to (2, 3, 4, 2)", Input("a", (3, 1, 2)))
def _broadcast_to(a):
    return F.broadcast_to(a, (2, 3, 4, 2))


# -- Swin's token moves ---------------------------------------------------------------------------
@register("window_partition", "(B, H, W, C) map into 2x3 windows (B·nW, 6, C), a transposed view",
          Input("x", (2, 4, 6, 3), layout="transposed"))
def _window_partition(x):
    return F.window_partition(x, (2, 3))


@register("window_reverse", "2x3 windows (B·nW, 6, C) back into a 4x6 map",
          Input("windows", (8, 6, 3)))
def _window_reverse(windows):
    return F.window_reverse(windows, (2, 3), 4, 6)


@register("roll", "cyclic shift by (-1, 2) along H and W (Swin's shifted windows)",
          Input("x", (2, 3, 4, 2), layout="strided"))
def _roll(x):
    return F.roll(x, (-1, 2), (1, 2))


@register("patch_merge", "Swin's 2x2 gather, (B, H, W, C) -> (B, H/2, W/2, 4C)",
          Input("x", (2, 4, 6, 3)))
def _patch_merge(x):
    return F.patch_merge(x)


# -- self-supervised pretraining's ops (MAE masking, DINO head, resized position embedding) -------
@register("gather_tokens", "MAE: keep tokens ids[b] of row b, (B, L, D) -> (B, K, D), a repeat",
          Input("x", (2, 5, 3)), Input("ids", (2, 3), kind="index", values=((4, 0, 4), (1, 3, 2))))
def _gather_tokens(x, ids):
    return F.gather_tokens(x, ids)


@register("unshuffle_tokens", "MAE: visible tokens + mask tokens back in image order",
          Input("visible", (2, 2, 3), layout="transposed"), Input("mask_token", (1, 1, 3)),
          Input("ids_restore", (2, 5), kind="index", values=((3, 0, 4, 2, 1), (1, 4, 0, 3, 2))))
def _unshuffle_tokens(visible, mask_token, ids_restore):
    return F.unshuffle_tokens(visible, mask_token, ids_restore)


# x not "normal": drawn from the seed the upstream gradient is drawn from, it would be an affine
# function of that gradient, along which batch norm's input gradient is exactly 0
@register("batch_norm", "DINO head (use_bn): normalise each channel over the batch, scale, shift",
          Input("x", (5, 4), "distinct"),
          Input("weight", (4,), scale=0.5, shift=1.0), Input("bias", (4,)))
def _batch_norm(x, weight, bias):
    return F.batch_norm(x, weight, bias)


@register("l2_normalize", "DINO head: x / ‖x‖ over the last axis",
          Input("x", (3, 4), kind="away", layout="strided"))
def _l2_normalize(x):
    return F.l2_normalize(x)


@register("weight_norm_linear", "DINO head: x (g v/‖v‖)ᵀ, weight-normalised rows",
          Input("x", (2, 3, 4)), Input("v", (5, 4), kind="away"), Input("g", (5, 1), "positive"))
def _weight_norm_linear(x, v, g):
    return F.weight_norm_linear(x, v, g)


@register("resize_grid", "bicubic resize of a position embedding's patch grid, 3x3 -> 2x4",
          Input("x", (2, 9, 3)))
def _resize_grid(x):
    return F.resize_grid(x, (3, 3), (2, 4))


# -- arithmetic (with broadcasting) -------------------------------------------------------------
@register("add", "a + b, b broadcast", Input("a", (2, 3, 4)), Input("b", (3, 1)))
def _add(a, b):
    return F.add(a, b)


@register("add_same_shape", "a + b of one shape (the residual adds)",
          Input("a", (3, 4)), Input("b", (3, 4), layout="transposed"))
def _add_same_shape(a, b):
    return F.add(a, b)


@register("sub", "a − b, a broadcast", Input("a", (4,)), Input("b", (3, 4)))
def _sub(a, b):
    return F.sub(a, b)


@register("mul", "a ⊙ b, both broadcast", Input("a", (2, 1, 4)), Input("b", (3, 1)))
def _mul(a, b):
    return F.mul(a, b)


@register("div", "a / b, b away from zero", Input("a", (3, 4)), Input("b", (4,), kind="away"))
def _div(a, b):
    return F.div(a, b)


@register("neg", "−a", Input("a", (3, 4)))
def _neg(a):
    return F.neg(a)


@register("power", "a ** 2.5, a > 0", Input("a", (3, 4), kind="positive"))
def _power(a):
    return F.power(a, 2.5)


@register("exp", "eᵃ", Input("a", (3, 4)))
def _exp(a):
    return F.exp(a)


@register("log", "ln a, a > 0", Input("a", (3, 4), kind="positive"))
def _log(a):
    return F.log(a)


@register("matmul", "batched a @ b, b broadcast over the batch",
          Input("a", (2, 3, 4)), Input("b", (4, 5), layout="transposed"))
def _matmul(a, b):
    return F.matmul(a, b)


@register("matmul_vector", "vector @ batched matrices, the 1-D operand promoted as NumPy does",
          Input("a", (4,)), Input("b", (2, 4, 3), layout="transposed"))
def _matmul_vector(a, b):
    return F.matmul(a, b)


@register("clone", "Tensor.clone: a copy in new memory", Input("a", (3, 4), layout="strided"))
def _clone(a):
    return a.clone()


# -- reductions -----------------------------------------------------------------------------------
@register("sum", "sum over axes (0, 2), keepdims", Input("a", (2, 3, 4)))
def _sum(a):
    return F.sum(a, axis=(0, 2), keepdims=True)


@register("mean", "mean over the last axis", Input("a", (2, 3, 4)))
def _mean(a):
    return F.mean(a, axis=-1)


@register("mean_all", "mean of every element (a scalar)", Input("a", (3, 4)))
def _mean_all(a):
    return F.mean(a)


@register("max", "max over axis 1, distinct values", Input("a", (2, 5, 3), kind="distinct"))
def _max(a):
    return F.max(a, axis=1)


# the whole small models register last, after every op (their checks run slowest)
from minivit.inspect import model_checks  # noqa: E402,F401
