"""The parts a run is built from (data, model, optimizer, the training step) and its epoch loop:
train an epoch, evaluate, write metrics and checkpoints, report."""

import dataclasses
import math
import time

import minivit.functional as F
from minivit import backend, cuda, loss_scale
from minivit import distributed as dist
from minivit.data.pipeline import DataFacts, build_loaders
from minivit.encoders import load_encoder
from minivit.errors import MinivitError
from minivit.finetune import (LayerwiseOptimizer, freeze_all_but_head, layer_scales,
                              load_pretrained_weights)
from minivit.models import create_model, model_config
from minivit.optim import SGD, AdamW, warmup_cosine
from minivit.tensor import no_grad
from minivit.train.run_folder import diverged_error, save_epoch_checkpoints, write_failure


@dataclasses.dataclass
class TrainingData:
    train_loader: object  # a WorkerLoader (this process's part of each batch, data parallel)
    test_loader: object
    facts: DataFacts


def model_input(config):
    """(image size, channels) an image folder is read at: --img-size, else the model's."""
    settings = model_config(config.model_name())
    return config.img_size or settings["img_size"], settings["in_chans"]


def load_training_data(config):
    """The run's loaders and DataFacts, and `config` recording whether augmentation applies."""
    # data parallel: each process evaluates its part of the test set, and trains on its part
    # of every (global, --batch-size) batch
    train_loader, test_loader, facts = build_loaders(
        config, *model_input(config),
        test_part=dist.shard_bounds if dist.world_size() > 1 else None)
    config = dataclasses.replace(config, augment=facts.augmented)
    return TrainingData(dist.shard_loader(train_loader), test_loader, facts), config


def build_model(config, num_classes, image_size, channels, notify=print):
    """The run's model; with config.pretrained, its weights loaded (and the provenance the run
    records returned as the second value, else None)."""
    backend.manual_seed(config.seed)
    options = {"pos_embed": config.pos_embed} if config.pos_embed else {}
    if config.rel_pos_bias:
        options["rel_pos_bias"] = True
    model = create_model(config.model_name(), num_classes=num_classes, img_size=image_size,
                         in_chans=channels, drop_path_rate=config.drop_path, **options)
    provenance = None
    if config.pretrained and not config.resume:  # a resumed run has the weights it made
        provenance = load_pretrained_weights(model, config.pretrained, notify)
    if config.init:
        load_encoder(model, config.init)  # its head stays fresh
    if config.freeze:
        freeze_all_but_head(model)
    return model.to(dtype=config.dtype), provenance


def model_notes(config, facts):
    """A named model configured for other images than the data's is built for the data's:
    say so."""
    named = model_config(config.model_name())
    height, channels = facts.image_size, facts.channels
    wanted = (named["img_size"], named["in_chans"])
    if wanted != (height, channels):
        yield (f"{config.model_name()} is configured for {named['img_size']}x{named['img_size']}"
               f"x{named['in_chans']} images; it is built for {facts.name}'s "
               f"{height}x{height}x{channels} ({(height // named['patch_size']) ** 2} patches "
               f"of {named['patch_size']}x{named['patch_size']})")


def build_optimizer(config, model):
    optimizer = {"adamw": AdamW, "sgd": SGD}[config.optimizer]  # names checked by train()
    if config.layer_decay is not None:
        return LayerwiseOptimizer(optimizer, model.named_parameters(),
                                  layer_scales(model, config.layer_decay), config.lr,
                                  config.weight_decay)
    return optimizer(model.named_parameters(), lr=config.lr, weight_decay=config.weight_decay)


