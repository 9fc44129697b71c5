"""The inspection commands minivit gradcheck and info, through cli.main (plot:
test_commands_plot.py; attention: test_commands_attention.py).
"""

import re

import pytest
from helpers_commands import tiny_checkpoint  # noqa: F401 (a fixture)

import minivit.functional.activation as activation
import minivit.functional.attention as attention_module
import minivit.functional.normalization as normalization
from minivit.cli import main
from minivit.inspect.opchecks import OP_CHECKS, run_check


def table_rows(output):
    """{(op, input): result} from the gradcheck table."""
    rows = {}
    for line in output.splitlines():
        parts = line.replace("pass (atol)", "pass(atol)").split()
        if len(parts) == 7 and parts[-1] in ("pass", "pass(atol)", "FAIL"):
            rows[parts[0], parts[1]] = parts[-1]
    return rows


# ---------------------------------------------------------------- gradcheck


REQUIRED_OPS = {
    "linear", "patchify", "scaled_dot_product_attention", "softmax", "log_softmax", "layer_norm",
    "gelu", "gelu_tanh", "cross_entropy", "cross_entropy_soft", "cross_entropy_smoothed",
    "dropout", "drop_path", "concat", "stack", "getitem", "add", "sub", "mul", "div", "neg",
    "power", "exp", "log", "matmul", "sum", "mean", "max", "reshape", "transpose",
    "broadcast_to", "vit", "window_partition", "window_reverse", "roll", "patch_merge", "swin",
}


def test_registry_covers_every_hand_written_op():
    assert REQUIRED_OPS <= set(OP_CHECKS)


def test_gradcheck_command_passes_on_the_real_ops(capsys):
    assert main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert "FAIL" not in out
    assert {op for op, _ in rows} == set(OP_CHECKS)
    assert all(result == "pass" for result in rows.values())
    # the whole ViT: the images and every parameter
    vit_inputs = {name for op, name in rows if op == "vit"}
    assert {"images", "pos_embed", "cls_token", "blocks.1.attn.qkv.weight",
            "head.bias"} <= vit_inputs
    assert len(vit_inputs) == 1 + 4 + 2 * 12 + 4
    assert re.search(rf"all {len(OP_CHECKS)} checks passed", out)


def _softmax_without_the_sum_term(self, grad):
    probs, _ = self.saved  # every softmax implementation saves (p, axis)
    return (probs * grad,)  # p ⊙ dp: drops − p Σ dp ⊙ p


def _layer_norm_without_the_projection_term(self, grad):
    normalized, rstd, weight = self.saved  # every layer_norm implementation saves (x̂, r, w)
    grad_normalized = grad * weight
    grad_x = rstd * (grad_normalized - grad_normalized.mean(axis=-1, keepdims=True))
    leading = tuple(range(grad.ndim - 1))
    return grad_x, (grad * normalized).sum(axis=leading), grad.sum(axis=leading)


def _layer_norm_without_the_mean_term(self, grad):
    normalized, rstd, weight = self.saved
    grad_normalized = grad * weight
    dot = (grad_normalized * normalized).mean(axis=-1, keepdims=True)
    grad_x = rstd * (grad_normalized - normalized * dot)
    leading = tuple(range(grad.ndim - 1))
    return grad_x, (grad * normalized).sum(axis=leading), grad.sum(axis=leading)


@pytest.mark.parametrize("target, broken, ops, failing_input", [
    (activation.Softmax, _softmax_without_the_sum_term, ["softmax"], ("softmax", "x")),
    (normalization.LayerNorm, _layer_norm_without_the_projection_term, ["layer_norm", "vit"],
     ("layer_norm", "x")),
    (normalization.LayerNorm, _layer_norm_without_the_mean_term, ["layer_norm", "vit"],
     ("vit", "images")),
])
def test_gradcheck_command_fails_on_a_broken_backward(monkeypatch, capsys, target, broken, ops,
                                                      failing_input):
    monkeypatch.setattr(target, "backward", broken)
    argv = ["gradcheck"] + [arg for op in ops for arg in ("--op", op)]
    assert main(argv) == 1
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows[failing_input] == "FAIL"
    assert "FAILED" in out
    for op in ops:  # every selected check notices, the whole ViT included
        assert any(result == "FAIL" for (name, _), result in rows.items() if name == op)


def test_gradcheck_notices_a_forgotten_attention_scale(monkeypatch, capsys):
    """dq and dk without the 1/√d factor (the real backward, whichever path it takes)."""
    original = attention_module.ScaledDotProductAttention.backward

    def without_scale(self, grad):
        grad_q, grad_k, grad_v, grad_bias = original(self, grad)
        return grad_q / self.scale, grad_k / self.scale, grad_v, grad_bias

    monkeypatch.setattr(attention_module.ScaledDotProductAttention, "backward", without_scale)
    assert main(["gradcheck", "--op", "scaled_dot_product_attention", "--op", "softmax"]) == 1
    rows = table_rows(capsys.readouterr().out)
    assert rows["scaled_dot_product_attention", "q"] == "FAIL"
    assert rows["scaled_dot_product_attention", "k"] == "FAIL"
    assert rows["scaled_dot_product_attention", "v"] == "pass"
    assert rows["softmax", "x"] == "pass"


