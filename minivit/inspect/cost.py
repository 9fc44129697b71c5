"""Parameters, tokens, MACs/FLOPs and activation memory of a VisionTransformer, by arithmetic.

Nothing here builds a model: the numbers follow from the configuration alone, so
`minivit info` can describe ViT-H/14 on a laptop.

Conventions
-----------
MACs (multiply-accumulates) per image, forward pass, counting only matrix products, with
the class token included (T = N + 1 tokens, N patches):

    patch_embed   N·D·C·p²          (the stride-p convolution is one GEMM)
    per block     qkv    T·D·3D
                  q@kᵀ   H·T·T·d = T²·D     (d = D / H)
                  attn@v T²·D
                  proj   T·D·D
                  fc1    T·D·M              (M = int(D · mlp_ratio))
                  fc2    T·M·D
    head          D·K                (class token only, K classes)

Biases, LayerNorm, softmax, GELU, residual adds and the position-embedding add are left
out. This is the fvcore/timm convention for matmuls; fvcore also counts each affine
LayerNorm as 5 per element, which adds ~0.1%: ViT-B/16 at 224 is 17.564 GMACs here,
17.58 with the LayerNorms (ViT-S/16 4.599 vs 4.61, ViT-L/16 61.55 vs 61.60). Leaving out
the attention matmuls would give 16.85 GMACs for ViT-B/16, 4% short.

FLOPs = 2·MACs. A training step costs ≈ 3× the forward FLOPs: the backward pass needs two
matmuls per forward matmul (gradient of the input and of the weight), each as large as the
forward one. (The patch embedding needs no input gradient; the convention ignores that.)

Activation memory is the float32 bytes a straightforward implementation keeps for backward,
per image (see `_block_activations`); dropout/drop-path masks (rates 0 by default) and the
gradients themselves are not counted.
"""

from dataclasses import dataclass

from minivit.errors import MinivitError
from minivit.functional.position import relative_table_entries

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class CostReport:
    """What `model_cost` found. Counts are per image; bytes are float32."""

    config: dict  # normalised: img_size/patch_size as (h, w) pairs, mlp_hidden added
    param_shapes: dict  # timm state_dict name -> shape
    params: dict  # group ("patch_embed", "cls_token+pos_embed", "blocks.i", "norm", "head") -> count
    grid: tuple  # (gh, gw) patches
    num_patches: int  # N
    num_tokens: int  # N + 1 with the class token
    block_macs: dict  # op ("qkv", "q@k^T", "attn@v", "proj", "fc1", "fc2") -> MACs in one block
    macs: dict  # group -> forward MACs
    block_activations: dict  # tensor kept for backward in one block -> bytes
    activation_bytes: int  # whole model, training, per image

    @property
    def total_params(self):
        return sum(self.params.values())

    @property
    def attention_shape(self):
        """(T, T): one head's attention matrix, class token included."""
        return (self.num_tokens, self.num_tokens)

    @property
    def attention_entries_per_layer(self):
        """H·T·T: the entries of every head's attention matrix in one layer."""
        return self.config["num_heads"] * self.num_tokens**2

    @property
    def total_macs(self):
        return sum(self.macs.values())

    @property
    def flops(self):
        """Forward FLOPs per image: 2 · MACs."""
        return 2 * self.total_macs

    @property
    def train_flops(self):
        """Training-step FLOPs per image: forward + backward ≈ 3 · forward."""
        return 3 * self.flops


def _pair(value, name):
    if isinstance(value, int):
        return (value, value)
    if len(value) == 2 and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise MinivitError(f"{name} must be an int or a pair of ints, got {value!r}")


# the family's options at VisionTransformer's defaults: timm's plain ViT
PLAIN_VIT_OPTIONS = {"global_pool": "token", "class_token": True, "distilled": False,
                     "pos_embed": "learn", "no_embed_class": False, "fc_norm": None,
                     "init_values": None, "rel_pos_bias": False, "beit": False}


def _normalise(config):
    """Read the VisionTransformer arguments from a dict, a model (its .config) or an object
    with them as attributes; check they fit together."""
    if isinstance(getattr(config, "config", None), dict):  # a VisionTransformer
        config = config.config
    defaults = {"in_chans": 3, "num_classes": 1000, "mlp_ratio": 4.0, "qkv_bias": True,
                **PLAIN_VIT_OPTIONS}
    required = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    missing = [k for k in required if get(k) is None]
    if missing:
        raise MinivitError(f"model configuration lacks {', '.join(missing)}")
    cfg = {k: get(k, default) for k, default in defaults.items()}
    cfg.update({k: get(k) for k in required})
    cfg["img_size"] = _pair(cfg["img_size"], "img_size")
    cfg["patch_size"] = _pair(cfg["patch_size"], "patch_size")
    for size, patch in zip(cfg["img_size"], cfg["patch_size"]):
        if size % patch:
            raise MinivitError(f"img_size {cfg['img_size']} is not a multiple of patch_size {cfg['patch_size']}")
    if cfg["embed_dim"] % cfg["num_heads"]:
        raise MinivitError(f"embed_dim {cfg['embed_dim']} is not divisible by num_heads {cfg['num_heads']}")
    cfg["mlp_hidden"] = int(cfg["embed_dim"] * cfg["mlp_ratio"])
    return cfg


