"""A hospital's own recordings as one site: the site file (TOML) and loading its windows.

A site file says where the recordings are, in which format, where the labels
come from and how to fix channel names::

    [site]
    name = "hospital-a"

    [data]
    root = "recordings"                      # relative to this file's folder
    format = "edf"                           # edf|bdf|brainvision|eeglab|fif|bids|auto
    pattern = "**/*.edf"                     # glob under root (not for bids; default: every file of the format)
    subject_pattern = "(?P<subject>S\\d+)"   # regex on the relative path (default: file stem; bids: sub-<label>)
    # entities = { task = "rest" }           # bids only
    strict = false                           # true: a bad file is fatal

    [labels]
    source = "annotations"                   # annotations|table|filename
    mapping = { T1 = "left", T2 = "right" }
    tmin = 0.0
    tmax = 4.0
    # table = "labels.csv"                                    (source = "table")
    # filename = { "*_1.edf" = "rest", "*_2.edf" = "arithmetic" }  (source = "filename")

    [channels]
    rename = { "EEG Fpz-Cz" = "Fpz" }
    bads = ["T3"]
    # pick = ["Fp1", "Fp2", "C3", "C4"]      # the site's channels; files lacking one are skipped

:func:`load_site_config` reads and validates it into a :class:`SiteConfig`;
:func:`load_site_windows` reads every recording (:mod:`fedeeg.data.readers`),
applies renames and bad channels, checks amplitudes (flat channels are dropped,
clipped ones reported), preprocesses (:func:`~fedeeg.data.preprocessing.preprocess_raw`),
cuts each labelled segment (:mod:`fedeeg.data.labels`) into non-overlapping
windows and returns a :class:`~fedeeg.data.base.WindowSet` and a
:class:`SiteReport`. A bad file is skipped with one log line naming it and the
problem (or is fatal with ``strict``); the other files give exactly the windows
they give alone.

The report holds file paths relative to the data root, channel names, rates,
durations, window counts and per-channel robust amplitude; never signal
values, never header fields that identify a patient. It is meant for the site
itself (it names files and subjects).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any, NamedTuple

import numpy as np

from .._validation import check_option, read_toml
from .base import WindowSet
from .channels import LABRAM_VOCAB, standardize_channel_name, to_vocab
from .labels import (
    LABEL_SOURCES,
    LabelError,
    Segment,
    annotation_key,
    check_filename_patterns,
    check_label_values,
    label_from_filename,
    read_label_table,
    segments_from_annotations,
)
from .preprocessing import PreprocessSpec, make_windows, preprocess_raw, reject_windows
from .readers import BIDS_ENTITIES, EXTENSIONS, DataFileError, _log_warnings, _read, _CHATTER, find_bids_recordings

__all__ = [
    "DATA_FORMATS",
    "ChannelConfig",
    "DataConfig",
    "FileReport",
    "LabelConfig",
    "SiteConfig",
    "SiteConfigError",
    "SiteDataError",
    "SiteReport",
    "amplitude_summary",
    "discover_recordings",
    "load_site_config",
    "load_site_windows",
]

logger = logging.getLogger(__name__)

#: ``[data] format`` values.
DATA_FORMATS = ("edf", "bdf", "brainvision", "eeglab", "fif", "bids", "auto")

#: A channel whose robust standard deviation (1.4826 × median absolute deviation) is below this (µV) is flat.
FLAT_UV = 0.1
#: Above this robust standard deviation (µV) a channel is reported as implausibly large (wrong units?).
LARGE_UV = 1000.0
#: A channel with at least this fraction of its samples on its minimum or its maximum value is clipped.
CLIPPED_FRACTION = 0.01

_FORMAT_EXTENSIONS = {fmt: tuple(e for e, f in EXTENSIONS.items() if f == fmt) for fmt in set(EXTENSIONS.values())}
_VOCAB_UPPER = frozenset(name.upper() for name in LABRAM_VOCAB)


class SiteConfigError(ValueError):
    """An invalid site file (unknown key, wrong type, inconsistent options)."""


class SiteDataError(ValueError):
    """A site whose recordings give nothing to train on (no files matched, no windows).

    Attributes
    ----------
    report : SiteReport | None
        What was found, when the files were read.
    """

    def __init__(self, message: str, report: "SiteReport | None" = None) -> None:
        super().__init__(message)
        self.report = report


class FrozenMap(Mapping):
    """A read-only, hashable mapping (the tables of a frozen :class:`SiteConfig`)."""

    __slots__ = ("_d",)

    def __init__(self, items=()) -> None:
        self._d = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(items).items()}

    def __getitem__(self, key):
        return self._d[key]

    def __iter__(self) -> Iterator:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(tuple(self._d.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"


# --- configuration ------------------------------------------------------------------------------


def _type_name(value) -> str:
    return type(value).__name__


def _check_str_map(value, name: str, where: str) -> FrozenMap:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise SiteConfigError(f"{where}: {name} must be a table of strings to strings, got {value!r} instead.")
    return FrozenMap(value)


def _check_regex(pattern, name: str, where: str) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise SiteConfigError(f"{where}: {name} must be a non-empty string (a regular expression), got {pattern!r} instead.")
    try:
        re.compile(pattern)
    except re.error as err:
        raise SiteConfigError(f"{where}: {name} {pattern!r} is not a valid regular expression ({err}).") from None


@dataclass(frozen=True)
class DataConfig:
    """Where a site's recordings are (``[data]``).

    Parameters
    ----------
    root : path-like
        The folder of the recordings (the BIDS root for ``format="bids"``).
    format : {"edf", "bdf", "brainvision", "eeglab", "fif", "bids", "auto"}
        The recordings' format; ``"auto"`` (default) picks it from each file's
        extension.
    pattern : str | None
        Glob under ``root`` selecting the recordings (e.g. ``"**/*.edf"``).
        Default: every file with an extension of ``format`` (any case). Not
        for ``"bids"``.
    subject_pattern : str | None
        Regular expression searched in each file's path relative to ``root``;
        the subject is its group ``subject``, else its first group, else the
        whole match. Default: the file name without extension (BIDS:
        ``"sub-<label>"``).
    entities : mapping | None
        BIDS only: restrict to these entities (``{"task": "rest"}``), see
        :func:`~fedeeg.data.readers.find_bids_recordings`.
    strict : bool
        If True, a bad file stops the loading; if False (default) it is skipped
        and reported.
    """

    root: Path
    format: str = "auto"
    pattern: str | None = None
    subject_pattern: str | None = None
    entities: Mapping = field(default_factory=FrozenMap)
    strict: bool = False

    def __post_init__(self) -> None:
        where = "[data]"
        if not isinstance(self.root, (str, PurePath)) or str(self.root) == "":
            raise SiteConfigError(f"{where}: root must be a folder path, got {self.root!r} instead.")
        object.__setattr__(self, "root", Path(self.root).expanduser())
        check_option("format", self.format, DATA_FORMATS)
        if self.pattern is not None:
            if not isinstance(self.pattern, str) or not self.pattern:
                raise SiteConfigError(f"{where}: pattern must be a non-empty glob string, got {self.pattern!r} instead.")
            if self.format == "bids":
                raise SiteConfigError(
                    f"{where}: pattern does not apply to format = 'bids' (recordings are sub-*/[ses-*/]eeg/*_eeg.*); "
                    "use entities = { task = \"...\" } to select them."
                )
        if self.subject_pattern is not None:
            _check_regex(self.subject_pattern, "subject_pattern", where)
        if not isinstance(self.entities, Mapping):
            raise SiteConfigError(f"{where}: entities must be a table, got {self.entities!r} instead.")
        if self.entities and self.format != "bids":
            raise SiteConfigError(f"{where}: entities apply only to format = 'bids', got format = {self.format!r}.")
        unknown = sorted(set(self.entities) - set(BIDS_ENTITIES))
        if unknown:
            raise SiteConfigError(f"{where}: unknown BIDS entit(ies) {unknown} in entities; allowed: {list(BIDS_ENTITIES)}.")
        for key, value in self.entities.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if not values or not all(isinstance(v, str) and v for v in values):
                raise SiteConfigError(f"{where}: entities.{key} must be a string or a list of strings, got {value!r} instead.")
        object.__setattr__(self, "entities", FrozenMap(self.entities))
        if not isinstance(self.strict, bool):
            raise SiteConfigError(f"{where}: strict must be true or false, got {self.strict!r} instead.")


@dataclass(frozen=True)
class LabelConfig:
    """Where a site's labels come from (``[labels]``), see :mod:`fedeeg.data.labels`.

    Parameters
    ----------
    source : {"annotations", "table", "filename"}
        The label source.
    mapping : mapping of str to str
        ``"annotations"``: annotation description -> label.
    tmin, tmax : float | None
        ``"annotations"``: the segment around each annotation onset, in seconds
        (both or neither; neither: the annotation's own span).
    table : path-like | None
        ``"table"``: the CSV/TSV label table (columns ``file``, ``label``,
        optional ``onset``, ``duration``; files relative to the data root).
    filename : mapping of str to str
        ``"filename"``: glob (or ``"re:"`` regex) on the relative path -> label.
    """

    source: str
    mapping: Mapping = field(default_factory=FrozenMap)
    tmin: float | None = None
    tmax: float | None = None
    table: Path | None = None
    filename: Mapping = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        where = "[labels]"
        check_option("source", self.source, LABEL_SOURCES)
        object.__setattr__(self, "mapping", _check_str_map(self.mapping, "mapping", where))
        object.__setattr__(self, "filename", _check_str_map(self.filename, "filename", where))
        for name in ("tmin", "tmax"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise SiteConfigError(f"{where}: {name} must be a number of seconds, got {value!r} instead.")
                object.__setattr__(self, name, float(value))
        if self.table is not None:
            if not isinstance(self.table, (str, PurePath)) or str(self.table) == "":
                raise SiteConfigError(f"{where}: table must be a file path, got {self.table!r} instead.")
            object.__setattr__(self, "table", Path(self.table).expanduser())
        used = {
            "annotations": ("mapping", "tmin", "tmax"),
            "table": ("table",),
            "filename": ("filename",),
        }[self.source]
        given = [n for n in ("mapping", "tmin", "tmax", "table", "filename") if getattr(self, n) not in (None, FrozenMap())]
        extra = [n for n in given if n not in used]
        if extra:
            raise SiteConfigError(
                f"{where}: {extra} do(es) not apply to source = {self.source!r}, which uses {list(used)}. "
                "Remove them or change source."
            )
        if self.source == "annotations":
            if not self.mapping:
                raise SiteConfigError(f"{where}: source = 'annotations' needs mapping = {{ DESCRIPTION = \"label\", ... }}.")
            if (self.tmin is None) != (self.tmax is None):
                raise SiteConfigError(f"{where}: give both tmin and tmax (or neither), got tmin={self.tmin} and tmax={self.tmax}.")
            if self.tmin is not None and not self.tmin < self.tmax:
                raise SiteConfigError(f"{where}: tmin must be below tmax, got tmin={self.tmin} and tmax={self.tmax}.")
        elif self.source == "table" and self.table is None:
            raise SiteConfigError(f"{where}: source = 'table' needs table = \"labels.csv\".")
        elif self.source == "filename":
            if not self.filename:
                raise SiteConfigError(f"{where}: source = 'filename' needs filename = {{ \"*_1.edf\" = \"label\", ... }}.")
            try:
                check_filename_patterns(self.filename, where=where)
            except LabelError as err:
                raise SiteConfigError(str(err)) from None

    def values(self) -> list[tuple[str, str]]:
        """``(origin, label)`` of every label value the config names (mapping / filename patterns)."""
        if self.source == "annotations":
            return [(f"mapping {k!r}", v) for k, v in self.mapping.items()]
        if self.source == "filename":
            return [(f"filename {k!r}", v) for k, v in self.filename.items()]
        return []


@dataclass(frozen=True)
class ChannelConfig:
    """Channel fixes applied to every recording (``[channels]``).

    Parameters
    ----------
    rename : mapping of str to str
        Recorded name -> new name (applied where the recorded name occurs).
    bads : sequence of str
        Channels never used (matched after standardisation, so ``"T3"`` also
        drops ``"EEG T3-REF"``).
    pick : sequence of str | None
        The site's channels (vocabulary names or names that map to them). A
        recording lacking one is skipped. Default: the channels common to all
        recordings read.
    """

    rename: Mapping = field(default_factory=FrozenMap)
    bads: tuple[str, ...] = ()
    pick: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        where = "[channels]"
        object.__setattr__(self, "rename", _check_str_map(self.rename, "rename", where))
        for name in ("bads", "pick"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise SiteConfigError(f"{where}: {name} must be a list of channel names, got {value!r} instead.")
            object.__setattr__(self, name, tuple(value))
        if self.pick is not None:
            if not self.pick:
                raise SiteConfigError(f"{where}: pick must name at least one channel (or be left out).")
            try:
                to_vocab(self.pick)
            except ValueError as err:
                raise SiteConfigError(f"{where}: pick: {err}") from None


@dataclass(frozen=True)
class SiteConfig:
    """A site: its name, recordings, labels and channel fixes (see the module docstring).

    Parameters
    ----------
    name : str
        The site's name (``[site] name``).
    data : DataConfig
        ``[data]``.
    labels : LabelConfig
        ``[labels]``.
    channels : ChannelConfig
        ``[channels]``.
    path : pathlib.Path | None
        The site file it was read from (for messages).
    """

    name: str
    data: DataConfig
    labels: LabelConfig
    channels: ChannelConfig = field(default_factory=ChannelConfig)
    path: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise SiteConfigError(f"[site]: name must be a non-empty string, got {self.name!r} instead.")
        for attr, kind in (("data", DataConfig), ("labels", LabelConfig), ("channels", ChannelConfig)):
            if not isinstance(getattr(self, attr), kind):
                raise TypeError(f"{attr} must be a {kind.__name__}, got {_type_name(getattr(self, attr))} instead.")
        if self.labels.source == "table" and self.data.pattern is not None:
            raise SiteConfigError(
                "[data]: pattern does not apply with [labels] source = 'table': the table lists the recordings. "
                "Remove pattern."
            )

    @property
    def where(self) -> str:
        """How messages name this site's file."""
        return self.path.name if self.path is not None else f"site {self.name!r}"

    @classmethod
    def from_dict(cls, d: Mapping, *, base_dir=".", path=None) -> "SiteConfig":
        """Build a site from the TOML's tables; relative paths are resolved against ``base_dir``.

        Raises
        ------
        SiteConfigError
            On an unknown table or key (listing the allowed ones), a missing
            required key, or a value of the wrong type.
        """
        where = Path(path).name if path is not None else "site config"
        base = Path(base_dir).expanduser()
        if not isinstance(d, Mapping):
            raise SiteConfigError(f"{where}: expected tables [site], [data], [labels], [channels], got {_type_name(d)}.")
        tables = {"site": ("name",), "data": _fields(DataConfig), "labels": _fields(LabelConfig),
                  "channels": _fields(ChannelConfig)}  # fmt: skip
        _check_keys(d, tables, where, "the site file", required=("site", "data", "labels"))
        sections: dict[str, dict] = {}
        for table, allowed in tables.items():
            section = d.get(table, {})
            if not isinstance(section, Mapping):
                raise SiteConfigError(f"{where}: [{table}] must be a table, got {section!r} instead.")
            _check_keys(section, {k: None for k in allowed}, where, f"[{table}]")
            sections[table] = dict(section)
        for table, key in (("site", "name"), ("data", "root"), ("labels", "source")):
            if key not in sections[table]:
                raise SiteConfigError(f"{where}: [{table}] needs {key} = ...")
        data = sections["data"]
        if isinstance(data.get("root"), str):
            data["root"] = _resolve(base, data["root"])
        labels = sections["labels"]
        if isinstance(labels.get("table"), str):
            labels["table"] = _resolve(base, labels["table"])
        try:
            return cls(
                name=sections["site"]["name"],
                data=DataConfig(**data),
                labels=LabelConfig(**labels),
                channels=ChannelConfig(**sections["channels"]),
                path=Path(path) if path is not None else None,
            )
        except SiteConfigError as err:
            raise SiteConfigError(f"{where}: {err}") from None
        except ValueError as err:  # check_option's messages
            raise SiteConfigError(f"{where}: {err}") from None

    def to_dict(self) -> dict:
        """The site as JSON-ready tables (paths as strings)."""

        def plain(value):
            if isinstance(value, Mapping):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, tuple):
                return list(value)
            if isinstance(value, PurePath):
                return str(value)
            return value

        out = {"site": {"name": self.name}}
        for table in ("data", "labels", "channels"):
            obj = getattr(self, table)
            out[table] = {k: plain(getattr(obj, k)) for k in _fields(type(obj)) if getattr(obj, k) not in (None, FrozenMap())}
        return out


