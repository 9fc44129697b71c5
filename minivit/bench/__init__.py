"""The benchmark behind ``minivit bench``: images/s, FLOP/s and peak memory, optionally side by
side with PyTorch.

run.py: the named configurations and the timing loop (``run_benchmark``); runners.py: what is
timed (minivit's and PyTorch's model, optimizer and batch); profile.py: time per op;
machine.py: the machine and memory peaks; report.py: the text and JSON reports.
"""

from minivit.bench.profile import format_profile, profile_ops
from minivit.bench.report import format_report, main_json
from minivit.bench.run import CONFIGS, config_model_args, run_benchmark
from minivit.bench.runners import MinivitRunner, TorchRunner

__all__ = ["CONFIGS", "MinivitRunner", "TorchRunner", "config_model_args", "format_profile",
           "format_report", "main_json", "profile_ops", "run_benchmark"]
