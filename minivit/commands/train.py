"""minivit train: train a ViT and keep a run folder (config, metrics, checkpoints)."""

import argparse
import dataclasses
import json
from pathlib import Path

from minivit.commands.common import add_backend_flags, apply_backend

EPILOG = """examples:
  minivit train                                   tiny ViT on the embedded 8x8 digits (CPU)
  minivit train --dataset cifar10 --data-dir ~/data --epochs 50 --backend cupy
  minivit train --out runs/a --resume             continue runs/a from its last checkpoint

The run folder (--out) gets config.json, metrics.jsonl (one JSON record per epoch and split),
last.safetensors (weights + optimizer, every epoch) and best.safetensors (best test accuracy).
Checkpoints are written atomically: an interrupted run keeps its last good checkpoint.
"""


def add_parser(subparsers, name, help_text):
    from minivit.train import TrainConfig

    defaults = TrainConfig()
    p = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default=defaults.dataset,
                      choices=("digits", "mnist", "fashion_mnist", "cifar10", "cifar100",
                               "synthetic"),
                      help="digits is embedded; mnist/fashion_mnist (IDX files) and "
                           "cifar10/cifar100 (python pickle batches) are read from --data-dir "
                           "(default: %(default)s)")
    data.add_argument("--data-dir", default=None, metavar="DIR",
                      help="folder holding the dataset files (default: ./data)")
    data.add_argument("--no-augment", dest="augment", action="store_false",
                      help="turn off the dataset's default augmentation")
    model = p.add_argument_group("model and optimisation")
    model.add_argument("--model", default=None, metavar="NAME",
                       help="named configuration (see minivit info --list); default: the small "
                            "model that suits the dataset (vit_digits, vit_mnist, vit_cifar)")
    model.add_argument("--epochs", type=int, default=None,
                       help=f"default: {defaults.epochs}; with --resume, the run's own")
    model.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="default: %(default)s")
    model.add_argument("--lr", type=float, default=defaults.lr,
                       help="peak AdamW learning rate (default: %(default)s)")
    model.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                       help="decoupled weight decay, not on biases/norms/embeddings "
                            "(default: %(default)s)")
    model.add_argument("--warmup", type=int, default=defaults.warmup, metavar="EPOCHS",
                       help="linear warmup epochs before the cosine decay (default: %(default)s)")
    model.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing,
                       help="default: %(default)s")
    model.add_argument("--drop-path", type=float, default=defaults.drop_path,
                       help="stochastic depth rate of the last block (default: %(default)s)")
    model.add_argument("--clip-grad", type=float, default=defaults.clip_grad,
                       help="clip the global gradient norm to this (0: off; default: "
                            "%(default)s)")
    model.add_argument("--optimizer", choices=("adamw", "sgd"), default=defaults.optimizer)
    run = p.add_argument_group("run")
    add_backend_flags(run)
    run.add_argument("--seed", type=int, default=defaults.seed, help="default: %(default)s")
    run.add_argument("--out", default=defaults.out, metavar="RUN_DIR",
                     help="run folder (default: %(default)s)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint, with its saved "
                          "configuration (only --epochs may change)")
    run.add_argument("--format", dest="checkpoint_format", choices=("safetensors", "npz"),
                     default=defaults.checkpoint_format, help="checkpoint file format")
    run.add_argument("--log-grads", action="store_true",
                     help="log per-layer gradient norms and update/weight ratios each epoch")
    run.add_argument("--quiet", dest="progress", action="store_false",
                     help="no progress bar or per-epoch lines")


def run(args):
    from minivit.errors import MinivitError
    from minivit.train import TrainConfig, train

    args.backend = apply_backend(args)
    if args.epochs is None and not args.resume:
        args.epochs = TrainConfig.epochs
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if args.resume:
        saved_path = Path(args.out) / "config.json"
        if not saved_path.exists():
            raise MinivitError(f"--resume: {saved_path} does not exist; is {args.out} a run "
                               f"folder made by minivit train?")
        saved = json.loads(saved_path.read_text())
        saved.update(resume=True, progress=args.progress, out=args.out)
        if args.epochs is not None:
            saved["epochs"] = args.epochs
        config = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
    finished = []  # epochs whose checkpoint has been written in this run
    try:
        summary = train(config, on_epoch_end=lambda epoch, summary: finished.append(epoch))
    except KeyboardInterrupt:
        import sys

        if finished or config.resume:
            kept = f"epoch {finished[-1]}" if finished else "the epoch it resumed from"
            print(f"minivit train: interrupted; {config.out} keeps the checkpoint of {kept}: "
                  f"continue with minivit train --resume --out {config.out}", file=sys.stderr)
        else:
            print("minivit train: interrupted during the first epoch; no checkpoint was written",
                  file=sys.stderr)
        return 130
    print(f"test accuracy {summary['test_accuracy']:.4f} (best {summary['best_accuracy']:.4f}) "
          f"after {summary['epoch']} epochs, {summary['seconds']:.1f} s; run folder "
          f"{summary['run_dir']}")
    return 0
