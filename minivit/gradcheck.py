"""Check a hand-written backward against central finite differences, in float64.

The check compares the analytic vector-Jacobian product vᵀJ (from backward with a RANDOM
upstream gradient v) with numerical derivatives of the scalar ⟨v, f(x)⟩. A random v matters:
with v = 1 the gradient of Σ softmax(x) is zero whatever the backward does.

Small inputs are checked element by element; inputs larger than `full_check_limit` along
`directions` random unit directions u (⟨∇, u⟩ against a directional difference), which keeps
checking a whole ViT cheap.
"""

from dataclasses import dataclass, field

import numpy as np

from minivit import backend
from minivit.tensor import Tensor, no_grad


@dataclass
class InputCheck:
    """Result for one input: the largest absolute error and the error relative to the
    gradient's scale, max|analytic − numeric| / max(max|analytic|, max|numeric|)."""
    index: int
    name: str
    shape: tuple
    max_abs_error: float
    max_rel_error: float
    mode: str  # "full" (every element) or "directional"
    passed: bool
    rtol: float = 0.0  # the tolerances it was held to
    atol: float = 0.0

    @property
    def verdict(self):
        """"pass", "pass (atol)" when its relative error is above rtol but its absolute error
        is under the round-off floor atol, or "FAIL"."""
        if not self.passed:
            return "FAIL"
        return "pass" if self.max_rel_error <= self.rtol else "pass (atol)"


@dataclass
class GradcheckReport:
    inputs: list = field(default_factory=list)

    @property
    def passed(self):
        return all(check.passed for check in self.inputs)

    def __str__(self):
        lines = [f"{'input':<16} {'shape':<18} {'mode':<12} {'max abs err':>12} "
                 f"{'max rel err':>12}  result"]
        for c in self.inputs:
            lines.append(f"{c.name:<16} {str(c.shape):<18} {c.mode:<12} {c.max_abs_error:12.3e} "
                         f"{c.max_rel_error:12.3e}  {c.verdict}")
        return "\n".join(lines)


def _to_float64_tensor(value):
    """A float64 copy that keeps a non-contiguous input non-contiguous (strided view)."""
    data = value.data if isinstance(value, Tensor) else value
    if not (hasattr(data, "dtype") and data.dtype.kind == "f"):
        return value  # integer labels and other non-differentiable arguments pass through
    if data.flags.c_contiguous:
        copy = data.astype(np.float64, copy=True)
    else:
        xp = backend.array_module(data)
        copy = xp.empty(data.shape + (2,), dtype=np.float64)[..., 0]
        copy[...] = data
    return Tensor(copy, requires_grad=True)


def gradcheck(fn, *inputs, parameters=(), eps=1e-6, rtol=1e-6, atol=None, names=None, seed=0,
              full_check_limit=512, directions=8, raise_on_failure=False):
    """Check `fn(*inputs)`'s backward for every floating-point input.

    fn must be deterministic (reseed inside it if it uses dropout). Inputs are copied to
    float64. `parameters`: float64 tensors that fn uses without taking them as arguments (a
    module's parameters, e.g. ``dict(model.named_parameters())``: name -> tensor); they are
    checked in place. An input passes when max_rel_error <= rtol or max_abs_error <= atol.
    atol defaults to the round-off floor of the differences, max(1e-10, 1e-8·Σ|f(x)|): a few
    ulps of ⟨v, f⟩ over the step 2·eps, which matters only where a gradient is itself tiny.
    Returns a GradcheckReport; with raise_on_failure=True a failure raises AssertionError."""
    rng = np.random.default_rng(seed)
    tensors = [_to_float64_tensor(x) for x in inputs]
    named_parameters = list(parameters.items()) if isinstance(parameters, dict) \
        else [(f"parameter {i}", p) for i, p in enumerate(parameters)]
    for name, parameter in named_parameters:
        if parameter.dtype != np.float64:
            raise TypeError(f"gradcheck needs float64 parameters; {name} is {parameter.dtype} "
                            f"(use model.to(dtype='float64'))")
        parameter.grad = None
    output = fn(*tensors)
    xp = backend.array_module(output.data)
    upstream = xp.asarray(rng.standard_normal(output.shape))
    output.backward(upstream)
    if atol is None:
        atol = max(1e-10, 1e-8 * float(abs(output.data).sum()))

    def objective():
        with no_grad():
            return float((fn(*tensors).data * upstream).sum())

    report = GradcheckReport()
    names = list(names) if names else [f"input {i}" for i in range(len(tensors))]
    checked = [(i, names[i], t) for i, t in enumerate(tensors)
               if isinstance(t, Tensor) and t.requires_grad]
    checked += [(len(tensors) + i, name, p) for i, (name, p) in enumerate(named_parameters)]
    for index, name, tensor in checked:
        analytic = backend.to_numpy(tensor.grad) if tensor.grad is not None \
            else np.zeros(tensor.shape)
        data = tensor.data
        if tensor.size <= full_check_limit:
            mode, computed, expected = "full", analytic.ravel(), _full_differences(
                data, objective, eps)
        else:
            mode = "directional"
            units = rng.standard_normal((directions,) + tensor.shape)
            units /= np.sqrt((units ** 2).reshape(directions, -1).sum(axis=1)).reshape(
                (directions,) + (1,) * tensor.ndim)
            computed = (units * analytic).reshape(directions, -1).sum(axis=1)
            expected = np.array([_directional_difference(data, xp.asarray(u), objective, eps)
                                 for u in units])
        abs_error = float(np.max(np.abs(computed - expected), initial=0.0))
        scale = max(float(np.max(np.abs(computed), initial=0.0)),
                    float(np.max(np.abs(expected), initial=0.0)))
        rel_error = abs_error / scale if scale > 0 else abs_error
        passed = rel_error <= rtol or abs_error <= atol
        report.inputs.append(InputCheck(index, name, tuple(tensor.shape), abs_error, rel_error,
                                        mode, passed, rtol, atol))
    if raise_on_failure and not report.passed:
        raise AssertionError(f"gradient check failed:\n{report}")
    return report


def _full_differences(data, objective, eps):
    """∂⟨v, f⟩/∂x_i for every element by central differences (data is perturbed in place)."""
    numeric = np.empty(data.size)
    for i, position in enumerate(np.ndindex(data.shape)):
        original = data[position].item()
        data[position] = original + eps
        plus = objective()
        data[position] = original - eps
        minus = objective()
        data[position] = original
        numeric[i] = (plus - minus) / (2 * eps)
    return numeric


def _directional_difference(data, direction, objective, eps):
    """⟨∇⟨v, f⟩, u⟩ by a central difference along u (data is perturbed in place)."""
    original = data.copy()
    data += eps * direction
    plus = objective()
    data[...] = original - eps * direction
    minus = objective()
    data[...] = original
    return (plus - minus) / (2 * eps)
