"""The op catalogue: every hand-written op with the inputs it is checked on. `minivit gradcheck`,
the op tests (tests/test_ops.py: values, layouts, float32, the plain code), and the CuPy
tests (tests/test_cuda.py) all read OP_CHECKS; a new op gets one entry here.

OP_CHECKS maps a name to an OpCheck: the function to check (`fn(*inputs) -> Tensor`), and its
inputs as Input specs (shape, kind of values, memory layout), from which `build(rng)` draws
host arrays (float64; integer arrays such as class labels pass through gradcheck as they
are). `run_check` moves the inputs to the current backend and runs `minivit.gradcheck` with a
random upstream gradient. The whole ViT and Swin at the end have no Input specs: they build
their inputs from the model (`whole_model`).

Inputs are drawn where each op is smooth and well conditioned: no ties for max, positive
values for log and non-integer powers, denominators away from zero, softmax/attention
scores of order one. Some inputs are non-contiguous views (transposed, strided) on purpose.
The dropout checks reseed minivit's generator (minivit.manual_seed) on every call, so that
every evaluation of the function draws the same mask.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

import minivit.functional as F
from minivit import backend
from minivit.errors import MinivitError
from minivit.gradcheck import gradcheck

DROPOUT_SEED = 1234
VIT_CONFIG = dict(depth=2, embed_dim=16, num_heads=2, drop_path_rate=0.0, drop_rate=0.0)
SWIN_CONFIG = dict(embed_dim=8, depths=(2, 1), num_heads=(2, 2), drop_path_rate=0.0)


@dataclass(frozen=True)
class Input:
    """One input of an op: `kind` says which values it takes ("normal" N(shift, scale²),
    "positive" in [0.5, 2), "away" ±[0.5, 2), "distinct" 0.05 apart, "labels" in
    [0, classes), "probabilities" rows summing to 1, "index" the integers `values`); `layout`
    its memory layout ("contiguous", "transposed" or "strided")."""
    name: str
    shape: tuple
    kind: str = "normal"
    scale: float = 1.0
    shift: float = 0.0
    layout: str = "contiguous"
    classes: int = 0
    values: tuple = ()

    def draw(self, rng):
        shape = self.shape
        if self.kind == "index":
            return np.array(self.values)
        if self.kind == "labels":
            return rng.integers(0, self.classes, size=shape)
        if self.kind == "distinct":  # no ties, nor near-ties within the finite-difference step
            grid = rng.permutation(np.arange(int(np.prod(shape)))).reshape(shape)
            values = (grid - grid.size / 2) * 0.05 + rng.uniform(0, 0.01, size=shape)
        elif self.kind == "positive":
            values = rng.uniform(0.5, 2.0, size=shape)
        elif self.kind == "away":
            values = rng.uniform(0.5, 2.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        elif self.kind == "probabilities":
            values = rng.uniform(0.1, 1.0, size=shape)
            values /= values.sum(axis=-1, keepdims=True)
        else:
            values = self.shift + self.scale * rng.standard_normal(shape)
        return _LAYOUTS[self.layout](values)


def _transposed(array):
    """The same values as a non-contiguous (Fortran-ordered) view."""
    return np.array(array.T, order="C").T


def _strided(array):
    """The same values as a view taking every other element of a longer last axis."""
    big = np.zeros(array.shape[:-1] + (2 * array.shape[-1],))
    big[..., ::2] = array
    return big[..., ::2]


_LAYOUTS = {"contiguous": lambda array: array, "transposed": _transposed, "strided": _strided}


@dataclass(frozen=True)
class OpCheck:
    name: str
    fn: object  # fn(*inputs) -> Tensor
    inputs: tuple  # Input specs, in fn's argument order (empty for the whole model)
    description: str
    full_check_limit: int = 512  # inputs larger than this are checked along random directions
    directions: int = 8
    whole_model: object = None  # build(rng) -> {input name: host array}, for the whole ViT

    def build(self, rng):
        """{input name: host array} drawn from `rng`, in fn's argument order."""
        if self.whole_model is not None:
            return self.whole_model(rng)
        return {spec.name: spec.draw(rng) for spec in self.inputs}


