"""Where a site's class labels come from: annotations, a label table, or file names.

Every source gives, per recording, labelled segments ``(onset, duration,
label)`` in seconds from the recording's first sample; windows are later cut
inside each segment (:func:`fedeeg.data.site.load_site_windows`).

* **annotations** (:func:`segments_from_annotations`): the recording's
  annotations/events (EDF+ annotations, BrainVision markers, EEGLAB events,
  BIDS ``events.tsv``), mapped to labels (``{"T1": "left", "T2": "right"}``),
  each segment ``[onset + tmin, onset + tmax)``, or the annotation's own span;
* **table** (:func:`read_label_table`): a CSV/TSV file with columns ``file``
  and ``label`` and optional ``onset`` and ``duration`` (seconds), file paths
  relative to the data root;
* **filename** (:func:`label_from_filename`): one label per file from a
  glob or regex on its path (``{"*_1.edf": "rest", "*_2.edf": "arithmetic"}``).

The set of labels comes from the federation (``label_names``); a label outside
it is a :class:`LabelError` naming where it was found and the value.
"""

from __future__ import annotations

import csv
import fnmatch
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import NamedTuple

import numpy as np

__all__ = [
    "LABEL_SOURCES",
    "LabelError",
    "LabelTable",
    "Segment",
    "annotation_key",
    "annotation_onsets",
    "check_filename_patterns",
    "check_label_values",
    "label_from_filename",
    "read_label_table",
    "segments_from_annotations",
]

logger = logging.getLogger(__name__)

#: Label sources of a site.
LABEL_SOURCES = ("annotations", "table", "filename")

#: Columns of a label table (``file`` and ``label`` are required).
TABLE_COLUMNS = ("file", "label", "onset", "duration")


class LabelError(ValueError):
    """A label source that does not fit the recordings or the federation's labels."""


class Segment(NamedTuple):
    """A labelled stretch of one recording.

    Attributes
    ----------
    onset : float
        Start in seconds from the recording's first sample.
    duration : float | None
        Length in seconds; None means "to the end of the recording".
    label : str
        The class name (one of the federation's ``label_names``).
    """

    onset: float
    duration: float | None
    label: str


def check_label_values(values: Iterable[tuple[str, str]], label_names, *, where: str) -> None:
    """Check that every label value is one of the federation's labels.

    Parameters
    ----------
    values : iterable of (str, str)
        ``(what, label)`` pairs, ``what`` naming the value's origin
        (e.g. ``"mapping 'T1'"``).
    label_names : sequence of str
        The federation's labels.
    where : str
        The source, for the message (e.g. ``"site.toml [labels]"``).

    Raises
    ------
    LabelError
        Listing every value outside ``label_names``.
    """
    label_names = tuple(label_names)
    bad = [f"{what} -> {label!r}" for what, label in values if label not in label_names]
    if bad:
        raise LabelError(
            f"{where}: label value(s) not among the federation's labels {label_names}: {'; '.join(bad)}. "
            "Use exactly those names (case matters)."
        )


# --- annotations --------------------------------------------------------------------------------


def annotation_onsets(raw) -> np.ndarray:
    """Onsets of a recording's annotations in seconds from its first sample.

    MNE keeps annotation onsets on the acquisition time line (relative to
    ``meas_date`` or, without one, to sample 0 before any cropping); this
    subtracts ``raw.first_time`` and any offset of the annotations' origin.

    Parameters
    ----------
    raw : mne.io.BaseRaw
        The recording.

    Returns
    -------
    onsets : ndarray, shape (n_annotations,)
    """
    ann = raw.annotations
    onsets = np.asarray(ann.onset, dtype=float) - float(raw.first_time)
    meas_date = raw.info["meas_date"]
    if ann.orig_time is not None and meas_date is not None:
        onsets = onsets + (ann.orig_time - meas_date).total_seconds()
    return onsets


def annotation_key(description: str, mapping: Mapping[str, str]) -> str | None:
    """The mapping key an annotation description matches, or None.

    A key matches a description exactly or, for BrainVision-style
    ``"Type/Description"`` annotations (``"Comment/T1"``, ``"Stimulus/S  1"``),
    the part after the first ``/``. An exact match wins.
    """
    if description in mapping:
        return description
    if "/" in description:
        tail = description.split("/", 1)[1]
        if tail in mapping:
            return tail
    return None


