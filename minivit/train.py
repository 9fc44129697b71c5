"""The training and evaluation loop.

``train(TrainConfig(...))`` builds the model and data, trains with AdamW and a warmup + cosine
schedule, evaluates every epoch and keeps a run folder:

    RUN/config.json        the training configuration
    RUN/metrics.jsonl      one JSON record per epoch and split (train, test, grads)
    RUN/last.safetensors   weights + optimizer state at the end of the last finished epoch
    RUN/best.safetensors   weights of the epoch with the best test accuracy

Checkpoints are written atomically; a run stopped at any point (Ctrl-C, NaN loss, a crash)
keeps the last good checkpoint, and ``resume=True`` continues from it with exactly the batches
and random numbers the uninterrupted run would have used. A new run refuses a folder that holds
another run unless ``overwrite=True``, which removes that run's checkpoints and metrics first.
"""

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import minivit.functional as F
from minivit import backend, cpu, cuda
from minivit import distributed as dist
from minivit.checkpoint import (CHECKPOINT_SUFFIXES, find_checkpoint, read_checkpoint,
                                read_checkpoint_parts, save_checkpoint)
from minivit.data import DATASETS
from minivit.data.folder import skipped_files_report
from minivit.data.pipeline import build_loaders, pipeline_option_checks, recipe_defaults
from minivit.ema import ModelEma
from minivit.encoders import load_encoder
from minivit.errors import MinivitError, TrainingError
from minivit.io import atomic_write
from minivit.finetune import (LayerwiseOptimizer, describe_trainable, freeze_all_but_head,
                              layer_scales, load_pretrained_weights)
from minivit.models import create_model, model_config
from minivit.optim import AdamW, SGD, warmup_cosine
from minivit.tensor import no_grad

DEFAULT_MODELS = {"digits": "vit_digits", "mnist": "vit_mnist", "fashion_mnist": "vit_mnist",
                  "cifar10": "vit_cifar", "cifar100": "vit_cifar", "synthetic": "vit_cifar",
                  "folder": "vit_cifar"}
# The files of a run, in the order --overwrite removes them: the checkpoints --resume would
# continue from first, config.json last.
RUN_FILES = (*(f"{name}{suffix}" for name in ("last", "best") for suffix in CHECKPOINT_SUFFIXES),
             "metrics.jsonl", "config.json")


# What --lr and --weight-decay default to, per optimizer. AdamW's decay is decoupled
# (θ ← θ − lr·λ·θ); SGD's is an L2 term added to the gradient (as torch.optim.SGD's), so
# AdamW's 0.05 shrinks an SGD model towards a constant output (measured on digits: the loss
# settled at ln 10, chance accuracy), and AdamW's 2e-3 barely moves SGD.
OPTIMIZER_DEFAULTS = {"adamw": {"lr": 2e-3, "weight_decay": 0.05},
                      "sgd": {"lr": 0.1, "weight_decay": 5e-4}}