OP_CHECKS = {}


def _register(name, description, *inputs, **options):
    def decorate(fn):
        OP_CHECKS[name] = OpCheck(name, fn, inputs, description, **options)
        return fn
    return decorate


# -- the layers' ops ----------------------------------------------------------------------------
@_register("linear", "x Wᵀ + b over leading dims (x transposed in memory)",
           Input("x", (2, 3, 4), layout="transposed"), Input("weight", (5, 4)),
           Input("bias", (5,)))
def _linear(x, weight, bias):
    return F.linear(x, weight, bias)


@_register("linear_no_bias", "x Wᵀ without a bias", Input("x", (3, 4)), Input("weight", (2, 4)))
def _linear_no_bias(x, weight):
    return F.linear(x, weight)


@_register("patchify", "stride-p convolution as one GEMM, (B, C, H, W) -> (B, N, D)",
           Input("x", (2, 2, 4, 6)), Input("weight", (3, 2, 2, 2)), Input("bias", (3,)))
def _patchify(x, weight, bias):
    return F.patchify(x, weight, bias, 2)


@_register("scaled_dot_product_attention", "softmax(q kᵀ/√d) v, (B, heads, N, d)",
           Input("q", (2, 2, 4, 3)), Input("k", (2, 2, 4, 3)), Input("v", (2, 2, 4, 3)))
def _attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


@_register("self_attention", "multi-head attention from packed qkv (B, N, 3·D) to (B, N, D)",
           Input("qkv", (2, 5, 12)))
def _self_attention(qkv):
    return F.self_attention(qkv, 2)


@_register("self_attention_queries", "self-attention of the first 2 of 5 tokens (queries=2)",
           Input("qkv", (2, 5, 12)))
def _self_attention_queries(qkv):
    return F.self_attention(qkv, 2, queries=2)


@_register("softmax", "max-subtracted softmax over the last axis",
           Input("x", (3, 5), scale=2.0))
def _softmax(x):
    return F.softmax(x, axis=-1)


@_register("softmax_axis0", "softmax over the first axis of a strided view",
           Input("x", (4, 3), scale=2.0, layout="strided"))
def _softmax_axis0(x):
    return F.softmax(x, axis=0)


@_register("log_softmax", "x − log Σ eˣ over the last axis", Input("x", (3, 5), scale=2.0))
def _log_softmax(x):
    return F.log_softmax(x, axis=-1)


@_register("log_softmax_axis0", "log_softmax over the first axis",
           Input("x", (3, 4, 2), scale=2.0))
def _log_softmax_axis0(x):
    return F.log_softmax(x, axis=0)


@_register("layer_norm", "normalise over the last dim, then scale and shift (eps 1e-6)",
           Input("x", (2, 3, 6), scale=2.0, shift=1.0),
           Input("weight", (6,), scale=0.5, shift=1.0), Input("bias", (6,)))
def _layer_norm(x, weight, bias):
    return F.layer_norm(x, weight, bias)


@_register("gelu", "exact GELU, x Φ(x)", Input("x", (3, 7), scale=2.0))
def _gelu(x):
    return F.gelu(x, approximate="none")


@_register("gelu_tanh", "GELU, tanh approximation", Input("x", (3, 7), scale=2.0))
def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


_LOGITS = Input("logits", (4, 5), scale=2.0)


@_register("cross_entropy", "fused log-softmax + NLL, integer labels",
           _LOGITS, Input("target", (4,), kind="labels", classes=5))
def _cross_entropy(logits, target):
    return F.cross_entropy(logits, target)


@_register("cross_entropy_soft", "soft targets, label smoothing 0.2 (gradient of both inputs)",
           _LOGITS, Input("target", (4, 5), kind="probabilities"))
