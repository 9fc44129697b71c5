"""The layers of a ViT, each a thin Module over one hand-written functional op."""

import minivit.functional as F
from minivit import backend
from minivit.errors import DTypeError, ShapeError
from minivit.functional.position import relative_position_index, relative_table_entries
from minivit.nn import init
from minivit.nn.module import Constants, Module, Parameter
from minivit.tensor import Tensor


class Linear(Module):
    """y = x Wᵀ + b with W (out_features, in_features); W ~ trunc-normal(0.02), b = 0 (timm)."""

    def __init__(self, in_features, out_features, bias=True):
        self.weight = Parameter(init.trunc_normal((out_features, in_features)))
        self.bias = Parameter(init.zeros(out_features)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        out_features, in_features = self.weight.shape
        return f"{in_features}, {out_features}, bias={self.bias is not None}"


class LayerNorm(Module):
    def __init__(self, dim, eps=1e-6):
        self.weight = Parameter(init.ones(dim))
        self.bias = Parameter(init.zeros(dim))
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class PatchConv2d(Module):
    """Conv2d with kernel = stride = patch_size, weight (D, C, p, p), returning tokens (B, N, D).
    PyTorch's default Conv2d initialisation, as timm leaves it."""

    def __init__(self, in_chans, embed_dim, patch_size):
        fan_in = in_chans * patch_size * patch_size
        self.weight = Parameter(init.uniform_fan_in((embed_dim, in_chans, patch_size, patch_size),
                                                    fan_in))
        self.bias = Parameter(init.uniform_fan_in((embed_dim,), fan_in))
        self.patch_size = patch_size

    def forward(self, x):
        return F.patchify(x, self.weight, self.bias, self.patch_size)

    def extra_repr(self):
        embed_dim, in_chans, p, _ = self.weight.shape
        return f"{in_chans}, {embed_dim}, kernel_size={p}, stride={p}"


class PatchEmbed(Module):
    """Images (B, C, H, W) to patch tokens (B, N, D), N = (H/p)(W/p)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = patch_size
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ShapeError(f"image size {self.img_size} is not a multiple of the patch size "
                             f"{patch_size}")
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.proj = PatchConv2d(in_chans, embed_dim, patch_size)

    def forward(self, x):
        expected = (self.in_chans,) + self.img_size
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ShapeError(f"expected images of shape (batch, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}) (channels, height, width); got {tuple(x.shape)}")
        dtype = self.proj.weight.dtype
        if x.dtype != dtype:  # would compute in float64 and fail in backward, blaming Linear
            raise DTypeError(f"expected {dtype} images for this {dtype} model; got {x.dtype}: "
                             f"cast them with .astype('{dtype}') (or use model.to(dtype=...))")
        return self.proj(x)


class Attention(Module):
    """Multi-head self-attention: qkv projection, softmax(q kᵀ/√d + bias) v per head, output
    projection.

    qkv_bias: True (one bias for q, k and v), False, or "qv" (BEiT: ``q_bias`` and ``v_bias``
    of their own, no k bias). rel_pos_grid=(H, W): a learned relative position bias per head,
    ``relative_position_bias_table`` ((2H−1)(2W−1) entries, + 3 with rel_pos_class_token, as
    BEiT), gathered through the fixed ``relative_position_index`` (not a weight; in
    ``constants``, copied once to each backend the attention runs on).

    Set ``keep_attention = True`` to keep the last forward's probabilities (B, heads, N, N) in
    ``self.attention`` (they are computed anyway; on the GPU keeping them also spares backward
    from rebuilding them). With ``forward(x, queries=n)`` they are (B, heads, n, N): the
    model's forward does that in its last block, so use
    ``VisionTransformer.forward_with_attention`` for full maps."""

    def __init__(self, dim, num_heads, qkv_bias=True, proj_drop=0.0, rel_pos_grid=None,
                 rel_pos_class_token=True):
        if dim % num_heads:
            raise ShapeError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        if qkv_bias == "qv":
            self.q_bias = Parameter(init.zeros(dim))
            self.v_bias = Parameter(init.zeros(dim))
        if rel_pos_grid is not None:
            self.window = tuple(rel_pos_grid)  # what the table serves (timm's window_size)
            self.constants = Constants(relative_position_index=relative_position_index(
                rel_pos_grid, rel_pos_class_token))
            entries = relative_table_entries(rel_pos_grid, rel_pos_class_token)
            self.relative_position_bias_table = Parameter(init.trunc_normal((entries,
                                                                             num_heads)))
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias is True)
        self.proj = Linear(dim, dim)
        self.proj_drop = proj_drop
        self.keep_attention = False
        self.attention = None

    def forward(self, x, queries=None):
        """(B, N, D) → (B, N, D); with queries=n only the first n tokens' outputs (B, n, D)."""
        # qkv (B, N, 3D) is timm's (B, N, 3, heads, head_dim) layout; self_attention reads q, k,
        # v from it in place and returns the heads merged back to (B, N, D)
        bias = None
        if hasattr(self, "q_bias"):
            k_bias = Tensor(backend.array_module(self.q_bias.data).zeros_like(self.q_bias.data))
            bias = F.concat([self.q_bias, k_bias, self.v_bias])
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias if bias is None else bias)
        position_bias = None
        if hasattr(self, "relative_position_bias_table"):
            index = self.constants.get("relative_position_index", x)
            if index.shape[0] != x.shape[1]:
                raise ShapeError(f"the relative position bias serves {index.shape[0]} tokens; "
                                 f"got {x.shape[1]}")
            position_bias = F.relative_position_bias(self.relative_position_bias_table, index)
        out = F.self_attention(qkv, self.num_heads, return_attention=self.keep_attention,
                               queries=queries, bias=position_bias)
        if self.keep_attention:
            out, self.attention = out
        return F.dropout(self.proj(out), self.proj_drop, self.training)


