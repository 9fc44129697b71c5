"""Self-supervised pretraining: ``pretrain(PretrainConfig(method="mae" | "dino", ...))``.

The run folder is the one ``minivit train`` keeps (config.json, metrics.jsonl, last.* written
atomically every epoch, --resume, --overwrite, the NaN guard, `time` going on across resumes,
clear messages when the folder cannot be written; the helpers are minivit.train.run_folder's), but
with no labels there is no test accuracy and so no best.* checkpoint. The checkpoint holds the
whole pretraining state: MAE's encoder and decoder, or DINO's student, teacher and center
(``student.*``, ``teacher.*``, ``center``), plus the optimizer's buffers.

MAE (He et al.): AdamW with betas (0.9, 0.95), per-step warmup + cosine learning rate.
DINO (Caron et al.): AdamW, per-parameter gradient clipping (3.0), the last layer of the
student's head frozen during the first epoch(s), the teacher's EMA momentum cosine from
--momentum-teacher (0.99 here, 0.996 in the reference) to 1, the teacher's temperature warmed
up linearly; PretrainConfig's DINO defaults are for small images (docs/pretraining.md). Both
take --precision as train does (fp16: the loss scaled, DINO's clipping bound with it), and
log the loss per epoch; DINO also logs the teacher's mean entropy, the entropy of its mean
output and the center's norm, which show collapse (entropy → 0: one dimension dominates;
→ log K: uniform output).

Under mpiexec (minivit.distributed) each process works on its rows of every global batch, with
the random numbers (MAE's masks, DINO's crops) drawn for the whole batch from the batch's seed,
and DINO's head batch norms and center use the global batch: N processes pretrain the model
one process would (without drop-path, whose masks each process draws for itself).
"""

import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from minivit import backend, loss_scale
from minivit import distributed as dist
from minivit.checkpoint import find_checkpoint, read_checkpoint, save_checkpoint
from minivit.data import DATASETS, DataLoader, load_dataset
from minivit.data.multicrop import MultiCrop, flips_suit
from minivit.errors import MinivitError
from minivit.models import model_config
from minivit.models.dino import (DINO, DINOLoss, synchronize_batch_norms, teacher_momentum,
                                 update_teacher)
from minivit.models.mae import MaskedAutoencoderViT, mae_for_encoder
from minivit.nn import Module, Parameter
from minivit.optim import AdamW, warmup_cosine
from minivit.precision import check_precision, prepare_training
from minivit.tensor import no_grad
# training's run-folder machinery: one home for the rules of a run folder
from minivit.train.config import (DEFAULT_EPOCHS, DEFAULT_MODELS, refuse_out_of_range,
                                  resumed_config, saved_config, schedule_checks)
from minivit.train.run_folder import (RunStart, check_run_folder, diverged_error,
                                      make_run_folder, prepare_run_folder, resume_from_last,
                                      write_failure)

METHOD_DEFAULTS = {"mae": {"lr": 1.5e-3, "weight_decay": 0.05, "clip_grad": 0.0, "warmup": 5},
                   "dino": {"lr": 1e-3, "weight_decay": 0.04, "clip_grad": 3.0, "warmup": 1}}

# PretrainConfig fields of the run rather than of what it trains: a resume takes them from the
# caller and never compares them with the run's config.json.
RUN_CONTROL = {"out", "resume", "overwrite", "progress", "backend"}


@dataclasses.dataclass
class PretrainConfig:
    """What `pretrain` is told. ``resume=True`` goes on with the options saved in the run's
    config.json, as TrainConfig's: fields left at their defaults take the saved values, others
    must equal them, except `epochs`, `data_dir` and the run control (RUN_CONTROL)."""
    method: str = "mae"
    dataset: str = "digits"
    data_dir: str = None
    model: str = None  # the encoder's configuration; default: DEFAULT_MODELS[dataset]
    epochs: int = None  # None: DEFAULT_EPOCHS, or a resumed run's own
    batch_size: int = 64
    lr: float = None  # None: METHOD_DEFAULTS
    min_lr: float = 1e-6
    weight_decay: float = None
    warmup: int = None  # epochs; None: METHOD_DEFAULTS
    clip_grad: float = None  # MAE: global norm (0: off); DINO: per parameter, as the reference
    drop_path: float = 0.0
    # MAE
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    decoder_dim: int = None  # None: half the encoder's width
    decoder_depth: int = 2
    # DINO: defaults for small images and datasets (docs/pretraining.md: with the reference's
    # own defaults, no batch norm in the head and colour jitter, every run on the digits
    # collapsed)
    out_dim: int = 256
    head_hidden_dim: int = 256
    head_bottleneck_dim: int = 64
    head_bn: bool = True  # the reference's use_bn_in_head
    local_crops: int = 2
    local_crop_size: int = None  # None: half the image, a multiple of the patch
    color_jitter: bool = False
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    momentum_teacher: float = 0.99
    freeze_last_layer: int = 1
    # the run
    backend: str = "numpy"
    dtype: str = "float32"
    precision: str = "fp32"  # as TrainConfig's: bf16 or fp16 (with loss scaling) on the GPU
    seed: int = 0
    out: str = "runs/pretrain"
    checkpoint_format: str = "safetensors"
    progress: bool = True
    resume: bool = False
    overwrite: bool = False

    def model_name(self):
        return self.model or DEFAULT_MODELS[self.dataset]