def _fields(cls) -> tuple[str, ...]:
    return tuple(cls.__dataclass_fields__)


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _check_keys(d: Mapping, allowed: Mapping, where: str, what: str, required=()) -> None:
    unknown = sorted(str(k) for k in d if k not in allowed)
    if unknown:
        raise SiteConfigError(f"{where}: unknown key(s) {unknown} in {what}; allowed keys are {list(allowed)}.")
    missing = [k for k in required if k not in d]
    if missing:
        raise SiteConfigError(f"{where}: missing table(s) {['[' + k + ']' for k in missing]}; {what} needs {list(required)}.")


def load_site_config(path) -> SiteConfig:
    """Read and validate a site file.

    Parameters
    ----------
    path : path-like
        The TOML file. Relative paths in it (``[data] root``, ``[labels]
        table``) are resolved against its folder.

    Returns
    -------
    site : SiteConfig

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    SiteConfigError
        If it is not valid TOML, or a table or key is unknown (the message
        lists the allowed ones), missing or of the wrong type.
    """
    d, path = read_toml(path, kind="Site file", error=SiteConfigError)
    return SiteConfig.from_dict(d, base_dir=path.parent.resolve(), path=path)


# --- reports ------------------------------------------------------------------------------------


@dataclass
class FileReport:
    """What one recording gave (no signal values, no header identifiers).

    Attributes
    ----------
    file : str
        Path relative to the data root.
    format : str
        Reader used.
    subject : str
        Subject id (from the path).
    sfreq : float
        Sampling rate of the file in Hz.
    duration_s : float
        Length of the recording in seconds.
    n_chans : int
        Channels in the file (all types).
    channels_found : list of str
        Vocabulary names of the channels used.
    channels_missing : list of str
        Channels other recordings of the site have and this one lacks.
    channels_dropped : list of str
        Channels not used (not EEG, name not in the vocabulary, bad, flat).
    bads : list of str
        Channels marked bad (site file, file's own bads, flat).
    robust_std_uv : dict of str to float
        Robust standard deviation (1.4826 × MAD) of each checked EEG channel, µV.
    flat, clipped, large : list of str
        Channels below :data:`FLAT_UV`, with :data:`CLIPPED_FRACTION` of samples
        on a rail, above :data:`LARGE_UV`.
    n_segments : int
        Labelled segments.
    windows_per_label : dict of str to int
        Windows cut per class (after artifact rejection).
    rejected_per_label : dict of str to int
        Windows rejected by amplitude per class (``spec.reject_peak_to_peak``).
    warnings : list of str
        One line each.
    """

    file: str
    format: str
    subject: str
    sfreq: float = 0.0
    duration_s: float = 0.0
    n_chans: int = 0
    channels_found: list = field(default_factory=list)
    channels_missing: list = field(default_factory=list)
    channels_dropped: list = field(default_factory=list)
    bads: list = field(default_factory=list)
    robust_std_uv: dict = field(default_factory=dict)
    flat: list = field(default_factory=list)
    clipped: list = field(default_factory=list)
    large: list = field(default_factory=list)
    n_segments: int = 0
    windows_per_label: dict = field(default_factory=dict)
    rejected_per_label: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    @property
    def n_windows(self) -> int:
        return int(sum(self.windows_per_label.values()))

    def to_dict(self) -> dict:
        return {**asdict(self), "n_windows": self.n_windows}


