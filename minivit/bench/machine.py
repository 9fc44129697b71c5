"""The machine a benchmark ran on (CPU, cores, load, library versions) and its memory peaks."""

import datetime
import os
import platform
import resource
import sys
import tracemalloc

import numpy as np
import scipy

from minivit import __version__, cpu


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(backend_name="numpy", torch_module=None):
    """CPU model, cores, load, library versions and the date, as a dict."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "minivit": __version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        **_cpu_paths_info(cpu),
        "minivit_threads": cpu.num_threads(),
    }
    if backend_name == "cupy":
        import cupy  # the optional GPU extra

        device = cupy.cuda.Device()
        properties = cupy.cuda.runtime.getDeviceProperties(device.id)
        info["cupy"] = cupy.__version__
        info["gpu"] = properties["name"].decode() if isinstance(properties["name"], bytes) \
            else str(properties["name"])
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    if torch_module is not None:
        info["torch"] = torch_module.__version__
        info["torch_threads"] = torch_module.get_num_threads()
        info["torch_interop_threads"] = torch_module.get_num_interop_threads()
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    return info


def peak_rss_bytes():
    """The process's peak resident set size so far (getrusage; kilobytes on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def traced_peak_bytes(step):
    """Peak bytes of memory allocated through Python's allocator tracker during step() —
    NumPy registers every array buffer with tracemalloc, so on the CPU this is the peak of
    live arrays (activations, gradients, temporaries) plus Python objects. Slows Python down:
    used in an untimed step only."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        step()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was_tracing:
            tracemalloc.stop()


def _cpu_paths_info(cpu):
    """What minivit did to BLAS, which CPU kernels ran, and malloc; with the fast paths off
    (MINIVIT_FAST_CPU=0) none of them, and blas_info() is not called: it would set BLAS's
    threads after the timed runs."""
    if not cpu.fast_paths_enabled():
        off = "not used: fast CPU paths off (MINIVIT_FAST_CPU=0)"
        return {"blas": "left as it is: fast CPU paths off (MINIVIT_FAST_CPU=0)",
                "compiled_kernels": off, "memory": "malloc left as it is"}
    return {"blas": cpu.blas_info(), "compiled_kernels": cpu.compiled_kernels_info(),
            "memory": cpu.memory_info()}
