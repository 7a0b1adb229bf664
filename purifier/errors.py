"""The library's error hierarchy.

Every error a user can cause by their own input (a bad flag, a corrupt artifact, a vector that is
not a probability vector) is a `PurifierError`: the CLI prints its message on one line and exits
non-zero, the sidecar maps it to a gRPC status in `purifier_server.errors`. Anything else is a bug
and keeps its traceback.
"""


class PurifierError(Exception):
    """Base class of every error caused by input, configuration or artifacts."""


class ConfigError(PurifierError):
    """A setting or argument has an invalid value; the message names the field and the choices."""


class DatasetError(PurifierError):
    """Unknown dataset, or a loader's package is missing."""


class ArtifactError(PurifierError):
    """A model, split or defense artifact is missing, corrupt or belongs to another model."""


class InvalidProbabilities(PurifierError):
    """A confidence vector is not a probability vector (the message names the row and problem)."""


class DefenseError(PurifierError):
    """A defense could not transform a batch; the caller must fail closed."""