@dataclass
class SiteReport:
    """What a site's folder gave: files read and skipped, channels, rates, windows.

    Attributes
    ----------
    site : str
        Site name.
    root : str
        The data root.
    format : str
        ``[data] format``.
    label_names : list of str
        The federation's labels.
    n_found : int
        Recordings found (matched by the pattern, listed in the table, or in
        the BIDS dataset).
    files : list of FileReport
        Recordings read, in path order.
    skipped : list of dict
        ``{"file": ..., "reason": ...}`` for each recording skipped.
    channels : list of str
        The site's channels (vocabulary names, order of the windows).
    sfreqs : list of float
        Sampling rates seen (each file is resampled to ``spec.sfreq``).
    windows_per_label : dict of str to int
    windows_per_subject : dict of str to int
    warnings : list of str
        Site-level warnings (mapping keys never seen, channels left out, ...).
    """

    site: str
    root: str
    format: str
    label_names: list
    n_found: int = 0
    files: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    channels: list = field(default_factory=list)
    sfreqs: list = field(default_factory=list)
    windows_per_label: dict = field(default_factory=dict)
    windows_per_subject: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    @property
    def n_read(self) -> int:
        return len(self.files)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def n_windows(self) -> int:
        return int(sum(self.windows_per_label.values()))

    @property
    def n_subjects(self) -> int:
        return sum(1 for n in self.windows_per_subject.values() if n > 0)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        out = asdict(self)
        out["files"] = [f.to_dict() for f in self.files]
        out.update(n_read=self.n_read, n_skipped=self.n_skipped, n_windows=self.n_windows, n_subjects=self.n_subjects)
        return out


