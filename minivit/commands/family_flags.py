"""minivit train's flags for the ViT family's options and DeiT distillation (minivit.distill)."""

from minivit.commands.common import number
from minivit.distill import DISTILLATION_KINDS
from minivit.models.vit import POS_EMBEDS


def add_family_flags(parser):
    family = parser.add_argument_group("model family and distillation")
    family.add_argument("--pos-embed", choices=POS_EMBEDS, default=None,
                        help="position embedding: learn (1-D table, timm's), none, sincos "
                             "(fixed 2-D sine-cosine, MAE's) or 2d (learned row + column "
                             "tables); default: the model's own")
    family.add_argument("--rel-pos-bias", action="store_true", default=None,
                        help="a learned relative position bias in every block's attention "
                             "(BEiT's layout)")
    family.add_argument("--teacher", default=None, metavar="RUN_OR_WEIGHTS",
                        help="distil from this model (a minivit run folder or checkpoint, or "
                             "timm-format weights with --teacher-model): needs a student with "
                             "a distillation token (--model deit_digits, deit_*_distilled_*)")
    family.add_argument("--teacher-model", default=None, metavar="NAME",
                        help="the named model of a --teacher given as timm-format weights")
    family.add_argument("--distillation", choices=DISTILLATION_KINDS, default=None,
                        help="hard: the distillation head learns the teacher's argmax; soft: "
                             "its softened distribution (KL at temperature tau)")
    family.add_argument("--distillation-alpha", type=number(float, 0.0), default=None,
                        metavar="ALPHA", help="weight of the teacher's term, 0..1 (default 0.5)")
    family.add_argument("--distillation-tau", type=number(float, 0.0, inclusive=False),
                        default=None, metavar="TAU",
                        help="soft distillation's temperature (default 1.0)")
