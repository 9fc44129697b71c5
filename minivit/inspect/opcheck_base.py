"""What an op check is and how one runs: the Input specs an op's inputs are drawn from, the
OpCheck, the pieces of a whole-model check, OP_CHECKS with get_check and run_check. The
catalogue that fills OP_CHECKS is minivit.inspect.opchecks (import that one)."""

from dataclasses import dataclass

import numpy as np

from minivit import backend
from minivit.errors import MinivitError
from minivit.gradcheck import gradcheck



@dataclass(frozen=True)
class Input:
    """One input of an op: `kind` says which values it takes ("normal" N(shift, scale²),
    "positive" in [0.5, 2), "away" ±[0.5, 2), "distinct" 0.05 apart, "labels" in
    [0, classes), "probabilities" rows summing to 1, "index" the integers `values`); `layout`
    its memory layout ("contiguous", "transposed" or "strided")."""
    name: str
    shape: tuple
    kind: str = "normal"
    scale: float = 1.0
    shift: float = 0.0
    layout: str = "contiguous"
    classes: int = 0
    values: tuple = ()

    def draw(self, rng):
        shape = self.shape
        if self.kind == "index":
            return np.array(self.values)
        if self.kind == "labels":
            return rng.integers(0, self.classes, size=shape)
        if self.kind == "distinct":  # no ties, nor near-ties within the finite-difference step
            grid = rng.permutation(np.arange(int(np.prod(shape)))).reshape(shape)
            values = (grid - grid.size / 2) * 0.05 + rng.uniform(0, 0.01, size=shape)
        elif self.kind == "positive":
            values = rng.uniform(0.5, 2.0, size=shape)
        elif self.kind == "away":
            values = rng.uniform(0.5, 2.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        elif self.kind == "probabilities":
            values = rng.uniform(0.1, 1.0, size=shape)
            values /= values.sum(axis=-1, keepdims=True)
        else:
            values = self.shift + self.scale * rng.standard_normal(shape)
        return _LAYOUTS[self.layout](values)


def _transposed(array):
    """The same values as a non-contiguous (Fortran-ordered) view."""
    return np.array(array.T, order="C").T


def _strided(array):
    """The same values as a view taking every other element of a longer last axis."""
    big = np.zeros(array.shape[:-1] + (2 * array.shape[-1],))
    big[..., ::2] = array
    return big[..., ::2]


_LAYOUTS = {"contiguous": lambda array: array, "transposed": _transposed, "strided": _strided}


@dataclass(frozen=True)
class OpCheck:
    name: str
    fn: object  # fn(*inputs) -> Tensor
    inputs: tuple  # Input specs, in fn's argument order (empty for the whole model)
    description: str
    full_check_limit: int = 512  # inputs larger than this are checked along random directions
    directions: int = 8
    whole_model: object = None  # build(rng) -> {input name: host array}, for the whole ViT

    def build(self, rng):
        """{input name: host array} drawn from `rng`, in fn's argument order."""
        if self.whole_model is not None:
            return self.whole_model(rng)
        return {spec.name: spec.draw(rng) for spec in self.inputs}


def register(name, description, *inputs, **options):
    """Enter the decorated function in OP_CHECKS, checked on `inputs`."""
    def decorate(fn):
        OP_CHECKS[name] = OpCheck(name, fn, inputs, description, **options)
        return fn
    return decorate


# -- whole small models ---------------------------------------------------------------------------
def model_slots(model):
    """(model, its parameter slots [(name, shape, module, attribute)] in named_parameters
    order). The check swaps the parameters for gradcheck's tensors, so their initial values
    do not matter (and the model is not for other use)."""
    slots = []
    for name, parameter in model.named_parameters():
        *path, attr = name.split(".")
        module = model
        for part in path:
            module = getattr(module, part)
        slots.append((name, tuple(parameter.shape), module, attr))
    return model, slots


def model_inputs(rng, slots):
    """Images and every parameter of a model, drawn at scales where nothing saturates:
    LayerNorm weights around 1, other parameters N(0, 0.3²)."""
    inputs = {"images": rng.standard_normal((2, 1, 8, 8))}
    for name, shape, _, _ in slots:
        value = 0.3 * rng.standard_normal(shape)
        if "norm" in name and name.endswith(".weight"):
            value += 1.0
        inputs[name] = value
    return inputs


def model_logits(model_and_slots, images, parameters):
    model, slots = model_and_slots
    for (_, _, module, attr), tensor in zip(slots, parameters, strict=True):
        setattr(module, attr, tensor)  # the model now computes with gradcheck's float64 tensors
    return model(images)


# -- running (OP_CHECKS is filled by minivit.inspect.opchecks) ---------------------------------
OP_CHECKS = {}


def get_check(name):
    if name not in OP_CHECKS:
        raise MinivitError(f"unknown op {name!r}; known ops: {', '.join(OP_CHECKS)}")
    return OP_CHECKS[name]


def run_check(check, seed=0, rtol=1e-6, eps=1e-6):
    """Draw `check`'s inputs from `seed`, move them to the current backend and gradcheck them
    with a random upstream gradient (also from `seed`). Returns the GradcheckReport.

    An input passes when its relative error is at most `rtol`, or its absolute error is below
    the finite differences' own round-off (gradcheck's default floor, 1e-8 · Σ|f|: a tiny
    gradient cannot be resolved better than that with a 1e-6 step)."""
    if isinstance(check, str):
        check = get_check(check)
    host = check.build(np.random.default_rng(seed))
    names = list(host)
    inputs = [backend.to_backend(value) if isinstance(value, np.ndarray) and value.dtype.kind == "f"
              else backend.to_backend(np.asarray(value)) for value in host.values()]
    return gradcheck(check.fn, *inputs, eps=eps, rtol=rtol,
                     names=names, seed=seed, full_check_limit=check.full_check_limit,
                     directions=check.directions)
