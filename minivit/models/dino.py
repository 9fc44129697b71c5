"""DINO (Caron et al. 2021, self-distillation with no labels), after facebookresearch/dino.

A student and a teacher of the same architecture (a VisionTransformer backbone without a
classifier, then a DINOHead) see different crops of the same images; the student learns to
match the teacher's centred, sharpened output distribution, and the teacher is an exponential
moving average of the student. Parameter names follow the reference's MultiCropWrapper
(``backbone.*`` = timm ViT names, ``head.mlp.{0,2,4}``, ``head.last_layer.weight_{g,v}``).
"""

import math

import numpy as np

import minivit.functional as F
from minivit import backend
from minivit.errors import MinivitError, ShapeError
from minivit.functional.projection import (l2_normalize, summed_over_processes,
                                           weight_norm_linear)
from minivit.functional.resize import resize_grid
from minivit.models.vit import VisionTransformer
from minivit.nn import Linear, Module, Parameter, init
from minivit.tensor import Tensor, no_grad


class WeightNormLinear(Module):
    """torch.nn.utils.weight_norm(Linear(in, out, bias=False)): W = g · v / ‖v‖ per row; g
    is fixed at 1 (DINO's norm_last_layer=True), so only the direction v learns."""

    def __init__(self, in_features, out_features):
        self.weight_g = Parameter(init.ones((out_features, 1)), requires_grad=False)
        self.weight_v = Parameter(init.uniform_fan_in((out_features, in_features), in_features))

    def forward(self, x):
        return weight_norm_linear(x, self.weight_v, self.weight_g)


class BatchNorm1d(Module):
    """torch.nn.BatchNorm1d(C) in training mode: batch statistics, weight 1 and bias 0 at init.
    No running statistics: DINO's head only runs in training (the teacher's too).
    synchronize_batch_norms makes it torch.nn.SyncBatchNorm: the statistics of every process's
    rows."""

    def __init__(self, channels):
        self.weight = Parameter(init.ones(channels))
        self.bias = Parameter(init.zeros(channels))
        self.sum_over_processes = None

    def forward(self, x):
        return F.batch_norm(x, self.weight, self.bias,
                            sum_over_processes=self.sum_over_processes)


def synchronize_batch_norms(model, sum_over_processes):
    """Make every BatchNorm1d of `model` normalise over the rows of all processes of a
    data-parallel run (the reference's convert_sync_batchnorm); `sum_over_processes(array)`
    sums an array over them in place (minivit.distributed.allreduce_sum)."""
    for _, module in model.named_modules():
        if isinstance(module, BatchNorm1d):
            module.sum_over_processes = sum_over_processes


class _MLP(Module):
    """Linear, GELU, Linear, GELU, Linear under the reference nn.Sequential's indices 0, 2, 4;
    with use_bn a BatchNorm1d after each hidden Linear (indices 0, 1, 3, 4, 6)."""

    def __init__(self, in_dim, hidden_dim, bottleneck_dim, use_bn=False):
        modules = []  # None: the GELU, which has no parameters
        for fan_in in (in_dim, hidden_dim):
            norm = [BatchNorm1d(hidden_dim)] if use_bn else []
            modules += [Linear(fan_in, hidden_dim), *norm, None]
        modules.append(Linear(hidden_dim, bottleneck_dim))
        for index, module in enumerate(modules):
            if module is not None:
                setattr(self, str(index), module)

    def forward(self, x):
        first, *rest = [module for _, module in self.named_children()]
        x = first(x)
        for layer in rest:
            x = layer(F.gelu(x) if isinstance(layer, Linear) else x)  # GELU before each Linear
        return x


