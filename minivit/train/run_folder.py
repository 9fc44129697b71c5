"""A run's folder: whether it may be used, where a resume starts, metrics.jsonl, checkpoints.

Every message here gives advice that works for the folder's state: a run that stopped before
its first epoch ended can only start again (--overwrite), an unfinished one can --resume, a
finished one can --resume with more --epochs.
"""

import dataclasses
import json
from pathlib import Path

from minivit.checkpoint import (CHECKPOINT_SUFFIXES, find_checkpoint, read_checkpoint,
                                read_checkpoint_parts, save_checkpoint)
from minivit.errors import MinivitError, TrainingError
from minivit.io import atomic_write
from minivit.train.config import config_json, epochs_text

# The files of a run, in the order --overwrite removes them: the checkpoints --resume would
# continue from first, config.json last.
RUN_FILES = (*(f"{name}{suffix}" for name in ("last", "best") for suffix in CHECKPOINT_SUFFIXES),
             "metrics.jsonl", "config.json")
# What `minivit plot` writes into a run folder by default: drawn from the run, so --overwrite
# removes them with it (they would show the old run's curves).
PLOT_FILES = ("curves.png", "grads.png")


def run_files(run_dir):
    """The names of the run files (RUN_FILES) that `run_dir` holds."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def _progress(run_dir, files):
    """(epochs done, epochs planned) of the run in `run_dir` from its last checkpoint; (0, None)
    when it has none, None when that checkpoint cannot be read."""
    if not any(name.startswith("last.") for name in files):
        return 0, None
    try:
        info = read_checkpoint(find_checkpoint(run_dir, "last"))[2]
        return int(info["epoch"]), int(info["train_config"]["epochs"])
    except (MinivitError, OSError, KeyError, TypeError, ValueError):
        return None


def check_run_folder(config, run_dir):
    """Refuse an `out` that is a file, a new run into a folder holding another run (unless
    `overwrite`), and a resume with no checkpoint to continue from."""
    if run_dir.exists() and not run_dir.is_dir():
        raise MinivitError(f"--out {run_dir} is a file, not a folder: pass --out a folder for "
                           f"the run (a new one, or a run folder with --resume)")
    if config.resume and config.overwrite:
        raise MinivitError(f"--resume continues the run in {run_dir} and --overwrite replaces "
                           f"it: pass one of them")
    files = run_files(run_dir)
    if files and not config.resume and not config.overwrite:
        raise MinivitError(_occupied_message(run_dir, files))
    if config.resume and "config.json" in files and not any(
            name.startswith("last.") for name in files):
        kept = [name for name in files if name != "config.json"]
        if not any(name.startswith("best.") for name in kept):
            raise MinivitError(f"--resume: {run_dir} has no checkpoint to continue from (its run "
                               f"stopped before its first checkpoint was written): start it "
                               f"again with --overwrite")
        raise MinivitError(f"--resume: {run_dir} has no last checkpoint (last.safetensors or "
                           f"last.npz: the weights and optimizer state a resume continues from), "
                           f"though it holds {', '.join(kept)}. If last.* was moved away, put it "
                           f"back to resume; to keep these files, start a new run with --out "
                           f"OTHER; --overwrite starts this run again and deletes them")


def _occupied_message(run_dir, files):
    """Why a new run may not start in `run_dir`, and what to do instead, for its state."""
    keep = "--out OTHER to keep it and start another run"
    listed = ", ".join(files)
    progress = _progress(run_dir, files)
    if progress is None:
        return (f"{run_dir} already holds a run whose last checkpoint cannot be read "
                f"({listed}): pass {keep}, or --overwrite to replace it")
    done, planned = progress
    if done == 0:
        return (f"{run_dir} already holds a run that stopped before its first checkpoint was "
                f"written (no epoch finished: {listed}): pass --overwrite to start it again, or "
                f"{keep}")
    if done >= planned:
        return (f"{run_dir} already holds a finished run (epoch {done} of {planned} done: "
                f"{listed}): pass --resume --epochs N (N > {done}) to train it further, "
                f"{keep}, or --overwrite to replace it")
    return (f"{run_dir} already holds a run (epoch {done} of {planned} done: {listed}): pass "
            f"--resume to continue it, {keep}, or --overwrite to replace it")


def make_run_folder(run_dir):
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MinivitError(f"cannot create the run folder {run_dir}: {error.strerror or error}; "
                           f"pass --out a folder that can be created") from None


@dataclasses.dataclass
class RunStart:
    """Where the epoch loop starts: epochs done, the best test accuracy so far, the seconds
    the run has trained (its `time` continues across resumes) and where its starting weights
    came from (--pretrained's provenance, which a resumed run carries over)."""
    epoch: int = 0
    best_accuracy: float = -1.0
    seconds: float = 0.0
    pretrained: dict = None


def resume_from_last(run_dir, model, optimizer, ema, config):
    """Load the last checkpoint into `model`, `optimizer` and `ema` (a ModelEma, or None for a
    run without --ema); its RunStart."""
    last = find_checkpoint(run_dir, "last")
    model_state, optimizer_arrays, ema_arrays, saved = read_checkpoint_parts(last)
    _check_same_command(run_dir, saved.get("method"), getattr(config, "method", None))
    model.load_state_dict(model_state)
    optimizer.load_state_dict({**saved["optimizer"], "arrays": optimizer_arrays})
    if ema is not None:
        ema.load_state_arrays(ema_arrays, last)
    if saved["epoch"] >= config.epochs:
        raise MinivitError(f"--resume: {run_dir} has already trained "
                           f"{epochs_text(saved['epoch'])}; pass --epochs greater than "
                           f"{saved['epoch']} to train further")
    # checkpoints written before `time` was kept in them: the time of their metrics records
    seconds = saved.get("time")
    if seconds is None:
        seconds = _metrics_time(run_dir / "metrics.jsonl", saved["epoch"])
    # a pretraining run (no labels) keeps no best accuracy
    return RunStart(saved["epoch"], saved.get("best_accuracy", -1.0), float(seconds),
                    saved.get("pretrained"))


def _check_same_command(run_dir, saved_method, method):
    """--resume continues a run with the command that made it (pretrain runs save a method)."""
    if saved_method and not method:
        raise MinivitError(f"--resume: {run_dir} is a minivit pretrain run ({saved_method}): "
                           f"continue it with `minivit pretrain --out {run_dir} --resume`, or "
                           f"fine-tune its encoder with `minivit train --init {run_dir} --out "
                           f"OTHER`")
    if method and not saved_method:
        raise MinivitError(f"--resume: {run_dir} is a minivit train run: continue it with "
                           f"`minivit train --out {run_dir} --resume`, or pretrain in another "
                           f"folder (--out OTHER)")


def _metrics_time(path, epoch):
    """The `time` of the records of `epoch` in a metrics.jsonl (0 where there is none)."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return max(record["time"] for record in records if record.get("epoch") == epoch)
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def prepare_run_folder(config, run_dir, start_epoch, data=None, command="train"):
    """Before the first epoch: remove an overwritten run's files, cut metrics.jsonl back to the
    epoch a resume starts from and write config.json (with `data`, the run's DataFacts, where
    there is one); the MetricsLog to append to. A folder that cannot be written is a
    MinivitError saying what to do (with `minivit COMMAND`)."""
    try:
        if config.overwrite:  # nothing of the old run may be resumed under the new config
            for name in RUN_FILES + PLOT_FILES:
                (run_dir / name).unlink(missing_ok=True)
        metrics = MetricsLog(run_dir / "metrics.jsonl", keep_until_epoch=start_epoch)
        text = config_json(config, data)
        atomic_write(run_dir / "config.json", lambda tmp: Path(tmp).write_text(text))
    except OSError as error:
        where = error.filename or run_dir
        advice = (f"copy the run folder to a writable place and resume it there (minivit "
                  f"{command} --resume --out COPY)" if config.resume
                  else "pass --out a writable folder")
        raise MinivitError(f"cannot write in the run folder {run_dir} ({where}: "
                           f"{error.strerror or error}): {advice}") from None
    return metrics


class MetricsLog:
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


def save_epoch_checkpoints(run_dir, model, optimizer, ema, info, suffix, is_best):
    """Write `best` (when this epoch is the best) and then `last`, each with the ModelEma's
    averages when `ema` is not None. Whatever an interruption
    cuts short, resuming from `last` redoes. But in a run's first epoch there is no `last` to
    resume from: if it cannot be written, the new `best` goes too, so that the folder reads as
    a run that stopped before its first epoch ended (start again with --overwrite) rather than
    as a finished run that cannot be resumed."""
    best, last = run_dir / f"best{suffix}", run_dir / f"last{suffix}"
    first = not any((run_dir / f"last{other}").exists() for other in CHECKPOINT_SUFFIXES)
    if is_best:
        save_checkpoint(best, model, info, ema=ema)
    try:
        save_checkpoint(last, model, info, optimizer, ema=ema)
    except BaseException:
        if first and is_best:
            best.unlink(missing_ok=True)
        raise


def kept_checkpoint_text(run_dir, last_path, command="train"):
    """What a run of `minivit COMMAND` stopped by an error keeps, and how to go on."""
    if last_path.exists():
        return (f"The last good checkpoint is kept in {last_path}: continue with minivit "
                f"{command} --resume --out {run_dir}")
    return ("No checkpoint was kept (the run had written none yet): start again by adding "
            "--overwrite to the same command")


def diverged_error(loss, epoch, step, lr, last_path, work="training"):
    """The TrainingError of a non-finite loss at 0-based `epoch` and `step`: what was kept and
    how to start again (`work`: training or pretraining)."""
    kept = (f"The last good checkpoint is kept in {last_path}" if last_path.exists()
            else "No checkpoint was written (the first epoch had not ended)")
    return TrainingError(
        f"the loss became {loss} at epoch {epoch + 1}, step {step + 1} (lr {lr:.3g}); {work} "
        f"stopped. {kept}. A resume would repeat the same steps: start again with a lower --lr "
        f"(or with --clip-grad on) and --overwrite, or --out OTHER to keep this run")


def write_failure(error, run_dir, last_path, command="train"):
    """A TrainingError for a file of the run that could not be written mid-run (full disk)."""
    reason = error if isinstance(error, MinivitError) else (
        f"cannot write {error.filename or 'a file of the run'}: {error.strerror or error}")
    kept = kept_checkpoint_text(run_dir, last_path, command)
    return TrainingError(f"{reason}. {command.capitalize()}ing stopped. {kept} once the disk "
                         f"has room")
