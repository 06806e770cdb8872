"""Preprocessing of raw recordings into the backbone's input: channels, filters, rate, units, windows.

Every site applies the same :class:`PreprocessSpec`; it is stored in the adapter
manifest so that a trained adapter is always fed data prepared the same way.
Harmonisation (a fixed channel list, interpolation of missing or bad channels,
re-referencing) makes recordings of different montages and rates give arrays
of the same shape and channel order; :func:`reject_windows` drops windows with
artifacts.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import warnings
from dataclasses import asdict, dataclass, fields
from fractions import Fraction

import numpy as np

from .._validation import check_option, check_range
from .channels import _vocab_name, to_vocab

__all__ = ["HarmoniseReport", "PreprocessSpec", "make_windows", "preprocess_raw", "reject_windows"]

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
    channels : tuple of str | None
        The channels every recording is brought to, in this order (any
        spelling that maps onto the vocabulary; stored as vocabulary names, so
        ``"T7"`` becomes ``"T3"``, see :func:`~fedeeg.data.channels.standardize_channel_name`).
        Channels a recording lacks (or marks bad) are interpolated, up to
        ``max_interpolated``. None (default) keeps every EEG channel of the
        recording that maps onto the vocabulary, in recording order.
    max_interpolated : int
        How many channels of one recording may be interpolated (missing from
        ``channels`` or marked bad) before the recording is refused. Default 0:
        interpolated channels are not measurements, so a federation opts in
        explicitly (the value is stored with the adapter).
    reference : {None, "average"}
        None (default) keeps the recording's reference; ``"average"``
        subtracts the mean over the output channels (after interpolation).
    reject_peak_to_peak : float | None
        Artifact threshold in µV: :func:`reject_windows` drops a window when
        any channel's peak-to-peak amplitude (after filtering and
        re-referencing) exceeds it. None (default): no rejection.
    resample_method : {"fft", "polyphase"}
        ``"fft"`` (default): MNE's ``raw.resample``. Its padding shifts the
        output in time by up to half an output sample depending on the rate
        and length (2.5 ms for 500 Hz → 200 Hz on a 40-s recording, 0 for
        256 Hz), so sites recorded at different rates are not aligned.
        ``"polyphase"``: ``scipy.signal.resample_poly`` with the exact ratio of
        the two rates; output sample 0 is input sample 0 at every rate. Prefer
        it when sites record at different rates.
    """

    sfreq: float = 200.0
    l_freq: float = 0.1
    h_freq: float = 75.0
    notch_freq: float | None = 50.0
    window_seconds: float = 4.0
    scale: float = 1e4
    channels: tuple[str, ...] | None = None
    max_interpolated: int = 0
    reference: str | None = None
    reject_peak_to_peak: float | None = None
    resample_method: str = "fft"

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
        if self.channels is not None:
            if isinstance(self.channels, str) or not hasattr(self.channels, "__iter__"):
                raise TypeError(
                    "channels must be a list or tuple of channel names (or None), "
                    f"got {type(self.channels).__name__} ({self.channels!r}) instead."
                )
            try:
                names = to_vocab(self.channels)
            except ValueError as err:
                raise ValueError(
                    f"Invalid value for the 'channels' parameter ({list(self.channels)!r}): {err} "
                    "The output channels must be names of the LaBraM vocabulary (fedeeg.data.LABRAM_VOCAB)."
                ) from None
            object.__setattr__(self, "channels", names)
        check_range("max_interpolated", self.max_interpolated, low=0, kind=(int, np.integer))
        object.__setattr__(self, "max_interpolated", int(self.max_interpolated))
        check_option("reference", self.reference, (None, "average"))
        if self.reject_peak_to_peak is not None:
            check_range("reject_peak_to_peak", self.reject_peak_to_peak, kind=_REAL)
            if not self.reject_peak_to_peak > 0 or not math.isfinite(self.reject_peak_to_peak):
                raise ValueError(
                    "reject_peak_to_peak must be a positive finite threshold in µV (e.g. 150.0) or None, "
                    f"got {self.reject_peak_to_peak!r} instead."
                )
            setf("reject_peak_to_peak", self.reject_peak_to_peak)
        check_option("resample_method", self.resample_method, ("fft", "polyphase"))

    @property
    def n_times(self) -> int:
        """Samples per window (``window_seconds * sfreq``)."""
        return int(round(self.window_seconds * self.sfreq))

    @property
    def n_patches(self) -> int:
        """1-s patches per window."""
        return int(self.window_seconds)

    def to_dict(self) -> dict:
        """The spec as a JSON-ready dict (see :meth:`from_dict`); ``channels`` is a list or None."""
        d = asdict(self)
        if d["channels"] is not None:
            d["channels"] = list(d["channels"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        """Rebuild a spec written by :meth:`to_dict`; missing keys take the defaults.

        A manifest written before a field existed therefore loads with that
        field's default, which reproduces the behaviour of the time.
        """
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


@dataclass(frozen=True)
class HarmoniseReport:
    """What :func:`preprocess_raw` did to one recording's channels.

    Parameters
    ----------
    source : str
        The recording, as named in messages.
    found : tuple of str
        Output channels (vocabulary names) that the recording holds, in output order.
    missing : tuple of str
        Output channels that the recording lacks (only when ``spec.channels`` is set).
    interpolated : tuple of str
        Output channels interpolated: the missing ones and those marked bad, in output order.
    dropped : tuple of str
        Recorded channels not in the output (as recorded): non-EEG channels,
        names outside the vocabulary, channels not in ``spec.channels``, bad
        channels that are not output channels.
    sfreq_in : float
        Sampling frequency of the recording in Hz.
    duration_s : float
        Length of the recording in seconds.
    """

    source: str
    found: tuple[str, ...]
    missing: tuple[str, ...]
    interpolated: tuple[str, ...]
    dropped: tuple[str, ...]
    sfreq_in: float
    duration_s: float

    def to_dict(self) -> dict:
        """The report as a JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


#: Head-frame origin of the spherical-spline interpolation (m). The standard
#: montage's electrodes lie on a sphere about this point; fitting a sphere to a
#: few electrodes instead ('auto') depends on the montage and is less stable.
_INTERPOLATION_ORIGIN = (0.0, 0.0, 0.04)


@functools.lru_cache(maxsize=1)
def _standard_montage():
    """MNE's 10-05 template montage (``standard_1005``, renamed ``colin27_1005`` in MNE 1.13)."""
    import mne

    name = "colin27_1005" if "colin27_1005" in mne.channels.get_builtin_montages() else "standard_1005"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return mne.channels.make_standard_montage(name)


@functools.lru_cache(maxsize=1)
def _montage_names() -> frozenset[str]:
    """Upper-cased channel names of the template montage."""
    return frozenset(name.upper() for name in _standard_montage().ch_names)


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


def _bad_vocab_names(bads, recorded: tuple[str, ...], source: str) -> set[str]:
    """Vocabulary names of the recorded channels listed in ``bads``; others are logged and ignored."""
    if isinstance(bads, str):
        bads = [bads]
    out: set[str] = set()
    unknown: list[str] = []
    for name in bads:
        vocab = _vocab_name(name) if isinstance(name, str) else None
        if vocab is None or vocab not in recorded:
            unknown.append(repr(name))
        else:
            out.add(vocab)
    if unknown:
        logger.warning(
            "%s: ignoring bad channel(s) %s: not among the recording's usable EEG channels %s.",
            source, ", ".join(unknown), list(recorded),
        )  # fmt: skip
    return out


def _interpolate(data: np.ndarray, names: tuple[str, ...], goods: list[str], targets: list[str], sfreq: float, source: str) -> np.ndarray:
    """Spherical-spline interpolation of ``targets`` from the ``goods`` rows of ``data``.

    Both sets are placed at their template-montage positions (standard_1005,
    matched case-insensitively); returns shape (len(targets), n_samples).
    """
    import mne

    positioned = _montage_names()
    no_position = [t for t in targets if t.upper() not in positioned]
    if no_position:
        raise ValueError(
            f"{source}: cannot interpolate channel(s) {no_position}: they have no position in the standard 10-05 "
            "montage (standard_1005). Drop them from spec.channels or record them at this site."
        )
    sources = [g for g in goods if g.upper() in positioned]
    if len(sources) < 3:
        raise ValueError(
            f"{source}: interpolating {targets} needs at least 3 good channels with standard positions, "
            f"got {sources}. Record more of spec.channels at this site, or mark fewer channels bad."
        )
    index = {name: i for i, name in enumerate(names)}
    work = np.zeros((len(sources) + len(targets), data.shape[1]))
    work[: len(sources)] = data[[index[g] for g in sources]]
    info = mne.create_info(sources + targets, sfreq, "eeg")
    tmp = mne.io.RawArray(work, info, verbose="error")
    tmp.set_montage(_standard_montage(), match_case=False, on_missing="raise", verbose="error")
    tmp.info["bads"] = list(targets)
    tmp.interpolate_bads(reset_bads=True, origin=_INTERPOLATION_ORIGIN, verbose="error")
    logger.info("%s: interpolated %s from %d channel(s).", source, ", ".join(targets), len(sources))
    return tmp.get_data(picks=list(targets))


def _resample_polyphase(data: np.ndarray, sfreq_in: float, sfreq_out: float, source: str) -> np.ndarray:
    """Resample ``data`` (n_chans, n_samples) with the rational ratio of the rates, sample 0 aligned.

    The ratio is exact for rational rates (200/256 = 25/32); otherwise the
    closest fraction with a denominator up to 1000 is used (a relative rate
    error below 1e-6, logged). The length is ``round(n_samples * ratio)``, as MNE's.
    """
    from scipy.signal import resample_poly

    exact = Fraction(sfreq_out).limit_denominator(10**6) / Fraction(sfreq_in).limit_denominator(10**6)
    ratio = exact if max(exact.numerator, exact.denominator) <= 1000 else exact.limit_denominator(1000)
    if ratio != exact:
        logger.debug(
            "%s: resampling %s Hz -> %s Hz with the ratio %s (rate error %.2g).",
            source, sfreq_in, sfreq_out, ratio, float(ratio / exact) - 1,
        )  # fmt: skip
    n_out = max(int(round(data.shape[1] * sfreq_out / sfreq_in)), 1)
    out = resample_poly(data, ratio.numerator, ratio.denominator, axis=-1, padtype="reflect")
    if out.shape[1] < n_out:  # only for an approximated ratio
        out = np.pad(out, ((0, 0), (0, n_out - out.shape[1])), mode="edge")
    return out[:, :n_out]


def preprocess_raw(
    raw,
    spec: PreprocessSpec,
    *,
    source: str = "<raw>",
    bads=(),
    return_report: bool = False,
):
    """Turn a raw recording into continuous backbone input.

    Picks the EEG channels whose names map onto the vocabulary (others, such as
    ECG or the reference pair ``A2-A1``, are dropped and logged). When
    ``spec.channels`` is set, brings the recording to exactly those channels in
    that order: a channel the recording lacks, or one listed in ``bads``, is
    interpolated with spherical splines from the good channels at their
    template positions (standard_1005), at most ``spec.max_interpolated`` of
    them. Without ``spec.channels``, channels listed in ``bads`` are
    interpolated the same way. Then re-references (``spec.reference``),
    band-passes, notches (both skipped at or above Nyquist), resamples to
    ``spec.sfreq`` (``spec.resample_method``) and scales volts to model units.
    Works on a copy: ``raw`` is left unchanged.

    Parameters
    ----------
    raw : mne.io.BaseRaw
        The recording, in volts (preloaded or not).
    spec : PreprocessSpec
        The preprocessing to apply.
    source : str
        What to call the recording in messages (e.g. its file name).
    bads : list of str
        Channels to treat as bad (any spelling that maps onto the vocabulary):
        interpolated if they are output channels, otherwise dropped. Names the
        recording does not hold are ignored with a warning.
    return_report : bool
        Also return a :class:`HarmoniseReport`.

    Returns
    -------
    data : ndarray, shape (n_chans, n_samples)
        float32 EEG at ``spec.sfreq`` in model units (0.1 mV).
    ch_names : tuple of str
        Vocabulary names of the channels, length n_chans (``spec.channels``
        when set).
    report : HarmoniseReport
        Only with ``return_report=True``.

    Raises
    ------
    ValueError
        If the recording has no usable EEG channel, holds non-finite values, is
        shorter than one window, or needs more channels interpolated than
        ``spec.max_interpolated`` (the error lists them).
    """
    if not isinstance(spec, PreprocessSpec):
        raise TypeError(f"spec must be a PreprocessSpec, got {type(spec).__name__} instead.")
    recorded = list(raw.ch_names)
    picks, ch_names = _pick_usable(raw, source)
    vocab_of = dict(zip(picks, ch_names))
    sfreq_in = float(raw.info["sfreq"])
    duration = raw.n_times / sfreq_in
    if duration < spec.window_seconds:
        raise ValueError(
            f"{source}: the recording lasts {duration:.3f} s, shorter than one window "
            f"(window_seconds={spec.window_seconds}). Use a longer recording or shorter windows."
        )
    bad = _bad_vocab_names(bads, ch_names, source)
    targets = spec.channels if spec.channels is not None else ch_names
    present = set(ch_names)
    missing = tuple(t for t in targets if t not in present)
    to_interpolate = [t for t in targets if t in missing or t in bad]
    if len(to_interpolate) > spec.max_interpolated:
        bad_part = [t for t in to_interpolate if t not in missing]
        raise ValueError(
            f"{source}: {len(to_interpolate)} of the {len(targets)} output channel(s) would have to be interpolated "
            f"(missing from the recording: {list(missing)}; marked bad: {bad_part}), but max_interpolated="
            f"{spec.max_interpolated}. The recording's EEG channels are {list(ch_names)}. Raise max_interpolated, "
            "choose spec.channels that this site records, or leave this recording out."
        )

    raw = raw.copy().pick(picks)
    if not raw.preload:
        raw.load_data(verbose="error")
    data = raw.get_data()
    if not np.all(np.isfinite(data)):
        nonfinite = [ch for ch, row in zip(raw.ch_names, data) if not np.all(np.isfinite(row))]
        raise ValueError(
            f"{source}: non-finite values (NaN or inf) in channel(s) {nonfinite}. "
            "Repair or drop those channels (or segments) before preprocessing."
        )

    if tuple(targets) != ch_names or to_interpolate or spec.reference is not None:
        import mne

        index = {name: i for i, name in enumerate(ch_names)}
        out = np.empty((len(targets), data.shape[1]))
        if to_interpolate:
            goods = [c for c in ch_names if c not in bad]
            filled = _interpolate(data, ch_names, goods, to_interpolate, sfreq_in, source)
            for row, name in zip(filled, to_interpolate):
                out[targets.index(name)] = row
        for i, name in enumerate(targets):
            if name not in to_interpolate:
                out[i] = data[index[name]]
        if spec.reference == "average":
            out -= out.mean(axis=0, keepdims=True)
        raw = mne.io.RawArray(out, mne.create_info(list(targets), sfreq_in, "eeg"), verbose="error")
    ch_names = tuple(targets)

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
    if math.isclose(sfreq_in, spec.sfreq):
        out = raw.get_data()
    elif spec.resample_method == "fft":
        out = raw.resample(spec.sfreq, verbose="warning").get_data()
    else:
        out = _resample_polyphase(raw.get_data(), sfreq_in, spec.sfreq, source)
    out = (out * spec.scale).astype(np.float32)
    if out.shape[1] < spec.n_times:
        raise ValueError(
            f"{source}: {out.shape[1]} samples after resampling to {spec.sfreq} Hz, "
            f"fewer than one window ({spec.n_times}). Use a longer recording or shorter windows."
        )
    logger.debug("%s: %d channels, %d samples at %s Hz.", source, out.shape[0], out.shape[1], spec.sfreq)
    if not return_report:
        return out, ch_names
    report = HarmoniseReport(
        source=source,
        found=tuple(t for t in ch_names if t in present),
        missing=missing,
        interpolated=tuple(to_interpolate),
        dropped=tuple(name for name in recorded if vocab_of.get(name) not in ch_names),
        sfreq_in=sfreq_in,
        duration_s=duration,
    )
    return out, ch_names, report


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


def reject_windows(windows: np.ndarray, spec: PreprocessSpec, *, source: str = "<windows>") -> tuple[np.ndarray, np.ndarray]:
    """Drop windows whose peak-to-peak amplitude exceeds ``spec.reject_peak_to_peak`` in any channel.

    The threshold is in µV; windows are in model units, so it is compared as
    ``reject_peak_to_peak * 1e-6 * spec.scale``. Windows holding non-finite
    values are dropped too. The count is logged; use the mask to count the
    rejected windows per label (``np.bincount(y[~mask])``).

    Parameters
    ----------
    windows : ndarray, shape (n_windows, n_chans, n_times)
        Windows in model units (as from :func:`make_windows`).
    spec : PreprocessSpec
        Gives the threshold and the scale; with ``reject_peak_to_peak=None``
        every window is kept.
    source : str
        What to call the windows in the log (e.g. a file or subject).

    Returns
    -------
    kept : ndarray, shape (n_kept, n_chans, n_times)
        The windows kept (``windows[mask]``, a copy).
    mask : ndarray of bool, shape (n_windows,)
        True for a kept window, False for a rejected one.
    """
    if not isinstance(spec, PreprocessSpec):
        raise TypeError(f"spec must be a PreprocessSpec, got {type(spec).__name__} instead.")
    windows = np.asarray(windows)
    if windows.ndim != 3:
        raise ValueError(f"windows must have shape (n_windows, n_chans, n_times), got shape {windows.shape} instead.")
    if spec.reject_peak_to_peak is None:
        return windows.copy(), np.ones(len(windows), dtype=bool)
    threshold = spec.reject_peak_to_peak * 1e-6 * spec.scale
    if windows.shape[0] == 0 or windows.shape[2] == 0:
        return windows.copy(), np.ones(len(windows), dtype=bool)
    ptp = windows.max(axis=-1) - windows.min(axis=-1)  # (n_windows, n_chans); NaN where non-finite
    mask = np.all(ptp <= threshold, axis=1)
    n_rejected = int((~mask).sum())
    if n_rejected:
        logger.info(
            "%s: rejected %d of %d window(s) with a peak-to-peak amplitude above %g µV in at least one channel.",
            source, n_rejected, len(mask), spec.reject_peak_to_peak,
        )  # fmt: skip
    else:
        logger.debug("%s: no window above %g µV peak-to-peak (%d kept).", source, spec.reject_peak_to_peak, len(mask))
    return windows[mask], mask