def parameter_shapes(config):
    """timm `state_dict` names and shapes of a VisionTransformer (any option of the family),
    in timm's order."""
    cfg = _normalise(config)
    D, M, K = cfg["embed_dim"], cfg["mlp_hidden"], cfg["num_classes"]
    (ph, pw), (h, w) = cfg["patch_size"], cfg["img_size"]
    grid = (h // ph, w // pw)
    n = grid[0] * grid[1]
    prefix = int(cfg["class_token"]) + int(cfg["distilled"])
    pos_prefix = 0 if cfg["no_embed_class"] else prefix
    shapes = {}
    if cfg["class_token"]:
        shapes["cls_token"] = (1, 1, D)
    if cfg["distilled"]:
        shapes["dist_token"] = (1, 1, D)
    if cfg["pos_embed"] == "learn":
        shapes["pos_embed"] = (1, pos_prefix + n, D)
    elif cfg["pos_embed"] == "2d":
        shapes.update({"pos_embed_row": (grid[0], D), "pos_embed_col": (grid[1], D)})
        if pos_prefix:
            shapes["pos_embed_cls"] = (1, pos_prefix, D)
    shapes.update({"patch_embed.proj.weight": (D, cfg["in_chans"], ph, pw),
                   "patch_embed.proj.bias": (D,)})
    scale = cfg["init_values"] is not None
    beit, qkv_bias = cfg["beit"], cfg["qkv_bias"]
    table = relative_table_entries(grid, cfg["class_token"])
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        if beit and scale:
            shapes.update({b + "gamma_1": (D,), b + "gamma_2": (D,)})
        shapes.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,)})
        if beit and qkv_bias:
            shapes.update({b + "attn.q_bias": (D,), b + "attn.v_bias": (D,)})
        if cfg["rel_pos_bias"]:
            shapes[b + "attn.relative_position_bias_table"] = (table, cfg["num_heads"])
        shapes[b + "attn.qkv.weight"] = (3 * D, D)
        if qkv_bias and not beit:
            shapes[b + "attn.qkv.bias"] = (3 * D,)
        shapes.update({b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,)})
        if scale and not beit:
            shapes[b + "ls1.gamma"] = (D,)
        shapes.update({
            b + "norm2.weight": (D,), b + "norm2.bias": (D,),
            b + "mlp.fc1.weight": (M, D), b + "mlp.fc1.bias": (M,),
            b + "mlp.fc2.weight": (D, M), b + "mlp.fc2.bias": (D,),
        })
        if scale and not beit:
            shapes[b + "ls2.gamma"] = (D,)
    fc_norm = cfg["global_pool"] == "avg" if cfg["fc_norm"] is None else cfg["fc_norm"]
    norm = "fc_norm" if fc_norm else "norm"
    shapes.update({f"{norm}.weight": (D,), f"{norm}.bias": (D,)})
    if K:  # num_classes=0: timm's head is an Identity
        shapes.update({"head.weight": (K, D), "head.bias": (K,)})
        if cfg["distilled"]:
            shapes.update({"head_dist.weight": (K, D), "head_dist.bias": (K,)})
    return shapes


def _group(name):
    if name.startswith("blocks."):
        return ".".join(name.split(".")[:2])
    if name in ("cls_token", "dist_token") or name.startswith("pos_embed"):
        return "cls_token+pos_embed"
    return {"fc_norm": "norm", "head_dist": "head"}.get(name.split(".")[0], name.split(".")[0])


def _size(shape):
    count = 1
    for dim in shape:
        count *= dim
    return count


def _block_activations(T, D, H, M):
    """Float32 bytes one pre-norm block keeps for backward, per image.

    norm1/norm2 keep their input (T·D) and per-token mean and 1/std (2T); every Linear keeps
    its input (qkv: norm1's output, proj: the merged heads, fc1: norm2's output, fc2: GELU's
    output, T·M); attention keeps q, k, v (3·T·D) and the softmax probabilities (H·T·T) —
    softmax's backward needs only its output; GELU keeps its input (T·M).
    """
    floats = {
        "norm1 input+stats": T * D + 2 * T,
        "qkv input": T * D,
        "q, k, v": 3 * T * D,
        "attention probs": H * T * T,
        "proj input": T * D,
        "norm2 input+stats": T * D + 2 * T,
        "fc1 input": T * D,
        "gelu input": T * M,
        "fc2 input": T * M,
    }
    return {name: FLOAT32_BYTES * n for name, n in floats.items()}


