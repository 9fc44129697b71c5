"""Errors minivit raises on bad input. Each message names what was expected and what came."""


class MinivitError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ShapeError(MinivitError, ValueError):
    """An array of the wrong shape reached an op or a layer."""


class DTypeError(MinivitError, TypeError):
    """An array of the wrong dtype reached an op or a layer."""


class BackendError(MinivitError, RuntimeError):
    """The backend asked for is unavailable, or arrays from two backends met in one op."""


class GraphError(MinivitError, RuntimeError):
    """Misuse of the autograd graph (backward twice through a freed graph, ...)."""


class DatasetError(MinivitError, ValueError):
    """A dataset file is missing, truncated or malformed."""


class WeightsError(MinivitError, ValueError):
    """A weights file is unreadable, or its keys/shapes do not fit the model."""


class PretrainingCheckpointError(WeightsError):
    """A pretraining checkpoint (an encoder, no classifier) where a classifier was expected."""


class TrainingError(MinivitError, RuntimeError):
    """Training cannot go on (NaN/inf loss, ...); the last good checkpoint is kept."""
