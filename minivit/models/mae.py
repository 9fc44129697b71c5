"""The masked autoencoder (He et al. 2021, MAE), after the reference models_mae.py.

The encoder is a VisionTransformer (timm's parameter names) that sees only the visible patches
and the class token; a light decoder (``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
``decoder_blocks``, ``decoder_norm``, ``decoder_pred``) rebuilds every patch's pixels from them,
and the loss is the mean squared error over the masked patches only. Parameter names are the
reference checkpoints', so the encoder of an MAE checkpoint loads into a VisionTransformer.
Both position embeddings are fixed 2-D sine-cosine tables (requires_grad=False).
"""

import minivit.functional as F
from minivit import backend
from minivit.errors import MinivitError, ShapeError
from minivit.functional.masking import gather_tokens, unshuffle_tokens
from minivit.models.pos_embed import sincos_2d
from minivit.models.vit import VisionTransformer
from minivit.nn import Block, LayerNorm, Linear, ModuleList, Parameter, init
from minivit.tensor import Tensor

NORM_PIX_EPS = 1e-6  # the reference's (x − mean) / sqrt(var + 1e-6), var unbiased


def check_mask_ratio(mask_ratio, num_patches):
    """Refuse a ratio outside (0, 1) or one that keeps no patch of `num_patches`."""
    if not 0 < mask_ratio < 1:  # also refuses NaN
        raise MinivitError(f"mask ratio must be in (0, 1) (the fraction of patches hidden), got "
                           f"{mask_ratio}")
    if int(num_patches * (1 - mask_ratio)) < 1:
        raise MinivitError(f"mask ratio {mask_ratio} keeps no patch of {num_patches}: lower it "
                           f"below {1 - 1 / num_patches:.4g}")


def random_masking(batch, length, mask_ratio, noise=None, dtype="float32"):
    """(ids_keep (B, K), ids_restore (B, L), mask (B, L)) as the reference draws them: sort
    uniform noise per image, keep the K = int(L (1 − ratio)) patches of smallest noise;
    ids_restore undoes the sort; mask is 1 on removed patches, 0 on kept ones."""
    xp = backend.xp()
    if noise is None:
        noise = backend.random_generator().random((batch, length))
    noise = backend.to_backend(noise)
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = xp.argsort(noise, axis=1)
    ids_restore = xp.argsort(ids_shuffle, axis=1)
    return ids_shuffle[:, :keep], ids_restore, (ids_restore >= keep).astype(dtype)


def patchify_pixels(images, patch_size):
    """Images (B, C, H, W) -> (B, H/p · W/p, p·p·C) arrays, each patch in the reference's order
    (row within the patch, column, channel; channel fastest)."""
    batch, channels, height, width = images.shape
    p = patch_size
    x = images.reshape(batch, channels, height // p, p, width // p, p)
    return x.transpose(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p),
                                                 p * p * channels)


def unpatchify_pixels(patches, patch_size, grid, channels):
    """The inverse of patchify_pixels: (B, h·w, p·p·C) -> (B, C, h·p, w·p)."""
    (h, w), p = grid, patch_size
    x = patches.reshape(patches.shape[0], h, w, p, p, channels)
    return x.transpose(0, 5, 1, 3, 2, 4).reshape(patches.shape[0], channels, h * p, w * p)


def normalized_patches(patches):
    """(patches − mean) / sqrt(var + 1e-6) per patch, var unbiased: the --norm-pix-loss target."""
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)
    return (patches - mean) / (var + NORM_PIX_EPS) ** 0.5


