"""The human-readable report and the JSON of a run_benchmark() result."""

import json

from minivit.bench.profile import format_profile


def _human(value, unit):
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(value) < 1000:
            return f"{value:.3g} {prefix}{unit}"
        value /= 1000
    return f"{value:.3g} E{unit}"


def _mib(value):
    """Bytes as MiB (KiB below 1 MiB, so that a small model's peak does not read 0)."""
    return f"{value / 2**20:.0f} MiB" if value >= 2**20 else f"{value / 2**10:.0f} KiB"


def _blas_line(blas):
    """"openblas 0.3.31 (libscipy_openblas), 1 thread (set by minivit)" from blas_info()."""
    if isinstance(blas, str):
        return blas
    libraries = ", ".join(blas["libraries"]) or "not found by threadpoolctl"
    if not blas["controlled"]:
        return f"{libraries}, threads left as they are"
    return f"{libraries}, {_count(blas['threads'], 'thread')} (set by minivit)"


def _count(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "s")


def format_report(result):
    """The human-readable table of a run_benchmark() result."""
    machine = result["machine"]
    lines = [f"minivit bench: {result['config']} (batch {result['batch']}, {result['dtype']}, "
             f"backend {result['backend']}, {_count(result['threads'], 'thread')}"
             + (", TF32" if result["tf32"] else "")
             + (", CUDA graphs" if result.get("cuda_graph") else "")
             + (", full last block" if result.get("full_last_block") else "") + ")",
             f"machine: {machine.get('gpu') or machine['cpu']}, {machine['usable_cores']} usable "
             f"cores of {machine['cores']}, load {', '.join(f'{x:.1f}' for x in machine['load_average'] or [])}",
             "versions: " + ", ".join(f"{k} {machine[k]}" for k in
                                      ("minivit", "python", "numpy", "scipy", "cupy", "torch")
                                      if k in machine),
             f"BLAS: {_blas_line(machine['blas'])}; compiled CPU kernels: "
             f"{machine['compiled_kernels']}; memory: {machine['memory']}; date {machine['date']}"]
    if "max_abs_logit_difference" in result:
        lines.append(f"same weights and batch: max |logits minivit - torch| = "
                     f"{result['max_abs_logit_difference']:.2e}")
    lines.append("")
    header = f"{'mode':<7}{'minivit img/s':>15}{'FLOP/s':>15}"
    if "torch" in result:
        header += f"{'torch img/s':>14}{'FLOP/s':>15}{'ratio':>8}"
    header += f"{'peak memory':>14}"
    if result["backend"] == "cupy" and "torch" in result:
        header += f"{'torch peak':>14}"
    lines.append(header)
    for mode in result["minivit"]:
        mini = result["minivit"][mode]
        row = f"{mode:<7}{mini['images_per_s']:>15.1f}{_human(mini['flop_per_s'], 'FLOP/s'):>15}"
        if "torch" in result:
            other = result["torch"][mode]
            row += (f"{other['images_per_s']:>14.1f}{_human(other['flop_per_s'], 'FLOP/s'):>15}"
                    f"{result['ratio'][mode]:>7.2f}x")
        peak = mini.get("peak_gpu_bytes", mini.get("peak_array_bytes", 0))
        row += f"{_mib(peak):>14}"
        if "torch" in result and "peak_gpu_bytes" in result["torch"][mode]:
            row += f"{_mib(result['torch'][mode]['peak_gpu_bytes']):>14}"
        lines.append(row)
    if "torch" in result:
        alone = result["minivit_alone"]
        lines.append("")
        lines.append("minivit alone (before PyTorch was imported): " + ", ".join(
            f"{mode} {alone[mode]['images_per_s']:.1f} img/s" for mode in alone)
            + "; the table's minivit column was measured taking turns with PyTorch")
        lines.append("ratio = minivit / PyTorch images/s, medians of "
                     f"{result['rounds']} alternating rounds x {result['steps']} steps")
    for mode, profile in result.get("profile", {}).items():
        lines.append("")
        lines.append(format_profile(profile, result["batch"]))
    if result["backend"] == "cupy":
        held = ", ".join(f"{mode} {_mib(result['minivit'][mode]['gpu_pool_bytes'])}"
                         + (f" (torch {_mib(result['torch'][mode]['gpu_pool_bytes'])})"
                            if "torch" in result else "") for mode in result["minivit"])
        lines.append("peak memory: the most GPU bytes in use at once during one step (CuPy "
                     "pool's used bytes; PyTorch: torch.cuda.max_memory_allocated); held by the "
                     f"pool after it (reserved): {held}")
    else:
        lines.append("peak memory: live NumPy arrays at the peak of one step (tracemalloc, "
                     "untimed step); process peak RSS "
                     f"{_mib(result['peak_rss_bytes_minivit_alone'])} with minivit alone, "
                     f"{_mib(result['peak_rss_bytes'])} at the end")
    return "\n".join(lines)


def main_json(result):
    return json.dumps(result, indent=2, default=float)
