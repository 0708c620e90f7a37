"""Exceptions for user mistakes: each message names the problem and the fix on one line."""


class MlmError(Exception):
    """Base class for errors caused by user input (config, data, workdir, checkpoints).

    The command-line entry points print these as one line and exit with status 2; anything
    else is a bug and keeps its traceback.
    """


class ConfigError(MlmError, ValueError):
    """A config field is unknown, ill-typed or has an invalid value."""


class DataError(MlmError, ValueError):
    """Input data is missing, empty, corrupt or does not match the config."""


class WorkdirError(MlmError, OSError):
    """The workdir cannot be created or written, or holds files from an incompatible run."""


class DivergenceError(MlmError):
    """Training diverged: updates kept being non-finite."""
