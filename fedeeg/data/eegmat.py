"""eegmat: EEG during mental arithmetic (PhysioNet, v1.0.0), split into sites.

The folder must hold ``SubjectNN_1.edf`` (rest before the task),
``SubjectNN_2.edf`` (serial subtraction) and ``subject-info.csv``. Rest
(label 0) is the last 60 s of ``_1``; arithmetic (label 1) is all of ``_2``
(about 60 s), so both classes are balanced per subject.

Sites: ``split="year"`` gives one site per recording year (a natural proxy for
acquisition batches); ``split="subject"`` deals subjects round-robin into
``n_sites`` sites.

Subjects are memoised in-process; with ``cache_dir`` they are also cached on
disk (:class:`~fedeeg.data.cache.WindowCache`, keyed on the two EDF files'
contents, the spec and this loader's windowing and labels).
"""

from __future__ import annotations

import csv
import functools
import logging
import re
from pathlib import Path

import numpy as np

from .._validation import check_option, check_range
from .base import Site, WindowSet
from .cache import WindowCache
from .preprocessing import PreprocessSpec, make_windows, preprocess_raw, reject_windows

__all__ = ["LABEL_NAMES", "load_eegmat_sites", "load_eegmat_subject", "read_subject_info"]

logger = logging.getLogger(__name__)

LABEL_NAMES = ("rest", "arithmetic")
#: Seconds of rest taken from the end of ``SubjectNN_1.edf``.
REST_SECONDS = 60.0

#: Version of the windowing and labelling below; part of the disk-cache key, so
#: bump it whenever they change.
LOADER_VERSION = 1

_SOURCE = 'PhysioNet eegmat v1.0.0 ("EEG During Mental Arithmetic Tasks", https://physionet.org/content/eegmat/1.0.0/)'
_CONTENTS = "subject-info.csv and the EDF files SubjectNN_1.edf (rest) and SubjectNN_2.edf (arithmetic)"


def _data_dir(data_dir) -> Path:
    if data_dir is None or str(data_dir) == "":
        raise ValueError(f"data_dir must be the eegmat folder (holding {_CONTENTS}), got {data_dir!r} instead.")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"The eegmat folder {str(path)!r} does not exist. Download {_SOURCE} and pass the folder that holds {_CONTENTS}."
        )
    return path.resolve()


def _snake(header: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", header.strip().lower()).strip("_")


def _convert(value: str):
    value = value.strip()
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def read_subject_info(data_dir) -> dict[str, dict]:
    """Read eegmat's ``subject-info.csv``.

    Parameters
    ----------
    data_dir : path-like
        The eegmat folder.

    Returns
    -------
    info : dict of str to dict
        Keyed by subject id (``"Subject04"``); each value holds the CSV's other
        columns in snake case, numbers converted: ``age`` (int), ``gender``
        (str), ``recording_year`` (int), ``number_of_subtractions`` (float),
        ``count_quality`` (int).
    """
    path = _data_dir(data_dir) / "subject-info.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"No subject-info.csv in the eegmat folder {str(path.parent)!r}. The folder must hold {_CONTENTS}, "
            f"as released in {_SOURCE}."
        )
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "Subject" not in reader.fieldnames:
            raise ValueError(f"{path}: expected a 'Subject' column, got columns {reader.fieldnames} instead.")
        out: dict[str, dict] = {}
        for row in reader:
            subject = (row.pop("Subject") or "").strip()
            if not subject:
                continue
            out[subject] = {_snake(k): _convert(v or "") for k, v in row.items() if k is not None}
    for subject, row in out.items():
        if not isinstance(row.get("recording_year"), int):
            raise ValueError(f"{path}: subject {subject} has no integer 'Recording year' (got {row.get('recording_year')!r}).")
    return out


def _subject_id(subject) -> str:
    """``4``, ``"04"``, ``"Subject04"`` → ``"Subject04"``."""
    if isinstance(subject, (int, np.integer)) and not isinstance(subject, bool):
        return f"Subject{int(subject):02d}"
    if isinstance(subject, str):
        match = re.fullmatch(r"(?:subject)?\s*(\d+)", subject.strip(), flags=re.IGNORECASE)
        if match:
            return f"Subject{int(match.group(1)):02d}"
    raise ValueError(f"subject must be an eegmat subject id such as 'Subject04' or 4, got {subject!r} instead.")


def _files(path: Path, subject: str) -> tuple[Path, Path]:
    return path / f"{subject}_1.edf", path / f"{subject}_2.edf"