def training_step(model, optimizer, config, criterion=None):
    """A function (x, y) -> (loss, logits) arrays of one training step: forward, cross-entropy,
    backward, optimizer step. With config.cuda_graph, full batches replay one CUDA graph,
    recorded on the first of them (which trains eagerly, as the capture's warm-up); a smaller
    last batch runs eagerly. The graph's outputs are overwritten by its next replay."""
    def step(x, y):  # criterion(outputs, x, y) -> (loss, logits): e.g. DeiT distillation
        if criterion is None:
            logits = model(x)
            # Mixup/CutMix targets (B, K) come with the smoothing folded in
            smoothing = config.label_smoothing if y.ndim == 1 else 0.0
            loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        else:
            loss, logits = criterion(model(x), x, y)
        optimizer.zero_grad()
        loss_scale.scaled_backward(loss, optimizer)
        optimizer.step(max_grad_norm=config.clip_grad)
        return loss.data, logits.data

    run = cuda.replayed(step, config.batch_size) if config.cuda_graph else step
    return loss_scale.updating_scale(run, optimizer)


def hard_labels(targets):
    """Class indices of a batch's targets: labels (B,) as they are, soft targets (B, K) by
    their largest entry."""
    return targets if targets.ndim == 1 else targets.argmax(axis=1)


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


def gradient_statistics(optimizer, params_before):
    """Per-parameter gradient norms and update/weight ratios ‖Δθ‖/‖θ‖ of the last step."""
    xp = optimizer.xp
    grad_norms, update_ratios = {}, {}
    for name, start, stop in zip(optimizer.names, optimizer.offsets, optimizer.offsets[1:]):
        weight_norm = float(xp.linalg.norm(params_before[start:stop]))
        update = optimizer.flat[start:stop] - params_before[start:stop]
        grad_norms[name] = float(xp.linalg.norm(optimizer.flat_grad[start:stop]))
        update_ratios[name] = float(xp.linalg.norm(update)) / max(weight_norm, 1e-12)
    return grad_norms, update_ratios


@dataclasses.dataclass
class EpochResult:
    loss: float
    accuracy: float
    images: int
    seconds: float
    grads: tuple = None  # (grad_norms, update_ratios) of the last step, with --log-grads


