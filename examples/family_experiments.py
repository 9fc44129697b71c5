"""The ViT family's two experiments on the embedded 8x8 digits, several seeds each.

    python examples/family_experiments.py positions [--epochs 12 --seeds 0 1 2]
    python examples/family_experiments.py distillation [--epochs 12 --seeds 0 1 2]

positions: the ViT paper's position-embedding ablation (its Table 8) in the small: vit_digits
with no position embedding, the learned 1-D table, learned row + column tables (2d), the fixed
2-D sine-cosine table, and a relative position bias (no absolute embedding, BEiT's layout).
distillation: DeiT on the digits: deit_digits (a distillation token) trained alone, and with a
teacher (vit_digits trained for twice the epochs) by hard and soft distillation.

Each run is a minivit training run under --runs (default runs/family); the test accuracy after
the last epoch, per arm: mean, standard deviation, min and max over the seeds, written to
--out (default docs/) as <experiment>.json and .md, and a plot <experiment>.png.
"""

import argparse
import json
import statistics
from pathlib import Path

from minivit.train import TrainConfig, train

POSITION_ARMS = {
    "none": dict(pos_embed="none"),
    "learn (1-D)": dict(pos_embed="learn"),
    "2d (row + col)": dict(pos_embed="2d"),
    "sincos (fixed 2-D)": dict(pos_embed="sincos"),
    "relative bias": dict(pos_embed="none", rel_pos_bias=True),
}


def run(runs, name, seed, epochs, **options):
    """Train one arm with one seed (or reuse its finished run): its final test accuracy."""
    out = runs / name.split()[0] / f"seed{seed}"
    options = {"model": "vit_digits", **options}
    config = TrainConfig(dataset="digits", epochs=epochs, warmup=1, seed=seed, out=str(out),
                         progress=False, overwrite=True, **options)
    summary = train(config)
    print(f"{name:<22} seed {seed}: test accuracy {summary['test_accuracy']:.4f} "
          f"({summary['seconds']:.0f} s)", flush=True)
    return summary["test_accuracy"]


def summarise(results):
    return {arm: {"accuracies": values, "mean": statistics.mean(values),
                  "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                  "min": min(values), "max": max(values)} for arm, values in results.items()}


def write(summary, out, experiment, command, title):
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{experiment}.json").write_text(json.dumps(dict(command=command, arms=summary),
                                                       indent=2) + "\n")
    lines = [f"`{command}`", "", "| arm | test accuracy, mean ± std | min | max | seeds |",
             "|---|---|---|---|---|"]
    lines += [f"| {arm} | {s['mean']:.4f} ± {s['std']:.4f} | {s['min']:.4f} | {s['max']:.4f} "
              f"| {len(s['accuracies'])} |" for arm, s in summary.items()]
    (out / f"{experiment}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.4 * len(summary) + 1.5, 3.2))
    for i, (arm, s) in enumerate(summary.items()):
        ax.scatter([i] * len(s["accuracies"]), s["accuracies"], color="0.6", s=12, zorder=2)
        ax.errorbar(i, s["mean"], yerr=s["std"], fmt="o", color="C0", capsize=4, zorder=3)
    ax.set_xticks(range(len(summary)), list(summary), fontsize=8)
    ax.set_ylabel("test accuracy (digits)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{experiment}.png", dpi=120)
    print("\n".join(lines))


def positions(args, command):
    results = {arm: [run(args.runs / "positions", arm, seed, args.epochs, **options)
                     for seed in args.seeds] for arm, options in POSITION_ARMS.items()}
    write(summarise(results), args.out, "position_ablation", command,
          f"position embeddings, vit_digits, {args.epochs} epochs, {len(args.seeds)} seeds")


def distillation(args, command):
    runs = args.runs / "distillation"
    teacher = runs / "teacher"
    train(TrainConfig(dataset="digits", model="vit_digits", epochs=2 * args.epochs, warmup=1,
                      seed=100, out=str(teacher), progress=False, overwrite=True))
    arms = {"alone": {}, "hard": dict(teacher=str(teacher), distillation="hard"),
            "soft": dict(teacher=str(teacher), distillation="soft")}
    results = {"teacher (vit_digits)": [json.loads(line)["accuracy"] for line in
                                        (teacher / "metrics.jsonl").read_text().splitlines()
                                        if json.loads(line)["split"] == "test"][-1:]}
    results.update({f"deit_digits {arm}": [run(runs, arm, seed, args.epochs, model="deit_digits",
                                               **options) for seed in args.seeds]
                    for arm, options in arms.items()})
    write(summarise(results), args.out, "deit_distillation", command,
          f"DeiT distillation, deit_digits, {args.epochs} epochs, {len(args.seeds)} seeds")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=("positions", "distillation"))
    parser.add_argument("--epochs", type=int, default=12, help="default: %(default)s")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="default: %(default)s")
    parser.add_argument("--runs", type=Path, default=Path("runs/family"),
                        help="where the training runs go (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("docs"),
                        help="where the results and the plot go (default: %(default)s)")
    args = parser.parse_args()
    command = (f"python examples/family_experiments.py {args.experiment} --epochs {args.epochs}"
               f" --seeds {' '.join(map(str, args.seeds))}")
    {"positions": positions, "distillation": distillation}[args.experiment](args, command)


if __name__ == "__main__":
    main()
