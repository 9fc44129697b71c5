"""minivit bench: training/inference images/s, FLOP/s and peak memory, optionally side by side
with PyTorch."""

import sys

from minivit.bench import CONFIGS, format_report, main_json, run_benchmark
from minivit.commands.common import add_backend_flags, apply_backend, command_parser, number

EPILOG = """configurations (--config), each a model of `minivit info --list`:
  digits   vit_digits: 8x8x1 images, patch 2, D 64, depth 4, 4 heads, 10 classes; batch 128
  cifar    vit_cifar: 32x32x3, patch 4, D 192, depth 6, 3 heads, 10 classes; batch 128
  vit_s16  vit_small_patch16_224 (ViT-S/16 at 224, 1000 classes); batch 64
  vit_b16  vit_base_patch16_224 (ViT-B/16 at 224, 1000 classes); batch 64
  tiny     vit_digits at patch 4, D 16, depth 1, 2 heads, 5 classes: for smoke tests; batch 8

A training step is forward + cross-entropy + backward + AdamW step; inference is a no-grad
forward in eval mode; both on one fixed random batch. FLOP/s counts 2 x MACs per image forward
and 3x that for training (minivit.inspect.cost): the model's FLOPs as timm computes them, for
both frameworks. minivit's forward skips the last block's work for the tokens the head never
reads (VisionTransformer.forward; same logits and gradients), so its column is model FLOP/s:
for cifar it executes ~12% fewer multiply-adds than the column counts. --full-last-block
makes minivit do the same work as PyTorch.

--against torch builds the same architecture in PyTorch with minivit's initial weights (the
logits are compared as a check), on the same number of threads, and times both ALTERNATELY
in --rounds rounds of --steps steps each; ratio = minivit / PyTorch images/s of the medians.
minivit is also timed alone before PyTorch is imported, to show whether PyTorch's threads in
the same process slow NumPy down.

--tf32 (GPU only) lets float32 GEMMs use TF32 tensor cores: for CuPy through cuBLAS's compute
type (the same switch as CUPY_TF32=1; see minivit.cuda.set_tf32), for PyTorch through
torch.backends.cuda.matmul.allow_tf32.

--cuda-graph (GPU only, experimental) records minivit's whole training step (forward,
backward, AdamW) and inference step as CUDA graphs after a warm-up, and times their replays:
~2 us per kernel instead of ~18 us of Python launching it (see minivit.cuda.CapturedStep).
Peak memory is then measured on the same steps run eagerly.

CPU threads (--threads N): minivit's own threads (GEMM row blocks and elementwise chunks, with
NumPy's BLAS on one thread via threadpoolctl) and torch.set_num_threads(N). Default: every CPU
this process may use. MINIVIT_NUM_THREADS does the same for any minivit command.

examples:
  minivit bench --config cifar --against torch
  minivit bench --model swin_digits --against torch --steps 3 --rounds 1
  minivit bench --config vit_b16 --backend cupy --tf32 --against torch --json
"""


def add_parser(subparsers, name, help_text):
    p = command_parser(subparsers, name, help_text, EPILOG)
    p.add_argument("--config", choices=tuple(CONFIGS), default="digits",
                   help="named configuration (default: %(default)s)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="a named model instead of --config (minivit info --list; a Swin is "
                        "compared with timm's SwinTransformer; default batch 32)")
    p.add_argument("--batch", type=number(int, 1), default=None,
                   help="batch size (default: the configuration's)")
    p.add_argument("--steps", type=number(int, 1), default=10,
                   help="timed steps per round and mode (default: %(default)s)")
    p.add_argument("--warmup-steps", type=number(int, 0), default=2,
                   help="untimed steps first (default: %(default)s)")
    p.add_argument("--rounds", type=number(int, 1), default=3,
                   help="alternating minivit/PyTorch rounds with --against (default: "
                        "%(default)s)")
    p.add_argument("--mode", choices=("both", "train", "infer"), default="both",
                   help="what to time (default: %(default)s)")
    add_backend_flags(p)
    p.add_argument("--full-last-block", action="store_true",
                   help="minivit computes every token in the last block, as PyTorch/timm do "
                        "(default: only the class token, whose output the head reads)")
    p.add_argument("--tf32", action="store_true",
                   help="GPU: TF32 tensor-core GEMMs for float32 (CuPy and PyTorch)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="GPU, experimental: record minivit's train and inference steps once as "
                        "CUDA graphs and time their replays (PyTorch stays eager)")
    p.add_argument("--against", choices=("torch",), default=None,
                   help="also run the same model in PyTorch and print minivit/PyTorch ratios")
    p.add_argument("--threads", type=number(int, 1), default=None,
                   help="CPU threads for minivit and PyTorch (default: all usable CPUs)")
    p.add_argument("--profile", action="store_true",
                   help="also time each minivit op (forward/backward), the optimizer and the "
                        "rest, and print where a step's time goes")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args):
    backend_name = apply_backend(args)
    modes = ("train", "infer") if args.mode == "both" else (args.mode,)
    log = None if args.quiet or args.json else (lambda message: print(message, file=sys.stderr,
                                                                       flush=True))
    result = run_benchmark(config=args.config, batch=args.batch, steps=args.steps,
                           warmup_steps=args.warmup_steps, rounds=args.rounds,
                           backend_name=backend_name, dtype=args.dtype, against=args.against,
                           threads=args.threads, tf32=args.tf32, modes=modes,
                           profile=args.profile, log=log,
                           full_last_block=args.full_last_block, cuda_graph=args.cuda_graph,
                           model=args.model)
    print(main_json(result) if args.json else format_report(result))
    return 0