@dataclasses.dataclass
class TrainConfig:
    dataset: str = "digits"
    data_dir: str = None
    model: str = None  # default: the small model that suits the dataset (DEFAULT_MODELS)
    epochs: int = 100
    batch_size: int = 64
    lr: float = None  # None: the optimizer's default (OPTIMIZER_DEFAULTS)
    min_lr: float = 1e-5
    weight_decay: float = None  # None: the optimizer's default
    warmup: int = 5  # epochs of linear warmup
    label_smoothing: float = 0.1
    drop_path: float = 0.2
    optimizer: str = "adamw"
    clip_grad: float = 1.0
    augment: bool = True
    backend: str = "numpy"
    cuda_graph: bool = False  # GPU: replay the training step of full batches as a CUDA graph
    dtype: str = "float32"
    seed: int = 0
    out: str = "runs/latest"
    checkpoint_format: str = "safetensors"
    log_grads: bool = False
    progress: bool = True
    init: str = None  # a pretrained encoder (run folder or weights) to fine-tune from
    train_fraction: float = 1.0  # a stratified fraction of the training labels
    resume: bool = False  # continue from RUN/last.* instead of starting afresh
    overwrite: bool = False  # start afresh in an `out` that holds a run, removing that run
    # image folders and the input pipeline (minivit.data.pipeline, minivit.data.folder)
    img_size: int = None  # folder / fine-tuning: the model's input size (default: its own)
    val_fraction: float = None  # folder without train/ and val/: the seeded share for val
    strict: bool = False  # folder: refuse unreadable image files instead of skipping them
    norm: str = None  # folder: "imagenet" or "inception" mean/std (default: by model size)
    workers: int = None  # loader threads (default: 0 for in-memory data, up to 4 for folders)
    # the DeiT recipe (0: off; None: the dataset's default, RECIPE_DEFAULTS); timm's values:
    # 9, 0.25, 0.8, 1.0, 0.99996
    randaugment: float = None  # RandAugment magnitude (2 ops per image)
    reprob: float = None  # random erasing probability
    mixup: float = None  # Mixup alpha
    cutmix: float = None  # CutMix alpha
    ema: float = None  # decay of the moving average of the weights
    # fine-tuning (minivit.finetune)
    pretrained: str = None  # timm or minivit weights to start from
    freeze: bool = False  # train only the head
    layer_decay: float = None  # layer-wise learning-rate decay, e.g. 0.75

    def model_name(self):
        return self.model or DEFAULT_MODELS[self.dataset]


