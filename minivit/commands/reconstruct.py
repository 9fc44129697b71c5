"""minivit reconstruct: an MAE run's reconstructions of dataset images, as a PNG."""

EPILOG = """Each row is one image: the original, what the encoder sees (masked patches grey),
the decoder's prediction of every patch, and the prediction with the visible patches pasted
back (as the MAE paper's figures). With --norm-pix-loss runs, each predicted patch is shown
with the original patch's mean and deviation.

examples:
  minivit reconstruct runs/mae --index 0 1 2 3
  minivit reconstruct runs/mae --index 7 --mask-ratio 0.5 --out seven.png
"""


def add_parser(subparsers, name, help_text):
    from minivit.commands.common import add_backend_flags, add_run_data_flags, command_parser

    p = command_parser(subparsers, name, help_text, EPILOG)
    p.add_argument("run", metavar="RUN", help="a minivit pretrain --method mae run folder")
    p.add_argument("--index", type=int, nargs="+", default=[0], metavar="N",
                   help="images of the dataset split (default: 0)")
    add_run_data_flags(p, split="the dataset split --index reads")
    p.add_argument("--mask-ratio", type=float, default=None,
                   help="fraction of patches hidden (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    p.add_argument("--out", default="reconstruction.png", metavar="FILE.png",
                   help="the PNG to write (default: %(default)s)")
    add_backend_flags(p)


def run(args):
    from pathlib import Path

    import numpy as np

    from minivit import backend
    from minivit.commands.common import apply_backend, run_data_dir, writing_figure
    from minivit.data import load_dataset
    from minivit.errors import MinivitError
    from minivit.inspect.plots import new_figure
    from minivit.io import atomic_write
    from minivit.models.mae import check_mask_ratio
    from minivit.pretrain import model_from_run
    from minivit.tensor import no_grad

    apply_backend(args)
    model, info = model_from_run(args.run)
    if info["method"] != "mae":
        raise MinivitError(f"{args.run} is a {info['method']} run: reconstruct draws MAE runs")
    ratio = model.mask_ratio if args.mask_ratio is None else args.mask_ratio
    check_mask_ratio(ratio, model.patch_embed.num_patches)
    dataset = load_dataset(info["dataset"], args.split,
                           run_data_dir(args.data_dir, info, info["dataset"]))
    bad = [i for i in args.index if not 0 <= i < len(dataset)]
    if bad:
        raise MinivitError(f"--index {bad[0]} is outside the {args.split} split's "
                           f"0..{len(dataset) - 1}")
    mean = np.asarray(info["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(info["std"], np.float32).reshape(1, -1, 1, 1)
    images = (dataset.images[args.index] - mean) / std
    backend.manual_seed(args.seed)
    with no_grad():
        loss, pred, mask = model(backend.to_backend(images), mask_ratio=ratio)
        pred = backend.to_numpy(model.reconstruction(images, backend.to_numpy(pred.data)))
    mask = backend.to_numpy(mask)
    p, grid = model.patch_embed.patch_size, model.patch_embed.grid_size
    pixel_mask = np.kron(mask.reshape(-1, 1, *grid), np.ones((p, p)))  # 1 on hidden pixels
    panels = {"original": images, "visible": np.where(pixel_mask > 0, np.nan, images),
              "reconstruction": pred, "reconstruction + visible":
                  np.where(pixel_mask > 0, pred, images)}
    figure, axes = new_figure(len(args.index), len(panels))
    for row, index in enumerate(args.index):
        for column, (title, batch) in enumerate(panels.items()):
            picture = np.clip((batch[row] * std[0] + mean[0]).transpose(1, 2, 0), 0, 1)
            picture = np.where(np.isnan(picture), 0.5, picture)  # hidden patches grey
            ax = axes[row * len(panels) + column]
            ax.imshow(picture[..., 0] if picture.shape[2] == 1 else picture, cmap="gray",
                      vmin=0, vmax=1)
            ax.set_title(f"{title}" if row else f"{title}\n#{index}", fontsize=8)
            ax.set_axis_off()
    out = Path(args.out)
    with writing_figure(out):
        atomic_write(out, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    print(f"wrote {out}: {len(args.index)} image(s), {ratio:.0%} of the patches masked, "
          f"loss on them {float(loss.data):.4f}")
    return 0
