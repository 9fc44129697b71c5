"""Parameter initialisers (timm's choices for ViT).

Values are drawn on the host from minivit's seeded NumPy generator and then placed on the
current backend, so a seed gives the same initial weights on NumPy and CuPy."""

import math

from minivit import backend


def _host_rng():
    return backend.random_generator("numpy")


def _place(values, dtype):
    return backend.to_backend(values.astype(dtype, copy=False))


def trunc_normal(shape, std=0.02, low=-2.0, high=2.0, dtype="float32"):
    """Normal(0, std) with values outside [low, high] drawn again (timm's trunc_normal_)."""
    rng = _host_rng()
    values = rng.standard_normal(shape) * std
    outside = (values < low) | (values > high)
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum())) * std
        outside = (values < low) | (values > high)
    return _place(values, dtype)


def normal(shape, std, dtype="float32"):
    return _place(_host_rng().standard_normal(shape) * std, dtype)


def uniform_fan_in(shape, fan_in, dtype="float32"):
    """U(−1/√fan_in, 1/√fan_in): PyTorch's default Conv2d/Linear initialisation."""
    bound = 1.0 / math.sqrt(fan_in)
    return _place(_host_rng().uniform(-bound, bound, shape), dtype)


def zeros(shape, dtype="float32"):
    return backend.xp().zeros(shape, dtype=dtype)


def ones(shape, dtype="float32"):
    return backend.xp().ones(shape, dtype=dtype)


def xavier_uniform(shape, dtype="float32"):
    """U(−a, a), a = √(6 / (fan_in + fan_out)) of a (out, in, ...) weight (torch's
    xavier_uniform_ on its 2-D view; MAE's initialisation of its linear layers)."""
    fan_out, fan_in = shape[0], math.prod(shape[1:])
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return _place(_host_rng().uniform(-bound, bound, shape), dtype)