def _cross_entropy_soft(logits, target):
    return F.cross_entropy(logits, target, label_smoothing=0.2)


@_register("cross_entropy_smoothed", "cross-entropy, integer labels, label smoothing 0.1",
           _LOGITS, Input("target", (4,), kind="labels", classes=5))
def _cross_entropy_smoothed(logits, target):
    return F.cross_entropy(logits, target, label_smoothing=0.1)


@_register("dropout", "dropout p=0.3, training, fixed seed", Input("x", (4, 6)))
def _dropout(x):
    backend.manual_seed(DROPOUT_SEED)
    return F.dropout(x, 0.3, training=True)


@_register("drop_path", "stochastic depth p=0.5, training, fixed seed", Input("x", (6, 3, 4)))
def _drop_path(x):
    backend.manual_seed(DROPOUT_SEED)
    return F.drop_path(x, 0.5, training=True)


# -- shape ops ------------------------------------------------------------------------------------
@_register("concat", "join along an existing axis", Input("a", (2, 1, 3)), Input("b", (2, 3, 3)),
           Input("c", (2, 2, 3), layout="transposed"))
def _concat(a, b, c):
    return F.concat([a, b, c], axis=1)


@_register("stack", "join along a new axis",
           Input("a", (2, 3)), Input("b", (2, 3)), Input("c", (2, 3)))
def _stack(a, b, c):
    return F.stack([a, b, c], axis=1)


@_register("getitem", "fancy indexing with repeated indices (scatter-add backward)",
           Input("a", (3, 5)), Input("index", (5,), kind="index", values=(4, 0, 4, 2, 4)))
def _getitem(a, index):
    return F.getitem(a, (slice(1, None), index))


@_register("getitem_slice", "basic indexing: a negative-step slice and an integer",
           Input("a", (4, 3, 6)))
def _getitem_slice(a):
    return F.getitem(a, (slice(None, None, -2), 1, slice(1, 5)))


@_register("reshape", "reshape", Input("a", (2, 3, 4), layout="transposed"))
def _reshape(a):
    return F.reshape(a, (4, 6))


@_register("transpose", "permute axes (negative axes)", Input("a", (2, 3, 4)))
def _transpose(a):
    return F.transpose(a, (-1, 0, 1))


@_register("broadcast_to", "broadcast (3, 1, 2) to (2, 3, 4, 2)", Input("a", (3, 1, 2)))
def _broadcast_to(a):
    return F.broadcast_to(a, (2, 3, 4, 2))


# -- Swin's token moves ---------------------------------------------------------------------------
@_register("window_partition", "(B, H, W, C) map into 2x3 windows (B·nW, 6, C), a transposed view",
           Input("x", (2, 4, 6, 3), layout="transposed"))
def _window_partition(x):
    return F.window_partition(x, (2, 3))


@_register("window_reverse", "2x3 windows (B·nW, 6, C) back into a 4x6 map",
           Input("windows", (8, 6, 3)))
def _window_reverse(windows):
    return F.window_reverse(windows, (2, 3), 4, 6)


@_register("roll", "cyclic shift by (-1, 2) along H and W (Swin's shifted windows)",
           Input("x", (2, 3, 4, 2), layout="strided"))
def _roll(x):
    return F.roll(x, (-1, 2), (1, 2))


@_register("patch_merge", "Swin's 2x2 gather, (B, H, W, C) -> (B, H/2, W/2, 4C)",
           Input("x", (2, 4, 6, 3)))
def _patch_merge(x):
    return F.patch_merge(x)


# -- self-supervised pretraining's ops (MAE masking, DINO head, resized position embedding) -------
@_register("gather_tokens", "MAE: keep tokens ids[b] of row b, (B, L, D) -> (B, K, D), a repeat",
           Input("x", (2, 5, 3)), Input("ids", (2, 3), kind="index", values=((4, 0, 4), (1, 3, 2))))
