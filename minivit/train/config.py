"""What a training run is told: TrainConfig, its defaults, its checks, and config.json."""

import dataclasses
import json
from pathlib import Path

from minivit.data import DATASETS
from minivit.data.pipeline import pipeline_option_checks, recipe_defaults
from minivit.errors import MinivitError
from minivit.precision import check_precision

DEFAULT_MODELS = {"digits": "vit_digits", "mnist": "vit_mnist", "fashion_mnist": "vit_mnist",
                  "cifar10": "vit_cifar", "cifar100": "vit_cifar", "synthetic": "vit_cifar",
                  "folder": "vit_cifar"}

# What --lr and --weight-decay default to, per optimizer. AdamW's decay is decoupled
# (θ ← θ − lr·λ·θ); SGD's is an L2 term added to the gradient (as torch.optim.SGD's), so
# AdamW's 0.05 shrinks an SGD model towards a constant output (measured on digits: the loss
# settled at ln 10, chance accuracy), and AdamW's 2e-3 barely moves SGD.
OPTIMIZER_DEFAULTS = {"adamw": {"lr": 2e-3, "weight_decay": 0.05},
                      "sgd": {"lr": 0.1, "weight_decay": 5e-4}}
DEFAULT_EPOCHS = 100  # a new run's length where `epochs` is not given (train and pretrain)

# TrainConfig fields that control the run rather than say what it trains: a resume takes them
# from the caller and never compares them with the run's config.json.
RUN_CONTROL = {"out", "resume", "overwrite", "progress", "cuda_graph"}
# Options a resume takes from the caller where given, instead of the run's config.json (train
# and pretrain); every other option it continues with is the saved one.
RESUME_MAY_CHANGE = {"epochs", "data_dir", "workers"}
FLAGS = {"augment": "--no-augment", "checkpoint_format": "--format"}  # the rest: --name-like-this


@dataclasses.dataclass
class TrainConfig:
    """What `minivit.train.train` is told. With ``resume=True`` the run in `out` goes on with
    the options saved in its config.json: a field at its default here (None, or the value
    below; also when passed explicitly) takes the saved value; a field set to another value
    must equal the saved one (else a MinivitError names it), except `epochs`, `data_dir`,
    `workers` (RESUME_MAY_CHANGE) and the run control (RUN_CONTROL: `out`, `progress`,
    `overwrite`, `cuda_graph`), which are taken from here. So ``TrainConfig(out=RUN,
    resume=True)`` continues RUN exactly, and with ``epochs=N`` trains it to N epochs (the
    three default to None, so any value of theirs counts as given)."""
    dataset: str = "digits"
    data_dir: str = None
    model: str = None  # default: the small model that suits the dataset (DEFAULT_MODELS)
    epochs: int = None  # None: DEFAULT_EPOCHS, or a resumed run's own
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
    # the model family's options and DeiT distillation (minivit.distill)
    pos_embed: str = None  # None: the named model's own
    rel_pos_bias: bool = False
    teacher: str = None  # a run folder or weights file: distill from it
    teacher_model: str = None  # the named model of a teacher given as timm-format weights
    distillation: str = None  # "hard" or "soft", with teacher
    distillation_alpha: float = 0.5
    distillation_tau: float = 1.0
    # image folders and the input pipeline (minivit.data.pipeline, minivit.data.folder)
    img_size: int = None  # folder / fine-tuning: the model's input size (default: its own)
    val_fraction: float = None  # folder without train/ and val/: the seeded share for val
    strict: bool = False  # folder: refuse unreadable image files instead of skipping them
    norm: str = None  # folder: "imagenet" or "inception" mean/std (default: by model size)
    workers: int = None  # loader threads (default: 0 for in-memory data, up to 4 for folders)
    # the DeiT recipe (0: off; None: the dataset's default, RECIPE_DEFAULTS); timm's values:
    # 9, 0.25, 0.8, 1.0, 0.99996
    randaugment: float = None  # RandAugment magnitude (2 ops per image)
    reprob: float = None  # random erasing probability
    mixup: float = None  # Mixup alpha
    cutmix: float = None  # CutMix alpha
    ema: float = None  # decay of the moving average of the weights
    # fine-tuning (minivit.finetune)
    pretrained: str = None  # timm or minivit weights to start from
    freeze: bool = False  # train only the head
    layer_decay: float = None  # layer-wise learning-rate decay, e.g. 0.75

    def model_name(self):
        return self.model or DEFAULT_MODELS[self.dataset]


def checked_config(config):
    """`config` as the run trains with it (and config.json records it): the optimizer's and the
    dataset's recipe defaults and the dataset's model filled in. MinivitError naming the option
    for an unknown name, a value out of range or options that exclude each other."""
    if config.dataset not in DATASETS and config.dataset != "folder":
        raise MinivitError(f"unknown dataset {config.dataset!r}; known: "
                           f"{', '.join(DATASETS)}, folder")
    if config.cuda_graph and config.backend != "cupy":
        raise MinivitError(f"--cuda-graph records the training step on the GPU: it needs "
                           f"--backend cupy, got {config.backend}")
    check_precision(config.precision, config.backend, config.dtype)
    if config.pretrained and config.init:
        raise MinivitError("--pretrained (a classifier's weights) and --init (a pretrained "
                           "encoder) both choose the starting weights: pass one of them")
    if config.layer_decay is not None and config.precision == "fp16":
        raise MinivitError("--layer-decay steps one optimizer per learning rate, and fp16's loss "
                           "scaling works with a single one: use --precision bf16 or leave out "
                           "--layer-decay")
    if config.layer_decay is not None and (config.log_grads or config.cuda_graph):
        raise MinivitError("--layer-decay steps one optimizer per learning rate, and "
                           "--log-grads and --cuda-graph work with a single one: leave out "
                           "--layer-decay or them")
    if config.optimizer not in OPTIMIZER_DEFAULTS:
        raise MinivitError(f"unknown optimizer {config.optimizer!r}; known: "
                           f"{', '.join(OPTIMIZER_DEFAULTS)}")
    defaults = dict(OPTIMIZER_DEFAULTS[config.optimizer], epochs=DEFAULT_EPOCHS,
                    **recipe_defaults(config.dataset, config.augment, config.resume))
    config = dataclasses.replace(config, model=config.model_name(), **{
        name: value for name, value in defaults.items() if getattr(config, name) is None})
    refuse_out_of_range(config, (
            *schedule_checks(config), ("min_lr", config.min_lr >= 0, "at least 0"),
            ("label_smoothing", 0 <= config.label_smoothing < 1, "in [0, 1)"),
            ("drop_path", 0 <= config.drop_path < 1, "in [0, 1)"), *pipeline_option_checks(config),
            ("layer_decay", config.layer_decay is None or 0 < config.layer_decay <= 1,
             "in (0, 1]")))
    return config


