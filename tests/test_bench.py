"""`minivit bench`: it runs and reports its fields. No wall-clock assertions here, ever: the
numbers are checked for presence and sanity (positive, consistent), not for speed."""

import gc
import json
import sys

import pytest
from threadpoolctl import threadpool_info

import minivit
from minivit import bench, cli, cpu
from minivit.errors import MinivitError
from minivit.models import VisionTransformer, model_config
from minivit.torch_reference import reference_vit


def run_cli(capsys, *argv):
    code = cli.main(["bench", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = cpu.num_threads()
    yield
    cpu.set_num_threads(threads)


def test_digits_json_reports_the_fields(capsys):
    out = run_cli(capsys, "--config", "digits", "--steps", "2", "--warmup-steps", "1", "--json")
    result = json.loads(out)
    assert result["config"] == "digits" and result["batch"] == 128
    assert result["model"]["embed_dim"] == 64 and result["model"]["depth"] == 4
    assert result["dtype"] == "float32" and result["backend"] == "numpy"
    assert result["flops_per_image"]["train"] == 3 * result["flops_per_image"]["forward"] > 0
    for mode in ("train", "infer"):
        stats = result["minivit"][mode]
        assert stats["steps"] == 2
        assert stats["images_per_s"] > 0 and stats["step_ms"] > 0
        assert stats["flop_per_s"] == pytest.approx(
            result["flops_per_image"]["train" if mode == "train" else "forward"]
            * result["batch"] / (stats["step_ms"] / 1e3))
        assert stats["peak_array_bytes"] > 0
        assert result["minivit_alone"][mode]["images_per_s"] > 0
    # training keeps activations for backward: its peak is above inference's
    assert result["minivit"]["train"]["peak_array_bytes"] > \
        result["minivit"]["infer"]["peak_array_bytes"]
    assert result["peak_rss_bytes"] > 0
    machine = result["machine"]
    for key in ("cpu", "cores", "usable_cores", "numpy", "scipy", "python", "date", "blas",
                "minivit_threads", "compiled_kernels", "memory"):
        assert key in machine
    assert result["full_last_block"] is False
    assert "torch" not in result and "ratio" not in result


def test_text_report_and_options(capsys):
    out = run_cli(capsys, "--config", "tiny", "--steps", "1", "--warmup-steps", "0",
                  "--mode", "infer", "--threads", "1", "--batch", "4", "--quiet")
    assert "minivit bench: tiny (batch 4, float32, backend numpy, 1 thread)" in out
    assert " 0 MiB" not in out and "KiB" in out  # a tiny model's peak is not rounded to 0
    assert "infer" in out and "train " not in out
    assert "machine:" in out and "numpy" in out


def test_full_last_block_runs_the_whole_last_block(capsys, monkeypatch):
    seen = []
    original = bench.MinivitRunner.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.model.full_last_block)

    monkeypatch.setattr(bench.MinivitRunner, "__init__", spy)
    out = run_cli(capsys, "--config", "tiny", "--steps", "1", "--warmup-steps", "0",
                  "--full-last-block", "--quiet")
    assert "full last block" in out and seen == [True]


def test_profile_shows_where_the_time_goes(capsys):
    out = run_cli(capsys, "--config", "tiny", "--steps", "2", "--warmup-steps", "0",
                  "--profile", "--json")
    profile = json.loads(out)["profile"]["train"]
    assert profile["total"] > 0
    assert any(name.startswith("Linear.") for name in profile["ops"])
    assert "SelfAttention.backward" in profile["ops"]
    assert "engine + Python (the rest)" in profile["groups"]
    assert "optimizer (AdamW)" in profile["groups"]
    assert minivit.tensor._op_hook is None  # the profiler's hook is gone afterwards


def test_float64(capsys):
    result = json.loads(run_cli(capsys, "--config", "tiny", "--steps", "1", "--dtype",
                                "float64", "--json"))
    assert result["dtype"] == "float64" and result["minivit"]["train"]["images_per_s"] > 0


def test_against_torch_on_a_tiny_config(capsys):
    pytest.importorskip("torch")
    out = run_cli(capsys, "--config", "tiny", "--steps", "2", "--warmup-steps", "1",
                  "--rounds", "2", "--threads", "1", "--against", "torch", "--json")
    result = json.loads(out)
    assert result["against"] == "torch"
    # same weights, same batch: the two frameworks compute the same logits
    assert result["max_abs_logit_difference"] < 1e-4
    for mode in ("train", "infer"):
        assert result["torch"][mode]["images_per_s"] > 0
        assert result["torch"][mode]["steps"] == 2 * 2  # rounds x steps
        assert result["minivit"][mode]["steps"] == 2 * 2
        assert result["ratio"][mode] == pytest.approx(
            result["minivit"][mode]["images_per_s"] / result["torch"][mode]["images_per_s"])
    assert result["machine"]["torch"] and result["machine"]["torch_threads"] == 1
    text = bench.format_report(result)
    assert "ratio" in text and "torch img/s" in text and "max |logits" in text


def test_against_torch_without_torch_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    code = cli.main(["bench", "--config", "tiny", "--steps", "1", "--against", "torch"])
    assert code == 1
    assert "pip install torch" in capsys.readouterr().err


def test_tf32_is_refused_on_the_cpu(capsys):
    code = cli.main(["bench", "--config", "tiny", "--steps", "1", "--tf32"])
    assert code == 1
    assert "--tf32" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("batch", 0), ("threads", 0), ("steps", 0),
                                           ("rounds", 0), ("warmup_steps", -1)])