def saved_config(path):
    """The TrainConfig in a run's config.json, each value checked against its field's type;
    MinivitError naming the file and the field when it is damaged."""
    advice = ("restore it (minivit train writes it at the start of a run), or start a new run "
              "with --out OTHER")
    try:
        saved = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, ValueError) as error:
        raise MinivitError(f"{path} is damaged ({error}): {advice}") from None
    if not isinstance(saved, dict):
        raise MinivitError(f"{path} is damaged: it holds a JSON {type(saved).__name__}, not the "
                           f"object of training options minivit train writes; {advice}")
    values = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name not in saved:
            continue
        value, kind = saved[field.name], field.type
        fits = (value is None and field.default is None) or (
            isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)) or (
            kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not fits:
            raise MinivitError(f"{path} is damaged: {field.name} is {json.dumps(value)}, "
                               f"expected {kind.__name__}; {advice}")
        values[field.name] = value
    return TrainConfig(**values)


def epochs_text(count):
    """'1 epoch', '2 epochs'."""
    return f"{count} epoch{'' if count == 1 else 's'}"


def _run_files(run_dir):
    """The names of the run files (RUN_FILES) that `run_dir` holds."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def _describe_run(run_dir, files):
    """How far the run in `run_dir` got and its files, e.g. 'epoch 2 of 3 done: config.json,
    ...', for messages."""
    progress = "no epoch finished"
    if any(name.startswith("last.") for name in files):
        try:
            info = read_checkpoint(find_checkpoint(run_dir, "last"))[2]
            progress = f"epoch {info['epoch']} of {info['train_config']['epochs']} done"
        except (MinivitError, OSError, KeyError, TypeError, ValueError):
            progress = "an unreadable last checkpoint"
    return f"{progress}: {', '.join(files)}"


def _check_run_folder(config, run_dir):
    """Refuse an `out` that is a file, a new run into a folder holding another run (unless
    `overwrite`), and a resume with no checkpoint to continue from."""
    if run_dir.exists() and not run_dir.is_dir():
        raise MinivitError(f"--out {run_dir} is a file, not a folder: pass --out a folder for "
                           f"the run (a new one, or a run folder with --resume)")
    if config.resume and config.overwrite:
        raise MinivitError(f"--resume continues the run in {run_dir} and --overwrite replaces "
                           f"it: pass one of them")
    files = _run_files(run_dir)
    if files and not config.resume and not config.overwrite:
        raise MinivitError(f"{run_dir} already holds a run ({_describe_run(run_dir, files)}): "
                           f"pass --resume to continue it, --out OTHER to keep it and start "
                           f"another run, or --overwrite to replace it")
    if config.resume and "config.json" in files and not any(
            name.startswith("last.") for name in files):
        kept = [name for name in files if name != "config.json"]
        if not kept:
            raise MinivitError(f"--resume: {run_dir} has no checkpoint to continue from (its run "
                               f"stopped before its first epoch ended): start it again with "
                               f"--overwrite")
        raise MinivitError(f"--resume: {run_dir} has no last checkpoint (last.safetensors or "
                           f"last.npz: the weights and optimizer state a resume continues from), "
                           f"though it holds {', '.join(kept)}. If last.* was moved away, put it "
                           f"back to resume; to keep these files, start a new run with --out "
                           f"OTHER; --overwrite starts this run again and deletes them")


def model_input(config):
    """(image size, channels) an image folder is read at: --img-size, else the model's."""
    settings = model_config(config.model_name())
    return config.img_size or settings["img_size"], settings["in_chans"]


def build_model(config, num_classes, image_size, channels, notify=print):
    """The run's model; with config.pretrained, its weights loaded (and the provenance the run
    records returned as the second value, else None)."""
    backend.manual_seed(config.seed)
    model = create_model(config.model_name(), num_classes=num_classes, img_size=image_size,
                         in_chans=channels, drop_path_rate=config.drop_path)
    provenance = None
    if config.pretrained and not config.resume:  # a resumed run has the weights it made
        provenance = load_pretrained_weights(model, config.pretrained, notify)
    if config.init:
        load_encoder(model, config.init)  # its head stays fresh
    if config.freeze:
        freeze_all_but_head(model)
    return model.to(dtype=config.dtype), provenance


def build_optimizer(config, model):
    optimizer = {"adamw": AdamW, "sgd": SGD}[config.optimizer]  # names checked by train()
    if config.layer_decay is not None:
        return LayerwiseOptimizer(optimizer, model.named_parameters(),
                                  layer_scales(model, config.layer_decay), config.lr,
                                  config.weight_decay)
    return optimizer(model.named_parameters(), lr=config.lr, weight_decay=config.weight_decay)


def training_step(model, optimizer, config):
    """A function (x, y) -> (loss, logits) arrays of one training step: forward, cross-entropy,
    backward, optimizer step. With config.cuda_graph, full batches replay one CUDA graph,
    recorded on the first of them (which trains eagerly, as the capture's warm-up); a smaller
    last batch runs eagerly. The graph's outputs are overwritten by its next replay."""
    def step(x, y):
        logits = model(x)
        # Mixup/CutMix targets (B, K) come with the smoothing folded in
        smoothing = config.label_smoothing if y.ndim == 1 else 0.0
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(max_grad_norm=config.clip_grad)
        return loss.data, logits.data

    return cuda.replayed(step, config.batch_size) if config.cuda_graph else step


def hard_labels(targets):
    """Class indices of a batch's targets: labels (B,) as they are, soft targets (B, K) by
    their largest entry."""
    return targets if targets.ndim == 1 else targets.argmax(axis=1)


def _notice(message):
    print(f"minivit train: {message}", file=sys.stderr)


def evaluate(model, loader, dtype="float32"):
    """(mean loss, accuracy) of `model` over `loader`, in eval mode, without a graph."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    with no_grad():
        for images, labels in loader:
            logits = model(backend.to_backend(images.astype(dtype, copy=False)))
            targets = backend.to_backend(labels)
            total_loss += F.cross_entropy(logits, targets).item() * len(labels)
            correct += int((logits.data.argmax(axis=1) == targets).sum())
            count += len(labels)
    total_loss, correct, count = dist.sum_over_ranks(total_loss, correct, count)  # data parallel
    model.train(was_training)
    return total_loss / count, correct / count


class _MetricsLog:
    """Appends JSON records to RUN/metrics.jsonl (one line each, flushed)."""

    def __init__(self, path, keep_until_epoch=None):
        self.path = Path(path)
        if keep_until_epoch is not None and self.path.exists():
            # drop records of epochs after the checkpoint we resume from
            lines = [line for line in self.path.read_text(errors="replace").splitlines()
                     if line.strip()]
            kept = []
            for number, line in enumerate(lines, 1):
                try:
                    keep = json.loads(line)["epoch"] <= keep_until_epoch
                except (ValueError, TypeError, KeyError):
                    if number == len(lines):  # cut short by an interruption: its epoch is redone
                        break
                    raise MinivitError(f"{self.path} line {number} is damaged (not a JSON record "
                                       f"with an epoch: {line[:60]!r}): fix or delete that line, "
                                       f"then resume") from None
                if keep:
                    kept.append(line)
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record):
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")


def _gradient_statistics(model, optimizer, params_before):
    """Per-parameter gradient norms and update/weight ratios ‖Δθ‖/‖θ‖ of the last step."""
    xp = optimizer.xp
    grad_norms, update_ratios = {}, {}
    for name, start, stop in zip(optimizer.names, optimizer.offsets, optimizer.offsets[1:]):
        weight_norm = float(xp.linalg.norm(params_before[start:stop]))
        update = optimizer.flat[start:stop] - params_before[start:stop]
        grad_norms[name] = float(xp.linalg.norm(optimizer.flat_grad[start:stop]))
        update_ratios[name] = float(xp.linalg.norm(update)) / max(weight_norm, 1e-12)
    return grad_norms, update_ratios


def train(config, on_epoch_end=None):
    """Train as `config` says; returns a summary dict. `on_epoch_end(epoch, summary)` is called
    after each epoch's checkpoint is written (tests use it to interrupt a run)."""
    cpu.configure()  # BLAS threads and malloc, as the command line sets them up
    # overflow on the way to a non-finite loss is reported by the loss check, with the epoch,
    # step and learning rate, rather than as NumPy warnings
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), dist.failing_together():
        return _train(config, on_epoch_end)