def _gather_tokens(x, ids):
    return F.gather_tokens(x, ids)


@_register("unshuffle_tokens", "MAE: visible tokens + mask tokens back in image order",
           Input("visible", (2, 2, 3), layout="transposed"), Input("mask_token", (1, 1, 3)),
           Input("ids_restore", (2, 5), kind="index", values=((3, 0, 4, 2, 1), (1, 4, 0, 3, 2))))
def _unshuffle_tokens(visible, mask_token, ids_restore):
    return F.unshuffle_tokens(visible, mask_token, ids_restore)


@_register("l2_normalize", "DINO head: x / ‖x‖ over the last axis",
           Input("x", (3, 4), kind="away", layout="strided"))
def _l2_normalize(x):
    return F.l2_normalize(x)


@_register("weight_norm_linear", "DINO head: x (g v/‖v‖)ᵀ, weight-normalised rows",
           Input("x", (2, 3, 4)), Input("v", (5, 4), kind="away"), Input("g", (5, 1), "positive"))
def _weight_norm_linear(x, v, g):
    return F.weight_norm_linear(x, v, g)


@_register("resize_grid", "bicubic resize of a position embedding's patch grid, 3x3 -> 2x4",
           Input("x", (2, 9, 3)))
def _resize_grid(x):
    return F.resize_grid(x, (3, 3), (2, 4))


# -- arithmetic (with broadcasting) -------------------------------------------------------------
@_register("add", "a + b, b broadcast", Input("a", (2, 3, 4)), Input("b", (3, 1)))
def _add(a, b):
    return F.add(a, b)


@_register("add_same_shape", "a + b of one shape (the residual adds)",
           Input("a", (3, 4)), Input("b", (3, 4), layout="transposed"))
def _add_same_shape(a, b):
    return F.add(a, b)


@_register("sub", "a − b, a broadcast", Input("a", (4,)), Input("b", (3, 4)))
def _sub(a, b):
    return F.sub(a, b)


@_register("mul", "a ⊙ b, both broadcast", Input("a", (2, 1, 4)), Input("b", (3, 1)))
def _mul(a, b):
    return F.mul(a, b)


@_register("div", "a / b, b away from zero", Input("a", (3, 4)), Input("b", (4,), kind="away"))
def _div(a, b):
    return F.div(a, b)


@_register("neg", "−a", Input("a", (3, 4)))
def _neg(a):
    return F.neg(a)


@_register("power", "a ** 2.5, a > 0", Input("a", (3, 4), kind="positive"))
def _power(a):
    return F.power(a, 2.5)


@_register("exp", "eᵃ", Input("a", (3, 4)))
def _exp(a):
    return F.exp(a)


@_register("log", "ln a, a > 0", Input("a", (3, 4), kind="positive"))
def _log(a):
    return F.log(a)


@_register("matmul", "batched a @ b, b broadcast over the batch",
           Input("a", (2, 3, 4)), Input("b", (4, 5), layout="transposed"))
def _matmul(a, b):
    return F.matmul(a, b)


@_register("matmul_vector", "vector @ batched matrices, the 1-D operand promoted as NumPy does",
           Input("a", (4,)), Input("b", (2, 4, 3), layout="transposed"))
def _matmul_vector(a, b):
    return F.matmul(a, b)


@_register("clone", "Tensor.clone: a copy in new memory", Input("a", (3, 4), layout="strided"))
def _clone(a):
    return a.clone()


# -- reductions -----------------------------------------------------------------------------------
@_register("sum", "sum over axes (0, 2), keepdims", Input("a", (2, 3, 4)))
def _sum(a):
    return F.sum(a, axis=(0, 2), keepdims=True)


@_register("mean", "mean over the last axis", Input("a", (2, 3, 4)))
def _mean(a):
    return F.mean(a, axis=-1)


@_register("mean_all", "mean of every element (a scalar)", Input("a", (3, 4)))
def _mean_all(a):
    return F.mean(a)