def test_run_benchmark_refuses_out_of_range_counts(option, value):
    flag = "--" + option.replace("_", "-")
    with pytest.raises(MinivitError, match=f"{flag} must be at least"):
        bench.run_benchmark(config="tiny", **{option: value})


def test_cuda_graph_is_refused_on_the_cpu(capsys):
    code = cli.main(["bench", "--config", "tiny", "--steps", "1", "--cuda-graph"])
    assert code == 1
    assert "--cuda-graph applies to the GPU (--backend cupy) only" in capsys.readouterr().err


def test_torch_vit_has_minivits_parameter_names():
    pytest.importorskip("torch")
    args = bench.config_model_args("tiny")
    ours = VisionTransformer(**args).state_dict()
    theirs = reference_vit(args).state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(tuple(theirs[k].shape) == ours[k].shape for k in ours)


def test_configurations_are_named_models():
    digits = bench.config_model_args("digits")
    assert {k: digits[k] for k in ("img_size", "patch_size", "in_chans", "num_classes",
                                   "embed_dim", "depth", "num_heads")} == \
        dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4,
             num_heads=4)
    c = bench.CONFIGS
    for name, model in (("digits", "vit_digits"), ("cifar", "vit_cifar"),
                        ("vit_s16", "vit_small_patch16_224"),
                        ("vit_b16", "vit_base_patch16_224")):
        assert c[name]["model"] == model and bench.config_model_args(name) == model_config(model)
    assert c["cifar"]["batch"] == 128 and c["vit_s16"]["batch"] == c["vit_b16"]["batch"] == 64
    assert bench.config_model_args("tiny")["embed_dim"] == 16
    with pytest.raises(MinivitError, match="unknown bench configuration 'huge'; known: digits"):
        bench.config_model_args("huge")


def test_with_the_fast_paths_off_the_report_says_so_and_leaves_blas_alone(capsys):
    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    with cpu.fast_paths(False):
        out = run_cli(capsys, "--config", "tiny", "--steps", "1", "--warmup-steps", "0",
                      "--quiet")
    assert "BLAS: left as it is: fast CPU paths off (MINIVIT_FAST_CPU=0)" in out
    assert "compiled CPU kernels: not used" in out
    assert blas_threads() == before


def test_timed_steps_run_with_the_garbage_collector_paused_and_restore_it():
    seen = []
    assert gc.isenabled()
    times = bench.run._time_steps(lambda: seen.append(gc.isenabled()), 3)
    assert seen == [False, False, False] and len(times) == 3
    assert gc.isenabled()
    gc.disable()
    try:  # a caller that had it off keeps it off
        bench.run._time_steps(lambda: None, 1)
        assert not gc.isenabled()
    finally:
        gc.enable()