# --- amplitude ----------------------------------------------------------------------------------


def amplitude_summary(data: np.ndarray, ch_names) -> dict:
    """Robust amplitude per channel and the channels that look flat, clipped or implausibly large.

    Parameters
    ----------
    data : ndarray, shape (n_chans, n_samples)
        EEG in volts.
    ch_names : sequence of str
        Channel names, length n_chans.

    Returns
    -------
    summary : dict
        ``robust_std_uv`` (channel -> µV, 1.4826 × median absolute deviation),
        ``flat`` (below :data:`FLAT_UV` µV, or constant), ``clipped`` (at least
        :data:`CLIPPED_FRACTION` of the samples on the channel's minimum or
        maximum), ``large`` (above :data:`LARGE_UV` µV).
    """
    data = np.asarray(data, dtype=float)
    if data.ndim != 2 or data.shape[0] != len(ch_names):
        raise ValueError(f"data must have shape (n_chans={len(ch_names)}, n_samples), got {data.shape} instead.")
    med = np.median(data, axis=1, keepdims=True)
    rstd = 1.4826 * np.median(np.abs(data - med), axis=1) * 1e6
    lo, hi = data.min(axis=1), data.max(axis=1)
    tol = 1e-6 * (hi - lo)[:, None]
    on_hi = np.mean(data >= hi[:, None] - tol, axis=1)
    on_lo = np.mean(data <= lo[:, None] + tol, axis=1)
    flat = (rstd < FLAT_UV) | (hi == lo)
    clipped = ~flat & (np.maximum(on_hi, on_lo) >= CLIPPED_FRACTION)
    large = ~flat & (rstd > LARGE_UV)
    names = list(ch_names)
    return {
        "robust_std_uv": {n: round(float(v), 3) for n, v in zip(names, rstd)},
        "flat": [n for n, f in zip(names, flat) if f],
        "clipped": [n for n, c in zip(names, clipped) if c],
        "large": [n for n, g in zip(names, large) if g],
    }