class DINOHead(Module):
    """3-layer MLP (GELU; use_bn: batch norm after the hidden layers) to a bottleneck, L2
    normalisation, weight-normalised last layer to out_dim scores (the reference's defaults:
    hidden 2048, bottleneck 256, out 65536, use_bn False)."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, use_bn=False):
        self.mlp = _MLP(in_dim, hidden_dim, bottleneck_dim, use_bn)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x):
        return self.last_layer(l2_normalize(self.mlp(x)))


def class_token_features(vit, images):
    """The final-norm class token (B, D) of `vit` for images of any size that is a multiple of
    its patch: the patch part of the position embedding is resized (bicubic, with its
    backward) when the grid differs from the one the model was built for."""
    patch = vit.patch_embed.patch_size
    height, width = images.shape[2:]
    if height % patch or width % patch:
        raise ShapeError(f"crops of {height}x{width} pixels are not a whole number of "
                         f"{patch}x{patch} patches")
    w = vit.patch_embed.proj
    x = F.patchify(images, w.weight, w.bias, patch)
    grid = (height // patch, width // patch)
    pos = vit.pos_embed
    if grid != vit.patch_embed.grid_size:
        pos = F.concat([pos[:, :1], resize_grid(pos[:, 1:], vit.patch_embed.grid_size, grid)],
                       axis=1)
    cls = F.broadcast_to(vit.cls_token, (x.shape[0], 1, x.shape[2]))
    x = F.concat([cls, x], axis=1) + pos
    last = len(vit.blocks) - 1
    for index, block in enumerate(vit.blocks):
        x = block(x, queries=1 if index == last else None)
    return vit.norm(x)[:, 0]


class DINO(Module):
    """backbone + head; forward(crops) -> (ncrops · B, out_dim) scores, crop by crop, for a
    list of crop batches (each (B, C, h, w); consecutive crops of one size share a pass through
    the backbone, as the reference's MultiCropWrapper does)."""

    def __init__(self, encoder_config, out_dim=256, hidden_dim=256, bottleneck_dim=64,
                 use_bn=False):
        self.backbone = VisionTransformer(**dict(encoder_config, num_classes=0))
        self.head = DINOHead(self.backbone.config["embed_dim"], out_dim, hidden_dim,
                             bottleneck_dim, use_bn)
        self.config = dict(encoder=dict(self.backbone.config), out_dim=out_dim,
                           hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, use_bn=use_bn)

    def forward(self, crops):
        features, start = [], 0
        while start < len(crops):
            stop = start + 1
            while stop < len(crops) and crops[stop].shape == crops[start].shape:
                stop += 1
            group = backend.array_module(*crops).concatenate(crops[start:stop])
            features.append(class_token_features(self.backbone, group))
            start = stop
        return self.head(features[0] if len(features) == 1 else F.concat(features, axis=0))


def teacher_momentum(step, total_steps, base=0.996):
    """The reference's cosine schedule from `base` towards 1: 1 + (base − 1)(1 + cos(π t/T))/2."""
    return 1.0 + 0.5 * (base - 1.0) * (1.0 + math.cos(math.pi * step / total_steps))


def update_teacher(teacher, student, momentum):
    """teacher ← m · teacher + (1 − m) · student, parameter by parameter, in place."""
    with no_grad():
        for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
            t.data *= momentum
            t.data += (1.0 - momentum) * s.data


def _entropy(probabilities, axis=-1):
    xp = backend.array_module(probabilities)
    return -(probabilities * xp.log(xp.maximum(probabilities, 1e-30))).sum(axis=axis)


class DINOLoss:
    """Cross-entropy from the teacher's centred, sharpened distribution of each global crop to
    the student's distribution of every other crop, averaged over the pairs; the center is an
    EMA of the teacher's mean output, updated after each loss. In a data-parallel run,
    `sum_over_processes(array)` (an in-place all-reduce) makes the center's batch mean and the
    teacher's marginal entropy those of the global batch, as the reference's all_reduce."""

    def __init__(self, out_dim, student_temp=0.1, teacher_temp=0.04, warmup_teacher_temp=0.04,
                 warmup_epochs=0, center_momentum=0.9, dtype="float32", sum_over_processes=None):
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp, self.warmup_epochs = warmup_teacher_temp, warmup_epochs
        self.center_momentum = center_momentum
        self.center = backend.xp().zeros((1, out_dim), dtype=dtype)
        self.sum_over_processes = sum_over_processes

    def temperature(self, epoch):
        """The teacher's temperature at `epoch`: linear warm-up, then teacher_temp."""
        if epoch < self.warmup_epochs:
            return float(np.linspace(self.warmup_teacher_temp, self.teacher_temp,
                                     self.warmup_epochs)[epoch])
        return self.teacher_temp

    def teacher_probabilities(self, teacher_out, epoch):
        xp = backend.array_module(teacher_out)
        logits = (teacher_out - self.center) / self.temperature(epoch)
        e = xp.exp(logits - logits.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def __call__(self, student_out, teacher_out, epoch, update_center=True):
        """student_out: Tensor (V · B, K) over V crops, the 2 global ones first; teacher_out:
        array (2 · B, K) of the global crops. Returns (loss Tensor, statistics dict)."""
        teacher = teacher_out.data if isinstance(teacher_out, Tensor) else teacher_out
        batch = teacher.shape[0] // 2
        crops = student_out.shape[0] // batch
        if teacher.shape[0] != 2 * batch or student_out.shape[0] != crops * batch or crops < 2:
            raise ShapeError(f"DINO loss: expected teacher scores of 2 global crops (2·B, K) and "
                             f"student scores of 2 or more crops (V·B, K); got "
                             f"{tuple(teacher.shape)} and {tuple(student_out.shape)}")
        q = self.teacher_probabilities(teacher, epoch).reshape(2, batch, -1)
        # Σ_{iq} Σ_{v≠iq} ⟨q_iq, log p_v⟩ = Σ_v ⟨w_v, log p_v⟩, w_v = Σ_{iq≠v} q_iq
        xp = backend.array_module(teacher)
        weights = xp.zeros((crops, batch, q.shape[2]), dtype=teacher.dtype)
        weights[:2] = q[::-1]
        weights[2:] = q.sum(axis=0)
        pairs = 2 * (crops - 1)
        log_p = F.log_softmax(student_out / self.student_temp, axis=-1)
        loss = -(log_p * weights.reshape(crops * batch, -1)).sum() / float(batch * pairs)
        sums, count = summed_over_processes(xp.stack([teacher.sum(axis=0), q.sum(axis=(0, 1))]),
                                            2 * batch, self.sum_over_processes)
        teacher_mean, q_mean = sums / count  # of the global batch's global crops
        statistics = {"teacher_entropy": float(_entropy(q).mean()),
                      "teacher_marginal_entropy": float(_entropy(q_mean))}
        if update_center:
            self.center = (self.center * self.center_momentum
                           + teacher_mean[None] * (1 - self.center_momentum))
        return loss, statistics


def check_crop_size(size, patch_size, what):
    if size < patch_size or size % patch_size:
        raise MinivitError(f"{what} crop size must be a positive multiple of the patch size "
                           f"{patch_size}, got {size}")
