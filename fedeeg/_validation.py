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


def coerce_scalar(name: str, value: Any, annotation: Any) -> Any:  # noqa: ARG001 - same signature as field coercers
    """TOML/Flower scalars to a field's type: an int given as a float (``3.0``) to int, an int to float."""
    ann = str(annotation)
    if ann.startswith("int") and isinstance(value, float) and value.is_integer():
        return int(value)
    if ann.startswith("float") and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def dataclass_kwargs(cls, mapping, *, what: str, coerce=coerce_scalar) -> dict[str, Any]:
    """Keyword arguments of dataclass ``cls`` from a mapping with snake- or kebab-case keys (e.g. Flower's run config).

    Parameters
    ----------
    cls : dataclass type
    mapping : Mapping
    what : str
        What the mapping is, for the error ("run config", "pretraining config").
    coerce : callable
        ``coerce(name, value, annotation)`` for each value.

    Raises
    ------
    ValueError
        For unknown keys, naming them and listing the known ones.
    """
    import dataclasses

    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name not in known:
            unknown.append(key)
            continue
        kwargs[name] = coerce(name, value, known[name].type)
    if unknown:
        allowed = ", ".join(sorted(n.replace("_", "-") for n in known))
        raise ValueError(f"Unknown {what} key(s) {sorted(unknown)}. Known keys are: {allowed}.")
    return kwargs


def read_toml(path, *, kind: str, error: type[Exception] = ValueError, hint: str = "") -> tuple[dict, Any]:
    """Parse a TOML settings file, with clear errors when it is absent or not valid TOML.

    Parameters
    ----------
    path : path-like
        The file (``~`` is expanded).
    kind : str
        What the file is, for the messages (e.g. ``"Site file"``).
    error : type of Exception
        Raised, naming the file, when the TOML does not parse.
    hint : str
        Appended to the not-found message (e.g. ``" (see client/site.example.toml)"``).

    Returns
    -------
    data : dict
    path : Path
        The expanded path.
    """
    import tomllib
    from pathlib import Path

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {str(path)!r} not found{hint}.")
    try:
        with path.open("rb") as f:
            return tomllib.load(f), path
    except tomllib.TOMLDecodeError as err:
        raise error(f"{path.name}: not valid TOML ({err}).") from None