# --- discovery ----------------------------------------------------------------------------------


class Recording(NamedTuple):
    """One recording found for a site."""

    path: Path
    rel: str  #: path relative to the data root, POSIX form
    fmt: str  #: reader (a readers.FORMATS value)
    bids_path: Any = None


def _strip_ext(name: str) -> str:
    lower = name.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return name[: -len(ext)]
    return name.rsplit(".", 1)[0] if "." in name else name


def _file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return EXTENSIONS[ext]
    return "edf"  # an unknown extension under "auto": the EDF check names the problem


def _root(site: SiteConfig) -> Path:
    root = site.data.root
    if not root.is_dir():
        raise SiteDataError(f"{site.where}: [data] root {str(root)!r} is not a folder (or does not exist).")
    return root


def discover_recordings(site: SiteConfig) -> list[Recording]:
    """The recordings of a site, sorted by relative path.

    Raises
    ------
    SiteDataError
        If the root is not a folder or nothing matches (``"no recordings
        matched pattern P under ROOT"``).
    """
    root = _root(site)
    fmt = site.data.format
    if fmt == "bids":
        paths = find_bids_recordings(root, site.data.entities)
        if not paths:
            entities = f" with entities {dict(site.data.entities)}" if site.data.entities else ""
            raise SiteDataError(
                f"{site.where}: no BIDS EEG recordings (sub-*/[ses-*/]eeg/*_eeg.*){entities} under {root}."
            )
        return [Recording(Path(p.fpath), Path(p.fpath).relative_to(root).as_posix(), "bids", p) for p in paths]
    if site.data.pattern is not None:
        pattern = site.data.pattern
        found = [p for p in root.glob(pattern) if p.is_file()]
    else:
        exts = tuple(EXTENSIONS) if fmt == "auto" else _FORMAT_EXTENSIONS[fmt]
        pattern = "**/*" + (exts[0] if len(exts) == 1 else ".{" + ",".join(e[1:] for e in exts) + "}")
        found = [p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(exts)]
    found = [p for p in found if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if not found:
        raise SiteDataError(f"{site.where}: no recordings matched pattern {pattern!r} under {root}.")
    recs = [Recording(p, p.relative_to(root).as_posix(), _file_format(p, fmt)) for p in found]
    return sorted(recs, key=lambda r: r.rel)


def _table_recordings(site: SiteConfig, table) -> list[Recording]:
    root = _root(site)
    fmt = site.data.format
    recs = []
    for path in table.files:
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            rel = path.as_posix()
        recs.append(Recording(path, rel, "bids" if fmt == "bids" else _file_format(path, fmt)))
    return recs


# --- loading ------------------------------------------------------------------------------------


@dataclass
class _FileResult:
    report: FileReport
    X: np.ndarray  # (n_windows, n_chans_file, n_times)
    y: np.ndarray
    ch_names: tuple[str, ...]
    keys_seen: set
    renamed: set


def _subject(rec: Recording, site: SiteConfig) -> str:
    pattern = site.data.subject_pattern
    if pattern is None:
        if rec.bids_path is not None and rec.bids_path.subject:
            return f"sub-{rec.bids_path.subject}"
        return _strip_ext(PurePath(rec.rel).name)
    match = re.search(pattern, rec.rel)
    if match is None:
        raise DataFileError(rec.path, f"[data] subject_pattern {pattern!r} does not match its path {rec.rel!r}")
    if "subject" in match.re.groupindex:
        subject = match.group("subject")
    elif match.re.groups:
        subject = match.group(1)
    else:
        subject = match.group(0)
    if not subject:
        raise DataFileError(rec.path, f"[data] subject_pattern {pattern!r} gives an empty subject for {rec.rel!r}")
    return subject


def _usable(name: str, kind: str) -> bool:
    return kind == "eeg" and standardize_channel_name(name) in _VOCAB_UPPER


def _segments_to_windows(data: np.ndarray, segments, spec: PreprocessSpec, label_index, report: FileReport):
    n_samples = data.shape[1]
    sf = spec.sfreq
    xs, ys = [], []
    outside = clipped = short = 0
    for seg in segments:
        start = math.ceil(seg.onset * sf - 1e-6)
        stop = n_samples if seg.duration is None else math.floor((seg.onset + seg.duration) * sf + 1e-6)
        if stop <= start:  # zero-length (e.g. an event marker without tmin/tmax)
            short += 1
            continue
        if stop <= 0 or start >= n_samples:
            outside += 1
            continue
        if start < 0 or stop > n_samples:
            clipped += 1
            start, stop = max(start, 0), min(stop, n_samples)
        w = make_windows(data[:, start:stop], spec.n_times)
        if len(w) == 0:
            short += 1
            continue
        xs.append(w)
        ys.append(np.full(len(w), label_index[seg.label], dtype=np.int64))
    if outside:
        report.warnings.append(f"{outside} labelled segment(s) lie outside the recording")
    if clipped:
        report.warnings.append(f"{clipped} labelled segment(s) run past the recording; cut to it")
    if short:
        report.warnings.append(
            f"{short} labelled segment(s) shorter than one window ({spec.window_seconds:g} s) give no window"
            + ("; zero-length annotations need [labels] tmin/tmax" if any(s.duration == 0 for s in segments) else "")
        )
    if not xs:
        return np.empty((0, data.shape[0], spec.n_times), np.float32), np.empty(0, np.int64)
    X, y = np.concatenate(xs), np.concatenate(ys)
    if spec.reject_peak_to_peak is not None:
        X, keep = reject_windows(X, spec, source=report.file)
        if not keep.all():
            names = {i: n for n, i in label_index.items()}
            counts = np.bincount(y[~keep], minlength=len(names))
            report.rejected_per_label = {names[i]: int(c) for i, c in enumerate(counts) if c}
            report.warnings.append(
                f"{int((~keep).sum())} of {len(keep)} window(s) rejected: peak-to-peak above "
                f"{spec.reject_peak_to_peak:g} µV ({', '.join(f'{k}: {v}' for k, v in report.rejected_per_label.items())})"
            )
        y = y[keep]
    return X, y


def _load_file(rec: Recording, site: SiteConfig, spec: PreprocessSpec, label_names, table) -> _FileResult:
    """Read, check, label, preprocess and window one recording; DataFileError for anything that makes it unusable."""
    subject = _subject(rec, site)
    report = FileReport(file=rec.rel, format=rec.fmt, subject=subject)
    raw, caught = _read(rec.path, fmt=rec.fmt, preload=True, bids_path=rec.bids_path)
    _log_warnings(rec.rel, caught, logger)
    report.warnings.extend(m for m in caught if not any(m.startswith(c) for c in _CHATTER))
    report.sfreq = float(raw.info["sfreq"])
    report.duration_s = round(raw.n_times / report.sfreq, 6)
    report.n_chans = len(raw.ch_names)

    rename = {old: new for old, new in site.channels.rename.items() if old in raw.ch_names}
    if rename:
        try:
            raw.rename_channels(rename, verbose="error")
        except Exception as err:
            raise DataFileError(rec.path, f"[channels] rename gives unusable names ({err})") from None
    bad_names = {standardize_channel_name(b) for b in site.channels.bads}
    bads = [ch for ch in raw.ch_names if ch in raw.info["bads"] or standardize_channel_name(ch) in bad_names]
    types = raw.get_channel_types()
    usable = [ch for ch, kind in zip(raw.ch_names, types) if _usable(ch, kind) and ch not in bads]
    if not usable:
        raise DataFileError(
            rec.path,
            f"no usable EEG channel: none of its {len(raw.ch_names)} channel(s) is an EEG channel with a 10-20/10-10 "
            f"name that is not bad (channels: {', '.join(raw.ch_names[:12])}{', ...' if len(raw.ch_names) > 12 else ''}); "
            "fix names with [channels] rename",
        )
    data = raw.get_data(picks=usable)
    finite = np.isfinite(data).all(axis=1)
    if not finite.all():
        names = [ch for ch, ok in zip(usable, finite) if not ok]
        raise DataFileError(
            rec.path, f"NaN or infinite values in channel(s) {', '.join(names)}; repair the file or list them in [channels] bads"
        )
    amp = amplitude_summary(data, usable)
    del data
    report.robust_std_uv, report.flat, report.clipped, report.large = amp["robust_std_uv"], amp["flat"], amp["clipped"], amp["large"]
    if len(amp["flat"]) == len(usable):
        raise DataFileError(rec.path, f"all {len(usable)} EEG channel(s) are flat (robust std < {FLAT_UV:g} µV)")
    if amp["flat"]:
        report.warnings.append(f"flat channel(s) {', '.join(amp['flat'])} (robust std < {FLAT_UV:g} µV) dropped")
    if amp["clipped"]:
        report.warnings.append(
            f"clipped/saturated channel(s) {', '.join(amp['clipped'])} (>= {CLIPPED_FRACTION:.0%} of samples on a rail)"
        )
    if amp["large"]:
        report.warnings.append(f"implausibly large channel(s) {', '.join(amp['large'])} (robust std > {LARGE_UV:g} µV; units?)")
    bads = bads + [ch for ch in amp["flat"] if ch not in bads]
    report.bads = list(bads)
    report.channels_dropped = [ch for ch in raw.ch_names if ch not in usable or ch in bads]

    keys_seen: set = set()
    labels = site.labels
    if labels.source == "annotations":
        segments = segments_from_annotations(raw, labels.mapping, tmin=labels.tmin, tmax=labels.tmax, source=rec.rel)
        keys_seen = {annotation_key(str(d), labels.mapping) for d in raw.annotations.description} - {None}
        if not segments:
            descriptions = sorted({str(d) for d in raw.annotations.description})
            report.warnings.append(
                f"no annotation matches [labels] mapping (annotations: {descriptions[:10]}{' ...' if len(descriptions) > 10 else ''})"
            )
    elif labels.source == "table":
        segments = list(table.files.get(rec.path, ()))
    else:
        try:
            label = label_from_filename(rec.rel, labels.filename)
        except LabelError as err:
            raise DataFileError(rec.path, str(err).removeprefix(f"{rec.rel}: ")) from None
        if label is None:
            raise DataFileError(rec.path, f"no label: its path matches none of the [labels] filename patterns {list(labels.filename)}")
        segments = [Segment(0.0, None, label)]
    report.n_segments = len(segments)

    keep = raw.copy().drop_channels(bads) if bads else raw
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        try:
            cont, ch_names = preprocess_raw(keep, spec, source=rec.rel)
        except (ValueError, RuntimeError) as err:
            raise DataFileError(rec.path, str(err).removeprefix(f"{rec.rel}: ")) from None
    caught = list(dict.fromkeys(" ".join(str(r.message).split()) for r in records))
    _log_warnings(rec.rel, caught, logger)
    report.warnings.extend(caught)
    del keep, raw
    report.channels_found = list(ch_names)
    label_index = {name: i for i, name in enumerate(label_names)}
    X, y = _segments_to_windows(cont, segments, spec, label_index, report)
    counts = np.bincount(y, minlength=len(label_names))
    report.windows_per_label = {name: int(c) for name, c in zip(label_names, counts)}
    return _FileResult(report, X, y, tuple(ch_names), keys_seen, set(rename))


def _load_site(site: SiteConfig, spec: PreprocessSpec, label_names, *, strict: bool | None = None):
    """Load a site; return ``(windows, report)`` even when there are no windows (windows is then None)."""
    if not isinstance(site, SiteConfig):
        raise TypeError(f"site_cfg must be a SiteConfig (see load_site_config), got {_type_name(site)} instead.")
    if not isinstance(spec, PreprocessSpec):
        raise TypeError(f"spec must be a PreprocessSpec, got {_type_name(spec)} instead.")
    label_names = tuple(label_names)
    if not label_names or not all(isinstance(n, str) and n for n in label_names) or len(set(label_names)) != len(label_names):
        raise ValueError(f"label_names must be distinct non-empty strings, got {label_names!r} instead.")
    strict = site.data.strict if strict is None else bool(strict)
    check_label_values(site.labels.values(), label_names, where=f"{site.where} [labels]")

    report = SiteReport(site.name, str(site.data.root), site.data.format, list(label_names))
    table = None
    if site.labels.source == "table":
        _root(site)
        table = read_label_table(site.labels.table, root=site.data.root, label_names=label_names, strict=strict)
        recordings = _table_recordings(site, table)
        by_file: dict[str, list[str]] = {}
        for file, message in table.missing:
            by_file.setdefault(file, []).append(message)
        for file, messages in by_file.items():
            reason = messages[0] + (f" (and {len(messages) - 1} more row(s))" if len(messages) > 1 else "")
            logger.warning("skipping %s: %s", file, reason)
            report.skipped.append({"file": file, "reason": reason})
        n_missing = len(by_file)
        if not recordings and not n_missing:
            raise SiteDataError(f"{site.where}: the label table {site.labels.table} lists no recordings.")
    else:
        recordings = discover_recordings(site)
        n_missing = 0
    report.n_found = len(recordings) + n_missing

    results: list[_FileResult] = []
    for k, rec in enumerate(recordings, start=1):
        try:
            res = _load_file(rec, site, spec, label_names, table)
            if site.channels.pick is not None:
                want = to_vocab(site.channels.pick)
                lacking = [c for c in want if c not in res.ch_names]
                if lacking:
                    raise DataFileError(rec.path, f"lacks channel(s) {lacking} of [channels] pick (bad or flat: {res.report.bads})")
        except DataFileError as err:
            if strict:
                raise
            logger.warning("skipping %s: %s", rec.rel, err.reason)
            report.skipped.append({"file": rec.rel, "reason": err.reason})
            continue
        results.append(res)
        logger.info(
            "%s: %s read (%d channels, %g Hz, %.1f s, %d windows) [%d/%d]",
            site.name, rec.rel, len(res.ch_names), res.report.sfreq, res.report.duration_s, len(res.y), k, len(recordings),
        )

    # The site's channels.
    if site.channels.pick is not None:
        channels = list(to_vocab(site.channels.pick))
    elif results:
        channels = [c for c in results[0].ch_names if all(c in r.ch_names for r in results)]
    else:
        channels = []
    union = list(dict.fromkeys(c for r in results for c in r.ch_names))
    for r in results:
        r.report.channels_missing = [c for c in union if c not in r.ch_names]
    left_out = [c for c in union if c not in channels]
    if left_out and site.channels.pick is None:
        lacking = sorted({r.report.file for r in results if r.report.channels_missing})
        report.warnings.append(
            f"channel(s) {', '.join(left_out)} left out: not in every recording (lacking in {', '.join(lacking[:10])}"
            f"{' ...' if len(lacking) > 10 else ''})"
        )
    report.channels = channels
    report.files = [r.report for r in results]
    report.sfreqs = sorted({r.report.sfreq for r in results})
    if len(report.sfreqs) > 1:
        logger.info("%s: sampling rates %s Hz (each resampled to %g Hz)", site.name, report.sfreqs, spec.sfreq)

    # Keys and patterns never used.
    if site.labels.source == "annotations" and results:
        seen = set().union(*(r.keys_seen for r in results))
        unused = [k for k in site.labels.mapping if k not in seen]
        if unused:
            report.warnings.append(f"[labels] mapping key(s) {unused} occur in no recording's annotations")
    if site.labels.source == "filename" and recordings:
        unused = [p for p in site.labels.filename if not any(label_from_filename(r.rel, {p: "x"}) for r in recordings)]
        if unused:
            report.warnings.append(f"[labels] filename pattern(s) {unused} match no recording")
    if site.channels.rename and results:
        renamed = set().union(*(r.renamed for r in results))
        unused = [k for k in site.channels.rename if k not in renamed]
        if unused:
            report.warnings.append(f"[channels] rename key(s) {unused} occur in no recording")
    for message in report.warnings:
        logger.warning("%s: %s", site.name, message)

    parts_X, parts_y, parts_s = [], [], []
    for r in results:
        idx = [r.ch_names.index(c) for c in channels]
        parts_X.append(r.X[:, idx, :])
        parts_y.append(r.y)
        parts_s.append(np.full(len(r.y), r.report.subject, dtype=object))
    per_label = np.zeros(len(label_names), dtype=np.int64)
    per_subject: dict[str, int] = {}
    for r in results:
        per_label += np.bincount(r.y, minlength=len(label_names))
        per_subject[r.report.subject] = per_subject.get(r.report.subject, 0) + len(r.y)
    report.windows_per_label = {n: int(c) for n, c in zip(label_names, per_label)}
    report.windows_per_subject = dict(sorted(per_subject.items()))
    if results and not channels:
        message = "no channel is common to all recordings read; list the site's channels in [channels] pick"
        report.warnings.append(message)
        logger.warning("%s: %s", site.name, message)
    if not results or per_label.sum() == 0 or not channels:
        return None, report
    windows = WindowSet(
        np.concatenate(parts_X) if parts_X else np.empty((0, len(channels), spec.n_times), np.float32),
        np.concatenate(parts_y),
        np.concatenate(parts_s).astype(str),
        tuple(channels),
        spec.sfreq,
        label_names,
    )
    return windows, report


def load_site_windows(site_cfg: SiteConfig, spec: PreprocessSpec, label_names, *, strict: bool | None = None):
    """Read a site's recordings into labelled windows.

    For each recording: read it (:func:`~fedeeg.data.readers.read_raw_file`),
    apply ``[channels] rename``, mark bad channels (``[channels] bads``, the
    file's own bads, flat channels), check amplitudes and NaNs, find its
    labelled segments, preprocess (:func:`~fedeeg.data.preprocessing.preprocess_raw`,
    bads dropped) and cut each segment into non-overlapping windows of
    ``spec.n_times`` samples that lie inside the segment (segment times
    converted to samples at ``spec.sfreq``; an incomplete tail is dropped).
    The windows keep the channels common to all recordings read (or ``[channels]
    pick``).

    Parameters
    ----------
    site_cfg : SiteConfig
        The site (:func:`load_site_config`).
    spec : PreprocessSpec
        The federation's preprocessing.
    label_names : sequence of str
        The federation's classes; ``y`` indexes them.
    strict : bool | None
        Stop at the first bad file (True) or skip it (False); None (default)
        takes ``[data] strict``.

    Returns
    -------
    windows : WindowSet
        ``X`` of shape (n_windows, n_chans, n_times), in file order then
        segment order; ``subject`` from ``[data] subject_pattern``.
    report : SiteReport
        Files read and skipped (with reasons), channels, rates, window counts,
        amplitude checks.

    Raises
    ------
    SiteDataError
        If no recording matches, or no window results (``err.report`` says why).
    DataFileError
        With ``strict``, for the first bad recording.
    LabelError
        If a label in the site file or the label table is not in
        ``label_names``, or (``strict``) the table names a missing file.
    """
    windows, report = _load_site(site_cfg, spec, label_names, strict=strict)
    if windows is None:
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in report.skipped[:3])
        raise SiteDataError(
            f"{site_cfg.where}: no windows from {report.n_found} recording(s) under {report.root} "
            f"({report.n_read} read, {report.n_skipped} skipped{': ' + reasons if reasons else ''}). "
            "Run check_site (fedeeg check) for the full report.",
            report,
        )
    return windows, report