@_register("max", "max over axis 1, distinct values", Input("a", (2, 5, 3), kind="distinct"))
def _max(a):
    return F.max(a, axis=1)


# -- whole small models ---------------------------------------------------------------------------
def _slots(model):
    """(model, its parameter slots [(name, shape, module, attribute)] in named_parameters
    order). The check swaps the parameters for gradcheck's tensors, so their initial values
    do not matter (and the model is not for other use)."""
    slots = []
    for name, parameter in model.named_parameters():
        *path, attr = name.split(".")
        module = model
        for part in path:
            module = getattr(module, part)
        slots.append((name, tuple(parameter.shape), module, attr))
    return model, slots


def _model_inputs(rng, slots):
    """Images and every parameter of a model, drawn at scales where nothing saturates:
    LayerNorm weights around 1, other parameters N(0, 0.3²)."""
    inputs = {"images": rng.standard_normal((2, 1, 8, 8))}
    for name, shape, _, _ in slots:
        value = 0.3 * rng.standard_normal(shape)
        if "norm" in name and name.endswith(".weight"):
            value += 1.0
        inputs[name] = value
    return inputs


def _logits(model_and_slots, images, parameters):
    model, slots = model_and_slots
    for (_, _, module, attr), tensor in zip(slots, parameters, strict=True):
        setattr(module, attr, tensor)  # the model now computes with gradcheck's float64 tensors
    return model(images)


@lru_cache(maxsize=None)
def _vit():
    """A small ViT in eval mode (no dropout) and its parameter slots (see _slots)."""
    from minivit.models import create_model

    return _slots(create_model("vit_digits", **VIT_CONFIG).eval())


@_register("vit", "whole ViT (depth 2, dim 16, 2 heads, 8x8 images): logits w.r.t. images and "
           "every parameter, along random directions", full_check_limit=0, directions=4,
           whole_model=lambda rng: _model_inputs(rng, _vit()[1]))
def _vit_logits(images, *parameters):
    return _logits(_vit(), images, parameters)


@lru_cache(maxsize=None)
def _swin():
    """A small Swin in eval mode: an 8x8 map in four 4x4 windows (the second block shifted,
    with its mask), patch merging, then a 4x4 map in one window."""
    from minivit.models import create_model

    return _slots(create_model("swin_digits", **SWIN_CONFIG).eval())


@_register("swin", "whole Swin (8x8 map, 4x4 windows, shifted, patch merging, dim 8): logits "
           "w.r.t. images and every parameter, along random directions", full_check_limit=0,
           directions=4, whole_model=lambda rng: _model_inputs(rng, _swin()[1]))
def _swin_logits(images, *parameters):
    return _logits(_swin(), images, parameters)


# -- running ------------------------------------------------------------------------------------
def get_check(name):
    if name not in OP_CHECKS:
        raise MinivitError(f"unknown op {name!r}; known ops: {', '.join(OP_CHECKS)}")
    return OP_CHECKS[name]


def run_check(check, seed=0, rtol=1e-6, eps=1e-6):
    """Draw `check`'s inputs from `seed`, move them to the current backend and gradcheck them
    with a random upstream gradient (also from `seed`). Returns the GradcheckReport.

    An input passes when its relative error is at most `rtol`, or its absolute error is below
    the finite differences' own round-off (gradcheck's default floor, 1e-8 · Σ|f|: a tiny
    gradient cannot be resolved better than that with a 1e-6 step)."""
    if isinstance(check, str):
        check = get_check(check)
    host = check.build(np.random.default_rng(seed))
    names = list(host)
    inputs = [backend.to_backend(value) if isinstance(value, np.ndarray) and value.dtype.kind == "f"
              else backend.to_backend(np.asarray(value)) for value in host.values()]
    return gradcheck(check.fn, *inputs, eps=eps, rtol=rtol,
                     names=names, seed=seed, full_check_limit=check.full_check_limit,
                     directions=check.directions)
