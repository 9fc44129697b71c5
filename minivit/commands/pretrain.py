"""minivit pretrain: self-supervised pretraining (MAE or DINO) into a run folder."""

import argparse
import dataclasses

EPILOG = """examples:
  minivit pretrain --method mae --epochs 100 --out runs/mae      masked autoencoder on the digits
  minivit pretrain --method dino --epochs 100 --out runs/dino    self-distillation on the digits
  minivit pretrain --method mae --dataset cifar10 --data-dir ~/data --backend cupy --out runs/mae-c
  minivit pretrain --out runs/mae --resume --epochs 200           train the run further
then:
  minivit probe runs/mae                       k-NN and linear-probe accuracy of the encoder
  minivit reconstruct runs/mae --index 0 1 2   MAE reconstructions of test images
  minivit train --init runs/mae --out runs/ft  fine-tune the encoder with a new head

The run folder gets config.json, metrics.jsonl (the loss per epoch; DINO also the teacher's
entropy and the center's norm) and last.safetensors (every epoch, written atomically).
"""

OWN_FLAGS = {"dtype", "precision"}  # declared by the shared helpers of minivit.commands.common
HELP = {
    "method": "mae (masked autoencoder) or dino (self-distillation)",
    "dataset": "as minivit train's --dataset; labels are not used",
    "data_dir": "folder holding the dataset files (default: ./data)",
    "model": "the encoder's named configuration (default: the dataset's small model)",
    "lr": "peak learning rate (default: 1.5e-3 mae, 1e-3 dino)",
    "weight_decay": "AdamW's decoupled weight decay (default: 0.05 mae, 0.04 dino)",
    "warmup": "epochs of linear learning-rate warmup (default: 5 mae, 1 dino)",
    "clip_grad": "gradient clipping, 0: off (mae: global norm, default off; dino: each "
                 "parameter's norm, default 3.0)",
    "drop_path": "stochastic depth of the encoder (DINO: the student's)",
    "mask_ratio": "MAE: fraction of the patches hidden from the encoder, in (0, 1)",
    "norm_pix_loss": "MAE: predict each patch's pixels normalised by its mean and variance",
    "decoder_dim": "MAE: decoder width (default: half the encoder's)",
    "decoder_depth": "MAE: decoder blocks",
    "out_dim": "DINO: the head's output dimension K",
    "head_hidden_dim": "DINO: the head MLP's hidden width",
    "head_bottleneck_dim": "DINO: the head's bottleneck before the weight-normalised layer",
    "head_bn": "DINO: batch norm after the head's hidden layers (the reference's "
               "use_bn_in_head); without it DINO collapses on the digits",
    "color_jitter": "DINO: brightness/contrast/saturation jitter, grey-scale and solarisation "
                    "of the crops (the reference's; off: crops only)",
    "local_crops": "DINO: small crops per image besides the 2 global ones",
    "local_crop_size": "DINO: their side in pixels, a multiple of the patch (default: half "
                       "the image)",
    "teacher_temp": "DINO: the teacher's softmax temperature after the warm-up",
    "warmup_teacher_temp": "DINO: the teacher's temperature at the start of the warm-up",
    "warmup_teacher_temp_epochs": "DINO: epochs of the teacher temperature's warm-up",
    "momentum_teacher": "DINO: the teacher EMA's momentum at the start (cosine to 1)",
    "freeze_last_layer": "DINO: epochs during which the head's last layer is frozen",
    "checkpoint_format": "checkpoint file format",
}
FLAGS = {"checkpoint_format": "--format"}
CHOICES = {"method": ("mae", "dino"), "checkpoint_format": ("safetensors", "npz"),
           "dtype": ("float32", "float64")}


def add_parser(subparsers, name, help_text):
    from minivit.commands.common import add_backend_flags, add_precision_flag, command_parser
    from minivit.commands.train import add_run_folder_flags
    from minivit.pretrain import RUN_CONTROL, PretrainConfig
    from minivit.train.config import DEFAULT_EPOCHS

    defaults = PretrainConfig(epochs=DEFAULT_EPOCHS)  # the help names a new run's length
    p = command_parser(subparsers, name, help_text, EPILOG)
    for field in dataclasses.fields(PretrainConfig):
        if field.name in RUN_CONTROL | OWN_FLAGS:
            continue
        flag = FLAGS.get(field.name, "--" + field.name.replace("_", "-"))
        default = getattr(defaults, field.name)
        text = HELP.get(field.name, "")
        text += f" (default: {default})" if default is not None else ""
        if field.type is bool:  # --head-bn / --no-head-bn where the default is on
            action = argparse.BooleanOptionalAction if default else "store_true"
            p.add_argument(flag, dest=field.name, action=action, default=None, help=text)
        else:
            p.add_argument(flag, dest=field.name, type=field.type, default=None,
                           choices=CHOICES.get(field.name), help=text)
    add_backend_flags(p)
    add_precision_flag(p)
    p.set_defaults(dtype=None)
    add_run_folder_flags(p, defaults.out)


def run(args):
    from minivit import distributed as dist
    from minivit.commands.common import apply_backend
    from minivit.pretrain import RUN_CONTROL, PretrainConfig, pretrain, saved_pretrain_config
    from minivit.train.config import resumed_config

    names = {field.name for field in dataclasses.fields(PretrainConfig)}
    given = {k: v for k, v in vars(args).items()
             if k in names - RUN_CONTROL and v is not None}
    run_control = {"out": args.out, "resume": args.resume, "progress": args.progress,
                   "overwrite": args.overwrite, "backend": apply_backend(args)}
    config = PretrainConfig(**given, **run_control)
    if args.resume:  # the options given, not only those that differ from PretrainConfig's
        config = resumed_config(config, given, saved_pretrain_config, RUN_CONTROL,
                                "minivit pretrain")
    try:
        summary = pretrain(config)
    except KeyboardInterrupt:
        return dist.interrupted(
            f"minivit pretrain: interrupted; {config.out} keeps the checkpoint of its last "
            f"finished epoch (if any): continue with minivit pretrain --resume --out "
            f"{config.out}")
    if not dist.is_main():  # under mpiexec: rank 0 reports
        return 0
    print(f"{summary['method']} loss {summary['loss']:.4f} after {summary['epoch']} epochs, "
          f"{summary['seconds']:.1f} s; run folder {summary['run_dir']}")
    return 0
