"""Parameters, MACs and attention-matrix memory of a SwinTransformer, by arithmetic, and the
ViT-versus-Swin cost sweep over image sizes (`minivit info --sweep`).

The conventions are minivit.inspect.cost's (matrix products only, per image, forward). A
stage of width d, h heads, on an H×W map cut into nW windows of N = wh·ww tokens (the map
padded up to whole windows as timm pads it; minivit's model refuses such sizes) costs per
block, with T = H·W tokens and Tp = nW·N padded ones:

    qkv Tp·d·3d   q@kᵀ nW·h·N²·(d/h) = Tp·N·d   attn@v Tp·N·d   proj Tp·d²   fc1, fc2 T·d·m

so attention grows with T·N — linearly in the image area for a fixed window — where a ViT's
grows with T². Patch merging costs (H/2)(W/2)·2d·d at the start of stages 1..; the patch
embedding T0·D·C·p²; the head F·K. The attention matrices a training step keeps for
backward are h·Tp·N floats per block (a ViT's H·T²), float32 here.
"""

import math
from dataclasses import dataclass

from minivit.errors import MinivitError
from minivit.functional.position import relative_table_entries
from minivit.functional.window import pair
from minivit.inspect.cost import FLOAT32_BYTES, _human, model_cost
from minivit.models.swin import stage_layout


@dataclass(frozen=True)
class SwinStage:
    map: tuple  # (H, W) tokens, before padding
    window: tuple  # (wh, ww)
    windows: int  # nW per image, after padding the map to whole windows
    dim: int
    heads: int
    depth: int
    params: int  # the stage's parameters (downsample included)
    macs: int  # the stage's forward MACs (downsample included)
    attention_entries: int  # per block: h·nW·N², the entries of its attention matrices


@dataclass(frozen=True)
class SwinCost:
    config: dict
    stages: tuple
    params: dict  # group (patch_embed, layers.i, norm, head) -> count
    macs: dict  # group -> forward MACs

    total_params = property(lambda self: sum(self.params.values()))
    total_macs = property(lambda self: sum(self.macs.values()))
    flops = property(lambda self: 2 * self.total_macs)
    train_flops = property(lambda self: 3 * self.flops)  # forward + backward ≈ 3 × forward

    @property
    def attention_bytes(self):
        """Float32 bytes of every block's attention probabilities, per image (kept for
        backward in training)."""
        return FLOAT32_BYTES * sum(s.depth * s.attention_entries for s in self.stages)


def any_model_cost(config):
    """The cost report of any named family's arguments: swin_cost for a Swin (per-stage
    `depths`), model_cost for a VisionTransformer."""
    return swin_cost(config) if "depths" in config else model_cost(config)


