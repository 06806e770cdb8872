"""Reading hospital recordings in the common EEG file formats, with one clear error per bad file.

:func:`read_raw_file` reads EDF/EDF+ (``.edf``), BDF (``.bdf``), BrainVision
(``.vhdr``), EEGLAB (``.set``) and FIF (``.fif``, ``.fif.gz``) through MNE, and
files of a BIDS dataset through mne-bids (events from ``*_events.tsv`` become
annotations, ``status=bad`` in ``*_channels.tsv`` marks bad channels).
:func:`find_bids_recordings` lists a BIDS dataset's EEG recordings.

Every problem with a file (not an EEG file, truncated, empty, zero-length,
duplicate channel names, anything MNE cannot read) is raised as a
:class:`DataFileError`: one line naming the file and the problem, never a
traceback from deep inside a reader. EDF/BDF headers and BrainVision headers
are checked before MNE sees the file, so that the usual failures get a precise
message. MNE's chatter is suppressed; the warnings it raises while reading are
passed on to :mod:`logging` (prefixed with the file name).

Files are only ever opened for reading. (mne-bids may create and remove a
transient ``.lock`` file next to the sidecars it reads; the recordings are not
touched.)
"""

from __future__ import annotations

import configparser
import contextlib
import logging
import re
import warnings
from pathlib import Path

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "DataFileError",
    "detect_format",
    "find_bids_recordings",
    "read_raw_file",
]

logger = logging.getLogger(__name__)

#: Formats :func:`read_raw_file` reads.
FORMATS = ("edf", "bdf", "brainvision", "eeglab", "fif", "bids")

#: File name endings (lower case) and the format they stand for.
EXTENSIONS: dict[str, str] = {
    ".edf": "edf",
    ".bdf": "bdf",
    ".vhdr": "brainvision",
    ".set": "eeglab",
    ".fif": "fif",
    ".fif.gz": "fif",
}

#: BIDS data-file extensions of EEG recordings.
BIDS_EXTENSIONS = (".edf", ".bdf", ".vhdr", ".set", ".fif")

# Warnings of MNE / mne-bids that carry no information for a hospital's data engineer (logged at DEBUG).
_CHATTER = (
    "Could not create lock",
    "Could not acquire lock",
    "Did not find any electrodes.tsv",
    "Did not find any coordsystem.json",
    "participants.tsv file not found",
    "Encountered data in 'double' format",
)
_DUPLICATES = re.compile(r"Channel names are not unique, found duplicates for: (\{.*?\})")