def _read_edf(fname: Path):
    import mne

    if not fname.is_file():
        raise FileNotFoundError(f"Missing eegmat file {str(fname)!r}; the folder must hold {_CONTENTS} ({_SOURCE}).")
    try:
        return mne.io.read_raw_edf(fname, preload=True, verbose="error")
    except Exception as err:  # mne raises several types for a bad EDF
        raise OSError(
            f"Could not read the EDF file {str(fname)!r}: {type(err).__name__}: {err}. "
            f"The file may be truncated or not an EDF; download it again from {_SOURCE}."
        ) from err


def _cache_extra() -> dict:
    """Key material of the disk cache besides the files and the spec."""
    import mne

    from .. import __version__

    return {
        "dataset": "eegmat",
        "loader_version": LOADER_VERSION,
        "label_names": list(LABEL_NAMES),
        "rest_seconds": REST_SECONDS,
        "fedeeg": __version__,
        "mne": mne.__version__,
    }


@functools.lru_cache(maxsize=64)
def _load_subject_cached(path: str, subject: str, spec: PreprocessSpec, cache_dir: str | None = None) -> WindowSet:
    f_rest, f_task = _files(Path(path), subject)
    if cache_dir is None:
        return _compute_subject(f_rest, f_task, subject, spec)
    for fname in (f_rest, f_task):
        if not fname.is_file():
            raise FileNotFoundError(f"Missing eegmat file {str(fname)!r}; the folder must hold {_CONTENTS} ({_SOURCE}).")
    cache = WindowCache(cache_dir)
    key = cache.key([f_rest, f_task], spec, _cache_extra())
    windows = cache.load(key)
    if windows is None:
        windows = _compute_subject(f_rest, f_task, subject, spec)
        cache.store(key, windows, {"dataset": "eegmat", "subject": subject})
    else:
        logger.debug("eegmat: %s from the disk cache %s.", subject, cache_dir)
    return windows


def _compute_subject(f_rest: Path, f_task: Path, subject: str, spec: PreprocessSpec) -> WindowSet:
    rest, ch_rest = preprocess_raw(_read_edf(f_rest), spec, source=f_rest.name)
    task, ch_task = preprocess_raw(_read_edf(f_task), spec, source=f_task.name)
    if ch_rest != ch_task:
        raise ValueError(f"{subject}: the two files have different channels: {ch_rest} vs {ch_task}.")
    n_rest = int(round(REST_SECONDS * spec.sfreq))
    if rest.shape[1] < n_rest:
        logger.warning(
            "%s: rest lasts %.1f s, less than %.0f s; using all of it.", f_rest.name, rest.shape[1] / spec.sfreq, REST_SECONDS
        )
    rest = rest[:, -n_rest:]
    X0 = make_windows(rest, spec.n_times)
    X1 = make_windows(task, spec.n_times)
    if spec.reject_peak_to_peak is not None:
        X0, _ = reject_windows(X0, spec, source=f"{subject} {LABEL_NAMES[0]}")
        X1, _ = reject_windows(X1, spec, source=f"{subject} {LABEL_NAMES[1]}")
    X = np.concatenate([X0, X1])
    X.flags.writeable = False
    y = np.concatenate([np.zeros(len(X0), np.int64), np.ones(len(X1), np.int64)])
    return WindowSet(X, y, np.full(len(X), subject), ch_rest, spec.sfreq, LABEL_NAMES)


def load_eegmat_subject(data_dir, subject, spec: PreprocessSpec = PreprocessSpec(), *, cache_dir=None) -> WindowSet:
    """Load and preprocess one eegmat subject.

    Memoised in-process on (folder, subject, spec, cache_dir): a simulation
    asks for the same subject repeatedly. Each call returns its own copy of
    the arrays.

    Parameters
    ----------
    data_dir : path-like
        The eegmat folder.
    subject : str | int
        Subject id, e.g. ``"Subject04"`` (or ``4``).
    spec : PreprocessSpec
        Preprocessing.
    cache_dir : path-like | None
        A :class:`~fedeeg.data.cache.WindowCache` folder (e.g.
        :func:`~fedeeg.data.cache.default_cache_dir`): the subject's windows
        are read from it when the two EDF files (by content), the spec and
        this loader are unchanged, and stored there otherwise. None (default):
        no disk cache.

    Returns
    -------
    windows : WindowSet
        ``X`` of shape (n_windows, n_chans, n_times): rest windows (label 0,
        from the last 60 s of ``_1``) then arithmetic windows (label 1, all of
        ``_2``); ``subject`` is the subject id; ``label_names`` is
        ``("rest", "arithmetic")``.
    """
    if not isinstance(spec, PreprocessSpec):
        raise TypeError(f"spec must be a PreprocessSpec, got {type(spec).__name__} instead.")
    cache = None if cache_dir is None or str(cache_dir) == "" else str(Path(cache_dir).expanduser().resolve())
    cached = _load_subject_cached(str(_data_dir(data_dir)), _subject_id(subject), spec, cache)
    return WindowSet(cached.X.copy(), cached.y.copy(), cached.subject.copy(), cached.ch_names, cached.sfreq, cached.label_names)


