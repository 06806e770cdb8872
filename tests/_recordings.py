"""Small synthetic recordings written in every format the site readers take, for the data-layer tests.

Signals: a few 10-20 channels, sines of 6-13 Hz (about 20 µV) plus noise, in
volts. Writers: EDF (mne.export / edfio), BrainVision (pybv), EEGLAB
(eeglabio), FIF (MNE), BDF (a minimal writer here: no BDF exporter exists),
BIDS (mne-bids). Also: damaging copies of files for the bad-input tests, the
EEGBCI channel list, a reference windowing from the in-memory raw, and file
hashes to show that reading changes nothing.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import mne
import numpy as np

from fedeeg.data.preprocessing import PreprocessSpec, make_windows, preprocess_raw

CH_NAMES = ("Fp1", "Fp2", "C3", "C4", "O1", "O2", "Cz")

#: Channel names as PhysioNet's EEG Motor Movement/Imagery (EEGBCI) EDF files spell them.
EEGBCI_CHANNELS = tuple(
    """
    Fc5. Fc3. Fc1. Fcz. Fc2. Fc4. Fc6. C5.. C3.. C1.. Cz.. C2.. C4.. C6.. Cp5. Cp3. Cp1. Cpz. Cp2. Cp4. Cp6.
    Fp1. Fpz. Fp2. Af7. Af3. Afz. Af4. Af8. F7.. F5.. F3.. F1.. Fz.. F2.. F4.. F6.. F8.. Ft7. Ft8. T7.. T8..
    T9.. T10. Tp7. Tp8. P7.. P5.. P3.. P1.. Pz.. P2.. P4.. P6.. P8.. Po7. Po3. Poz. Po4. Po8. O1.. Oz.. O2.. Iz..
    """.split()
)

#: Events of :func:`make_raw` by default: (onset s, duration s, description); onsets whole samples at 200 Hz.
EVENTS = ((1.0, 4.0, "T1"), (5.5, 4.0, "T2"), (10.0, 1.0, "T0"), (11.0, 4.5, "T2"), (16.0, 3.0, "T1"))

SPEC = PreprocessSpec(window_seconds=2.0)


def make_raw(duration=20.0, sfreq=250.0, ch_names=CH_NAMES, seed=0, events=EVENTS, amplitude=20e-6):
    """A RawArray of sines plus noise in volts, with annotations ``events``."""
    rng = np.random.default_rng(seed)
    n = int(round(duration * sfreq))
    t = np.arange(n) / sfreq
    freqs = 6.0 + 7.0 * rng.random(len(ch_names))
    phases = 2 * np.pi * rng.random(len(ch_names))
    data = amplitude * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None])
    data += 0.3 * amplitude * rng.standard_normal((len(ch_names), n))
    raw = mne.io.RawArray(data, mne.create_info(list(ch_names), sfreq, "eeg"), verbose="error")
    events = [e for e in (events or ()) if e[0] + e[1] <= duration]
    if events:
        onsets, durations, descriptions = zip(*events)
        raw.set_annotations(mne.Annotations(onsets, durations, descriptions))
    return raw


def write_bdf(raw, path) -> Path:
    """A minimal BDF writer (24-bit, 1-s records, ±1000 µV physical range, no annotations)."""
    path = Path(path)
    data_uv = raw.get_data() * 1e6
    sfreq = int(raw.info["sfreq"])
    n_chans, n = data_uv.shape
    n_records = n // sfreq
    dmax, pmax = 8388607, 1000.0
    digital = np.clip(np.round(data_uv / pmax * dmax), -dmax, dmax).astype(np.int32)

    def field(value, width):
        return str(value).ljust(width)[:width].encode("latin-1")

    header = b"\xffBIOSEMI" + field("X X X X", 80) + field("Startdate 01-JAN-1985 X X X", 80)
    header += field("01.01.85", 8) + field("00.00.00", 8) + field(256 * (n_chans + 1), 8) + field("24BIT", 44)
    header += field(n_records, 8) + field(1, 8) + field(n_chans, 4)
    for width, values in (
        (16, raw.ch_names), (80, ["AgAgCl"] * n_chans), (8, ["uV"] * n_chans), (8, [-pmax] * n_chans),
        (8, [pmax] * n_chans), (8, [-dmax] * n_chans), (8, [dmax] * n_chans), (80, [""] * n_chans),
        (8, [sfreq] * n_chans), (32, [""] * n_chans),
    ):  # fmt: skip
        header += b"".join(field(v, width) for v in values)
    records = digital[:, : n_records * sfreq].reshape(n_chans, n_records, sfreq).transpose(1, 0, 2)
    as_bytes = records.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
    path.write_bytes(header + as_bytes.tobytes())
    return path


def write(raw, path, fmt=None) -> Path:
    """Write ``raw`` to ``path`` in ``fmt`` (default from the extension); returns the main file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.lower()
    fmt = fmt or (
        "fif" if name.endswith((".fif", ".fif.gz")) else
        {".edf": "edf", ".bdf": "bdf", ".vhdr": "brainvision", ".set": "eeglab"}[path.suffix.lower()]
    )  # fmt: skip
    if fmt == "fif":
        raw.save(path, overwrite=True, verbose="error")
    elif fmt == "bdf":
        write_bdf(raw, path)
    else:
        mne.export.export_raw(path, raw, fmt=fmt, overwrite=True, verbose="error")
    return path


