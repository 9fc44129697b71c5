"""What a training run is told: TrainConfig, its defaults, its checks, and config.json."""

import dataclasses
import json
from pathlib import Path

from minivit.data import DATASETS
from minivit.errors import MinivitError
from minivit.precision import check_precision

DEFAULT_MODELS = {"digits": "vit_digits", "mnist": "vit_mnist", "fashion_mnist": "vit_mnist",
                  "cifar10": "vit_cifar", "cifar100": "vit_cifar", "synthetic": "vit_cifar"}

# What --lr and --weight-decay default to, per optimizer. AdamW's decay is decoupled
# (θ ← θ − lr·λ·θ); SGD's is an L2 term added to the gradient (as torch.optim.SGD's), so
# AdamW's 0.05 shrinks an SGD model towards a constant output (measured on digits: the loss
# settled at ln 10, chance accuracy), and AdamW's 2e-3 barely moves SGD.
OPTIMIZER_DEFAULTS = {"adamw": {"lr": 2e-3, "weight_decay": 0.05},
                      "sgd": {"lr": 0.1, "weight_decay": 5e-4}}


@dataclasses.dataclass
class TrainConfig:
    dataset: str = "digits"
    data_dir: str = None
    model: str = None  # default: the small model that suits the dataset (DEFAULT_MODELS)
    epochs: int = 100
    batch_size: int = 64
    lr: float = None  # None: the optimizer's default (OPTIMIZER_DEFAULTS)
    min_lr: float = 1e-5
    weight_decay: float = None  # None: the optimizer's default
    warmup: int = 5  # epochs of linear warmup
    label_smoothing: float = 0.1
    drop_path: float = 0.2
    optimizer: str = "adamw"
    clip_grad: float = 1.0
    augment: bool = True
    backend: str = "numpy"
    cuda_graph: bool = False  # GPU: replay the training step of full batches as a CUDA graph
    dtype: str = "float32"
    precision: str = "fp32"  # fp32, tf32 (GPU), bf16 or fp16 (GPU; fp16 with loss scaling)
    seed: int = 0
    out: str = "runs/latest"
    checkpoint_format: str = "safetensors"
    log_grads: bool = False
    progress: bool = True
    init: str = None  # a pretrained encoder (run folder or weights) to fine-tune from
    train_fraction: float = 1.0  # a stratified fraction of the training labels
    resume: bool = False  # continue from RUN/last.* instead of starting afresh
    overwrite: bool = False  # start afresh in an `out` that holds a run, removing that run

    def model_name(self):
        return self.model or DEFAULT_MODELS[self.dataset]


def checked_config(config):
    """`config` as the run trains with it (and config.json records it): the optimizer's
    defaults and the dataset's model filled in. MinivitError naming the option for an unknown
    name or a value out of range."""
    if config.dataset not in DATASETS:
        raise MinivitError(f"unknown dataset {config.dataset!r}; known: {', '.join(DATASETS)}")
    if config.cuda_graph and config.backend != "cupy":
        raise MinivitError(f"--cuda-graph records the training step on the GPU: it needs "
                           f"--backend cupy, got {config.backend}")
    check_precision(config.precision, config.backend, config.dtype)
    if config.optimizer not in OPTIMIZER_DEFAULTS:
        raise MinivitError(f"unknown optimizer {config.optimizer!r}; known: "
                           f"{', '.join(OPTIMIZER_DEFAULTS)}")
    config = dataclasses.replace(config, model=config.model_name(), **{
        name: value for name, value in OPTIMIZER_DEFAULTS[config.optimizer].items()
        if getattr(config, name) is None})
    for field, ok, expected in (
            ("epochs", config.epochs >= 1, "at least 1"), ("lr", config.lr > 0, "positive"),
            ("min_lr", config.min_lr >= 0, "at least 0"),
            ("weight_decay", config.weight_decay >= 0, "at least 0"),
            ("warmup", config.warmup >= 0, "at least 0"),
            ("clip_grad", config.clip_grad >= 0, "at least 0 (0: off)"),
            ("label_smoothing", 0 <= config.label_smoothing < 1, "in [0, 1)"),
            ("drop_path", 0 <= config.drop_path < 1, "in [0, 1)"),
            ("seed", config.seed >= 0, "at least 0")):
        if not ok:
            raise MinivitError(f"{field.replace('_', '-')} must be {expected}, got "
                               f"{getattr(config, field)}")
    return config


def config_notes(config):
    """Things about a checked config a user should hear before training starts."""
    if config.warmup > config.epochs:
        yield (f"the warmup ({epochs_text(config.warmup)}) is longer than the training "
               f"({epochs_text(config.epochs)}): the learning rate only rises, to "
               f"{config.epochs / config.warmup:.0%} of --lr {config.lr:g}, and never decays; "
               f"pass --warmup below --epochs")


def saved_config(path):
    """The TrainConfig in a run's config.json, each value checked against its field's type;
    MinivitError naming the file and the field when it is damaged."""
    advice = ("restore it (minivit train writes it at the start of a run), or start a new run "
              "with --out OTHER")
    try:
        saved = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, ValueError) as error:
        raise MinivitError(f"{path} is damaged ({error}): {advice}") from None
    if not isinstance(saved, dict):
        raise MinivitError(f"{path} is damaged: it holds a JSON {type(saved).__name__}, not the "
                           f"object of training options minivit train writes; {advice}")
    values = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name not in saved:
            continue
        value, kind = saved[field.name], field.type
        fits = (value is None and field.default is None) or (
            isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)) or (
            kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not fits:
            raise MinivitError(f"{path} is damaged: {field.name} is {json.dumps(value)}, "
                               f"expected {kind.__name__}; {advice}")
        values[field.name] = value
    return TrainConfig(**values)


def config_json(config):
    """The text of a run's config.json."""
    return json.dumps(dataclasses.asdict(config), indent=2) + "\n"


def epochs_text(count):
    """'1 epoch', '2 epochs'."""
    return f"{count} epoch{'' if count == 1 else 's'}"