def schedule_checks(config):
    """The (field, ok, expected) checks of the options train and pretrain share: the run's
    length, learning rate, weight decay, warmup, gradient clipping and seed."""
    return (("epochs", config.epochs >= 1, "at least 1"), ("lr", config.lr > 0, "positive"),
            ("weight_decay", config.weight_decay >= 0, "at least 0"),
            ("warmup", config.warmup >= 0, "at least 0"),
            ("clip_grad", config.clip_grad >= 0, "at least 0 (0: off)"),
            ("seed", config.seed >= 0, "at least 0"))


def refuse_out_of_range(config, checks):
    """Raise a MinivitError naming the flag of the first (field, ok, expected) check that
    fails: `--FIELD must be EXPECTED, got VALUE` (for train and pretrain alike)."""
    for field, ok, expected in checks:
        if not ok:
            raise MinivitError(f"--{field.replace('_', '-')} must be {expected}, got "
                               f"{getattr(config, field)}")


def config_notes(config):
    """Things about a checked config a user should hear before training starts."""
    if config.warmup > config.epochs:
        yield (f"the warmup ({epochs_text(config.warmup)}) is longer than the training "
               f"({epochs_text(config.epochs)}): the learning rate only rises, to "
               f"{config.epochs / config.warmup:.0%} of --lr {config.lr:g}, and never decays; "
               f"pass --warmup below --epochs")


def saved_config(path, config_class=TrainConfig, command="minivit train"):
    """The `config_class` (TrainConfig, or pretrain's PretrainConfig) in a run's config.json,
    each value checked against its field's type; MinivitError naming the file and the field
    when it is damaged."""
    advice = (f"restore it ({command} writes it at the start of a run), or start a new run "
              f"with --out OTHER")
    try:
        saved = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, ValueError) as error:
        raise MinivitError(f"{path} is damaged ({error}): {advice}") from None
    if not isinstance(saved, dict):
        raise MinivitError(f"{path} is damaged: it holds a JSON {type(saved).__name__}, not the "
                           f"object of training options {command} writes; {advice}")
    values = {}
    for field in dataclasses.fields(config_class):
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
    return config_class(**values)


def resumed_config(config, given=None, read_saved=saved_config, run_control=RUN_CONTROL,
                   command="minivit train"):
    """The configuration that continues the run in `config.out`: the one saved in its
    config.json (read by `read_saved(path)`), with `config`'s `run_control` fields and the
    RESUME_MAY_CHANGE options that were given. `given`: the options the caller set (the
    command line's flags; default: `config`'s fields that differ from their dataclass
    default); the others among them must equal the saved ones (MinivitError naming each)."""
    saved_path = Path(config.out) / "config.json"
    if not saved_path.exists():
        raise MinivitError(f"--resume: {saved_path} does not exist; is {config.out} a run folder "
                           f"made by {command}?")
    saved = read_saved(saved_path)
    if given is None:
        given = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)
                 if field.name not in run_control and getattr(config, field.name) != field.default}
    _check_resumed_options(config.out, saved, given)
    kept = run_control | (RESUME_MAY_CHANGE & given.keys())
    return dataclasses.replace(saved, **{name: getattr(config, name) for name in kept})


def _check_resumed_options(run_dir, saved, given):
    """Refuse training options given with --resume that differ from the run's saved config."""
    differing = []
    for name, value in given.items():
        kept = saved.model_name() if name == "model" else getattr(saved, name)
        if name in RESUME_MAY_CHANGE or value == kept:
            continue
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        if isinstance(value, bool):
            differing.append(f"{flag} (saved: {name.replace('_', '-')} {json.dumps(kept)})")
        else:
            differing.append(f"{flag} {value} (saved: {kept})")
    if differing:
        raise MinivitError(f"--resume continues {run_dir} with the configuration saved in its "
                           f"config.json, and these options differ from it: "
                           f"{', '.join(differing)}. Leave them out to continue the run as it "
                           f"was, or start a new run with --out OTHER (or, without --resume, "
                           f"--overwrite to replace this one)")


def config_json(config, data=None):
    """The text of a run's config.json: the options, and beside them the data's class names
    (an image folder's sorted folder names) and mean/std (`data`: the run's DataFacts; a
    pretraining run has none)."""
    extra = {} if data is None else dict(class_names=data.class_names, mean=data.mean,
                                         std=data.std)
    return json.dumps(dict(dataclasses.asdict(config), **extra), indent=2) + "\n"


def epochs_text(count):
    """'1 epoch', '2 epochs'."""
    return f"{count} epoch{'' if count == 1 else 's'}"
