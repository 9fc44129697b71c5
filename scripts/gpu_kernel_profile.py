"""GPU kernel times of minivit's and PyTorch's training and inference steps, side by side.

    python scripts/gpu_kernel_profile.py --config vit_s16 --tf32 [--steps 3] [--rows 16]

PyTorch's profiler (CUPTI) records every kernel the process launches, CuPy's included, so one
table per framework and mode lists where the GPU's time goes: GEMMs, elementwise kernels,
minivit's fused kernels. The sum of the kernel times against the wall time of a step tells
whether a step is bound by the GPU or by the host launching its kernels (`minivit bench`
gives the wall time). A last table says which minivit/cuda/<family>.py module holds each of
minivit's kernels (RawKernels by name, ElementwiseKernels as minivit_<name>). Needs a GPU,
CuPy and PyTorch; scripts/gpu_check.sh runs it last.
"""

import argparse

from minivit import backend, cuda
from minivit.bench import CONFIGS, MinivitRunner, TorchRunner, config_model_args
from minivit.cuda import device
from minivit.torch_reference import import_torch


def kernel_table(step, steps, rows):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):  # warm up: kernels compiled, memory pools filled
        step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows,
                                     max_name_column_width=70)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=tuple(CONFIGS), default="vit_s16")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tf32", action="store_true", help="TF32 GEMMs on both sides")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per table")
    parser.add_argument("--rows", type=int, default=16, help="kernels per table")
    args = parser.parse_args()

    torch = import_torch()
    backend.set_backend("cupy")
    cuda.set_tf32(args.tf32)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    model_args = config_model_args(args.config)
    batch = args.batch or CONFIGS[args.config]["batch"]
    mini = MinivitRunner(model_args, batch)
    reference = TorchRunner(torch, model_args, mini.model.state_dict(), mini.images, mini.labels,
                            device="cuda")
    for runner in (mini, reference):
        for mode in ("train", "infer"):
            step = runner.train_step if mode == "train" else runner.infer_step
            print(f"==== {args.config} batch {batch}{' TF32' if args.tf32 else ''}: {runner.name} "
                  f"{mode}, GPU kernel times over {args.steps} steps", flush=True)
            print(kernel_table(step, args.steps, args.rows), flush=True)
    print("==== minivit's kernels and their modules")
    for name, module in sorted(device.KERNEL_MODULES.items(), key=lambda item: item[::-1]):
        print(f"{name:<40} {module}")


if __name__ == "__main__":
    main()
