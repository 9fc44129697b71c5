"""What training prints: a header, a progress bar on a terminal, one line per epoch, notes.

The bar is redrawn many times a second, so it is drawn only when stderr is a terminal; in a
log file (or a pipe) each epoch is one plain line on stdout instead. Notes go to stderr even
with --quiet: they say something about the run the user asked for.
"""

import sys

from tqdm import tqdm

from minivit import distributed as dist
from minivit.finetune import describe_trainable
from minivit.train.config import epochs_text


class Progress:
    def __init__(self, enabled):
        self.enabled = enabled
        self.bars = enabled and sys.stderr.isatty()

    @staticmethod
    def note(message):
        print(f"minivit train: note: {message}", file=sys.stderr, flush=True)

    def header(self, config, model, data, start, steps_per_epoch):
        """What is trained, on what, where: printed before the first step."""
        if not self.enabled:
            return
        facts = data.facts
        size = f"{facts.image_size}x{facts.image_size}x{facts.channels}"
        begin = (f"resuming {config.out} after epoch {start.epoch} of {config.epochs}"
                 if start.epoch else f"run folder {config.out}")
        print(f"minivit train: {config.model} ({model.num_parameters():,} parameters) on "
              f"{config.dataset}: {facts.train_size:,} train / {facts.test_size:,} test "
              f"images of {size}, {facts.num_classes} classes\n"
              f"  {config.backend} {config.dtype}, {config.optimizer} lr {config.lr:g}, batch "
              f"{config.batch_size}, {epochs_text(config.epochs)} of {steps_per_epoch} steps; "
              f"{begin}", flush=True)
        if config.freeze or config.pretrained:
            print(f"  {describe_trainable(model)}", flush=True)
        if dist.world_size() > 1:
            print(f"  data parallel: {dist.describe()}", flush=True)

    def batches(self, loader, epoch, epochs):
        """The loader, wrapped in a progress bar on a terminal."""
        if not self.bars:
            return loader
        return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, unit="batch")

    def update(self, batches, loss, accuracy, lr, images_per_s):
        if self.bars:
            batches.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}", lr=f"{lr:.2e}",
                                img_s=f"{images_per_s:.0f}")

    def close(self, batches):
        if self.bars:
            batches.close()

    def epoch_line(self, epoch, epochs, train, test, images_per_s, test_ema=None):
        """The line of a finished epoch; `train`, `test`, `test_ema` (the averaged weights',
        with --ema): (loss, accuracy)."""
        if not self.enabled:
            return
        ema = f"ema acc {test_ema[1]:.4f}  " if test_ema is not None else ""
        line = (f"epoch {epoch + 1:>3}/{epochs}  train loss {train[0]:.4f} acc {train[1]:.4f}  "
                f"test loss {test[0]:.4f} acc {test[1]:.4f}  {ema}{images_per_s:.0f} img/s")
        if self.bars:
            tqdm.write(line)
        else:
            print(line, flush=True)