def segments_from_annotations(
    raw,
    mapping: Mapping[str, str],
    *,
    tmin: float | None = None,
    tmax: float | None = None,
    label_names=None,
    source: str = "<raw>",
) -> list[Segment]:
    """Labelled segments from a recording's annotations.

    Parameters
    ----------
    raw : mne.io.BaseRaw
        The recording (its ``annotations``).
    mapping : mapping of str to str
        Annotation description -> label (``{"T1": "left", "T2": "right"}``);
        see :func:`annotation_key` for how descriptions match. Annotations
        that match no key are ignored.
    tmin, tmax : float | None
        Segment ``[onset + tmin, onset + tmax)`` around each annotation onset,
        in seconds. Both None (default): the annotation's own span
        ``[onset, onset + duration)`` (zero-length for a pure event marker).
    label_names : sequence of str | None
        If given, every mapped label must be one of them.
    source : str
        The recording's name, for messages.

    Returns
    -------
    segments : list of Segment
        In annotation order; onsets in seconds from the first sample.

    Raises
    ------
    LabelError
        If a mapped label is not in ``label_names``, or only one of ``tmin``
        and ``tmax`` is given or ``tmin >= tmax``.
    """
    if (tmin is None) != (tmax is None):
        raise LabelError(f"{source}: give both tmin and tmax (or neither), got tmin={tmin!r} and tmax={tmax!r}.")
    if tmin is not None and not tmin < tmax:
        raise LabelError(f"{source}: tmin must be below tmax, got tmin={tmin!r} and tmax={tmax!r}.")
    if label_names is not None:
        check_label_values(((f"mapping {k!r}", v) for k, v in mapping.items()), label_names, where=source)
    onsets = annotation_onsets(raw)
    segments = []
    for onset, duration, description in zip(onsets, raw.annotations.duration, raw.annotations.description):
        key = annotation_key(str(description), mapping)
        if key is None:
            continue
        if tmin is None:
            segments.append(Segment(float(onset), float(duration), mapping[key]))
        else:
            segments.append(Segment(float(onset) + tmin, float(tmax - tmin), mapping[key]))
    return segments


# --- table --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelTable:
    """A label table read against a data root.

    Attributes
    ----------
    path : pathlib.Path
        The table.
    files : dict of pathlib.Path to tuple of Segment
        Each existing recording (absolute path, in the table's order) and its
        segments.
    missing : tuple of (str, str)
        ``(file, message)`` for each row naming a file that does not exist,
        the message naming the row (``"labels.csv row 4: file 'S09.edf' not
        found under ROOT"``).
    """

    path: Path
    files: dict
    missing: tuple[tuple[str, str], ...]


