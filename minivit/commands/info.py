"""minivit info: parameters, tokens, attention size, MACs/FLOPs and activation memory of a
named model or a checkpoint, computed from the configuration (nothing is run)."""

from pathlib import Path

from minivit.checkpoint import find_checkpoint, read_checkpoint
from minivit.commands.common import command_parser, number
from minivit.errors import MinivitError
from minivit.inspect import format_cost, model_cost
from minivit.inspect.swin_cost import (any_model_cost, cost_sweep, format_sweep,
                                       format_swin_cost, plot_sweep, swin_cost)
from minivit.models import MODEL_CONFIGS, model_config

EPILOG = """MACs count the matrix products only (fvcore/timm convention; see minivit.inspect.cost);
FLOPs = 2 x MACs; a training step ~ 3 x the forward FLOPs. Activation memory is what a float32
training step keeps for backward, per image.

examples:
  minivit info vit_base_patch16_224
  minivit info vit_base_patch16_224 --img-size 384 --num-classes 10
  minivit info runs/latest            the model of a run folder (or a checkpoint file)
  minivit info --list                 the named models and their parameter counts
  minivit info swin_tiny_patch4_window7_224   per stage: map, windows, params, MACs
  minivit info --sweep --plot cost.png        ViT-B/16 vs Swin-T from 224 to 1024 pixels
"""


def add_parser(subparsers, name, help_text):
    p = command_parser(subparsers, name, help_text, EPILOG)
    p.add_argument("model", nargs="?", metavar="MODEL_OR_CHECKPOINT",
                   help="a model name (see --list), a checkpoint file or a run folder")
    p.add_argument("--img-size", type=number(int, 1), default=None, metavar="N",
                   help="image size to describe the model at (default: the model's own)")
    p.add_argument("--num-classes", type=number(int, 0), default=None, metavar="K",
                   help="classes of the head (default: the model's own)")
    p.add_argument("--list", action="store_true", help="list the named models and exit")
    p.add_argument("--sweep", action="store_true",
                   help="compare ViT-B/16 and Swin-T (MACs, attention-matrix memory) at image "
                        "sizes 224 to 1024 and exit")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="with --sweep: also draw the comparison to this PNG file")


def run(args):
    if args.list:
        print(list_models())
        return 0
    if args.plot is not None and not args.sweep:
        raise MinivitError("--plot draws the --sweep comparison: pass --sweep too")
    if args.sweep:
        rows = cost_sweep()
        print(format_sweep(rows))
        if args.plot is not None:
            plot_sweep(rows, args.plot)
            print(f"wrote {args.plot}")
        return 0
    if args.model is None:
        raise MinivitError("give a model name, a checkpoint or a run folder (or --list)")
    overrides = {key: value for key, value in (("img_size", args.img_size),
                                               ("num_classes", args.num_classes))
                 if value is not None}
    config, header = resolve_config(args.model)
    config = dict(config, **overrides)
    if header:
        print(header)
    print(format_swin_cost(swin_cost(config)) if "depths" in config
          else format_cost(model_cost(config)))
    return 0


def resolve_config(name_or_path):
    """(VisionTransformer arguments, a header line or None) for a model name, a checkpoint file
    or a run folder."""
    if name_or_path in MODEL_CONFIGS:
        return model_config(name_or_path), None
    path = Path(name_or_path)
    if not path.exists():
        raise MinivitError(f"{name_or_path!r} is neither a model name nor a checkpoint or run "
                           f"folder; known models: {', '.join(MODEL_CONFIGS)}")
    if path.is_dir():
        path = find_checkpoint(path)
    state, _, info = read_checkpoint(path)
    stored = sum(int(array.size) for array in state.values())
    details = [f"dataset {info['dataset']}"] if info.get("dataset") else []
    if "epoch" in info:
        details.append(f"epoch {info['epoch']}")
    if info.get("test_accuracy") is not None:
        details.append(f"test accuracy {info['test_accuracy']:.4f}")
    details.append(f"{stored:,} stored parameters")
    return info["model_config"], f"checkpoint {path}: {', '.join(details)}\n"


def list_models():
    """A table of the named models: image size, patch, width, depth, heads, classes, params."""
    rows = [("model", "image", "patch", "dim", "depth", "heads", "classes", "params", "GMACs")]
    for name in MODEL_CONFIGS:
        config = model_config(name)
        swin = "depths" in config  # per-stage depths and heads, as 2-2-6-2
        cost = any_model_cost(config)
        depth, heads = ((config["depths"], config["num_heads"]) if swin
                        else ([config["depth"]], [config["num_heads"]]))
        channels = config["in_chans"]
        rows.append((name, f"{config['img_size']}x{config['img_size']}x{channels}",
                     str(config["patch_size"]), str(config["embed_dim"]),
                     "-".join(map(str, depth)), "-".join(map(str, heads)),
                     str(config["num_classes"]), f"{cost.total_params:,}",
                     f"{cost.total_macs / 1e9:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)
