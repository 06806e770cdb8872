"""Small validators used at the edges (config, CLI, files), in mne's manner."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_option(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise a clear ValueError.

    Parameters
    ----------
    name : str
        Name of the parameter, as the user wrote it (e.g. ``"--strategy"``).
    value : object
        The value got.
    allowed : iterable
        The allowed values.
    """
    allowed = tuple(allowed)
    if value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"Invalid value for the {name!r} parameter. Allowed values are {options}, but got {value!r} instead.")
    return value


def check_range(name: str, value: Any, *, low: float | None = None, high: float | None = None, kind: type | tuple = (int, float)) -> Any:
    """Check a number's type and bounds (inclusive), raising a clear error."""
    if isinstance(value, bool) or not isinstance(value, kind):
        kname = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TypeError(f"{name!r} must be {kname}, got {type(value).__name__} ({value!r}) instead.")
    if low is not None and value < low:
        raise ValueError(f"{name!r} must be >= {low}, got {value!r} instead.")
    if high is not None and value > high:
        raise ValueError(f"{name!r} must be <= {high}, got {value!r} instead.")
    return value