#: Bump when the way a site's files become windows changes (part of the cache key).
SITE_LOADER_VERSION = 1


def site_source_files(site_cfg: SiteConfig) -> list[Path]:
    """Every file a site's windows depend on, in a fixed order.

    The recordings, the files beside each that share its name (BrainVision
    ``.vmrk``/``.eeg``, EEGLAB ``.fdt``, BIDS ``events.tsv``/``channels.tsv``
    sidecars) and the label table, if any.

    Raises
    ------
    SiteDataError
        If no recording matches (see :func:`discover_recordings`).
    """
    if site_cfg.labels.source == "table":
        table = read_label_table(site_cfg.labels.table, root=site_cfg.data.root, strict=False)
        paths = [Path(site_cfg.labels.table)] + [Path(p) for p in table.files]
    else:
        paths = [r.path for r in discover_recordings(site_cfg)]
    out: dict[str, Path] = {}
    for p in paths:
        out[str(p)] = p
        stem = _strip_ext(p.name)
        if stem.endswith("_eeg"):  # BIDS: sidecars share the entities before the suffix
            stem = stem[: -len("_eeg")]
        if p.parent.is_dir():
            for q in p.parent.iterdir():
                if q.is_file() and q.name.startswith(stem) and not q.name.startswith("."):
                    out[str(q)] = q
    return [out[k] for k in sorted(out)]