def _number(text: str, column: str, where: str) -> float | None:
    text = (text or "").strip()
    if text == "" or text.lower() in ("n/a", "na", "nan"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise LabelError(f"{where}: {column} must be a number of seconds, got {text!r} instead.") from None
    if not math.isfinite(value) or value < 0 or (column == "duration" and value == 0):
        raise LabelError(f"{where}: {column} must be a {'positive' if column == 'duration' else 'non-negative'} "
                         f"number of seconds, got {text!r} instead.")  # fmt: skip
    return value


def read_label_table(path, *, root, label_names=None, strict: bool = True) -> LabelTable:
    """Read a label table (CSV, or TSV for ``.tsv``/``.tab`` files).

    Columns: ``file`` (path relative to ``root``) and ``label`` (required);
    ``onset`` (seconds, default 0) and ``duration`` (seconds, default: to the
    end of the recording) optional. A file may have several rows (segments).
    Other columns are ignored (logged). Empty lines are skipped.

    Parameters
    ----------
    path : path-like
        The table.
    root : path-like
        The data root the ``file`` column is relative to.
    label_names : sequence of str | None
        If given, every label must be one of them.
    strict : bool
        If True (default), a row naming a missing file raises; if False it is
        listed in :attr:`LabelTable.missing` and left out.

    Returns
    -------
    table : LabelTable

    Raises
    ------
    LabelError
        If the table lacks a required column, a number is invalid, a label is
        not in ``label_names`` (naming row, file and value), the table has no
        rows, or (``strict``) a row names a missing file.
    FileNotFoundError
        If the table does not exist.
    """
    path = Path(path)
    root = Path(root)
    if not path.is_file():
        raise FileNotFoundError(f"Label table {str(path)!r} not found. Check [labels] table in the site file.")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        missing_cols = [c for c in ("file", "label") if c not in columns]
        if missing_cols:
            how = "TSV (tab-separated)" if delimiter == "\t" else "CSV (comma-separated; name it .tsv for tabs)"
            raise LabelError(
                f"{path.name}: the label table needs columns 'file' and 'label' (optional 'onset', 'duration'), "
                f"got columns {columns} instead (missing {missing_cols}). It is read as {how}."
            )
        extra = [c for c in columns if c not in TABLE_COLUMNS]
        if extra:
            logger.info("%s: ignoring column(s) %s of the label table.", path.name, extra)
        files: dict[Path, list[Segment]] = {}
        missing: list[tuple[str, str]] = []
        n_rows = 0
        for line, row in enumerate(reader, start=2):
            if not any((v or "").strip() for k, v in row.items() if k is not None):
                continue
            n_rows += 1
            rel = (row.get("file") or "").strip()
            label = (row.get("label") or "").strip()
            where = f"{path.name} row {line}" + (f" (file {rel!r})" if rel else "")
            if not rel:
                raise LabelError(f"{where}: empty 'file'.")
            if label_names is not None and label not in tuple(label_names):
                raise LabelError(
                    f"{where}: label {label!r} is not one of the federation's labels {tuple(label_names)}. "
                    "Use exactly those names (case matters)."
                )
            onset = _number(row.get("onset", ""), "onset", where) or 0.0
            duration = _number(row.get("duration", ""), "duration", where)
            target = root / PurePath(rel)
            if not target.is_file():
                message = f"{path.name} row {line}: file {rel!r} not found under {root}"
                if strict:
                    raise LabelError(message + ". Fix the path (relative to [data] root) or remove the row.")
                missing.append((rel, message))
                continue
            files.setdefault(target, []).append(Segment(onset, duration, label))
    if n_rows == 0:
        raise LabelError(f"{path.name}: the label table has no rows.")
    return LabelTable(path, {k: tuple(v) for k, v in files.items()}, tuple(missing))


# --- file names ---------------------------------------------------------------------------------


def _pattern_matches(pattern: str, rel: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], rel) is not None
    return fnmatch.fnmatchcase(rel, pattern) or fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], pattern)


def check_filename_patterns(patterns: Mapping[str, str], *, where: str) -> None:
    """Check that every ``re:`` pattern compiles (raises :class:`LabelError`)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise LabelError(f"{where}: invalid regular expression {pattern!r} ({err}).") from None


def label_from_filename(path, patterns: Mapping[str, str], *, label_names=None) -> str | None:
    """The label of a recording from its (relative) path.

    Parameters
    ----------
    path : path-like
        The file's path relative to the data root (matched in POSIX form).
    patterns : mapping of str to str
        Pattern -> label. A pattern is a glob (``"*_1.edf"``; matched against
        the relative path and against the file name, case-sensitively) or, with
        the prefix ``"re:"``, a regular expression searched in the relative
        path (``"re:_1\\.edf$"``).
    label_names : sequence of str | None
        If given, every label must be one of them.

    Returns
    -------
    label : str | None
        None if no pattern matches.

    Raises
    ------
    LabelError
        If patterns with different labels match the file, or a label is not in
        ``label_names``.
    """
    rel = PurePath(path).as_posix()
    if label_names is not None:
        check_label_values(((f"pattern {p!r}", v) for p, v in patterns.items()), label_names, where="filename patterns")
    hits = {p: label for p, label in patterns.items() if _pattern_matches(p, rel)}
    labels = set(hits.values())
    if len(labels) > 1:
        raise LabelError(
            f"{rel}: file-name patterns give different labels: "
            f"{', '.join(f'{p!r} -> {v!r}' for p, v in hits.items())}. Make the patterns exclusive."
        )
    return labels.pop() if labels else None