def _train(config, on_epoch_end):
    from tqdm import tqdm

    backend.set_backend(config.backend)
    dist.init()  # under mpiexec: join the other processes (each on its own GPU)
    run_dir = Path(config.out)
    if dist.is_main():  # rank 0 keeps the run folder; the others only read a resumed one
        _check_run_folder(config, run_dir)
    if config.dataset not in DATASETS and config.dataset != "folder":
        raise MinivitError(f"unknown dataset {config.dataset!r}; known: "
                           f"{', '.join(DATASETS)}, folder")
    if config.cuda_graph and config.backend != "cupy":
        raise MinivitError(f"--cuda-graph records the training step on the GPU: it needs "
                           f"--backend cupy, got {config.backend}")
    if config.pretrained and config.init:
        raise MinivitError("--pretrained (a classifier's weights) and --init (a pretrained "
                           "encoder) both choose the starting weights: pass one of them")
    if config.layer_decay is not None and (config.log_grads or config.cuda_graph):
        raise MinivitError("--layer-decay steps one optimizer per learning rate, and "
                           "--log-grads and --cuda-graph work with a single one: leave out "
                           "--layer-decay or them")
    if config.optimizer not in OPTIMIZER_DEFAULTS:
        raise MinivitError(f"unknown optimizer {config.optimizer!r}; known: "
                           f"{', '.join(OPTIMIZER_DEFAULTS)}")
    defaults = dict(OPTIMIZER_DEFAULTS[config.optimizer],
                    **recipe_defaults(config.dataset, config.augment, config.resume))
    config = dataclasses.replace(config, **{  # what the run trains with, as config.json says
        name: value for name, value in defaults.items() if getattr(config, name) is None})
    for field, ok, expected in (
            ("epochs", config.epochs >= 1, "at least 1"), ("lr", config.lr > 0, "positive"),
            ("min_lr", config.min_lr >= 0, "at least 0"),
            ("weight_decay", config.weight_decay >= 0, "at least 0"),
            ("warmup", config.warmup >= 0, "at least 0"),
            ("clip_grad", config.clip_grad >= 0, "at least 0 (0: off)"),
            ("label_smoothing", 0 <= config.label_smoothing < 1, "in [0, 1)"),
            ("drop_path", 0 <= config.drop_path < 1, "in [0, 1)"),
            ("seed", config.seed >= 0, "at least 0"), *pipeline_option_checks(config),
            ("layer_decay", config.layer_decay is None or 0 < config.layer_decay <= 1,
             "in (0, 1]")):
        if not ok:
            raise MinivitError(f"{field.replace('_', '-')} must be {expected}, got "
                               f"{getattr(config, field)}")
    # data parallel: each process evaluates its part of the test set, and trains on its part
    # of every (global, --batch-size) batch
    train_loader, test_loader, data = build_loaders(
        config, *model_input(config), test_part=dist.shard_bounds if dist.world_size() > 1
        else None)
    train_loader = dist.shard_loader(train_loader)
    config = dataclasses.replace(config, augment=data.augmented)  # record what is applied
    for line in skipped_files_report(data.skipped):
        _notice(line)
    model, provenance = build_model(config, data.num_classes, data.image_size, data.channels,
                                    notify=_notice)
    optimizer = build_optimizer(config, model)
    dist.average_gradients(optimizer)
    if config.progress and (config.freeze or config.pretrained):
        _notice(describe_trainable(model))
    train_step = training_step(model, optimizer, config)
    steps_per_epoch = len(train_loader)
    total_steps = config.epochs * steps_per_epoch
    info = {"dataset": config.dataset, "mean": data.mean, "std": data.std,
            "class_names": data.class_names, "train_config": dataclasses.asdict(config),
            "pretrained": provenance, "skipped_files": len(data.skipped)}

    start_epoch, best_accuracy = 0, -1.0
    if dist.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise MinivitError(f"cannot create the run folder {run_dir}: "
                               f"{error.strerror or error}; pass --out a folder that can be "
                               f"created") from None
    suffix = "." + config.checkpoint_format
    last_path = run_dir / f"last{suffix}"
    ema = None
    if config.resume:
        last = find_checkpoint(run_dir, "last")
        model_state, optimizer_arrays, ema_arrays, saved = read_checkpoint_parts(last)
        info["pretrained"] = saved.get("pretrained")
        model.load_state_dict(model_state)
        optimizer.load_state_dict({**saved["optimizer"], "arrays": optimizer_arrays})
        if config.ema:
            ema = ModelEma(model, config.ema)
            ema.load_state_arrays(ema_arrays, last)
        start_epoch, best_accuracy = saved["epoch"], saved["best_accuracy"]
        if start_epoch >= config.epochs:
            raise MinivitError(f"--resume: {run_dir} has already trained "
                               f"{epochs_text(start_epoch)}; pass --epochs greater than "
                               f"{start_epoch} to train further")
    if config.ema and ema is None:  # the average starts at the (pretrained) initial weights
        ema = ModelEma(model, config.ema)
    dist.broadcast_parameters(model)
    config = dataclasses.replace(config, progress=config.progress and dist.is_main())
    if config.overwrite and dist.is_main():  # nothing of the old run may be resumed now
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    # beside the options: the class names (an image folder's sorted folder names), mean/std
    config_text = json.dumps(dict(dataclasses.asdict(config), class_names=data.class_names,
                                  mean=data.mean, std=data.std), indent=2) + "\n"
    if dist.is_main():
        metrics = _MetricsLog(run_dir / "metrics.jsonl", keep_until_epoch=start_epoch)
        atomic_write(run_dir / "config.json", lambda tmp: Path(tmp).write_text(config_text))

    summary = {"run_dir": str(run_dir), "epochs": config.epochs, "best_accuracy": best_accuracy}
    if config.progress and dist.world_size() > 1:
        tqdm.write(f"data parallel: {dist.describe()}")
    step = start_epoch * steps_per_epoch
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        model.train()
        train_loader.set_epoch(epoch)
        backend.manual_seed(dist.rank_seed([config.seed, epoch]))  # this epoch's dropout numbers
        epoch_loss, epoch_correct, epoch_count, epoch_start = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not config.progress, unit="batch")
        for batch, (images, labels) in enumerate(bar):
            optimizer.lr = warmup_cosine(step, total_steps, config.lr,
                                         config.warmup * steps_per_epoch, config.min_lr)
            x = backend.to_backend(images.astype(config.dtype, copy=False))
            y = backend.to_backend(labels)
            log_grads_now = config.log_grads and batch == steps_per_epoch - 1
            params_before = optimizer.flat.copy() if log_grads_now else None
            loss, logits = train_step(x, y)
            if ema is not None:
                ema.update(model)
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                kept = (f"The last good checkpoint is kept in {last_path}" if last_path.exists()
                        else "No checkpoint was written (none had been: the first epoch had "
                             "not ended)")
                raise TrainingError(
                    f"the loss became {loss_value} at epoch {epoch + 1}, step {step + 1} "
                    f"(lr {optimizer.lr:.3g}); training stopped. {kept}: lower --lr, or keep "
                    f"--clip-grad on")
            step += 1
            epoch_loss += loss_value * len(labels)
            epoch_correct += int((logits.argmax(axis=1) == hard_labels(y)).sum())
            epoch_count += len(labels)
            elapsed = time.perf_counter() - epoch_start
            bar.set_postfix(loss=f"{epoch_loss / epoch_count:.3f}",
                            acc=f"{epoch_correct / epoch_count:.3f}", lr=f"{optimizer.lr:.2e}",
                            img_s=f"{epoch_count / elapsed:.0f}")
        bar.close()
        train_time = time.perf_counter() - epoch_start
        epoch_loss, epoch_correct, epoch_count = dist.sum_over_ranks(epoch_loss, epoch_correct,
                                                                     epoch_count)
        test_loss, test_accuracy = evaluate(model, test_loader, config.dtype)
        if ema is not None:
            with ema.applied(model):
                ema_loss, ema_accuracy = evaluate(model, test_loader, config.dtype)
        is_best = test_accuracy > best_accuracy
        best_accuracy = max(best_accuracy, test_accuracy)
        checkpoint_info = dict(info, epoch=epoch + 1, step=step, best_accuracy=best_accuracy,
                               test_accuracy=test_accuracy)
        if dist.is_main():  # the other processes hold the same weights and numbers
            common = {"epoch": epoch + 1, "step": step, "time": time.perf_counter() - started}
            metrics.write(dict(common, split="train", loss=epoch_loss / epoch_count,
                               accuracy=epoch_correct / epoch_count, lr=optimizer.lr,
                               images_per_s=epoch_count / train_time))
            metrics.write(dict(common, split="test", loss=test_loss, accuracy=test_accuracy))
            if ema is not None:
                metrics.write(dict(common, split="test_ema", loss=ema_loss,
                                   accuracy=ema_accuracy))
            if params_before is not None:
                grad_norms, update_ratios = _gradient_statistics(model, optimizer, params_before)
                metrics.write(dict(common, split="grads", grad_norms=grad_norms,
                                   update_ratios=update_ratios))
            # metrics, then best, then last: whatever an interruption cuts short, resuming from
            # `last` redoes (a resumed run drops metrics records past its checkpoint)
            if is_best:
                save_checkpoint(run_dir / f"best{suffix}", model, checkpoint_info, ema=ema)
            save_checkpoint(last_path, model, checkpoint_info, optimizer, ema=ema)
        if ema is not None:
            summary["ema_accuracy"] = ema_accuracy
        if config.progress:
            tqdm.write(f"epoch {epoch + 1:>3}/{config.epochs}  train loss "
                       f"{epoch_loss / epoch_count:.4f} acc {epoch_correct / epoch_count:.4f}  "
                       f"test loss {test_loss:.4f} acc {test_accuracy:.4f}  "
                       + (f"ema acc {ema_accuracy:.4f}  " if ema is not None else "")
                       + f"{epoch_count / train_time:.0f} img/s")
        summary.update(best_accuracy=best_accuracy, test_accuracy=test_accuracy,
                       test_loss=test_loss, epoch=epoch + 1, seconds=time.perf_counter() - started)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, summary)
    return summary
