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

A *window pack* (:func:`export_eegmat_pack`) is an eegmat folder that holds,
instead of the EDF files, every subject's preprocessed windows, losslessly
compressed (float32 bytes, byte-shuffled, xz; about 80 % of the raw arrays),
with ``subject-info.csv`` and a manifest recording the spec, this loader's key
material and the sha256 of the EDF files they came from. ``load_eegmat_sites``
reads such a folder like the original one (same subjects, same sites, the same
windows bit for bit) without MNE or the EDF files, for machines where neither
can go (a GPU host without a package index). A pack only serves the spec it was
made with; any other spec needs the EDF files.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
from pathlib import Path

import numpy as np

from .._hashing import sha256_file
from .._validation import check_option, check_range
from .base import Site, WindowSet
from .cache import WindowCache
from .preprocessing import PreprocessSpec, make_windows, preprocess_raw, reject_windows

__all__ = ["LABEL_NAMES", "PACK_MANIFEST", "export_eegmat_pack", "load_eegmat_sites", "load_eegmat_subject",
           "read_subject_info"]

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
    if not (f_rest.is_file() and f_task.is_file()) and subject in _pack_subjects(Path(path)):
        return _load_from_pack(Path(path), subject, spec)
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
    packed = _pack_subjects(path)
    for subject in wanted:
        missing = [p.name for p in _files(path, subject) if not p.is_file()]
        if missing and subject in packed:
            present.append(subject)
        elif missing:
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


# --- window packs ----------------------------------------------------------------------------------------------------

#: The manifest of a window pack (see :func:`export_eegmat_pack`); its presence makes a folder a pack.
PACK_MANIFEST = "fedeeg-windows-pack.json"
_PACK_FORMAT = "fedeeg-eegmat-window-pack"
_PACK_VERSION = 1


def _loader_material() -> dict:
    """This loader's key material that a pack must match (the disk cache's, less the library versions)."""
    return {"dataset": "eegmat", "loader_version": LOADER_VERSION, "label_names": list(LABEL_NAMES),
            "rest_seconds": REST_SECONDS}


