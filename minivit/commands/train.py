"""minivit train: train a ViT and keep a run folder (config, metrics, checkpoints)."""

import dataclasses

from minivit import distributed as dist
from minivit.commands.common import (add_backend_flags, add_precision_flag, apply_backend,
                                     command_parser, number)
from minivit.commands.family_flags import add_family_flags
from minivit.train import OPTIMIZER_DEFAULTS, TrainConfig, epochs_text, resumed_config, train
from minivit.train.config import DEFAULT_EPOCHS, RUN_CONTROL

EPILOG = """examples:
  minivit train                                   tiny ViT on the embedded 8x8 digits (CPU)
  minivit train --dataset cifar10 --data-dir ~/data --epochs 50 --backend cupy
  minivit train --backend cupy --cuda-graph       digits on the GPU, the steps replayed as a CUDA graph
  minivit train --out runs/a --resume             continue runs/a from its last checkpoint
  minivit train --out runs/a --overwrite          replace the run in runs/a with a new one
  minivit train --model beit_digits               BEiT (relative position bias) on the digits
  minivit train --pos-embed 2d --out runs/2d      the digits ViT with row + column positions
  minivit train --model deit_digits --teacher runs/a --distillation hard
                                                  DeiT: a distillation token learns from runs/a
  minivit train --dataset folder --data-dir photos --img-size 64      your own images
  minivit train --dataset folder --data-dir photos --model vit_small_patch16_224 \\
                --pretrained vit_small.safetensors --layer-decay 0.75 --ema 0.999
  minivit train --dataset cifar10 --data-dir ~/data --randaugment 9 --mixup 0.8 --cutmix 1 \\
                --reprob 0.25 --ema 0.9998                            the DeiT recipe

The run folder (--out) gets config.json, metrics.jsonl (one JSON record per epoch and split),
last.safetensors (weights + optimizer, every epoch) and best.safetensors (best test accuracy).
Checkpoints are written atomically: an interrupted run keeps its last good checkpoint. A new run
refuses a folder that holds another run: --resume it, pick another --out, or --overwrite it.
"""


def _per_optimizer(option):
    """'0.002 with adamw, 0.1 with sgd': an option's default for each optimizer."""
    return ", ".join(f"{values[option]:g} with {name}"
                     for name, values in OPTIMIZER_DEFAULTS.items())