class Trainer:
    """The epoch loop of one run: `run()` trains from `start` to config.epochs."""

    def __init__(self, config, run_dir, data, model, optimizer, metrics, progress, start,
                 criterion=None, ema=None):
        self.config, self.run_dir, self.data = config, run_dir, data
        self.model, self.optimizer, self.ema = model, optimizer, ema
        self.metrics, self.progress = metrics, progress
        self.start, self.best_accuracy = start, start.best_accuracy
        self.train_step = training_step(model, optimizer, config, criterion)
        self.steps_per_epoch = len(data.train_loader)
        self.step = start.epoch * self.steps_per_epoch
        self.suffix = "." + config.checkpoint_format
        self.last_path = run_dir / f"last{self.suffix}"
        facts = data.facts
        self.info = {"dataset": config.dataset, "mean": facts.mean, "std": facts.std,
                     "class_names": facts.class_names, "train_config": dataclasses.asdict(config),
                     "pretrained": start.pretrained, "skipped_files": len(facts.skipped)}

    def run(self, on_epoch_end=None):
        summary = {"run_dir": str(self.run_dir), "epochs": self.config.epochs,
                   "best_accuracy": self.best_accuracy}
        self.started = time.perf_counter() - self.start.seconds  # time goes on from a resume
        for epoch in range(self.start.epoch, self.config.epochs):
            result = self.train_epoch(epoch)
            test = evaluate(self.model, self.data.test_loader, self.config.dtype)
            test_ema = None
            if self.ema is not None:
                with self.ema.applied(self.model):
                    test_ema = evaluate(self.model, self.data.test_loader, self.config.dtype)
                summary["ema_accuracy"] = test_ema[1]
            self.end_epoch(epoch, result, test, test_ema)
            test_loss, test_accuracy = test
            summary.update(best_accuracy=self.best_accuracy, test_accuracy=test_accuracy,
                           test_loss=test_loss, epoch=epoch + 1, seconds=self.elapsed())
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, summary)
        return summary

    def elapsed(self):
        return time.perf_counter() - self.started

    def train_epoch(self, epoch):
        config, optimizer = self.config, self.optimizer
        self.model.train()
        self.data.train_loader.set_epoch(epoch)
        backend.manual_seed(dist.rank_seed([config.seed, epoch]))  # this epoch's dropout numbers
        total_steps = config.epochs * self.steps_per_epoch
        warmup_steps = config.warmup * self.steps_per_epoch
        loss_sum, correct, count, began = 0.0, 0, 0, time.perf_counter()
        grads = None
        batches = self.progress.batches(self.data.train_loader, epoch, config.epochs)
        for batch, (images, labels) in enumerate(batches):
            optimizer.lr = warmup_cosine(self.step, total_steps, config.lr, warmup_steps,
                                         config.min_lr)
            x = backend.to_backend(images.astype(config.dtype, copy=False))
            y = backend.to_backend(labels)
            log_grads_now = config.log_grads and batch == self.steps_per_epoch - 1
            params_before = optimizer.flat.copy() if log_grads_now else None
            loss, logits = self.train_step(x, y)
            if self.ema is not None:
                self.ema.update(self.model)
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise self.diverged(loss_value, epoch)
            if log_grads_now:
                grads = gradient_statistics(optimizer, params_before)
            self.step += 1
            loss_sum += loss_value * len(labels)
            correct += int((logits.argmax(axis=1) == hard_labels(y)).sum())
            count += len(labels)
            self.progress.update(batches, loss_sum / count, correct / count, optimizer.lr,
                                 count / (time.perf_counter() - began))
        self.progress.close(batches)
        seconds = time.perf_counter() - began
        loss_sum, correct, count = dist.sum_over_ranks(loss_sum, correct, count)  # data parallel
        return EpochResult(loss_sum / count, correct / count, count, seconds, grads)

    def diverged(self, loss_value, epoch):
        return diverged_error(loss_value, epoch, self.step, self.optimizer.lr, self.last_path)

    def end_epoch(self, epoch, result, test, test_ema=None):
        """Metrics, then best, then last: whatever an interruption cuts short, resuming from
        `last` redoes (a resumed run drops metrics records past its checkpoint). `test`,
        `test_ema`: (loss, accuracy) of the weights and (with --ema) of their average."""
        test_loss, test_accuracy = test
        is_best = test_accuracy > self.best_accuracy
        self.best_accuracy = max(self.best_accuracy, test_accuracy)
        images_per_s = result.images / result.seconds
        common = {"epoch": epoch + 1, "step": self.step, "time": self.elapsed()}
        if not dist.is_main():  # rank 0 writes the run folder
            return
        try:
            self.metrics.write(dict(common, split="train", loss=result.loss,
                                    accuracy=result.accuracy, lr=self.optimizer.lr,
                                    images_per_s=images_per_s))
            self.metrics.write(dict(common, split="test", loss=test_loss, accuracy=test_accuracy))
            if test_ema is not None:
                self.metrics.write(dict(common, split="test_ema", loss=test_ema[0],
                                        accuracy=test_ema[1]))
            if result.grads is not None:
                grad_norms, update_ratios = result.grads
                self.metrics.write(dict(common, split="grads", grad_norms=grad_norms,
                                        update_ratios=update_ratios))
            info = dict(self.info, epoch=epoch + 1, step=self.step, time=common["time"],
                        best_accuracy=self.best_accuracy, test_accuracy=test_accuracy)
            save_epoch_checkpoints(self.run_dir, self.model, self.optimizer, self.ema, info,
                                   self.suffix, is_best)
        except (OSError, MinivitError) as error:
            raise write_failure(error, self.run_dir, self.last_path) from None
        self.progress.epoch_line(epoch, self.config.epochs, (result.loss, result.accuracy),
                                 test, images_per_s, test_ema)
