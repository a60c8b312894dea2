"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class ZooError(Exception):
    """Base class: something the user can fix; the message names the problem and the fix."""


class ConfigError(ZooError, ValueError):
    """A config value is invalid."""


class TrainingError(ZooError, FloatingPointError):
    """Training cannot go on (e.g. a non-finite loss)."""


def zoo_error_in_chain(err: BaseException | None) -> ZooError | None:
    """The first :class:`ZooError` in ``err``'s cause/context chain (jsonargparse wraps errors raised while
    instantiating classes), or None: a user error to print as one line, else a bug to show in full."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ZooError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
