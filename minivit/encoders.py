"""The encoder (a VisionTransformer's weights, timm's names, no classifier) inside a run folder
or weights file, whatever trained it: `minivit pretrain --method mae|dino`, `minivit train`,
or a reference MAE / DINO / timm checkpoint. `minivit train --init` fine-tunes from it,
`minivit probe` evaluates it and `minivit attention` draws what it attends to.

What is dropped: MAE's decoder (``decoder_*``, ``mask_token``); DINO's projection head and
student (the teacher's backbone is the encoder, as the reference evaluates it); a supervised
model's ``head``. Reference checkpoints: MAE's (``{'model': ...}`` already flattened by
minivit's reader) load as they are, DINO's full checkpoints by their ``teacher.backbone.`` or
``backbone.`` keys.
"""

from pathlib import Path

from minivit.checkpoint import METADATA_KEY, find_checkpoint
from minivit.errors import MinivitError, WeightsError
from minivit.models.pretrained import load_pretrained, read_state_dict
from minivit.models.vit import VisionTransformer

DECODER_KEYS = ("decoder_", "mask_token")
# where an encoder sits inside the state of a pretraining method, most specific first
ENCODER_PREFIXES = ("teacher.backbone.", "backbone.")


def weights_file(path):
    """The checkpoint to read: the file itself, or in a run folder its best (supervised) or
    last (pretraining, which keeps no best) checkpoint."""
    path = Path(path)
    if not path.exists():
        raise MinivitError(f"{path} does not exist: expected a run folder (minivit pretrain or "
                           f"train --out) or a weights file")
    if not path.is_dir():
        return path
    try:
        return find_checkpoint(path, "best")
    except WeightsError:
        return find_checkpoint(path, "last")


def encoder_state(path):
    """(state, info, source): the encoder's weights under timm's ViT names, the checkpoint's
    minivit metadata (a dict, empty for foreign files) and the file's name for messages."""
    import json

    source = weights_file(path)
    state, metadata, text = read_state_dict(str(source))
    info = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}
    for prefix in ENCODER_PREFIXES:
        if any(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()
                     if key.startswith(prefix)}
            break
    state = {key: value for key, value in state.items()
             if not key.startswith(DECODER_KEYS) and not key.startswith("head.")}
    if "patch_embed.proj.weight" not in state:
        raise WeightsError(f"{text} holds no ViT encoder (no patch_embed.proj.weight under the "
                           f"names of timm, MAE or DINO)")
    return state, info, text


def encoder_config(info, source):
    """The VisionTransformer configuration of a minivit checkpoint's encoder (None for a
    foreign file: the caller's model decides); a Swin run's is refused by name."""
    config = info.get("encoder_config", info.get("model_config"))
    if config is not None and "depths" in config:  # SwinTransformer's keywords
        raise MinivitError(f"{source} holds a Swin Transformer: probe reads the encoder of "
                           f"a ViT (vit_*, deit_*, beit_*, MAE, DINO)")
    return None if config is None else dict(config)


def encoder_model(path):
    """(model, info): the encoder of a minivit run or checkpoint as it was trained, a
    VisionTransformer without a classifier (num_classes 0), weights loaded, in eval mode."""
    state, info, source = encoder_state(path)
    config = encoder_config(info, source)
    if config is None:
        raise MinivitError(f"{source} is not a minivit checkpoint: its encoder's configuration "
                           f"is unknown")
    model = VisionTransformer(**dict(config, num_classes=0))
    model.load_state_dict(state)
    return model.eval(), info


def load_encoder(model, path, notify=None, loaded=None):
    """Load the encoder at `path` into `model` (a VisionTransformer) in place; its head stays
    freshly initialised. A MinivitError names every key whose shape does not fit (another
    architecture) and nothing is loaded then. `loaded`: encoder_state(path), if already read."""
    state, _, source = loaded or encoder_state(path)
    try:
        return load_pretrained(model, state, strict=True, notify=notify or (lambda note: None),
                               source=source)
    except WeightsError as error:
        raise MinivitError(f"--init {path}: its encoder does not fit the model being trained "
                           f"({error}); train with the --model it was pretrained with") \
            from None
