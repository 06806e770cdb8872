"""Preprocessing of raw recordings into the backbone's input: channels, filters, rate, units, windows.

Every site applies the same :class:`PreprocessSpec`; it is stored in the adapter
manifest so that a trained adapter is always fed data prepared the same way.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import asdict, dataclass, fields

import numpy as np

from .._validation import check_range
from .channels import _vocab_name, to_vocab

__all__ = ["PreprocessSpec", "make_windows", "preprocess_raw"]

logger = logging.getLogger(__name__)

_REAL = (numbers.Real,)


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw EEG becomes backbone input.

    Parameters
    ----------
    sfreq : float
        Target sampling frequency in Hz (LaBraM: 200, one patch = ``sfreq`` samples).
    l_freq : float
        High-pass edge of the band-pass filter in Hz (0: no high-pass).
    h_freq : float
        Low-pass edge of the band-pass filter in Hz; below ``sfreq / 2``.
    notch_freq : float | None
        Mains frequency to notch out in Hz (50 in Europe, 60 in the Americas), or
        None for no notch.
    window_seconds : float
        Window length in seconds: a whole number of 1-s patches, 1 to 16.
    scale : float
        Factor from MNE's volts to model units (1e4: volts → 0.1 mV).
    """

    sfreq: float = 200.0
    l_freq: float = 0.1
    h_freq: float = 75.0
    notch_freq: float | None = 50.0
    window_seconds: float = 4.0
    scale: float = 1e4

    def __post_init__(self) -> None:
        def setf(name: str, value) -> None:
            object.__setattr__(self, name, float(value))

        check_range("sfreq", self.sfreq, low=1.0, kind=_REAL)
        setf("sfreq", self.sfreq)
        check_range("l_freq", self.l_freq, low=0.0, kind=_REAL)
        setf("l_freq", self.l_freq)
        check_range("h_freq", self.h_freq, low=0.0, kind=_REAL)
        setf("h_freq", self.h_freq)
        if not self.l_freq < self.h_freq:
            raise ValueError(f"l_freq must be below h_freq, got l_freq={self.l_freq} and h_freq={self.h_freq} instead.")
        if not self.h_freq < self.sfreq / 2:
            raise ValueError(
                f"h_freq must be below the Nyquist frequency of the target rate (sfreq / 2 = {self.sfreq / 2} Hz), "
                f"got h_freq={self.h_freq} instead. Lower h_freq or raise sfreq."
            )
        if self.notch_freq is not None:
            check_range("notch_freq", self.notch_freq, low=0.0, kind=_REAL)
            if self.notch_freq <= 0:
                raise ValueError(f"notch_freq must be positive or None, got {self.notch_freq!r} instead.")
            setf("notch_freq", self.notch_freq)
        check_range("window_seconds", self.window_seconds, low=1, high=16, kind=_REAL)
        if float(self.window_seconds) != int(self.window_seconds):
            raise ValueError(
                "window_seconds must be a whole number of 1-s patches (1 to 16), "
                f"got {self.window_seconds!r} instead."
            )
        setf("window_seconds", self.window_seconds)
        if not math.isclose(self.window_seconds * self.sfreq, round(self.window_seconds * self.sfreq)):
            raise ValueError(
                f"window_seconds * sfreq must be a whole number of samples, got {self.window_seconds} * {self.sfreq}."
            )
        check_range("scale", self.scale, kind=_REAL)
        if not self.scale > 0 or not math.isfinite(self.scale):
            raise ValueError(f"scale must be a positive finite number, got {self.scale!r} instead.")
        setf("scale", self.scale)

    @property
    def n_times(self) -> int:
        """Samples per window (``window_seconds * sfreq``)."""
        return int(round(self.window_seconds * self.sfreq))

    @property
    def n_patches(self) -> int:
        """1-s patches per window."""
        return int(self.window_seconds)

    def to_dict(self) -> dict:
        """The spec as a JSON-ready dict (see :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        """Rebuild a spec written by :meth:`to_dict`; missing keys take the defaults."""
        if not isinstance(d, dict):
            raise TypeError(f"A preprocessing spec must be a dict, got {type(d).__name__} instead.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"Unknown preprocessing key(s) {unknown}; allowed keys are {sorted(known)}. "
                "The manifest may come from a newer FedEEG version."
            )
        return cls(**d)


def _pick_usable(raw, source: str) -> tuple[list[str], tuple[str, ...]]:
    """Names of the EEG channels that map onto the vocabulary, and their vocabulary names."""
    types = raw.get_channel_types()
    keep: list[str] = []
    dropped: list[str] = []
    for name, kind in zip(raw.ch_names, types):
        if kind == "eeg" and _vocab_name(name) is not None:
            keep.append(name)
        else:
            dropped.append(f"{name} ({kind})")
    if dropped:
        logger.info("%s: dropping %d channel(s) that are not EEG in the channel vocabulary: %s", source, len(dropped), ", ".join(dropped))
    if not keep:
        raise ValueError(
            f"{source}: no usable EEG channels. Got {list(raw.ch_names)} with types {types}; "
            "none is an EEG channel with a 10-20/10-10 name. Rename the channels (raw.rename_channels) "
            "or set their types (raw.set_channel_types) so that EEG electrodes are recognised."
        )
    return keep, to_vocab(keep)


def preprocess_raw(raw, spec: PreprocessSpec, *, source: str = "<raw>") -> tuple[np.ndarray, tuple[str, ...]]:
    """Turn a raw recording into continuous backbone input.

    Picks the EEG channels whose names map onto the vocabulary (others, such as
    ECG or the reference pair ``A2-A1``, are dropped and logged), band-passes,
    notches (skipped when the notch frequency is at or above Nyquist), resamples
    to ``spec.sfreq`` and scales volts to model units. Works on a copy: ``raw``
    is left unchanged.

    Parameters
    ----------
    raw : mne.io.BaseRaw
        The recording, in volts (preloaded or not).
    spec : PreprocessSpec
        The preprocessing to apply.
    source : str
        What to call the recording in messages (e.g. its file name).

    Returns
    -------
    data : ndarray, shape (n_chans, n_samples)
        float32 EEG at ``spec.sfreq`` in model units (0.1 mV).
    ch_names : tuple of str
        Vocabulary names of the channels, length n_chans.

    Raises
    ------
    ValueError
        If the recording has no usable EEG channel, holds non-finite values or
        is shorter than one window.
    """
    if not isinstance(spec, PreprocessSpec):
        raise TypeError(f"spec must be a PreprocessSpec, got {type(spec).__name__} instead.")
    picks, ch_names = _pick_usable(raw, source)
    sfreq_in = float(raw.info["sfreq"])
    duration = raw.n_times / sfreq_in
    if duration < spec.window_seconds:
        raise ValueError(
            f"{source}: the recording lasts {duration:.3f} s, shorter than one window "
            f"(window_seconds={spec.window_seconds}). Use a longer recording or shorter windows."
        )
    raw = raw.copy().pick(picks)
    if not raw.preload:
        raw.load_data(verbose="error")
    data = raw.get_data()
    if not np.all(np.isfinite(data)):
        bad = [ch for ch, row in zip(raw.ch_names, data) if not np.all(np.isfinite(row))]
        raise ValueError(
            f"{source}: non-finite values (NaN or inf) in channel(s) {bad}. "
            "Repair or drop those channels (or segments) before preprocessing."
        )

    nyquist = sfreq_in / 2
    h_freq = spec.h_freq
    if h_freq >= nyquist:
        logger.debug("%s: low-pass at %s Hz skipped, at or above Nyquist (%s Hz).", source, h_freq, nyquist)
        h_freq = None
    l_freq = spec.l_freq if spec.l_freq > 0 else None
    if l_freq is not None or h_freq is not None:
        raw.filter(l_freq, h_freq, verbose="warning")
    if spec.notch_freq is not None:
        if spec.notch_freq >= nyquist:
            logger.debug("%s: notch at %s Hz skipped, at or above Nyquist (%s Hz).", source, spec.notch_freq, nyquist)
        else:
            raw.notch_filter(spec.notch_freq, verbose="warning")
    if not math.isclose(sfreq_in, spec.sfreq):
        raw.resample(spec.sfreq, verbose="warning")
    out = (raw.get_data() * spec.scale).astype(np.float32)
    if out.shape[1] < spec.n_times:
        raise ValueError(
            f"{source}: {out.shape[1]} samples after resampling to {spec.sfreq} Hz, "
            f"fewer than one window ({spec.n_times}). Use a longer recording or shorter windows."
        )
    logger.debug("%s: %d channels, %d samples at %s Hz.", source, out.shape[0], out.shape[1], spec.sfreq)
    return out, ch_names


def make_windows(data: np.ndarray, n_times: int) -> np.ndarray:
    """Cut continuous data into non-overlapping windows, dropping the incomplete tail.

    Parameters
    ----------
    data : ndarray, shape (n_chans, n_samples)
        Continuous data.
    n_times : int
        Samples per window.

    Returns
    -------
    windows : ndarray, shape (n_windows, n_chans, n_times)
        ``n_windows = n_samples // n_times`` (0 if the data is shorter than
        one window). A copy, same dtype as ``data``.
    """
    data = np.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"data must have shape (n_chans, n_samples), got shape {data.shape} instead.")
    check_range("n_times", n_times, low=1, kind=(int, np.integer))
    n_chans, n_samples = data.shape
    n_windows = n_samples // n_times
    windows = data[:, : n_windows * n_times].reshape(n_chans, n_windows, n_times)
    return np.ascontiguousarray(windows.transpose(1, 0, 2))