class Mlp(Module):
    def __init__(self, in_features, hidden_features, drop=0.0):
        self.fc1 = Linear(in_features, hidden_features)
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = drop

    def forward(self, x):
        # fc1 and GELU as one op: on the GPU the bias add rides in the GELU kernel
        x = F.dropout(F.linear_gelu(x, self.fc1.weight, self.fc1.bias), self.drop,
                      self.training)
        return F.dropout(self.fc2(x), self.drop, self.training)


class LayerScale(Module):
    """x · γ per channel (CaiT, DeiT-III), γ = init_values at first."""

    def __init__(self, dim, init_values):
        self.gamma = Parameter(init.ones(dim) * init_values)

    def forward(self, x):
        return x * self.gamma


class Block(Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x)).

    init_values: layer scale, the branches multiplied by learned per-channel γ (timm's
    ``ls1.gamma`` / ``ls2.gamma``; with beit=True BEiT's ``gamma_1`` / ``gamma_2``). beit=True
    also gives the attention BEiT's q and v biases (qkv_bias)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, drop_path=0.0,
                 init_values=None, norm_eps=1e-6, beit=False, rel_pos_grid=None,
                 rel_pos_class_token=True):
        if beit and init_values:
            self.gamma_1 = Parameter(init.ones(dim) * init_values)
            self.gamma_2 = Parameter(init.ones(dim) * init_values)
        self.norm1 = LayerNorm(dim, norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias="qv" if beit and qkv_bias else qkv_bias,
                              proj_drop=drop, rel_pos_grid=rel_pos_grid,
                              rel_pos_class_token=rel_pos_class_token)
        if init_values and not beit:
            self.ls1 = LayerScale(dim, init_values)
        self.norm2 = LayerNorm(dim, norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        if init_values and not beit:
            self.ls2 = LayerScale(dim, init_values)
        self.drop_path = drop_path

    def _scaled(self, x, which):
        """A residual branch times its layer scale (which: 1 or 2), if the block has one."""
        gamma = getattr(self, f"gamma_{which}", None)
        if gamma is not None:
            return x * gamma
        scale = getattr(self, f"ls{which}", None)
        return x if scale is None else scale(x)

    def forward(self, x, queries=None):
        """(B, N, D) → (B, N, D); with queries=n, the first n tokens only (B, n, D): every token
        is attended to, but only those n go through the projection, the residual and the MLP."""
        attended = self._scaled(self.attn(self.norm1(x), queries=queries), 1)
        if queries is not None:
            x = x[:, :queries]
        x = x + F.drop_path(attended, self.drop_path, self.training)
        mlp = self._scaled(self.mlp(self.norm2(x)), 2)
        return x + F.drop_path(mlp, self.drop_path, self.training)
