"""The training and evaluation loop.

``train(TrainConfig(...))`` builds the model and data, trains with AdamW and a warmup + cosine
schedule, evaluates every epoch and keeps a run folder:

    RUN/config.json        the training configuration
    RUN/metrics.jsonl      one JSON record per epoch and split (train, test, test_ema, grads)
    RUN/last.safetensors   weights + optimizer state (+ the weights' moving average, with
                           --ema) at the end of the last finished epoch
    RUN/best.safetensors   weights (+ average) of the epoch with the best test accuracy

Checkpoints are written atomically; a run stopped at any point (Ctrl-C, NaN loss, a crash)
keeps the last good checkpoint, and ``resume=True`` continues from it with the options saved in
its config.json (TrainConfig says which may change) and exactly the batches and random numbers
the uninterrupted run would have used. A new run refuses a folder that holds
another run unless ``overwrite=True``, which removes that run's checkpoints and metrics first.

A run goes through the stages of `_train`, each in its own module:

    config.py      TrainConfig: defaults, checks, config.json
    run_folder.py  may this folder be used; where a resume starts; metrics; checkpoints
    loop.py        data, model, optimizer, the training step, and the epoch loop (Trainer)
    progress.py    the header, the bar (on a terminal) or plain per-epoch lines, notes
"""

from pathlib import Path

import numpy as np

from minivit import backend, cpu
from minivit import distributed as dist
from minivit.data.folder import skipped_files_report
from minivit.distill import distillation_criterion
from minivit.ema import ModelEma
from minivit.precision import prepare_training
from minivit.train.config import (DEFAULT_MODELS, OPTIMIZER_DEFAULTS, TrainConfig, checked_config,
                                  config_notes, epochs_text, resumed_config, saved_config)
from minivit.train.loop import (Trainer, build_model, build_optimizer, evaluate,
                                load_training_data, model_notes, training_step)
from minivit.train.progress import Progress
from minivit.train.run_folder import (PLOT_FILES, RUN_FILES, RunStart, check_run_folder,
                                      make_run_folder, prepare_run_folder, resume_from_last)

__all__ = ["DEFAULT_MODELS", "OPTIMIZER_DEFAULTS", "PLOT_FILES", "RUN_FILES", "TrainConfig",
           "build_model", "build_optimizer", "epochs_text", "evaluate", "resumed_config",
           "saved_config", "train", "training_step"]


def train(config, on_epoch_end=None):
    """Train as `config` says; returns a summary dict. With ``config.resume``, the run in
    ``config.out`` goes on with its saved options: those left at TrainConfig's defaults are
    taken from its config.json, and others that differ from it are refused (all but epochs,
    data_dir, workers and the run control; see TrainConfig). `on_epoch_end(epoch, summary)` is
    called after each epoch's checkpoint is written (tests use it to interrupt a run)."""
    cpu.configure()  # BLAS threads and malloc, as the command line sets them up
    # overflow on the way to a non-finite loss is reported by the loss check, with the epoch,
    # step and learning rate, rather than as NumPy warnings
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), dist.failing_together():
        return _train(config, on_epoch_end)


def _train(config, on_epoch_end):
    # 1. the options and the run folder: refused before anything is loaded or written
    if config.resume:
        config = resumed_config(config)
    backend.set_backend(config.backend)
    dist.init()  # under mpiexec: join the other processes (each on its own GPU)
    run_dir = Path(config.out)
    if dist.is_main():  # rank 0 keeps the run folder; the others only read a resumed one
        check_run_folder(config, run_dir)
    config = checked_config(config)
    # 2. data, model, optimizer
    data, config = load_training_data(config)
    facts = data.facts
    note = Progress.note if dist.is_main() else lambda message: None  # rank 0 speaks
    if facts.skipped:
        note("\n".join(skipped_files_report(facts.skipped)))
    model, pretrained = build_model(config, facts.num_classes, facts.image_size, facts.channels,
                                    notify=note)
    criterion = distillation_criterion(config, model)  # checked before anything is written
    optimizer = build_optimizer(config, model)
    prepare_training(config.precision, config.backend, config.dtype, optimizer)
    dist.average_gradients(optimizer)
    # the average starts at the (pretrained) initial weights; a resume restores it
    ema = ModelEma(model, config.ema) if config.ema else None
    # 3. the run folder: a resume's checkpoint loaded, config.json and metrics made ready (only
    # rank 0 writes; the other processes hold the same weights and numbers)
    if dist.is_main():
        make_run_folder(run_dir)
    start = (resume_from_last(run_dir, model, optimizer, ema, config) if config.resume else
             RunStart(pretrained=pretrained))
    dist.broadcast_parameters(model)
    metrics = prepare_run_folder(config, run_dir, start.epoch, facts) if dist.is_main() else None
    # 4. say what is trained (rank 0), then train
    progress = Progress(config.progress and dist.is_main())
    if dist.is_main():
        for message in (*config_notes(config), *model_notes(config, facts)):
            progress.note(message)
    progress.header(config, model, data, start, len(data.train_loader))
    trainer = Trainer(config, run_dir, data, model, optimizer, metrics, progress, start,
                      criterion, ema)
    return trainer.run(on_epoch_end)