def model_cost(config):
    """Cost of a VisionTransformer given the model itself or its arguments (a dict, or an
    object with them as attributes): img_size, patch_size, embed_dim, depth, num_heads, and
    optionally in_chans (3), num_classes (1000), mlp_ratio (4.0), qkv_bias (True). See the
    module docstring for what is counted."""
    cfg = _normalise(config)
    shapes = parameter_shapes(cfg)
    params = {}
    for name, shape in shapes.items():
        params[_group(name)] = params.get(_group(name), 0) + _size(shape)
    order = ["patch_embed", "cls_token+pos_embed"] + [f"blocks.{i}" for i in range(cfg["depth"])] + ["norm", "head"]
    params = {g: params[g] for g in order if g in params}

    (h, w), (ph, pw) = cfg["img_size"], cfg["patch_size"]
    grid = (h // ph, w // pw)
    N = grid[0] * grid[1]
    prefix = int(cfg["class_token"]) + int(cfg["distilled"])
    T, D, H, M, K = N + prefix, cfg["embed_dim"], cfg["num_heads"], cfg["mlp_hidden"], cfg["num_classes"]
    block_macs = {
        "qkv": T * D * 3 * D,
        "q@k^T": T * T * D,
        "attn@v": T * T * D,
        "proj": T * D * D,
        "fc1": T * D * M,
        "fc2": T * M * D,
    }
    macs = {"patch_embed": N * D * cfg["in_chans"] * ph * pw}
    macs.update({f"blocks.{i}": sum(block_macs.values()) for i in range(cfg["depth"])})
    if K:
        macs["head"] = D * K * (2 if cfg["distilled"] else 1)

    block = _block_activations(T, D, H, M)
    outside = (
        cfg["in_chans"] * h * w  # patch embedding input (for the weight gradient)
        + T * D + 2 * T  # final norm input + stats
        + D  # head input (class token)
        + K  # softmax of the logits for the loss
    )
    activation_bytes = cfg["depth"] * sum(block.values()) + FLOAT32_BYTES * outside
    return CostReport(cfg, shapes, params, grid, N, T, block_macs, macs, block, activation_bytes)


def _human(n, unit):
    """(1234567, "MACs") -> '1.235 MMACs'; bytes ("B") use binary prefixes."""
    base, prefixes = (1024, ["", "Ki", "Mi", "Gi", "Ti"]) if unit == "B" else (1000, ["", "K", "M", "G", "T"])
    i = 0
    while abs(n) >= base and i < len(prefixes) - 1:
        n, i = n / base, i + 1
    return f"{n:.4g} {prefixes[i]}{unit}"


def _options_text(cfg):
    """The family options that differ from the plain ViT's, as key=value."""
    return ", ".join(f"{key}={cfg[key]}" for key, value in PLAIN_VIT_OPTIONS.items()
                     if cfg[key] != value)


def _prefix_text(count):
    return {0: "no class token", 1: "1 class token"}.get(count, "class + distillation tokens")


def format_cost(report):
    """A readable table of a CostReport, as printed by `minivit info`."""
    cfg, r = report.config, report
    depth, T, N = cfg["depth"], r.num_tokens, r.num_patches
    rows = [(g, r.params.get(g, 0), r.macs.get(g, 0)) for g in r.params if not g.startswith("blocks.")]
    if depth:
        block_params, block_macs = r.params["blocks.0"], r.macs["blocks.0"]
        first = sum(1 for g, _, _ in rows if g in ("patch_embed", "cls_token+pos_embed"))
        rows.insert(first, (f"blocks.0..{depth - 1}", depth * block_params, depth * block_macs))
        rows.insert(first + 1, ("  each block", block_params, block_macs))
    rows.append(("total", r.total_params, r.total_macs))
    width = max(len(name) for name, _, _ in rows)
    lines = [
        f"model      {cfg['img_size'][0]}x{cfg['img_size'][1]}x{cfg['in_chans']}, patch "
        f"{cfg['patch_size'][0]}x{cfg['patch_size'][1]}, dim {cfg['embed_dim']}, depth {depth}, "
        f"heads {cfg['num_heads']}, mlp {cfg['mlp_hidden']}, classes {cfg['num_classes']}",
        *([f"options    {_options_text(cfg)}"] if _options_text(cfg) else []),
        f"tokens     {N} patches ({r.grid[0]}x{r.grid[1]}) + {_prefix_text(T - N)} = {T}",
        f"attention  {T}x{T} per head (over patches alone {N}x{N}), "
        f"{r.attention_entries_per_layer:,} entries per layer",
        "",
        f"{'group':<{width}}  {'params':>14}  {'forward MACs':>16}",
    ]
    lines += [f"{name:<{width}}  {p:>14,}  {m:>16,}" for name, p, m in rows]
    lines += [
        "",
        "per block  " + ", ".join(f"{op} {_human(m, 'MACs')}" for op, m in r.block_macs.items()),
        f"forward    {_human(r.total_macs, 'MACs')} = {_human(r.flops, 'FLOPs')} per image (matmuls only)",
        f"training   ~{_human(r.train_flops, 'FLOPs')} per image (3x forward)",
        f"memory     {_human(r.total_params * FLOAT32_BYTES, 'B')} parameters (float32); activations kept "
        f"for backward {_human(sum(r.block_activations.values()), 'B')} per block, "
        f"{_human(r.activation_bytes, 'B')} per image",
    ]
    return "\n".join(lines)