class MaskedAutoencoderViT(VisionTransformer):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_pix_loss=False, mask_ratio=0.75):
        super().__init__(img_size, patch_size, in_chans, num_classes=0, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        num_patches = self.patch_embed.num_patches
        check_mask_ratio(mask_ratio, num_patches)
        self.encoder_config = dict(self.config)  # a VisionTransformer's: for fine-tuning
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                           decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                           decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio,
                           norm_pix_loss=norm_pix_loss, mask_ratio=mask_ratio)
        grid = self.patch_embed.grid_size
        self.pos_embed = Parameter(backend.to_backend(sincos_2d(embed_dim, grid)[None]
                                                      .astype("float32")), requires_grad=False)
        self.decoder_embed = Linear(embed_dim, decoder_embed_dim)
        self.mask_token = Parameter(init.normal((1, 1, decoder_embed_dim), std=0.02))
        self.decoder_pos_embed = Parameter(
            backend.to_backend(sincos_2d(decoder_embed_dim, grid)[None].astype("float32")),
            requires_grad=False)
        self.decoder_blocks = ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                         for _ in range(decoder_depth))
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        self.norm_pix_loss, self.mask_ratio = norm_pix_loss, mask_ratio
        self._initialize_as_the_reference()

    def _initialize_as_the_reference(self):
        """Xavier-uniform linear layers (the patch projection on its 2-D view) with zero
        biases, normal(0.02) class and mask tokens; the patch projection keeps its bias."""
        self.cls_token.data = init.normal(self.cls_token.shape, std=0.02)
        weight = self.patch_embed.proj.weight
        weight.data = init.xavier_uniform(weight.shape)
        for _, module in self.named_modules():
            if isinstance(module, Linear):
                module.weight.data = init.xavier_uniform(module.weight.shape)
                if module.bias is not None:
                    module.bias.data = init.zeros(module.bias.shape)

    def forward_encoder(self, images, mask_ratio=None, noise=None):
        """(latent (B, 1 + K, D), mask (B, L), ids_restore (B, L)): the class token and the K
        visible patches after the encoder; `noise` (B, L) fixes the masking (else drawn)."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        batch, length, dim = x.shape
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        check_mask_ratio(ratio, length)
        ids_keep, ids_restore, mask = random_masking(batch, length, ratio, noise, x.dtype)
        x = gather_tokens(x, ids_keep)
        cls = F.broadcast_to(self.cls_token + self.pos_embed[:, :1], (batch, 1, dim))
        x = F.concat([cls, x], axis=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        """Predicted pixels (B, L, p·p·C) of every patch, in image order."""
        x = self.decoder_embed(latent)
        patches = unshuffle_tokens(x[:, 1:], self.mask_token, ids_restore)
        x = F.concat([x[:, :1], patches], axis=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, images):
        """The pixels the decoder must predict, (B, L, p·p·C) (per-patch normalised with
        norm_pix_loss)."""
        patches = patchify_pixels(images.data if isinstance(images, Tensor) else images,
                                  self.patch_embed.patch_size)
        return normalized_patches(patches) if self.norm_pix_loss else patches

    def forward_loss(self, images, pred, mask):
        """Mean over the masked patches of each patch's mean squared error."""
        per_patch = ((pred - self.target(images)) ** 2).mean(axis=-1)
        return (per_patch * mask).sum() / float(mask.sum())

    def forward(self, images, mask_ratio=None, noise=None):
        """(loss, pred (B, L, p·p·C), mask (B, L)) as the reference's forward."""
        latent, mask, ids_restore = self.forward_encoder(images, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(images, pred, mask), pred, mask

    def reconstruction(self, images, pred):
        """The prediction as images (B, C, H, W), in the images' pixel scale (with
        norm_pix_loss, each patch is un-normalised with the original patch's mean and
        variance, as the MAE paper's figures do)."""
        if self.norm_pix_loss:
            patches = patchify_pixels(images, self.patch_embed.patch_size)
            mean = patches.mean(axis=-1, keepdims=True)
            std = (patches.var(axis=-1, keepdims=True, ddof=1) + NORM_PIX_EPS) ** 0.5
            pred = pred * std + mean
        return unpatchify_pixels(pred, self.patch_embed.patch_size, self.patch_embed.grid_size,
                                 self.patch_embed.in_chans)

    def resample_pos_embed(self, img_size):
        raise MinivitError("an MAE's position embeddings are fixed sine-cosine tables of its "
                           "grid: build the MAE at the image size instead")


def mae_for_encoder(encoder_config, decoder_embed_dim=None, decoder_depth=2,
                    decoder_num_heads=None, norm_pix_loss=False, mask_ratio=0.75):
    """An MAE whose encoder has a VisionTransformer configuration (model_config(name, ...));
    the decoder defaults to half the encoder's width (at least 16), `decoder_depth` blocks and
    heads of width 8 or more."""
    width = decoder_embed_dim or max(16, encoder_config["embed_dim"] // 2)
    heads = decoder_num_heads or max(1, min(encoder_config["num_heads"], width // 8))
    for name, value in (("embed_dim", encoder_config["embed_dim"]), ("decoder_embed_dim", width)):
        if value % 4:
            raise ShapeError(f"MAE: {name} must be divisible by 4 (its sine-cosine position "
                             f"embedding), got {value}")
    keys = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
    return MaskedAutoencoderViT(**{key: encoder_config[key] for key in keys},
                                decoder_embed_dim=width, decoder_depth=decoder_depth,
                                decoder_num_heads=heads, norm_pix_loss=norm_pix_loss,
                                mask_ratio=mask_ratio)