@functools.lru_cache(maxsize=16)
def _read_pack_manifest(path: str, mtime_ns: int) -> dict:
    manifest = json.loads((Path(path) / PACK_MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("format") != _PACK_FORMAT or manifest.get("format_version") != _PACK_VERSION:
        raise ValueError(f"{Path(path) / PACK_MANIFEST}: not a FedEEG eegmat window pack of format version "
                         f"{_PACK_VERSION} (format {manifest.get('format')!r}, version {manifest.get('format_version')!r}).")
    return manifest


def _pack_manifest(path: Path) -> dict | None:
    fname = path / PACK_MANIFEST
    if not fname.is_file():
        return None
    return _read_pack_manifest(str(path), fname.stat().st_mtime_ns)


def _pack_subjects(path: Path) -> frozenset[str]:
    manifest = _pack_manifest(path)
    return frozenset(manifest["subjects"]) if manifest else frozenset()


def _shuffle(X: np.ndarray) -> bytes:
    """float32 bytes grouped by byte position (all first bytes, then all second ...): sign and exponent compress."""
    return np.ascontiguousarray(X, dtype="<f4").view(np.uint8).reshape(-1, 4).T.tobytes()


def _unshuffle(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    planes = np.frombuffer(data, dtype=np.uint8).reshape(4, -1)
    return np.ascontiguousarray(planes.T).view("<f4").reshape(shape).astype(np.float32, copy=False)


def _load_from_pack(path: Path, subject: str, spec: PreprocessSpec) -> WindowSet:
    manifest = _pack_manifest(path)
    packed_spec = PreprocessSpec.from_dict(manifest["spec"])
    if packed_spec != spec:
        raise ValueError(
            f"The eegmat window pack {str(path)!r} holds windows preprocessed with {packed_spec}, but this run asks for "
            f"{spec}. A pack serves only the preprocessing it was made with: run with that one, or use the folder of "
            f"EDF files (or make a pack for this spec with export_eegmat_pack)."
        )
    if manifest["loader"] != _loader_material():
        raise ValueError(f"The eegmat window pack {str(path)!r} was made by another eegmat loader "
                         f"({manifest['loader']}; this one is {_loader_material()}): make it again from the EDF files.")
    entry = manifest["subjects"][subject]
    data = lzma.decompress((path / entry["file"]).read_bytes())
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise OSError(f"{path / entry['file']}: the windows do not match the pack's checksum (file damaged?); "
                      f"copy the pack again.")
    X = _unshuffle(data, tuple(entry["shape"]))
    X.flags.writeable = False
    y = np.asarray(entry["y"], dtype=np.int64)
    logger.debug("eegmat: %s from the window pack %s.", subject, path)
    return WindowSet(X, y, np.full(len(X), subject), tuple(manifest["ch_names"]), float(manifest["sfreq"]), LABEL_NAMES)


def export_eegmat_pack(data_dir, dest, *, spec: PreprocessSpec = PreprocessSpec(), subjects=None, cache_dir=None,
                       preset: int = 6) -> Path:
    """Write an eegmat window pack: every subject's preprocessed windows, losslessly compressed, in ``dest``.

    ``dest`` then works as an eegmat ``data_dir`` for runs with ``spec``
    (:func:`load_eegmat_sites` reads the windows from the pack, bit for bit
    those of the EDF folder), without the EDF files and without MNE.

    Parameters
    ----------
    data_dir : path-like
        The eegmat folder with the EDF files.
    dest : path-like
        The pack's folder (created; must not hold EDF files).
    spec : PreprocessSpec
        The preprocessing of the windows (the one the runs use).
    subjects : list | None
        Subjects to pack (default: all with both EDF files).
    cache_dir : path-like | None
        Disk cache of windows to read (and fill), as in :func:`load_eegmat_subject`.
    preset : int
        xz preset (0-9).

    Returns
    -------
    dest : Path
        Holding ``subject-info.csv``, :data:`PACK_MANIFEST` and one ``SubjectNN.f32shuf.xz`` per subject.
    """
    import mne

    src = _data_dir(data_dir)
    out = Path(dest).expanduser()
    if out.resolve() == src:
        raise ValueError(f"dest must be another folder than the EDF folder {str(src)!r}.")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.edf")):
        raise ValueError(f"dest {str(out)!r} holds EDF files: give an empty folder for the pack.")
    info = read_subject_info(src)
    present = _available_subjects(src, info, subjects)
    shutil.copyfile(src / "subject-info.csv", out / "subject-info.csv")
    entries: dict[str, dict] = {}
    ch_names = sfreq = None
    for subject in present:
        windows = load_eegmat_subject(src, subject, spec, cache_dir=cache_dir)
        if ch_names is None:
            ch_names, sfreq = list(windows.ch_names), float(windows.sfreq)
        elif list(windows.ch_names) != ch_names or float(windows.sfreq) != sfreq:
            raise ValueError(f"{subject}: channels or rate differ from the other subjects' ({windows.ch_names}, "
                             f"{windows.sfreq} Hz); a pack holds one montage.")
        data = _shuffle(windows.X)
        fname = f"{subject}.f32shuf.xz"
        tmp = out / f".{fname}.tmp"
        tmp.write_bytes(lzma.compress(data, preset=preset))
        os.replace(tmp, out / fname)
        entries[subject] = {
            "file": fname, "shape": list(windows.X.shape), "dtype": "<f4", "sha256": hashlib.sha256(data).hexdigest(),
            "y": windows.y.tolist(),
            "sources": [{"path": f.name, "size": f.stat().st_size, "sha256": sha256_file(f)} for f in _files(src, subject)],
        }
        logger.info("eegmat pack: %s (%d windows) -> %s", subject, windows.n_windows, out / fname)
    from .. import __version__

    manifest = {"format": _PACK_FORMAT, "format_version": _PACK_VERSION, "spec": spec.to_dict(),
                "loader": _loader_material(), "made_with": {"fedeeg": __version__, "mne": mne.__version__},
                "ch_names": ch_names, "sfreq": sfreq, "label_names": list(LABEL_NAMES), "subjects": entries}
    tmp = out / f".{PACK_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / PACK_MANIFEST)  # last: a folder without it is no pack
    return out