def add_parser(subparsers, name, help_text):
    defaults = TrainConfig()
    p = command_parser(subparsers, name, help_text, EPILOG)
    data = p.add_argument_group("data")
    # Training options default to None so that run() knows which ones were given (--resume
    # refuses those that differ from the run's); the help texts name TrainConfig's defaults.
    data.add_argument("--dataset", default=None,
                      choices=("digits", "mnist", "fashion_mnist", "cifar10", "cifar100",
                               "synthetic", "folder"),
                      help="digits is embedded; mnist/fashion_mnist (IDX files) and "
                           "cifar10/cifar100 (python pickle batches) are read from --data-dir; "
                           "folder: your images, --data-dir DIR with DIR/train/<class>/... and "
                           f"DIR/val/<class>/... (default: {defaults.dataset})")
    data.add_argument("--data-dir", default=None, metavar="DIR",
                      help="folder holding the dataset files (default: ./data)")
    data.add_argument("--train-fraction", type=float, default=None, metavar="F",
                      help="train on this stratified fraction of the training labels, in (0, 1] "
                           "(the test split is unchanged; default: 1)")
    data.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                      help="turn off the dataset's default augmentation (and its default "
                           "recipe: CutMix for digits)")
    add_folder_flags(data)
    add_recipe_flags(p.add_argument_group("the DeiT recipe (timm's values in brackets; 0: off)"))
    add_finetune_flags(p.add_argument_group("fine-tuning"))
    model = p.add_argument_group("model and optimisation")
    model.add_argument("--model", default=None, metavar="NAME",
                       help="named configuration (see minivit info --list); default: the small "
                            "model that suits the dataset (vit_digits, vit_mnist, vit_cifar)")
    model.add_argument("--init", default=None, metavar="RUN_OR_WEIGHTS",
                       help="start from a pretrained encoder: a minivit pretrain (MAE, DINO) or "
                            "train run folder, or a weights file (reference MAE/DINO, timm); "
                            "its decoder or head is dropped and a new head trained")
    model.add_argument("--epochs", type=int, default=None,
                       help=f"default: {DEFAULT_EPOCHS}; with --resume, the run's own")
    model.add_argument("--batch-size", type=int, default=None,
                       help=f"default: {defaults.batch_size}")
    model.add_argument("--lr", type=float, default=None,
                       help=f"peak learning rate (default: {_per_optimizer('lr')})")
    model.add_argument("--weight-decay", type=float, default=None,
                       help="weight decay, not on biases/norms/embeddings: decoupled with "
                            "adamw, an L2 term added to the gradient with sgd (default: "
                            f"{_per_optimizer('weight_decay')})")
    model.add_argument("--warmup", type=int, default=None, metavar="EPOCHS",
                       help="linear warmup epochs before the cosine decay (default: "
                            f"{defaults.warmup})")
    model.add_argument("--label-smoothing", type=float, default=None,
                       help=f"default: {defaults.label_smoothing}")
    model.add_argument("--drop-path", type=float, default=None,
                       help=f"stochastic depth rate of the last block (default: "
                            f"{defaults.drop_path})")
    model.add_argument("--clip-grad", type=float, default=None,
                       help=f"clip the global gradient norm to this (0: off; default: "
                            f"{defaults.clip_grad})")
    model.add_argument("--optimizer", choices=("adamw", "sgd"), default=None,
                       help=f"default: {defaults.optimizer}")
    add_family_flags(p)
    run = p.add_argument_group("run")
    add_backend_flags(run)
    add_precision_flag(run)
    p.set_defaults(dtype=None)  # its help names the default
    run.add_argument("--cuda-graph", action="store_true",
                     help="GPU (--backend cupy): record the training step once as a CUDA graph "
                          "and replay it for every full batch (several times faster for small "
                          "models, whose steps are bound by Python's kernel launches)")
    run.add_argument("--seed", type=int, default=None, help=f"default: {defaults.seed}")
    add_run_folder_flags(run, defaults.out)
    run.add_argument("--format", dest="checkpoint_format", choices=("safetensors", "npz"),
                     default=None, help=f"checkpoint file format (default: "
                                        f"{defaults.checkpoint_format})")
    run.add_argument("--log-grads", action="store_true", default=None,
                     help="log per-layer gradient norms and update/weight ratios each epoch")


def add_folder_flags(group):
    group.add_argument("--val-fraction", type=float, default=None, metavar="F",
                       help="folder without train/ and val/: hold out this seeded share of "
                            "each class folder for validation")
    group.add_argument("--img-size", type=number(int, 1), default=None, metavar="PIXELS",
                       help="folder / fine-tuning: the model's input size (default: the "
                            "model's); pretrained position embeddings and relative "
                            "position tables are resampled to it")
    group.add_argument("--strict", action="store_true", default=None,
                       help="folder: refuse unreadable image files instead of skipping them")
    group.add_argument("--norm", choices=("imagenet", "inception"), default=None,
                       help="folder: mean/std to normalise with (default: imagenet for the "
                            "224-pixel models, inception (0.5/0.5) for the small ones)")
    group.add_argument("--workers", type=number(int, 0), default=None, metavar="N",
                       help="threads decoding and augmenting batches ahead of the training "
                            "step (default: 0 for in-memory datasets, up to 4 for folders); "
                            "the batches do not depend on it")