def test_gradcheck_says_which_inputs_passed_on_the_absolute_floor(capsys):
    """With an rtol no float64 difference can meet, the rows that pass do so on atol, and the
    table says so instead of a bare 'pass'."""
    assert main(["gradcheck", "--op", "linear", "--rtol", "1e-14"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows and set(rows.values()) == {"pass(atol)"}
    assert "round-off" in out


def test_gradcheck_unknown_op_lists_the_names(capsys):
    assert main(["gradcheck", "--op", "convolution"]) == 1
    err = capsys.readouterr().err
    assert "unknown op 'convolution'" in err
    assert "layer_norm" in err and "scaled_dot_product_attention" in err and "vit" in err


def test_gradcheck_list_and_seed(capsys):
    assert main(["gradcheck", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(OP_CHECKS)
    assert main(["gradcheck", "--op", "gelu", "--seed", "3"]) == 0
    assert "seed 3" in capsys.readouterr().out


def test_run_check_draws_inputs_from_the_seed():
    first, again, other = (run_check("layer_norm", seed=s) for s in (5, 5, 6))
    errors = [[i.max_abs_error for i in r.inputs] for r in (first, again, other)]
    assert errors[0] == errors[1] != errors[2]


# ---------------------------------------------------------------- info


def parse_info(output):
    total = re.search(r"^total\s+([\d,]+)\s+([\d,]+)$", output, re.M)
    return int(total[1].replace(",", "")), int(total[2].replace(",", ""))


@pytest.mark.parametrize("argv, expected", [
    (["bench", "--config", "tiny", "--batch", "-4"],
     "argument --batch: must be at least 1, got -4"),
    (["bench", "--config", "tiny", "--threads", "0"], "argument --threads: must be at least 1"),
    (["bench", "--steps", "abc"], "argument --steps: expected a whole number, got 'abc'"),
    (["info", "vit_digits", "--img-size", "-16"], "argument --img-size: must be at least 1"),
    (["info", "vit_digits", "--num-classes", "-2"], "argument --num-classes: must be at least 0"),
    (["gradcheck", "--seed", "-1"], "argument --seed: must be at least 0, got -1"),
    (["gradcheck", "--rtol", "nan"], "argument --rtol: must be greater than 0.0, got nan"),
    (["predict", "--checkpoint", "x", "--top-k", "0", "a.npy"], "argument --top-k: must be at "
                                                                  "least 1, got 0")])
def test_out_of_range_numbers_are_usage_errors_naming_the_flag(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_info_vit_base(capsys):
    assert main(["info", "vit_base_patch16_224"]) == 0
    out = capsys.readouterr().out
    params, macs = parse_info(out)
    assert params == 86_567_656
    assert macs / 1e9 == pytest.approx(17.58, rel=0.005)
    assert "196 patches (14x14) + 1 class token = 197" in out
    assert "197x197 per head" in out
    assert re.search(r"^  each block\s+7,087,872\s", out, re.M)
    assert "GFLOPs per image" in out and "activations kept for backward" in out


def test_info_overrides_and_list(capsys):
    assert main(["info", "vit_base_patch16_224", "--img-size", "384", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "576 patches (24x24) + 1 class token = 577" in out
    params, _ = parse_info(out)
    # 10 classes instead of 1000; 577 instead of 197 position embeddings
    assert params == 86_567_656 - 990 * 769 + 380 * 768
    assert main(["info", "--list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^vit_base_patch16_224\s.*\s86,567,656\s", out, re.M)
    assert re.search(r"^vit_huge_patch14_224\s.*\s632,045,800\s", out, re.M)
    assert "vit_digits" in out


def test_info_unknown_model(capsys):
    assert main(["info", "vit_gigantic"]) == 1
    err = capsys.readouterr().err
    assert "vit_gigantic" in err and "vit_base_patch16_224" in err


def test_info_checkpoint(capsys, tiny_checkpoint):
    run_dir, model = tiny_checkpoint
    for target in (run_dir, run_dir / "best.safetensors"):
        assert main(["info", str(target)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"checkpoint {run_dir / 'best.safetensors'}: dataset digits, epoch 3")
        assert f"{model.num_parameters():,} stored parameters" in out
        assert parse_info(out)[0] == model.num_parameters()
        assert "16 patches (4x4) + 1 class token = 17" in out
        assert "17x17 per head" in out
