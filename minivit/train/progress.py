"""What training prints: a header, a progress bar on a terminal, one line per epoch, notes.

The bar is redrawn many times a second, so it is drawn only when stderr is a terminal; in a
log file (or a pipe) each epoch is one plain line on stdout instead. Notes go to stderr even
with --quiet: they say something about the run the user asked for.
"""

import sys

from tqdm import tqdm

from minivit import distributed as dist
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
        images = data.train_set.images
        size = "x".join(map(str, (images.shape[2], images.shape[3], images.shape[1])))
        begin = (f"resuming {config.out} after epoch {start.epoch} of {config.epochs}"
                 if start.epoch else f"run folder {config.out}")
        print(f"minivit train: {config.model} ({model.num_parameters():,} parameters) on "
              f"{config.dataset}: {len(data.train_set):,} train / {len(data.test_set):,} test "
              f"images of {size}, {data.train_set.num_classes} classes\n"
              f"  {config.backend} {config.dtype}, {config.optimizer} lr {config.lr:g}, batch "
              f"{config.batch_size}, {epochs_text(config.epochs)} of {steps_per_epoch} steps; "
              f"{begin}", flush=True)
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

    def epoch_line(self, epoch, epochs, train, test, images_per_s):
        """The line of a finished epoch; `train`, `test`: (loss, accuracy)."""
        if not self.enabled:
            return
        line = (f"epoch {epoch + 1:>3}/{epochs}  train loss {train[0]:.4f} acc {train[1]:.4f}  "
                f"test loss {test[0]:.4f} acc {test[1]:.4f}  {images_per_s:.0f} img/s")
        if self.bars:
            tqdm.write(line)
        else:
            print(line, flush=True)
