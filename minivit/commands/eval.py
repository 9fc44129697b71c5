"""minivit eval: test loss and accuracy of a checkpoint."""

from minivit.checkpoint import checkpoint_path
from minivit.commands.common import (add_backend_flags, add_precision_flag, add_run_data_flags,
                                     apply_backend, command_parser, describe_checkpoint, number,
                                     run_data_dir)
from minivit.data import DataLoader, load_dataset
from minivit.data.pipeline import folder_eval_loader
from minivit.errors import MinivitError
from minivit.models import model_from_checkpoint
from minivit.train import evaluate


def add_parser(subparsers, name, help_text):
    p = command_parser(subparsers, name, help_text)
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint file, or a run folder (its best checkpoint)")
    p.add_argument("--dataset", default=None,
                   help="dataset to evaluate on (default: the one the model was trained on)")
    add_run_data_flags(p, "the checkpoint's run", split="which split to evaluate on")
    p.add_argument("--batch-size", type=number(int, 1), default=256,
                   help="images per forward pass (default: 256; only speed and memory change)")
    p.add_argument("--ema", action="store_true",
                   help="evaluate the moving average of the weights (runs trained with --ema)")
    add_backend_flags(p)
    add_precision_flag(p)


def run(args):
    apply_backend(args)
    path = checkpoint_path(args.checkpoint)
    model, info = model_from_checkpoint(path, ema=args.ema)
    model.to(dtype=args.dtype)
    name = args.dataset or info.get("dataset")
    if name is None:
        raise MinivitError(f"{path} names no dataset (it was not written by minivit train): "
                           f"pass --dataset NAME")
    if name == "folder":
        return _evaluate_folder(model, path, info, args)
    dataset = load_dataset(name, args.split, run_data_dir(args.data_dir, info, name))
    expected = (model.patch_embed.in_chans, *model.patch_embed.img_size)
    if tuple(dataset.images.shape[1:]) != expected:
        trained_on = info.get("dataset", "another dataset")
        raise MinivitError(f"{dataset.name}'s images are {_size(dataset.images.shape[1:])}, the "
                           f"model takes {_size(expected)} (it was trained on {trained_on}): "
                           f"evaluate it on a dataset of that size")
    if dataset.num_classes > model.num_classes:
        raise MinivitError(f"{dataset.name} has {dataset.num_classes} classes, the model only "
                           f"{model.num_classes}: evaluate it on a dataset with at most "
                           f"{model.num_classes} classes")
    loader = DataLoader(dataset, args.batch_size, shuffle=False)
    loss, accuracy = evaluate(model, loader, args.dtype)
    print(f"checkpoint {describe_checkpoint(path, info)}")
    print(f"{dataset.name}: {len(dataset)} images, loss {loss:.4f}, accuracy {accuracy:.4f}")
    return 0


def _evaluate_folder(model, path, info, args):
    """Evaluate a checkpoint on the image folder (and split) it was trained on (or --data-dir)."""
    loader, split = folder_eval_loader(info, args.split, args.data_dir, args.batch_size)
    loss, accuracy = evaluate(model, loader, args.dtype)
    print(f"checkpoint {describe_checkpoint(path, info)}")
    print(f"{split.name}: {len(split)} images, loss {loss:.4f}, accuracy {accuracy:.4f}")
    return 0


def _size(shape):
    """'1x8x8' (channels x height x width)."""
    return "x".join(map(str, shape))