def _available_subjects(path: Path, info: dict[str, dict], subjects) -> list[str]:
    if subjects is None:
        wanted = sorted(info)
    else:
        wanted = sorted({_subject_id(s) for s in subjects})
        unknown = [s for s in wanted if s not in info]
        if unknown:
            raise ValueError(
                f"subjects {unknown} are not in {path / 'subject-info.csv'}; known subjects: {sorted(info)}."
            )
    present = []
    for subject in wanted:
        missing = [p.name for p in _files(path, subject) if not p.is_file()]
        if missing:
            logger.warning("eegmat: skipping %s, missing file(s) %s in %s.", subject, missing, path)
        else:
            present.append(subject)
    if not present:
        raise FileNotFoundError(
            f"No eegmat subject has both EDF files in {str(path)!r} (looked for {len(wanted)} subjects). "
            f"The folder must hold {_CONTENTS} ({_SOURCE})."
        )
    return present


def load_eegmat_sites(
    data_dir,
    *,
    split: str = "year",
    n_sites: int | None = 3,
    spec: PreprocessSpec = PreprocessSpec(),
    subjects=None,
    cache_dir=None,
) -> list[Site]:
    """Load eegmat as several sites.

    Parameters
    ----------
    data_dir : path-like
        The eegmat folder (``subject-info.csv`` and ``SubjectNN_{1,2}.edf``).
    split : {"year", "subject"}
        ``"year"``: one site per recording year present (``"year-2010"``, …,
        sorted). ``"subject"``: subjects (sorted) dealt round-robin into
        ``n_sites`` sites ``"site-0"``, ….
    n_sites : int | None
        Number of sites. With ``split="year"`` it must equal the number of
        years present, or be None.
    spec : PreprocessSpec
        Preprocessing.
    subjects : list of str | None
        Use only these subjects (default: all listed in ``subject-info.csv``
        whose two files are present; the others are skipped with a warning).
    cache_dir : path-like | None
        Disk cache of the subjects' windows (see :func:`load_eegmat_subject`);
        None (default): none.

    Returns
    -------
    sites : list of Site
        ``info`` holds ``n_subjects``, ``n_windows`` and, for the year split,
        ``year``.
    """
    check_option("split", split, ("year", "subject"))
    if n_sites is not None:
        check_range("n_sites", n_sites, low=1, kind=(int, np.integer))
    path = _data_dir(data_dir)
    info = read_subject_info(path)
    present = _available_subjects(path, info, subjects)

    groups: list[tuple[str, list[str], dict]] = []
    if split == "year":
        years = sorted({info[s]["recording_year"] for s in present})
        if n_sites is not None and n_sites != len(years):
            raise ValueError(
                f"The year split has exactly {len(years)} site(s) (recording years {years} among the subjects used), "
                f"but n_sites={n_sites}. Use n_sites={len(years)}, or split='subject' for another number of sites."
            )
        for year in years:
            groups.append((f"year-{year}", [s for s in present if info[s]["recording_year"] == year], {"year": year}))
    else:
        if n_sites is None:
            raise ValueError("split='subject' needs n_sites (an int >= 1), got None.")
        if len(present) < 2 * n_sites:
            raise ValueError(
                f"split='subject' with n_sites={n_sites} needs at least {2 * n_sites} subjects (two per site, so that "
                f"each site can hold one out for testing), but only {len(present)} are available. Use fewer sites."
            )
        for k in range(n_sites):
            groups.append((f"site-{k}", present[k::n_sites], {}))

    sites = []
    n_total = len(present)
    done = 0
    for name, members, extra in groups:
        parts = []
        for subject in members:
            parts.append(load_eegmat_subject(path, subject, spec, cache_dir=cache_dir))
            done += 1
            logger.info("eegmat: %s loaded (%d windows) [%d/%d] -> %s", subject, parts[-1].n_windows, done, n_total, name)
        windows = WindowSet.concatenate(parts)
        sites.append(Site(name, windows, {**extra, "n_subjects": len(members), "n_windows": windows.n_windows}))
    return sites
