"""DeiT distillation: the hard and soft losses as DeiT's DistillationLoss computes them, their
gradients, training with a teacher (a run or timm-format weights), and the errors of bad
options, with nothing written."""

import numpy as np
import pytest

import minivit
from minivit import Tensor, gradcheck
from minivit.checkpoint import save_checkpoint
from minivit.cli import main
from minivit.distill import DistillationLoss, soft_distillation
from minivit.io import save_weights
from minivit.models import create_model, model_from_checkpoint
from minivit.train import TrainConfig, train

QUICK = dict(dataset="digits", model="deit_digits", epochs=1, warmup=0, batch_size=64,
             drop_path=0.0, label_smoothing=0.0, augment=False, progress=False)


def log_softmax(x):
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class Fixed:
    """A stand-in teacher whose logits are given."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, x):
        return Tensor(self.logits)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_losses_are_deits(kind):
    rng = np.random.default_rng(0)
    cls, dist, teacher = (rng.standard_normal((4, 5)) for _ in range(3))
    labels = np.array([0, 3, 1, 4])
    alpha, tau = 0.3, 2.0
    loss, logits = DistillationLoss(Fixed(teacher), kind, alpha, tau)(
        (Tensor(cls), Tensor(dist)), np.zeros((4, 1, 8, 8)), labels)
    base = -log_softmax(cls)[np.arange(4), labels].mean()
    if kind == "hard":
        teaching = -log_softmax(dist)[np.arange(4), teacher.argmax(axis=1)].mean()
    else:  # F.kl_div(log_s, log_t, reduction='sum', log_target=True) * tau**2 / numel
        log_s, log_t = log_softmax(dist / tau), log_softmax(teacher / tau)
        teaching = (np.exp(log_t) * (log_t - log_s)).sum() * tau ** 2 / dist.size
    np.testing.assert_allclose(loss.data, (1 - alpha) * base + alpha * teaching, rtol=1e-12)
    np.testing.assert_allclose(logits.data, (cls + dist) / 2, rtol=1e-12)


def test_soft_loss_gradient_and_zero_at_the_teacher():
    rng = np.random.default_rng(1)
    teacher = rng.standard_normal((3, 4))
    report = gradcheck(lambda s: soft_distillation(s, teacher, 1.5) * 10.0,
                       rng.standard_normal((3, 4)))
    assert report.passed, str(report)
    assert abs(float(soft_distillation(Tensor(teacher), teacher, 1.5).data)) < 1e-15


def test_training_with_a_teacher_run(tmp_path):
    minivit.manual_seed(0)
    (tmp_path / "teacher").mkdir()
    save_checkpoint(tmp_path / "teacher" / "best.safetensors",
                    create_model("vit_digits", depth=1), {"epoch": 1})
    summary = train(TrainConfig(**QUICK, out=str(tmp_path / "run"),
                                teacher=str(tmp_path / "teacher"), distillation="soft"))
    assert summary["epoch"] == 1 and (tmp_path / "run" / "best.safetensors").exists()


def test_training_with_a_teacher_given_as_timm_weights(tmp_path):
    """A weights file has no configuration: --teacher-model names it, and a file that does not
    fit that model is one clear error naming the keys."""
    minivit.manual_seed(0)
    save_weights(create_model("vit_digits").state_dict(), tmp_path / "full.safetensors")
    save_weights(create_model("vit_digits", depth=1).state_dict(), tmp_path / "one.safetensors")
    options = dict(teacher_model="vit_digits", distillation="hard")
    with pytest.raises(minivit.errors.WeightsError, match="missing: blocks.1.norm1.weight"):
        train(TrainConfig(**QUICK, out=str(tmp_path / "bad"),
                          teacher=str(tmp_path / "one.safetensors"), **options))
    assert not (tmp_path / "bad").exists()
    summary = train(TrainConfig(**QUICK, out=str(tmp_path / "run"),
                                teacher=str(tmp_path / "full.safetensors"), **options))
    assert summary["epoch"] == 1


@pytest.mark.parametrize("args, message", [
    (["--model", "vit_digits", "--teacher", "T", "--distillation", "hard"],
     "--distillation needs a student with a distillation token; vit_digits has none"),
    (["--model", "deit_digits", "--teacher", "T"], "--teacher needs --distillation hard|soft"),
    (["--model", "deit_digits", "--distillation", "soft"],
     "--distillation needs --teacher RUN_OR_WEIGHTS"),
    (["--model", "deit_digits", "--teacher", "THREE", "--distillation", "soft"],
     "takes 1-channel (8, 8) images to 3 classes, the student 1-channel (8, 8) images to 10 "
     "classes"),
    (["--model", "deit_digits", "--teacher", "W3", "--teacher-model", "vit_digits",
      "--distillation", "hard"], "has 3 classes, the student 10"),
    (["--model", "deit_digits", "--teacher", "W3", "--distillation", "hard"],
     "name its model with --teacher-model NAME"),
    (["--model", "deit_digits", "--teacher", "nowhere", "--distillation", "hard"],
     "no such run folder or weights file"),
])
def test_bad_distillation_options_are_clear_errors_and_write_nothing(tmp_path, capsys, args,
                                                                     message):
    minivit.manual_seed(0)
    three = create_model("vit_digits", num_classes=3, depth=1)
    (tmp_path / "three").mkdir()
    save_checkpoint(tmp_path / "three" / "best.safetensors", three, {"epoch": 1})
    save_weights(three.state_dict(), tmp_path / "w3.safetensors")
    paths = {"T": tmp_path / "three", "THREE": tmp_path / "three", "W3": tmp_path / "w3.safetensors",
             "nowhere": tmp_path / "nowhere"}
    args = [str(paths.get(a, a)) for a in args]
    out = tmp_path / "run"
    assert main(["train", *args, "--epochs", "1", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err
    assert not out.exists()


def test_pos_embed_and_rel_pos_bias_flags_reach_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--pos-embed", "none", "--rel-pos-bias", "--epochs", "1",
                 "--batch-size", "128", "--out", str(out), "--quiet"]) == 0
    model, info = model_from_checkpoint(out)
    assert model.config["pos_embed"] == "none" and model.config["rel_pos_bias"]
    assert info["train_config"]["rel_pos_bias"] is True
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert f"{model.num_parameters():,} stored parameters" in capsys.readouterr().out
