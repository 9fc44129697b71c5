"""Flags shared by several sub-commands."""

from minivit import backend


def add_backend_flags(parser):
    parser.add_argument("--backend", choices=backend.BACKENDS, default=None,
                        help="array backend: numpy (CPU) or cupy (NVIDIA GPU); default: "
                             "$MINIVIT_BACKEND or numpy")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="floating-point type of weights and activations (default float32)")


def apply_backend(args):
    """Select the backend named by --backend (or keep the environment's choice)."""
    if args.backend:
        backend.set_backend(args.backend)
    return backend.get_backend()
