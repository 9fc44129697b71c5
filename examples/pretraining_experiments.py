"""Fine-tuning from MAE, from DINO and from scratch on the embedded 8x8 digits, several seeds.

    python examples/pretraining_experiments.py [--seeds 0 1 2 3 4 --fractions 0.1 1]

One MAE run (30 epochs) and one DINO run (12 epochs, the defaults) pretrain a vit_digits encoder
on the training images without their labels; then, for each fraction of the training labels
and each seed, `minivit train` runs 30 epochs from scratch, from the MAE encoder (--init) and
from the DINO encoder (its teacher's backbone). Every run is the command line that
docs/pretraining.md prints, under --runs (default runs/pretraining). The test accuracy after
the last epoch, per arm: mean, standard deviation, min and max over the seeds, written to
--out (default docs/) as pretraining_finetune.json and .md, and a plot
pretraining_finetune.png.
"""

import argparse
import json
from pathlib import Path

from family_experiments import summarise, write

from minivit.cli import main as minivit

ARMS = ("scratch", "MAE", "DINO")


def command(argv):
    """Run one minivit command line (printed first); stop the experiment if it fails."""
    print("$ minivit " + " ".join(argv), flush=True)
    if minivit([*argv, "--quiet"]) != 0:
        raise SystemExit(f"minivit {argv[0]} failed (see above)")


def final_test_accuracy(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["accuracy"] for r in records if r["split"] == "test"][-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="fine-tuning seeds (default: %(default)s)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0],
                        help="fractions of the training labels (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=30,
                        help="fine-tuning epochs (default: %(default)s)")
    parser.add_argument("--mae-epochs", type=int, default=30, help="default: %(default)s")
    parser.add_argument("--dino-epochs", type=int, default=12, help="default: %(default)s")
    parser.add_argument("--runs", type=Path, default=Path("runs/pretraining"),
                        help="where the runs go (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("docs"),
                        help="where the results and the plot go (default: %(default)s)")
    args = parser.parse_args()

    encoders = {"scratch": None, "MAE": args.runs / f"mae{args.mae_epochs}",
                "DINO": args.runs / f"dino{args.dino_epochs}"}
    for method, epochs in (("mae", args.mae_epochs), ("dino", args.dino_epochs)):
        command(["pretrain", "--method", method, "--epochs", str(epochs), "--out",
                 str(encoders[method.upper()]), "--overwrite"])
    results = {}
    for fraction in args.fractions:
        for arm in ARMS:
            accuracies = []
            for seed in args.seeds:
                run = args.runs / f"{arm.lower()}_{fraction:g}_seed{seed}"
                init = ["--init", str(encoders[arm])] if encoders[arm] else []
                command(["train", *init, "--train-fraction", f"{fraction:g}", "--epochs",
                         str(args.epochs), "--seed", str(seed), "--out", str(run), "--overwrite"])
                accuracies.append(final_test_accuracy(run))
                print(f"{arm} on {fraction:.0%} of the labels, seed {seed}: test accuracy "
                      f"{accuracies[-1]:.4f}", flush=True)
            results[f"{fraction:.0%} labels, {arm}"] = accuracies
    this = (f"python examples/pretraining_experiments.py --seeds {' '.join(map(str, args.seeds))}"
            f" --fractions {' '.join(f'{f:g}' for f in args.fractions)} --epochs {args.epochs}"
            f" --mae-epochs {args.mae_epochs} --dino-epochs {args.dino_epochs}")
    write(summarise(results), args.out, "pretraining_finetune", this,
          f"vit_digits fine-tuned {args.epochs} epochs: from scratch, MAE ({args.mae_epochs} "
          f"epochs), DINO ({args.dino_epochs} epochs); {len(args.seeds)} seeds")


if __name__ == "__main__":
    main()