def write_bids(raw, root, subject, *, session="01", task="rest", fmt="EDF") -> Path:
    """Write ``raw`` into a BIDS dataset (events.tsv from annotations, channels.tsv bads from info['bads'])."""
    import mne_bids

    raw = raw.copy()
    raw.info["line_freq"] = 50.0
    bids_path = mne_bids.BIDSPath(subject=subject, session=session, task=task, root=root, datatype="eeg")
    mne_bids.write_raw_bids(raw, bids_path, allow_preload=True, format=fmt, overwrite=True, verbose="error")
    return Path(bids_path.fpath)


def reference_windows(raw, segments, label_names, spec=SPEC):
    """Windows cut from the in-memory raw: the oracle the readers must match.

    ``segments``: (onset, duration, label) with onsets and ends on whole samples at ``spec.sfreq``.
    Returns ``X`` (n_windows, n_chans, n_times) and ``y``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MNE: filter longer than these short signals (same in the code under test)
        data, _ = preprocess_raw(raw, spec)
    xs, ys = [], []
    for onset, duration, label in segments:
        start = int(round(onset * spec.sfreq))
        stop = data.shape[1] if duration is None else int(round((onset + duration) * spec.sfreq))
        w = make_windows(data[:, start:stop], spec.n_times)
        xs.append(w)
        ys.extend([label_names.index(label)] * len(w))
    return np.concatenate(xs), np.array(ys, dtype=np.int64)


def file_hashes(folder) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex digest)."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- damaged files ------------------------------------------------------------------------------


def write_text_as(path, text="subject,label\nS01,rest\n" * 20) -> Path:
    """A text file with an EEG extension."""
    path = Path(path)
    path.write_text(text)
    return path


def truncate(src, dst, keep_seconds: float) -> Path:
    """Copy an EDF file keeping its header and the first ``keep_seconds`` of 1-s data records."""
    raw = Path(src).read_bytes()
    header_bytes = int(raw[184:192])
    n_records = int(raw[236:244])
    record_bytes = (len(raw) - header_bytes) // n_records
    Path(dst).write_bytes(raw[: header_bytes + int(keep_seconds) * record_bytes])
    return Path(dst)


def zero_length(src, dst) -> Path:
    """Copy an EDF file's header only, with 0 data records."""
    raw = bytearray(Path(src).read_bytes())
    header_bytes = int(raw[184:192])
    raw[236:244] = b"0".ljust(8)
    Path(dst).write_bytes(bytes(raw[:header_bytes]))
    return Path(dst)


def duplicate_label(src, dst, i: int, j: int) -> Path:
    """Copy an EDF file giving channel ``j`` the label of channel ``i``."""
    raw = bytearray(Path(src).read_bytes())
    raw[256 + 16 * j : 256 + 16 * (j + 1)] = raw[256 + 16 * i : 256 + 16 * (i + 1)]
    Path(dst).write_bytes(bytes(raw))
    return Path(dst)
