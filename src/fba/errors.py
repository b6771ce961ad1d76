"""User-facing errors.

Anything a user can cause (a bad config, an unknown model, missing data, a diverging loss)
raises an :class:`FBAError`. The CLI prints its message as one line and exits non-zero;
library users can catch it like any exception.
"""


class FBAError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


class ConfigError(FBAError, ValueError):
    """A config key or value is invalid."""


class DataError(FBAError):
    """Dataset files are missing, incomplete or corrupt."""


class NonFiniteLossError(FBAError, FloatingPointError):
    """A local loss became NaN or infinite; the step it stopped is left half done (see
    ``Learner.train_step``), so training goes on only from a reloaded checkpoint."""
