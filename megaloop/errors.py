"""Errors a user can cause. Each message says what is wrong and how to mend it.

The CLI prints a MegaloopError without a traceback and exits with status 2.
"""


class MegaloopError(Exception):
    """Base of every error a user can cause and fix."""


class ConfigError(MegaloopError):
    """A run configuration that cannot be built: unknown key, wrong type, inconsistent sizes."""


class DataError(MegaloopError):
    """Missing, corrupt or mismatched data: corpus, tokenizer, shards."""


class CheckpointError(MegaloopError):
    """A checkpoint that is missing, incomplete, corrupt or from an incompatible config."""


class FitError(MegaloopError):
    """Scaling-law input that cannot be fitted: too few runs, missing columns, bad values."""


class TrainingError(MegaloopError):
    """A run that cannot go on: a non-finite loss or gradient."""