class DINOPair(Module):
    """What DINO trains and keeps: the student, the teacher (no gradients) and the center."""

    def __init__(self, encoder_config, out_dim, hidden_dim, bottleneck_dim, use_bn):
        self.student = DINO(encoder_config, out_dim, hidden_dim, bottleneck_dim, use_bn)
        self.teacher = DINO(dict(encoder_config, drop_path_rate=0.0), out_dim, hidden_dim,
                            bottleneck_dim, use_bn)
        self.teacher.load_state_dict(self.student.state_dict())
        for parameter in self.teacher.parameters():
            parameter.requires_grad = False
        self.center = Parameter(backend.xp().zeros((1, out_dim), dtype="float32"),
                                requires_grad=False)
        self.config = self.student.config


def _check_config(config):
    if config.method not in METHOD_DEFAULTS:
        raise MinivitError(f"unknown method {config.method!r}; known: "
                           f"{', '.join(METHOD_DEFAULTS)}")
    if config.dataset not in DATASETS:
        raise MinivitError(f"unknown dataset {config.dataset!r}; known: {', '.join(DATASETS)}")
    check_precision(config.precision, config.backend, config.dtype)
    config = dataclasses.replace(config, **{
        name: value for name, value in dict(METHOD_DEFAULTS[config.method],
                                            epochs=DEFAULT_EPOCHS).items()
        if getattr(config, name) is None})
    refuse_out_of_range(config, (
            *schedule_checks(config), ("batch_size", config.batch_size >= 1, "at least 1"),
            ("mask_ratio", 0 < config.mask_ratio < 1, "in (0, 1)"),
            ("momentum_teacher", 0 <= config.momentum_teacher <= 1, "in [0, 1]"),
            ("teacher_temp", config.teacher_temp > 0, "positive")))
    return config


class _MAE:
    """One MAE step: mask, encode, decode, loss on the masked patches, update."""

    def __init__(self, config, encoder, data):
        self.model = mae_for_encoder(encoder, config.decoder_dim, config.decoder_depth,
                                     norm_pix_loss=config.norm_pix_loss,
                                     mask_ratio=config.mask_ratio)
        self.config, self.normalize = config, True

    def step(self, optimizer, images, rows, rng, epoch, step, total_steps):
        # the masking noise of the whole batch, so that each process masks its rows as one
        # process would (every image hides as many patches: the rows' mean losses weigh
        # by their share of the batch)
        noise = rng.random((len(images), self.model.patch_embed.num_patches))[rows]
        x = backend.to_backend(images[rows].astype(self.config.dtype, copy=False))
        loss, _, _ = self.model(x, noise=noise)
        optimizer.zero_grad()
        loss_scale.scaled_backward(dist.share_of_loss(loss), optimizer)
        optimizer.step(max_grad_norm=self.config.clip_grad or None)
        return loss.data, {}

    def resumed(self):
        pass