def load_site_windows_cached(site_cfg: SiteConfig, spec: PreprocessSpec, label_names, *, cache_dir=None,
                             strict: bool | None = None) -> WindowSet:
    """:func:`load_site_windows` through the preprocessed cache.

    The key covers the content of every file the windows come from
    (:func:`site_source_files`), the spec, the site description and the
    label set; a hit never reads an EDF, a changed file or setting is a miss.

    Parameters
    ----------
    site_cfg, spec, label_names, strict
        As :func:`load_site_windows`.
    cache_dir : path-like | None
        The cache folder; None reads without a cache.

    Returns
    -------
    windows : WindowSet
    """
    if cache_dir is None:
        return load_site_windows(site_cfg, spec, label_names, strict=strict)[0]
    from .cache import WindowCache

    cache = WindowCache(cache_dir)
    extra = {"loader": "site", "version": SITE_LOADER_VERSION, "site": site_cfg.to_dict(),
             "label_names": list(label_names), "strict": strict}
    key = cache.key(site_source_files(site_cfg), spec, extra)
    windows = cache.load(key)
    if windows is not None:
        logger.info("%s: %d windows from the cache %s", site_cfg.name, windows.n_windows, cache.path(key))
        return windows
    windows, report = load_site_windows(site_cfg, spec, label_names, strict=strict)
    cache.store(key, windows, {"site": site_cfg.name, "n_read": report.n_read, "n_skipped": report.n_skipped})
    return windows