def add_recipe_flags(group):
    group.add_argument("--randaugment", type=float, default=None, metavar="MAGNITUDE",
                       help="RandAugment: 2 operations per image at this magnitude, 0..10 [9]")
    group.add_argument("--reprob", type=float, default=None, metavar="P",
                       help="random erasing probability per image [0.25]")
    group.add_argument("--mixup", type=float, default=None, metavar="ALPHA",
                       help="Mixup alpha [0.8]; with --cutmix, each batch is one or the other")
    group.add_argument("--cutmix", type=float, default=None, metavar="ALPHA",
                       help="CutMix alpha [1.0]; --label-smoothing is folded into the targets "
                            "(default: 1.0 for digits, else 0)")
    group.add_argument("--ema", type=float, default=None, metavar="DECAY",
                       help="keep a moving average of the weights, evaluated each epoch and "
                            "saved in the checkpoints (minivit eval --ema) [0.99996 for "
                            "ImageNet; about 1 - 10/steps for short runs]")


def add_finetune_flags(group):
    group.add_argument("--pretrained", default=None, metavar="WEIGHTS",
                       help="start from timm or minivit weights (a file or a run folder): a new "
                            "head where the class count differs, pos_embed resampled to "
                            "--img-size")
    group.add_argument("--freeze", action="store_true", default=None,
                       help="train only the head (a linear probe)")
    group.add_argument("--layer-decay", type=float, default=None, metavar="DECAY",
                       help="layer-wise learning-rate decay (e.g. 0.75): block i of L trains at "
                            "lr * DECAY^(L - i)")


def add_run_folder_flags(parser, default_out):
    """--out, --resume, --overwrite and --quiet: the flags of a command that keeps a run folder
    (train, pretrain)."""
    parser.add_argument("--out", default=default_out, metavar="RUN_DIR",
                        help="run folder (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint, with its saved "
                             "configuration (only --epochs and --data-dir may change)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --out that holds a run, removing that run's "
                             "checkpoints and metrics")
    parser.add_argument("--quiet", dest="progress", action="store_false",
                        help="no progress bar or per-epoch lines")


def run(args):
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items()
             if k in fields - RUN_CONTROL and v is not None}  # before apply_backend fills it
    run_control = {"out": args.out, "resume": args.resume, "progress": args.progress,
                   "overwrite": args.overwrite, "cuda_graph": args.cuda_graph}
    config = TrainConfig(**dict(given, backend=apply_backend(args), **run_control))
    if args.resume:  # the options given, not only those that differ from TrainConfig's defaults
        config = resumed_config(config, given)
    finished = {}  # train()'s summary once an epoch's checkpoint is written in this run
    try:
        summary = train(config, on_epoch_end=lambda epoch, summary: finished.update(summary))
    except KeyboardInterrupt:  # every rank knows the same finished epochs
        if finished and finished["epoch"] == finished["epochs"]:
            message = (f"minivit train: interrupted after the last epoch's checkpoint; the run "
                       f"in {config.out} is complete")
        elif finished or config.resume:
            kept = f"epoch {finished['epoch']}" if finished else "the epoch it resumed from"
            message = (f"minivit train: interrupted; {config.out} keeps the checkpoint of "
                       f"{kept}: continue with minivit train --resume --out {config.out}")
        else:
            message = (f"minivit train: interrupted during the first epoch; no checkpoint was "
                       f"written in {config.out}: start again by adding --overwrite to the "
                       f"same command")
        return dist.interrupted(message)
    if not dist.is_main():  # under mpiexec: rank 0 reports
        return 0
    ema = f"; EMA weights {summary['ema_accuracy']:.4f}" if "ema_accuracy" in summary else ""
    print(f"test accuracy {summary['test_accuracy']:.4f} (best {summary['best_accuracy']:.4f}"
          f"{ema}) after {epochs_text(summary['epoch'])}, {summary['seconds']:.1f} s; run folder "
          f"{summary['run_dir']}")
    return 0
