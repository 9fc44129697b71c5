"""DeiT's knowledge distillation (Touvron et al. 2021): a student with a distillation token
learns from the labels through its class head and from a teacher through its distillation
head, as DeiT's ``DistillationLoss``:

    hard: (1 − α)·CE(class head, y) + α·CE(distillation head, argmax teacher)
    soft: (1 − α)·CE(class head, y) + α·τ²·KL(softmax(teacher/τ) ‖ softmax(dist/τ)) / (B·K)

(the KL summed over the batch and the K classes, then divided by their count B·K, as DeiT's
``F.kl_div(..., reduction='sum') / outputs_kd.numel()``). The teacher is any minivit run or
checkpoint, or timm-format weights of a model minivit builds (with ``teacher_model``); it runs
in eval mode without gradients. At inference the student averages its two heads.
"""

from pathlib import Path

import minivit.functional as F
from minivit import backend
from minivit.checkpoint import METADATA_KEY
from minivit.errors import MinivitError
from minivit.functional.activation import log_softmax_array
from minivit.io import load_weights
from minivit.models import (checkpoint_num_classes, create_model, load_pretrained,
                            model_from_checkpoint)
from minivit.tensor import Tensor, no_grad

DISTILLATION_KINDS = ("hard", "soft")


def check_options(config, model):
    """Refuse distillation options that do not fit together or the student, before a run
    writes anything."""
    teacher, kind = config.teacher, config.distillation
    if (teacher is None) != (kind is None):
        given, missing = ("--teacher", "--distillation hard|soft") if teacher else \
            ("--distillation", "--teacher RUN_OR_WEIGHTS")
        raise MinivitError(f"{given} needs {missing}: distillation trains against a teacher's "
                           f"outputs")
    if kind is None:
        return
    if kind not in DISTILLATION_KINDS:
        raise MinivitError(f"--distillation must be one of {', '.join(DISTILLATION_KINDS)}, "
                           f"got {kind!r}")
    if not hasattr(model, "dist_token"):
        raise MinivitError(f"--distillation needs a student with a distillation token; "
                           f"{config.model_name()} has none: use a distilled model such as "
                           f"deit_digits or deit_tiny_distilled_patch16_224")
    if not 0 <= config.distillation_alpha <= 1:
        raise MinivitError(f"--distillation-alpha must be in [0, 1], got "
                           f"{config.distillation_alpha}")
    if not config.distillation_tau > 0:
        raise MinivitError(f"--distillation-tau must be greater than 0, got "
                           f"{config.distillation_tau}")
    if config.cuda_graph:
        raise MinivitError("--cuda-graph does not record a teacher's forward pass: train with "
                           "--teacher without --cuda-graph")


def load_teacher(source, student, teacher_model=None, dtype="float32"):
    """The teacher model in eval mode: a minivit run folder or checkpoint, or (with
    teacher_model=NAME) timm-format weights of that named model. Its classes, channels and
    image size must be the student's."""
    path = Path(source)
    if not path.exists():
        raise MinivitError(f"--teacher {source}: no such run folder or weights file")
    classes = student.num_classes
    state, metadata = (None, {}) if path.is_dir() else load_weights(path)  # read once
    if path.is_dir() or METADATA_KEY in metadata:
        teacher, _ = model_from_checkpoint(path)
    elif teacher_model is None:
        raise MinivitError(f"--teacher {source} is a weights file without minivit's metadata: "
                           f"name its model with --teacher-model NAME (see minivit info --list)")
    else:
        found = checkpoint_num_classes(state)
        if found is not None and found != classes:
            raise MinivitError(f"--teacher {source} has {found} classes, the student {classes}: "
                               f"the teacher must predict the student's classes")
        teacher = create_model(teacher_model, num_classes=classes,
                               img_size=student.patch_embed.img_size,
                               in_chans=student.patch_embed.in_chans)
        load_pretrained(teacher, state)
    expected = (classes, student.patch_embed.in_chans, tuple(student.patch_embed.img_size))
    found = (teacher.num_classes, teacher.patch_embed.in_chans,
             tuple(teacher.patch_embed.img_size))
    if found != expected:
        raise MinivitError(f"--teacher {source} takes {found[1]}-channel {found[2]} images to "
                           f"{found[0]} classes, the student {expected[1]}-channel {expected[2]} "
                           f"images to {expected[0]} classes: they must be the same")
    return teacher.to(dtype=dtype).eval()


class DistillationLoss:
    """loss(outputs, x, y) -> (loss Tensor, logits for accuracy): outputs are the student's
    (class, distillation) logits (``distilled_training = True``), x the images the teacher
    sees, y the labels."""

    def __init__(self, teacher, kind, alpha=0.5, tau=1.0, label_smoothing=0.0):
        self.teacher, self.kind, self.alpha, self.tau = teacher, kind, alpha, tau
        self.label_smoothing = label_smoothing

    def __call__(self, outputs, x, y):
        logits, distilled = outputs
        base = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        with no_grad():
            teacher = self.teacher(x if isinstance(x, Tensor) else Tensor(x)).data
        if self.kind == "hard":
            teaching = F.cross_entropy(distilled, teacher.argmax(axis=1))
        else:
            teaching = soft_distillation(distilled, teacher, self.tau)
        loss = base * (1.0 - self.alpha) + teaching * self.alpha
        return loss, (logits + distilled) * 0.5


def soft_distillation(student_logits, teacher_logits, tau):
    """τ²·Σ p_t (log p_t − log p_s) / (B·K) with p = softmax(logits / τ): DeiT's soft loss.
    teacher_logits is a raw array (no gradient)."""
    xp = backend.array_module(teacher_logits)
    log_teacher = log_softmax_array(teacher_logits / tau, axis=1)
    log_student = F.log_softmax(student_logits * (1.0 / tau), axis=-1)
    kl = (xp.exp(log_teacher) * (Tensor(log_teacher) - log_student)).sum()
    return kl * (tau * tau / student_logits.size)


def distillation_criterion(config, model):
    """The training loss of a run: DistillationLoss when config names a teacher (the model
    then returns both heads in training), else None (plain cross-entropy)."""
    check_options(config, model)
    if config.teacher is None:
        return None
    teacher = load_teacher(config.teacher, model, config.teacher_model, config.dtype)
    model.distilled_training = True
    return DistillationLoss(teacher, config.distillation, config.distillation_alpha,
                            config.distillation_tau, config.label_smoothing)
