"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class ZooError(Exception):
    """Base class: something the user can fix; the message names the problem and the fix."""


class ConfigError(ZooError, ValueError):
    """A config value is invalid."""


class TrainingError(ZooError, FloatingPointError):
    """Training cannot go on (e.g. a non-finite loss)."""