def swin_cost(config):
    """Cost of a SwinTransformer from its arguments (a dict or a model's .config)."""
    cfg = getattr(config, "config", config)
    size, patch = pair(cfg["img_size"]), cfg["patch_size"]
    depths, heads = tuple(cfg["depths"]), tuple(cfg["num_heads"])
    if len(depths) != len(heads):
        raise MinivitError(f"depths {depths} and num_heads {heads} need one entry per stage")
    window = pair(cfg.get("window_size", 7))
    chans, classes = cfg.get("in_chans", 3), cfg.get("num_classes", 1000)
    ratio, bias = cfg.get("mlp_ratio", 4.0), 3 if cfg.get("qkv_bias", True) else 0
    embed = cfg["embed_dim"]
    res = (math.ceil(size[0] / patch), math.ceil(size[1] / patch))
    params = {"patch_embed": embed * chans * patch * patch + 3 * embed}
    macs = {"patch_embed": res[0] * res[1] * embed * chans * patch * patch}
    stages = []
    for i, (depth, h) in enumerate(zip(depths, heads)):
        d, stage_params, stage_macs = embed * 2 ** i, 0, 0
        if i > 0:  # patch merging: norm over 2d (= 4 · d/2), reduction 2d -> d
            res = ((res[0] + 1) // 2, (res[1] + 1) // 2)
            stage_params += 2 * 2 * d + 2 * d * d
            stage_macs += res[0] * res[1] * 2 * d * d
        win = tuple(min(r, w) for r, w in zip(res, window))
        padded = tuple(math.ceil(r / w) * w for r, w in zip(res, win))
        count, n = (padded[0] // win[0]) * (padded[1] // win[1]), win[0] * win[1]
        tokens, padded_tokens, hidden = res[0] * res[1], padded[0] * padded[1], int(d * ratio)
        block_params = (4 * d + relative_table_entries(win) * h + 3 * d * d + bias * d
                        + d * d + d + 2 * d * hidden + hidden + d)
        block_macs = (padded_tokens * (3 * d * d + 2 * n * d + d * d)
                      + tokens * 2 * d * hidden)
        stage_params += depth * block_params
        stage_macs += depth * block_macs
        params[f"layers.{i}"], macs[f"layers.{i}"] = stage_params, stage_macs
        stages.append(SwinStage(res, win, count, d, h, depth, stage_params, stage_macs,
                                h * count * n * n))
    features = embed * 2 ** (len(depths) - 1)
    params["norm"] = 2 * features
    if classes:
        params["head"], macs["head"] = features * classes + classes, features * classes
    return SwinCost(cfg, tuple(stages), params, macs)


def format_swin_cost(report):
    """A readable table of a SwinCost, as printed by `minivit info`."""
    cfg, size = report.config, pair(report.config["img_size"])
    lines = [f"model      {size[0]}x{size[1]}x{cfg.get('in_chans', 3)}, patch "
             f"{cfg['patch_size']}, dim {cfg['embed_dim']}, depths {tuple(cfg['depths'])}, "
             f"heads {tuple(cfg['num_heads'])}, window {cfg.get('window_size', 7)}, classes "
             f"{cfg.get('num_classes', 1000)}", "",
             f"{'stage':<8} {'map':>9} {'window':>7} {'windows':>8} {'dim':>5} {'heads':>5} "
             f"{'blocks':>6} {'params':>12} {'forward MACs':>16} {'attn entries/block':>19}"]
    for i, s in enumerate(report.stages):
        lines.append(f"{'layers.' + str(i):<8} {s.map[0]:>4}x{s.map[1]:<4} "
                     f"{s.window[0]:>3}x{s.window[1]:<3} {s.windows:>8} {s.dim:>5} {s.heads:>5} "
                     f"{s.depth:>6} {s.params:>12,} {s.macs:>16,} {s.attention_entries:>19,}")
    for group in ("patch_embed", "norm", "head"):
        if group in report.params:
            lines.append(f"{group:<54} {report.params[group]:>12,} "
                         f"{report.macs.get(group, 0):>16,}")
    lines.append(f"{'total':<54} {report.total_params:>12,} {report.total_macs:>16,}")
    lines += ["", f"forward    {_human(report.total_macs, 'MACs')} = "
                  f"{_human(report.flops, 'FLOPs')} per image (matmuls only)",
              f"attention  {_human(report.attention_bytes, 'B')} of attention matrices per "
              f"image (float32, all blocks): windows of {report.stages[0].window[0]}x"
              f"{report.stages[0].window[1]} tokens, linear in the image area"]
    try:
        stage_layout(size, cfg["patch_size"], cfg["depths"], cfg["num_heads"],
                     cfg.get("window_size", 7))
    except MinivitError as err:
        lines.append(f"note       timm pads the maps to whole windows, as counted here; minivit "
                     f"builds no model of this size: {err}")
    return "\n".join(lines)


SWEEP_SIZES = (224, 320, 384, 512, 640, 768, 896, 1024)


def cost_sweep(sizes=SWEEP_SIZES):
    """[(size, ViT-B/16 MACs, ViT attention bytes, Swin-T MACs, Swin attention bytes)]: the
    forward MACs and float32 attention-matrix bytes per image of both at each image size."""
    from minivit.models import model_config

    rows = []
    for size in sizes:
        vit = model_cost(model_config("vit_base_patch16_224", img_size=size))
        vit_bytes = (FLOAT32_BYTES * vit.config["depth"] * vit.attention_entries_per_layer)
        swin = swin_cost(model_config("swin_tiny_patch4_window7_224", img_size=size))
        rows.append((size, vit.total_macs, vit_bytes, swin.total_macs, swin.attention_bytes))
    return rows


def format_sweep(rows):
    lines = ["ViT-B/16 vs Swin-T: forward GMACs and float32 attention-matrix memory per image "
             "(all blocks)", f"{'image':>6} {'ViT GMACs':>10} {'ViT attn':>11} "
             f"{'Swin GMACs':>11} {'Swin attn':>11}"]
    for size, vit_macs, vit_bytes, swin_macs, swin_bytes in rows:
        lines.append(f"{size:>6} {vit_macs / 1e9:>10.2f} {_human(vit_bytes, 'B'):>11} "
                     f"{swin_macs / 1e9:>11.2f} {_human(swin_bytes, 'B'):>11}")
    return "\n".join(lines)


def plot_sweep(rows, path):
    """Draw the sweep (log-log: MACs and attention memory against image size) as a PNG."""
    from minivit.inspect.plots import new_figure

    figure, axes = new_figure(1, 2)
    sizes = [row[0] for row in rows]
    for axis, (vit, swin, scale, label) in zip(axes, ((1, 3, 1e9, "forward GMACs per image"),
                                                     (2, 4, 2**20, "attention matrices, MiB"))):
        axis.loglog(sizes, [row[vit] / scale for row in rows], "o-", label="ViT-B/16 (T²)")
        axis.loglog(sizes, [row[swin] / scale for row in rows], "s-", label="Swin-T (windows)")
        axis.set_xticks(sizes, [str(size) for size in sizes], minor=False)
        axis.set_xticks([], minor=True)
        axis.set_xlabel("image size (pixels per side)")
        axis.set_title(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return figure
