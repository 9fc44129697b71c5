"""Your own images, without a download: the embedded digits written as PNG files in the
ImageFolder layout, trained on with `--dataset folder`, then fine-tuned on other classes.

    python examples/digits_folder.py [--epochs 30] [--work-dir digits_work]

1. writes WORK/first/{train,val}/<digit>/*.png for the digits 0-5 and WORK/second/... for 6-9
   (the embedded 8x8 digits upscaled to 32x32, greyscale; plus three broken files, which the
   training lists and skips),
2. minivit train --dataset folder on WORK/first (vit_digits read at 16x16),
3. minivit train --pretrained WORK/run_first on WORK/second: the 6-class head is replaced by a
   new 4-class one, every other weight starts from step 2's run (with layer-wise lr decay),
4. minivit predict on one image of WORK/second: it prints the folder's class names.
Needs Pillow (pip install 'minivit[images]').
"""

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

from minivit.data import load_dataset


def write_digits(root, digits, size=32):
    """PNGs of the embedded digits `digits`, train and test splits, upscaled to size x size."""
    from PIL import Image

    for split, folder in (("train", "train"), ("test", "val")):
        data = load_dataset("digits", split)
        for index in np.flatnonzero(np.isin(data.labels, digits)):
            target = root / folder / str(data.labels[index])
            target.mkdir(parents=True, exist_ok=True)
            pixels = (data.images[index, 0] * 255).round().astype(np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.BICUBIC).save(
                target / f"{index:04d}.png")
    first = sorted((root / "train" / str(digits[0])).iterdir())[0]
    broken = root / "train" / str(digits[0])
    (broken / "truncated.png").write_bytes(first.read_bytes()[:60])
    (broken / "empty.png").write_bytes(b"")
    (broken / "not_a_picture.png").write_text("a text file with an image's name")


def minivit(*args):
    command = [sys.executable, "-m", "minivit.cli", *args]
    print("$ minivit " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="default: %(default)s")
    parser.add_argument("--work-dir", default="digits_work", help="default: %(default)s")
    args = parser.parse_args()
    work = Path(args.work_dir)
    write_digits(work / "first", [0, 1, 2, 3, 4, 5])
    write_digits(work / "second", [6, 7, 8, 9])
    common = ["--dataset", "folder", "--model", "vit_digits", "--img-size", "16",
              "--epochs", str(args.epochs), "--warmup", "2", "--quiet", "--overwrite"]
    minivit("train", *common, "--data-dir", str(work / "first"), "--out", str(work / "run_first"))
    minivit("train", *common, "--data-dir", str(work / "second"), "--out",
            str(work / "run_second"), "--pretrained", str(work / "run_first"), "--layer-decay",
            "0.75", "--lr", "1e-3")
    image = sorted((work / "second" / "val" / "7").iterdir())[0]
    minivit("predict", "--checkpoint", str(work / "run_second"), str(image), "--top-k", "2")


if __name__ == "__main__":
    main()