class DataFileError(ValueError):
    """A recording that cannot be used, with the file and the problem.

    Parameters
    ----------
    path : path-like
        The file.
    reason : str
        The problem, one line (e.g. ``"truncated: header says 120 s, file holds 3 s"``).

    Attributes
    ----------
    path : pathlib.Path
        The file.
    reason : str
        The problem.
    """

    def __init__(self, path, reason: str) -> None:
        self.path = Path(path)
        self.reason = " ".join(line.strip() for line in str(reason).strip().splitlines())  # one line
        super().__init__(f"{self.path.name}: {self.reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


def detect_format(path) -> str:
    """The format of a recording from its file name.

    Parameters
    ----------
    path : path-like
        The file.

    Returns
    -------
    fmt : str
        One of ``"edf"``, ``"bdf"``, ``"brainvision"``, ``"eeglab"``, ``"fif"``.

    Raises
    ------
    DataFileError
        If the extension is not one of :data:`EXTENSIONS`.
    """
    name = Path(path).name.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return EXTENSIONS[ext]
    raise DataFileError(
        path,
        f"unknown EEG file extension; expected one of {', '.join(EXTENSIONS)} "
        "(or pass fmt=... / set [data] format in the site file)",
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


# --- header checks ------------------------------------------------------------------------------


def _edf_field(raw: bytes, start: int, stop: int) -> str:
    return raw[start:stop].decode("latin-1").strip()


def _check_edf_header(path: Path, fmt: str) -> None:
    """Check an EDF/BDF file's fixed header against its size: type, truncation, zero length."""
    kind = fmt.upper()
    size = path.stat().st_size
    if size == 0:
        raise DataFileError(path, "empty file (0 bytes)")
    with path.open("rb") as f:
        head = f.read(256)
        if fmt == "edf" and not head.startswith(b"0       "):
            raise DataFileError(path, "not an EDF file (header does not start with '0       ')")
        if fmt == "bdf" and not head.startswith(b"\xffBIOSEMI"):
            raise DataFileError(path, "not a BDF file (header does not start with 0xFF 'BIOSEMI')")
        if len(head) < 256:
            raise DataFileError(path, f"truncated: {size} bytes, shorter than the 256-byte {kind} header")
        try:
            header_bytes = int(_edf_field(head, 184, 192))
            n_records = int(_edf_field(head, 236, 244))
            record_s = float(_edf_field(head, 244, 252))
            n_signals = int(_edf_field(head, 252, 256))
        except ValueError:
            raise DataFileError(
                path, f"corrupt {kind} header (header size, number of records, record duration or number of "
                "signals is not a number)"
            ) from None
        if n_signals < 1 or header_bytes != 256 * (n_signals + 1):
            raise DataFileError(
                path, f"corrupt {kind} header (header size {header_bytes} bytes does not fit {n_signals} signals)"
            )
        if size < header_bytes:
            raise DataFileError(path, f"truncated: {size} bytes, shorter than its {header_bytes}-byte header")
        f.seek(256 + n_signals * 216)
        spr_field = f.read(8 * n_signals)
    try:
        samples = [int(_edf_field(spr_field, 8 * i, 8 * i + 8)) for i in range(n_signals)]
    except ValueError:
        raise DataFileError(path, f"corrupt {kind} header (samples per record is not a number)") from None
    record_bytes = sum(samples) * (3 if fmt == "bdf" else 2)
    if record_bytes <= 0:
        raise DataFileError(path, f"corrupt {kind} header (no samples per data record)")
    in_file = (size - header_bytes) // record_bytes
    if n_records == 0 or in_file == 0:
        raise DataFileError(path, "zero-length recording (no data records)")
    if n_records > 0 and in_file < n_records:
        if record_s > 0:
            raise DataFileError(
                path, f"truncated: header says {n_records * record_s:g} s, file holds {in_file * record_s:g} s"
            )
        raise DataFileError(path, f"truncated: header says {n_records} data records, file holds {in_file}")


def _check_vhdr(path: Path) -> None:
    """Check a BrainVision header and its data file: type, presence, whole samples."""
    size = path.stat().st_size
    if size == 0:
        raise DataFileError(path, "empty file (0 bytes)")
    with path.open("rb") as f:
        first = f.readline(200).removeprefix(b"\xef\xbb\xbf").decode("latin-1").strip()
    if not first.startswith("Brain Vision Data Exchange Header File") and not first.startswith(
        "BrainVision Data Exchange Header File"
    ):
        raise DataFileError(path, "not a BrainVision header (first line is not 'Brain Vision Data Exchange Header File ...')")
    text = path.read_bytes().decode("utf-8", errors="replace")
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string("\n".join(line for line in text.splitlines()[1:] if not line.startswith(";")))
        common = parser["Common Infos"]
        data_file = common.get("DataFile", "").strip()
        n_chans = int(common.get("NumberOfChannels", "0"))
    except (configparser.Error, KeyError, ValueError) as err:
        raise DataFileError(path, f"corrupt BrainVision header ({_first_line(err)})") from None
    if not data_file:
        raise DataFileError(path, "corrupt BrainVision header (no DataFile in [Common Infos])")
    data_path = path.parent / data_file
    if not data_path.is_file():
        raise DataFileError(path, f"data file {data_file!r} named in the header is missing")
    data_size = data_path.stat().st_size
    if data_size == 0:
        raise DataFileError(path, f"zero-length recording (data file {data_file!r} is empty)")
    if common.get("DataFormat", "BINARY").strip().upper() == "BINARY" and n_chans > 0:
        binary = parser["Binary Infos"].get("BinaryFormat", "INT_16").strip().upper() if "Binary Infos" in parser else "INT_16"
        width = {"INT_16": 2, "UINT_16": 2, "INT_32": 4, "IEEE_FLOAT_32": 4}.get(binary)
        if width and data_size % (n_chans * width):
            raise DataFileError(
                path, f"truncated or corrupt: data file {data_file!r} holds {data_size} bytes, not a whole number "
                f"of samples of {n_chans} channels x {width} bytes"
            )


def _check_file(path: Path, fmt: str) -> None:
    if not path.exists():
        raise DataFileError(path, "file not found")
    if not path.is_file():
        raise DataFileError(path, "not a file")
    if fmt in ("edf", "bdf"):
        _check_edf_header(path, fmt)
    elif fmt == "brainvision":
        _check_vhdr(path)
    elif path.stat().st_size == 0:
        raise DataFileError(path, "empty file (0 bytes)")


# --- reading ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _reading(path: Path, fmt: str, caught: list[str]):
    """Record MNE's warnings into ``caught`` and turn any reader exception into a DataFileError."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        try:
            yield
        except DataFileError:
            raise
        except MemoryError:
            raise
        except Exception as err:  # MNE raises many types (ValueError, OSError, KeyError, ...) for bad files
            raise DataFileError(path, f"could not be read as {_FORMAT_NAMES[fmt]} ({_first_line(err)})") from err
        finally:
            caught.extend(" ".join(str(r.message).split()) for r in records)


_FORMAT_NAMES = {
    "edf": "EDF",
    "bdf": "BDF",
    "brainvision": "BrainVision",
    "eeglab": "EEGLAB",
    "fif": "FIF",
    "bids": "BIDS",
}


def _read_mne(path: Path, fmt: str, preload: bool):
    import mne

    wanted = tuple(e for e, f in EXTENSIONS.items() if f == fmt)
    if not path.name.lower().endswith(wanted):
        if fmt not in ("edf", "bdf"):
            raise DataFileError(path, f"{_FORMAT_NAMES[fmt]} files must end in {' or '.join(wanted)} to be read")
        # MNE checks the extension of a file name, not of a file object.
        with path.open("rb") as fid:
            reader = mne.io.read_raw_edf if fmt == "edf" else mne.io.read_raw_bdf
            return reader(fid, preload=True, verbose="warning")
    if fmt == "edf":
        return mne.io.read_raw_edf(path, preload=preload, verbose="warning")
    if fmt == "bdf":
        return mne.io.read_raw_bdf(path, preload=preload, verbose="warning")
    if fmt == "brainvision":
        return mne.io.read_raw_brainvision(path, preload=preload, verbose="warning")
    if fmt == "eeglab":
        return mne.io.read_raw_eeglab(path, preload=preload, verbose="warning")
    if fmt == "fif":
        return mne.io.read_raw_fif(path, preload=preload, verbose="warning")
    raise AssertionError(fmt)


def _read_bids(bids_path, preload: bool):
    import mne_bids

    raw = mne_bids.read_raw_bids(bids_path, verbose="warning")
    if preload and not raw.preload:
        raw.load_data(verbose="warning")
    return raw


def _bids_path_of(path: Path):
    import mne_bids

    try:
        bids_path = mne_bids.get_bids_path_from_fname(path, check=False, verbose="error")
    except Exception as err:
        raise DataFileError(path, f"not a file of a BIDS dataset ({_first_line(err)})") from None
    if bids_path.subject is None or bids_path.root is None:
        raise DataFileError(path, "not a file of a BIDS dataset (expected ROOT/sub-*/[ses-*/]eeg/sub-*_eeg.*)")
    return bids_path


def _read(path, *, fmt: str | None = None, preload: bool = True, bids_path=None):
    """Read one recording; return ``(raw, warnings)`` with MNE's warnings as one-line strings.

    ``bids_path`` (a :class:`mne_bids.BIDSPath`) reads through mne-bids.
    """
    if bids_path is not None:
        path = Path(bids_path.fpath)
        fmt = "bids"
    path = Path(path)
    if fmt is None:
        fmt = detect_format(path)
    elif fmt not in FORMATS:
        raise ValueError(f"Invalid value for the 'fmt' parameter. Allowed values are {FORMATS} or None, but got {fmt!r} instead.")
    if fmt == "bids":
        inner = detect_format(path)
        _check_file(path, inner)
        if bids_path is None:
            bids_path = _bids_path_of(path)
    else:
        _check_file(path, fmt)
    caught: list[str] = []
    with _reading(path, fmt, caught):
        raw = _read_bids(bids_path, preload) if fmt == "bids" else _read_mne(path, fmt, preload)
    for message in caught:
        match = _DUPLICATES.search(message)
        if match:
            raise DataFileError(path, f"duplicate channel names {match.group(1)}; keep one channel per name")
    if raw.n_times == 0:
        raise DataFileError(path, "zero-length recording (no samples)")
    return raw, caught


def _log_warnings(name: str, messages, log: logging.Logger = logger) -> None:
    for message in messages:
        if any(message.startswith(c) for c in _CHATTER):
            log.debug("%s: %s", name, message)
        else:
            log.warning("%s: %s", name, message)


def read_raw_file(path, *, fmt: str | None = None, preload: bool = True):
    """Read one EEG recording, whatever its format.

    Parameters
    ----------
    path : path-like
        The recording: ``.edf``, ``.bdf``, ``.vhdr`` (BrainVision header),
        ``.set`` (EEGLAB), ``.fif`` or ``.fif.gz``; with ``fmt="bids"``, a data
        file inside a BIDS dataset (``ROOT/sub-*/[ses-*/]eeg/*_eeg.*``), read
        with its ``events.tsv`` and ``channels.tsv``.
    fmt : str | None
        One of :data:`FORMATS`; None (default) picks the format from the
        extension. Pass it for files with another extension (e.g. EDF files
        named ``.rec``).
    preload : bool
        Load the data into memory (default True).

    Returns
    -------
    raw : mne.io.BaseRaw
        The recording, in volts, with its annotations (events) and bad channels.

    Raises
    ------
    DataFileError
        If the file cannot be used: its message is one line naming the file and
        the problem (``"x.edf: not an EDF file (header does not start with
        '0       ')"``, ``"x.edf: truncated: header says 120 s, file holds 3 s"``,
        ``"x.edf: zero-length recording (no data records)"``, ``"x.fif: duplicate
        channel names {'Fp1'}; ..."``, ``"x.set: could not be read as EEGLAB
        (...)"``).
    """
    path = Path(path)
    raw, caught = _read(path, fmt=fmt, preload=preload)
    _log_warnings(path.name, caught)
    return raw


def find_bids_recordings(root, entities=None) -> list:
    """The EEG recordings of a BIDS dataset.

    Parameters
    ----------
    root : path-like
        The BIDS root (holding ``sub-*`` folders).
    entities : dict | None
        Restrict to these BIDS entities, singular names as in file names' long
        form: ``subject``, ``session``, ``task``, ``acquisition``, ``run``,
        ``processing``, ``recording``, ``space``, ``description``; each value a
        str or a list of str (e.g. ``{"task": "rest", "session": "01"}``).

    Returns
    -------
    bids_paths : list of mne_bids.BIDSPath
        Sorted by file name; one per recording (``*_eeg.edf``, ``.bdf``,
        ``.vhdr``, ``.set`` or ``.fif``).
    """
    import mne_bids

    entities = dict(entities or {})
    unknown = sorted(set(entities) - set(BIDS_ENTITIES))
    if unknown:
        raise ValueError(f"Unknown BIDS entit(ies) {unknown}; allowed entities are {list(BIDS_ENTITIES)}.")
    kwargs = {BIDS_ENTITIES[k]: v for k, v in entities.items()}
    root = Path(root)
    paths = mne_bids.find_matching_paths(
        root, datatypes="eeg", suffixes="eeg", extensions=list(BIDS_EXTENSIONS), **kwargs
    )
    return sorted(paths, key=lambda p: str(Path(p.fpath).relative_to(root)))


#: BIDS entities accepted by :func:`find_bids_recordings` and the mne-bids parameter each maps to.
BIDS_ENTITIES = {
    "subject": "subjects",
    "session": "sessions",
    "task": "tasks",
    "acquisition": "acquisitions",
    "run": "runs",
    "processing": "processings",
    "recording": "recordings",
    "space": "spaces",
    "description": "descriptions",
}