class _DINO:
    """One DINO step: multi-crop, teacher on the global crops, student on all, loss, update,
    then the teacher's EMA."""

    def __init__(self, config, encoder, data):
        patch = encoder["patch_size"]
        local = config.local_crop_size or max(patch, encoder["img_size"] // 2 // patch * patch)
        self.crops = MultiCrop(encoder["img_size"], patch, config.local_crops, local, data.mean,
                               data.std, flips_suit(config.dataset), config.color_jitter)
        self.model = DINOPair(encoder, config.out_dim, config.head_hidden_dim,
                              config.head_bottleneck_dim, config.head_bn)
        # several processes: the head's batch norms and the center use the global batch
        several = dist.world_size() > 1
        if several:
            synchronize_batch_norms(self.model, dist.allreduce_sum)
        self.loss = DINOLoss(config.out_dim, teacher_temp=config.teacher_temp,
                             warmup_teacher_temp=config.warmup_teacher_temp,
                             warmup_epochs=config.warmup_teacher_temp_epochs, dtype=config.dtype,
                             sum_over_processes=dist.allreduce_sum if several else None)
        self.config, self.normalize = config, False

    def resumed(self):
        self.loss.center = self.model.center.data.copy()

    def step(self, optimizer, images, rows, rng, epoch, step, total_steps):
        crops = [backend.to_backend(c.astype(self.config.dtype)) for c in
                 self.crops(images, rng, rows)]
        student, teacher = self.model.student, self.model.teacher
        with no_grad():
            teacher_out = teacher(crops[:2]).data
        loss, statistics = self.loss(student(crops), teacher_out, epoch)
        optimizer.zero_grad()
        # weighed before backward: the synchronised batch norms add up the processes' gradients
        loss_scale.scaled_backward(dist.share_of_loss(loss), optimizer)
        grads = optimizer.step_grads()  # all-reduced: the processes clip the same gradient
        # the reference clips each parameter's gradient; fp16's gradients are still scaled by s
        # here (the optimizer unscales them), so their bound is s·clip_grad
        limit = self.config.clip_grad * loss_scale.current_scale(optimizer)
        xp, frozen = backend.array_module(grads), epoch < self.config.freeze_last_layer
        for name, start, stop in zip(optimizer.names, optimizer.offsets, optimizer.offsets[1:]):
            part = grads[start:stop]
            if frozen and name == "student.head.last_layer.weight_v":
                part[...] = 0.0
            elif self.config.clip_grad:
                part *= min(1.0, limit / (float(xp.linalg.norm(part)) + 1e-6))
        optimizer.step_from(grads)
        update_teacher(teacher, student, teacher_momentum(step, total_steps,
                                                          self.config.momentum_teacher))
        self.model.center.data[...] = self.loss.center
        return loss.data, statistics


METHODS = {"mae": _MAE, "dino": _DINO}


def build_method(config, encoder, data):
    """The method object (its `model` is what the checkpoints hold) for a resolved config."""
    backend.manual_seed(config.seed)
    method = METHODS[config.method](config, encoder, data)
    method.model.to(dtype=config.dtype)
    return method


def encoder_configuration(config, data):
    channels, size = data.images.shape[1], data.images.shape[2]
    return model_config(config.model_name(), num_classes=0, img_size=size, in_chans=channels,
                        drop_path_rate=config.drop_path)


def pretrain(config, on_epoch_end=None):
    """Pretrain as `config` says; returns a summary dict. `on_epoch_end(epoch, summary)` runs
    after each epoch's checkpoint is written. Under mpiexec the processes share each batch,
    as `minivit train`'s (minivit.distributed)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), dist.failing_together():
        return _pretrain(config, on_epoch_end)


def _pretrain(config, on_epoch_end):
    if config.resume:
        config = resumed_config(config, read_saved=saved_pretrain_config,
                                run_control=RUN_CONTROL, command="minivit pretrain")
    backend.set_backend(config.backend)
    dist.init()  # under mpiexec: join the other processes (each on its own GPU)
    config = _check_config(config)
    run_dir = Path(config.out)
    main = dist.is_main()  # rank 0 keeps the run folder and speaks
    if main:
        check_run_folder(config, run_dir)
    data = load_dataset(config.dataset, "train", config.data_dir)
    dist.check_batch_size(config.batch_size, len(data))
    encoder = encoder_configuration(config, data)
    method = build_method(config, encoder, data)
    optimizer = AdamW(method.model.named_parameters(), lr=config.lr,
                      weight_decay=config.weight_decay, betas=(0.9, 0.95))
    prepare_training(config.precision, config.backend, config.dtype, optimizer)
    dist.average_gradients(optimizer)
    method_step = loss_scale.updating_scale(method.step, optimizer)  # fp16: the scale's update
    # every process reads the global batches; each works on its rows (dist.shard_rows)
    loader = DataLoader(data, config.batch_size, shuffle=True, seed=config.seed,
                        normalize=method.normalize)
    steps_per_epoch = len(loader)
    total_steps = config.epochs * steps_per_epoch
    info = {"method": config.method, "dataset": config.dataset, "mean": data.mean,
            "std": data.std, "class_names": data.class_names, "encoder_config": encoder,
            "train_config": dataclasses.asdict(config)}
    if main:
        make_run_folder(run_dir)
    last_path = run_dir / f"last.{config.checkpoint_format}"
    start = RunStart()
    if config.resume:
        start = resume_from_last(run_dir, method.model, optimizer, None, config)
    dist.broadcast_parameters(method.model)
    if config.resume:
        method.resumed()
    metrics = prepare_run_folder(config, run_dir, start.epoch, command="pretrain") if main \
        else None
    if main and config.progress and dist.world_size() > 1:
        print(f"data parallel: {dist.describe()}", flush=True)

    summary = {"run_dir": str(run_dir), "epochs": config.epochs, "method": config.method}
    # `time` goes on from a resume, as in `minivit train`
    step, started = start.epoch * steps_per_epoch, time.perf_counter() - start.seconds
    for epoch in range(start.epoch, config.epochs):
        method.model.train()
        loader.set_epoch(epoch)
        backend.manual_seed(dist.rank_seed([config.seed, epoch]))  # this epoch's drop-path
        totals, count, epoch_start = {}, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not (config.progress and main and sys.stderr.isatty()),
                   unit="batch")  # a log file gets only the epoch lines, as in train
        for batch, (images, _) in enumerate(bar):
            optimizer.lr = warmup_cosine(step, total_steps, config.lr,
                                         config.warmup * steps_per_epoch, config.min_lr)
            rng = np.random.default_rng([config.seed, epoch, batch])  # masks, crops of the batch
            rows = dist.shard_rows(len(images))  # this process's part of the batch
            loss, statistics = method_step(optimizer, images, rows, rng, epoch, step,
                                           total_steps)
            loss = float(loss)
            if not math.isfinite(loss):
                raise diverged_error(loss, epoch, step, optimizer.lr, last_path, "pretraining")
            step += 1
            size = rows.stop - rows.start
            count += size
            for name, value in dict(statistics, loss=loss).items():
                totals[name] = totals.get(name, 0.0) + value * size
            bar.set_postfix(loss=f"{totals['loss'] / count:.4f}", lr=f"{optimizer.lr:.2e}")
        bar.close()
        count, *sums = dist.sum_over_ranks(count, *totals.values())  # the global batch's
        seconds = time.perf_counter() - epoch_start
        record = {"epoch": epoch + 1, "step": step, "time": time.perf_counter() - started,
                  "split": "train", **{name: total / count for name, total in zip(totals, sums)},
                  "lr": optimizer.lr, "images_per_s": count / seconds}
        if config.method == "dino":
            record["center_norm"] = float(np.linalg.norm(backend.to_numpy(method.loss.center)))
        if main:
            _end_epoch(config, method, optimizer, metrics, record,
                       dict(info, epoch=epoch + 1, step=step, time=record["time"]), last_path)
        summary.update(epoch=epoch + 1, loss=record["loss"], seconds=time.perf_counter() - started)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, summary)
    return summary


def _end_epoch(config, method, optimizer, metrics, record, info, last_path):
    """Rank 0: the epoch's metrics record and checkpoint, and its line."""
    try:
        metrics.write(record)
        save_checkpoint(last_path, method.model, info, optimizer)
    except (OSError, MinivitError) as error:
        raise write_failure(error, last_path.parent, last_path, command="pretrain") from None
    if config.progress:
        extra = "".join(f"  {name} {record[name]:.3f}" for name in
                        ("teacher_entropy", "teacher_marginal_entropy", "center_norm")
                        if name in record)
        tqdm.write(f"epoch {record['epoch']:>3}/{config.epochs}  loss {record['loss']:.4f}"
                   f"{extra}  {record['images_per_s']:.0f} img/s")


def saved_pretrain_config(path):
    """The PretrainConfig in a pretraining run's config.json (train's checks of each value);
    MinivitError when it is damaged."""
    return saved_config(path, PretrainConfig, "minivit pretrain")


def model_from_run(path):
    """(model, info) of a pretraining run folder or checkpoint: the MaskedAutoencoderViT or
    DINOPair with its weights, in eval mode."""
    path = Path(path)
    checkpoint = find_checkpoint(path, "last") if path.is_dir() else path
    state, _, info = read_checkpoint(checkpoint)
    if info.get("method") not in METHODS:
        raise MinivitError(f"{checkpoint} is not a minivit pretrain checkpoint (no MAE/DINO "
                           f"method in its metadata): give a run folder of `minivit pretrain "
                           f"--method mae`")
    saved = info["train_config"]
    if info["method"] == "mae":
        model = MaskedAutoencoderViT(**info["model_config"])
    else:
        model = DINOPair(info["encoder_config"], saved["out_dim"], saved["head_hidden_dim"],
                         saved["head_bottleneck_dim"], saved.get("head_bn", False))
    model.load_state_dict(state)
    return model.eval(), info
