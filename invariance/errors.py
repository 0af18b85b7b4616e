"""Errors a user can act on: each names the key, the path or the expected form."""


class InvarianceError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(InvarianceError):
    """The run config is missing a key, has a wrong type or an impossible value."""


class CheckpointError(InvarianceError):
    """A checkpoint cannot be found, read, trusted or matched to the model."""


class DataError(InvarianceError):
    """The eval data cannot be found or read, or holds fewer images than asked for."""


class StorageError(InvarianceError):
    """The output store cannot be reached, read or written."""


class NumericsError(InvarianceError):
    """A unit computed NaN or inf values (e.g. ``model.std`` of 0, diverged weights): nothing
    of it is written or marked done."""


class MeasureError(InvarianceError):
    """A measure's function (a user's ``measures: [{function: ...}]``) raised, or returned something
    other than a finite number: nothing of its shard is written or marked done."""
