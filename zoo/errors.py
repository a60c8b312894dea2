"""User-facing errors: the CLI prints their message as one line and exits non-zero."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ZooError(Exception):
    """Base class: something the user can fix; the message names the problem and the fix."""


class ConfigError(ZooError, ValueError):
    """A config value is invalid."""


class UsageError(ConfigError):
    """The command line itself is wrong (unknown option or key, wrong type): the CLI exits with code 2."""


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


def check_range(name: str, value: float, low: float | None = None, high: float | None = None, hint: str = "",
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` if ``low <= value <= high`` (``<`` where ``low_open`` / ``high_open``; None: no bound),
    else a one-line :class:`ConfigError` naming ``name``, the allowed range, the value and ``hint`` (the fix
    or the paper's setting)."""
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or below or above or value != value:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        opening = "(" if low_open or low is None else "["
        closing = ")" if high_open or high is None else "]"
        span = f"{opening}{left}, {right}{closing}"
        raise ConfigError(f"{name} must be in {span}, got {value!r}" + (f"; {hint}" if hint else ""))
    return value


def did_you_mean(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the nearest of ``choices`` to ``name`` (difflib), or ``""``."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""
