"""Synthetic multi-site EEG for tests, demos and smoke runs (no real data needed).

The signal model mimics the eegmat task (rest vs mental arithmetic) and the
differences between hospitals:

* pink (1/f) background per channel;
* class-dependent rhythms: at rest a strong posterior alpha (~10 Hz); during
  arithmetic less alpha, more frontal theta (~6 Hz) and more beta (~20 Hz);
* subjects differ in alpha frequency and amplitude, in baseline theta/beta, and
  in how strongly they react to the task;
* windows differ by random fluctuations of every rhythm;
* sites differ by a global gain (amplifier), a noise floor, per-channel gains,
  and one or two bad (noisy) channels.

Everything is drawn from :class:`numpy.random.Generator` seeded from ``seed``
(site ``i`` uses ``[seed, i]``, so a site's data does not depend on ``n_sites``).

Research scenarios add stronger, configurable differences between sites
(:class:`SiteHeterogeneity`): label skew (Dirichlet alpha), montage
differences (each site lacks some channels), different native sampling rates
(resampled to the common rate), amplitude and noise shifts, and skewed site
sizes. Each knob draws from its own generator (``[seed, i, 7919, k]``), so
turning one on never changes another's draws, and with every knob off the data
are exactly those without heterogeneity. :func:`make_synthetic_site` builds
one site without building the others (simulated clients load only their own).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .._validation import check_range
from .base import Site, WindowSet
from .channels import EEGMAT_CHANNELS, to_vocab

__all__ = ["SiteHeterogeneity", "make_synthetic_raw", "make_synthetic_site", "make_synthetic_sites"]

LABEL_NAMES = ("rest", "arithmetic")

# Anterior (+1) to posterior (-1) position of the 10-20/10-10 name prefixes.
_PREFIX_Y = {
    "FP": 1.0, "AF": 0.8, "F": 0.55, "FT": 0.3, "FC": 0.3, "FTT": 0.2, "CFC": 0.15,
    "T": 0.0, "C": 0.0, "CCP": -0.15, "TTP": -0.2, "CP": -0.3, "TP": -0.3, "TPP": -0.45,
    "P": -0.65, "PO": -0.85, "O": -1.0, "I": -1.1, "CB": -1.1, "M": -0.3, "A": -0.3,
}  # fmt: skip
_SPECIAL_Y = {"T5": -0.65, "T6": -0.65, "T1": 0.2, "T2": 0.2}

# Band centres (Hz) and widths (Hz, Gaussian sd) of the rhythms.
_THETA, _BETA = (6.0, 1.0), (20.0, 3.0)

# Variances (model units², 1 unit = 0.1 mV) at a site gain of 1.
_VAR_BACKGROUND = 0.12**2
_VAR_ALPHA_REST = 0.20**2
_VAR_THETA_REST = 0.05**2
_VAR_BETA_REST = 0.045**2

# Class-1 / class-0 power ratios (log-space means) and their spread across subjects.
# Tuned so that logistic regression on log band powers (theta/alpha/beta per
# channel), subjects held out, reaches about 0.9 balanced accuracy.
_LOG_ALPHA_EFFECT, _LOG_THETA_EFFECT, _LOG_BETA_EFFECT = np.log(0.3), np.log(1.8), np.log(1.5)
_SUBJECT_EFFECT_SD = 0.2
_SUBJECT_LEVEL_SD = 0.3  # subject baseline power (log)
_WINDOW_SD = 0.3  # window-to-window fluctuation of each rhythm (log)


def _anterior_y(name: str) -> float:
    """Rough anterior-posterior coordinate of a vocabulary channel, in [-1.1, 1]."""
    if "-" in name:  # bipolar pair: midpoint
        return float(np.mean([_anterior_y(part) for part in name.split("-")]))
    name = name.upper()
    if name in _SPECIAL_Y:
        return _SPECIAL_Y[name]
    match = re.match(r"[A-Z]+?(?=\d|Z|H|$)", name)
    prefix = match.group(0) if match else name
    while prefix and prefix not in _PREFIX_Y:
        prefix = prefix[:-1]
    return _PREFIX_Y.get(prefix, 0.0)


def _topographies(ch_names) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel weights of alpha (posterior), theta (frontal) and beta (broad), shape (n_chans,) each."""
    y = np.array([_anterior_y(n) for n in ch_names])
    post = np.clip((1.0 - y) / 2.0, 0.0, 1.0)
    front = np.clip((1.0 + y) / 2.0, 0.0, 1.0)
    alpha = 0.15 + 0.85 * post**2
    theta = 0.25 + 0.75 * front**2
    beta = 0.6 + 0.4 * (1.0 - np.abs(y))
    return alpha, theta, beta


def _unit_variance(shape: np.ndarray, n_times: int) -> np.ndarray:
    """Scale a power shape over rfft bins so that ``irfft(norm='ortho')`` of noise with it has unit variance."""
    total = 2.0 * shape[..., 1:].sum(axis=-1, keepdims=True)
    return shape * (n_times / np.maximum(total, 1e-30))


def _pink_shape(freqs: np.ndarray, n_times: int) -> np.ndarray:
    shape = np.where(freqs > 0, 1.0 / np.maximum(freqs, 0.5), 0.0)
    shape[freqs < 0.3] = 0.0
    return _unit_variance(shape, n_times)


def _bump(freqs: np.ndarray, centre, width, n_times: int) -> np.ndarray:
    centre = np.asarray(centre, dtype=float)[..., None]
    width = np.asarray(width, dtype=float)[..., None]
    shape = np.exp(-0.5 * ((freqs - centre) / width) ** 2)
    return _unit_variance(shape, n_times)


def _noise_with_psd(rng: np.random.Generator, psd: np.ndarray, n_times: int) -> np.ndarray:
    """Gaussian noise with the given power per rfft bin, shape psd.shape[:-1] + (n_times,)."""
    amp = np.sqrt(np.asarray(psd, dtype=np.float32) * np.float32(0.5))
    amp[..., 0] = 0.0
    z = np.empty(psd.shape, dtype=np.complex64)
    z.real = rng.standard_normal(psd.shape, dtype=np.float32) * amp
    z.imag = rng.standard_normal(psd.shape, dtype=np.float32) * amp
    return np.fft.irfft(z, n=n_times, axis=-1, norm="ortho")


def _make_site(
    site_index: int,
    seed: int,
    *,
    subjects_per_site: int,
    windows_per_class: int,
    n_times: int,
    sfreq: float,
    ch_names: tuple[str, ...],
    extra_gain: float = 1.0,
    extra_noise: float = 0.0,
) -> Site:
    rng = np.random.default_rng([seed, site_index])
    n_chans = len(ch_names)
    n_sub = subjects_per_site
    n_per_sub = 2 * windows_per_class
    n_win = n_sub * n_per_sub
    freqs = np.fft.rfftfreq(n_times, d=1.0 / sfreq)
    topo_alpha, topo_theta, topo_beta = _topographies(ch_names)

    # Site: amplifier gain, noise floor, per-channel gains, bad channels.
    gain = rng.uniform(0.6, 1.6) * extra_gain
    noise_floor = rng.uniform(0.01, 0.05) + extra_noise
    chan_gain = np.exp(rng.normal(0.0, 0.1, n_chans))
    n_bad = int(rng.integers(1, 3)) if n_chans > 2 else 0
    bad = np.sort(rng.choice(n_chans, size=n_bad, replace=False)) if n_bad else np.array([], dtype=int)
    bad_noise = np.zeros(n_chans)
    bad_noise[bad] = rng.uniform(0.15, 0.35, n_bad)
    chan_gain[bad] *= rng.uniform(1.3, 2.0, n_bad)

    # Subjects: alpha frequency, baseline powers and task reactivity.
    alpha_freq = np.clip(rng.normal(10.0, 0.8, n_sub), 8.0, 12.5)
    alpha_width = rng.uniform(0.7, 1.3, n_sub)
    level = np.exp(rng.normal(0.0, _SUBJECT_LEVEL_SD, (n_sub, 4)))  # background, alpha, theta, beta
    effect = np.exp(
        np.array([_LOG_ALPHA_EFFECT, _LOG_THETA_EFFECT, _LOG_BETA_EFFECT])
        + rng.normal(0.0, _SUBJECT_EFFECT_SD, (n_sub, 3))
    )

    sub_idx = np.repeat(np.arange(n_sub), n_per_sub)
    y = np.tile(np.repeat(np.arange(2), windows_per_class), n_sub)
    task = y.astype(bool)

    # Window-level power of each rhythm: subject level x class effect x fluctuation.
    def band_power(var_rest: float, col: int, eff_col: int | None) -> np.ndarray:
        p = var_rest * level[sub_idx, col] * np.exp(rng.normal(0.0, _WINDOW_SD, n_win))
        if eff_col is not None:
            p = np.where(task, p * effect[sub_idx, eff_col], p)
        return p

    p_bg = _VAR_BACKGROUND * level[sub_idx, 0]
    p_alpha = band_power(_VAR_ALPHA_REST, 1, 0)
    p_theta = band_power(_VAR_THETA_REST, 2, 1)
    p_beta = band_power(_VAR_BETA_REST, 3, 2)
    chan_jitter = np.exp(rng.normal(0.0, 0.15, (n_win, n_chans)))

    pink = _pink_shape(freqs, n_times)
    white = _unit_variance(np.ones_like(freqs), n_times)
    alpha_shapes = _bump(freqs, alpha_freq, alpha_width, n_times)  # (n_sub, n_freqs)
    theta_shape = _bump(freqs, _THETA[0], _THETA[1], n_times)
    beta_shape = _bump(freqs, _BETA[0], _BETA[1], n_times)

    f32 = np.float32
    psd = (
        (p_bg[:, None, None] * pink).astype(f32)
        + (noise_floor**2 + bad_noise**2).astype(f32)[None, :, None] * white.astype(f32)
        + (p_alpha[:, None] * topo_alpha * chan_jitter).astype(f32)[:, :, None] * alpha_shapes.astype(f32)[sub_idx][:, None, :]
        + (p_theta[:, None] * topo_theta * chan_jitter).astype(f32)[:, :, None] * theta_shape.astype(f32)
        + (p_beta[:, None] * topo_beta).astype(f32)[:, :, None] * beta_shape.astype(f32)
    )
    X = _noise_with_psd(rng, psd, n_times)  # (n_win, n_chans, n_times)
    X *= (gain * chan_gain).astype(f32)[None, :, None]

    subject = np.array([f"site{site_index}-sub{s:02d}" for s in range(n_sub)])[sub_idx]
    windows = WindowSet(X.astype(np.float32), y, subject, ch_names, sfreq, LABEL_NAMES)
    info = {
        "n_subjects": n_sub,
        "n_windows": n_win,
        "gain": round(float(gain), 4),
        "noise_floor": round(float(noise_floor), 4),
        "bad_channels": ",".join(ch_names[i] for i in bad),
    }
    return Site(f"site-{site_index}", windows, info)


@dataclass(frozen=True)
class SiteHeterogeneity:
    """How much synthetic sites differ beyond the default site effects.

    Every knob's default is "off"; with all off, sites are exactly those of
    :func:`make_synthetic_sites` without heterogeneity.

    Parameters
    ----------
    label_alpha : float
        Label skew: each site's class proportions are drawn from a symmetric
        Dirichlet with this alpha (small = strong skew, e.g. 0.3; large = near
        balanced); the rarer class keeps ``proportion / max_proportion`` of its
        windows per subject, at least one. 0 = balanced classes (off).
    montage_drop : float
        Fraction of the channels each site lacks (a random subset per site, at
        least 2 channels kept), in [0, 0.9]. Sites then hold different
        channels, which LaBraM backbones take; fixed-input baselines and
        pooled (centralized) training need a common channel list. 0 = off.
    site_sfreqs : tuple of float
        Native sampling rates (Hz) the sites record at, site ``i`` at
        ``site_sfreqs[i % len(site_sfreqs)]``; the signal is generated at that
        rate (nothing above its Nyquist frequency) and resampled to the common
        ``sfreq`` (polyphase, anti-aliased). Empty = every site at ``sfreq``.
    amplitude_shift : float
        Standard deviation of an extra log gain per site (amplifier
        calibration), >= 0. 0 = off.
    noise_shift : float
        Largest extra white-noise level per site (model units, 0.1 mV; drawn
        uniformly in [0, noise_shift]), >= 0. 0 = off.
    size_skew : float
        Site size skew: a site's subject count is ``subjects_per_site`` times a
        log-normal factor with this log standard deviation (mean 1), at least
        2 subjects. 0 = every site the same size.
    """

    label_alpha: float = 0.0
    montage_drop: float = 0.0
    site_sfreqs: tuple[float, ...] = ()
    amplitude_shift: float = 0.0
    noise_shift: float = 0.0
    size_skew: float = 0.0

    def __post_init__(self) -> None:
        check_range("label_alpha", self.label_alpha, low=0.0, kind=(int, float))
        check_range("montage_drop", self.montage_drop, low=0.0, high=0.9, kind=(int, float))
        check_range("amplitude_shift", self.amplitude_shift, low=0.0, high=3.0, kind=(int, float))
        check_range("noise_shift", self.noise_shift, low=0.0, high=5.0, kind=(int, float))
        check_range("size_skew", self.size_skew, low=0.0, high=3.0, kind=(int, float))
        rates = self.site_sfreqs
        if isinstance(rates, str):
            rates = tuple(float(r) for r in rates.replace(" ", "").split(",") if r)
        if isinstance(rates, (int, float)):
            rates = (rates,)
        rates = tuple(rates)
        for r in rates:
            check_range("site_sfreqs", r, low=20.0, high=10_000.0, kind=(int, float, np.integer, np.floating))
        object.__setattr__(self, "site_sfreqs", tuple(float(r) for r in rates))

    @property
    def active(self) -> bool:
        """Whether any knob is on."""
        return self != SiteHeterogeneity()

    def to_dict(self) -> dict:
        return {"label_alpha": self.label_alpha, "montage_drop": self.montage_drop,
                "site_sfreqs": list(self.site_sfreqs), "amplitude_shift": self.amplitude_shift,
                "noise_shift": self.noise_shift, "size_skew": self.size_skew}


#: Offsets of the knobs' own generators (``[seed, site, 7919, k]``).
_KNOB = {"size": 0, "gain": 1, "noise": 2, "label": 3, "montage": 4}


def _knob_rng(seed: int, site_index: int, knob: str) -> np.random.Generator:
    return np.random.default_rng([seed, site_index, 7919, _KNOB[knob]])


def _resample(X: np.ndarray, native: float, target: float, n_times: int) -> np.ndarray:
    """Polyphase resampling of ``X`` (..., n_native) to ``target`` Hz, cropped/padded to ``n_times``."""
    from scipy.signal import resample_poly

    ratio = Fraction(target / native).limit_denominator(1000)
    out = resample_poly(X, ratio.numerator, ratio.denominator, axis=-1).astype(np.float32)
    if out.shape[-1] >= n_times:
        return out[..., :n_times]
    pad = [(0, 0)] * (out.ndim - 1) + [(0, n_times - out.shape[-1])]
    return np.pad(out, pad, mode="edge")


def make_synthetic_site(
    site_index: int,
    *,
    subjects_per_site: int = 6,
    windows_per_class: int = 20,
    window_seconds: float = 4.0,
    sfreq: float = 200.0,
    ch_names=EEGMAT_CHANNELS,
    seed: int = 0,
    heterogeneity: SiteHeterogeneity | None = None,
) -> Site:
    """One synthetic site, built without the others.

    ``make_synthetic_site(i, ...)`` equals ``make_synthetic_sites(n, ...)[i]``
    for any ``n > i`` (same seed and settings).

    Parameters
    ----------
    site_index : int
        The site (``"site-{site_index}"``), >= 0.
    subjects_per_site, windows_per_class, window_seconds, sfreq, ch_names, seed
        As in :func:`make_synthetic_sites`.
    heterogeneity : SiteHeterogeneity | None
        Extra differences between sites; None = none.

    Returns
    -------
    site : Site
        ``windows.X`` has shape ``(n_windows, n_chans, n_times)`` with
        ``n_times = round(window_seconds * sfreq)``; fewer channels under
        ``montage_drop`` and fewer windows under ``label_alpha``. ``info`` adds
        the active knobs' draws (``native_sfreq``, ``class_proportions``, …).
    """
    check_range("site_index", site_index, low=0, kind=(int, np.integer))
    check_range("subjects_per_site", subjects_per_site, low=1, kind=(int, np.integer))
    check_range("windows_per_class", windows_per_class, low=1, kind=(int, np.integer))
    check_range("window_seconds", window_seconds, low=0.0, kind=(int, float))
    check_range("sfreq", sfreq, low=1.0, kind=(int, float))
    check_range("seed", seed, low=0, kind=(int, np.integer))
    if heterogeneity is not None and not isinstance(heterogeneity, SiteHeterogeneity):
        raise TypeError(f"'heterogeneity' must be a SiteHeterogeneity or None, got {type(heterogeneity).__name__}.")
    het = heterogeneity or SiteHeterogeneity()
    n_times = int(round(window_seconds * sfreq))
    if n_times < 2:
        raise ValueError(f"window_seconds * sfreq must give at least 2 samples, got {window_seconds} * {sfreq}.")
    ch_names = to_vocab(ch_names)
    i, seed = int(site_index), int(seed)
    n_sub = int(subjects_per_site)
    info: dict = {}
    if het.size_skew > 0:
        s = het.size_skew
        factor = float(np.exp(_knob_rng(seed, i, "size").normal(-0.5 * s * s, s)))
        n_sub = max(2, int(round(subjects_per_site * factor)))
    extra_gain = float(np.exp(_knob_rng(seed, i, "gain").normal(0.0, het.amplitude_shift))) if het.amplitude_shift > 0 else 1.0
    extra_noise = float(_knob_rng(seed, i, "noise").uniform(0.0, het.noise_shift)) if het.noise_shift > 0 else 0.0
    native = het.site_sfreqs[i % len(het.site_sfreqs)] if het.site_sfreqs else float(sfreq)
    n_native = int(round(window_seconds * native)) if native != sfreq else n_times
    site = _make_site(i, seed, subjects_per_site=n_sub, windows_per_class=int(windows_per_class), n_times=n_native,
                      sfreq=float(native), ch_names=ch_names, extra_gain=extra_gain, extra_noise=extra_noise)
    if not het.active:
        return site
    w = site.windows
    X, y, subject, names = w.X, w.y, w.subject, w.ch_names
    if native != sfreq:
        X = _resample(X, native, float(sfreq), n_times)
        info["native_sfreq"] = native
    if het.label_alpha > 0:
        props = _knob_rng(seed, i, "label").dirichlet(np.full(len(LABEL_NAMES), float(het.label_alpha)))
        props = np.maximum(props, 1e-12)
        keep_n = np.maximum(1, np.round(props / props.max() * windows_per_class)).astype(int)
        rank = np.zeros(len(y), dtype=int)  # position of each window among its subject's windows of its class
        for sub in np.unique(subject):
            for c in range(len(LABEL_NAMES)):
                idx = np.flatnonzero((subject == sub) & (y == c))
                rank[idx] = np.arange(idx.size)
        mask = rank < keep_n[y]
        X, y, subject = X[mask], y[mask], subject[mask]
        info["class_proportions"] = ",".join(f"{p:.3f}" for p in props)
    if het.montage_drop > 0:
        n_chans = len(names)
        n_keep = max(2, n_chans - int(round(het.montage_drop * n_chans)))
        keep = np.sort(_knob_rng(seed, i, "montage").choice(n_chans, size=n_keep, replace=False))
        X = X[:, keep]
        names = tuple(names[k] for k in keep)
        info["n_chans"] = n_keep
        info["bad_channels"] = ",".join(c for c in site.info["bad_channels"].split(",") if c in names)
    if het.amplitude_shift > 0:
        info["gain"] = round(float(site.info["gain"]), 4)
    windows = WindowSet(np.ascontiguousarray(X, dtype=np.float32), y, subject, names, float(sfreq), LABEL_NAMES)
    return Site(site.name, windows, {**site.info, **info, "n_windows": windows.n_windows})


def make_synthetic_sites(
    n_sites: int = 3,
    *,
    subjects_per_site: int = 6,
    windows_per_class: int = 20,
    window_seconds: float = 4.0,
    sfreq: float = 200.0,
    ch_names=EEGMAT_CHANNELS,
    seed: int = 0,
    heterogeneity: SiteHeterogeneity | None = None,
) -> list[Site]:
    """Synthetic rest-vs-arithmetic EEG at several sites, in model units.

    Parameters
    ----------
    n_sites : int
        Number of sites (``"site-0"``, ``"site-1"``, …).
    subjects_per_site : int
        Subjects per site (``"site0-sub00"``, …), each with both classes.
    windows_per_class : int
        Windows per subject and class (classes are balanced).
    window_seconds : float
        Window length in seconds.
    sfreq : float
        Sampling frequency in Hz.
    ch_names : sequence of str
        Channel names (mapped onto the LaBraM vocabulary).
    seed : int
        Seed; the same seed gives the same data.
    heterogeneity : SiteHeterogeneity | None
        Extra differences between sites (label skew, montage, sampling rate,
        amplitude/noise, size); None = none.

    Returns
    -------
    sites : list of Site
        Each holds a :class:`WindowSet` with ``X`` of shape
        ``(subjects_per_site * 2 * windows_per_class, n_chans, n_times)``, float32
        in units of 0.1 mV (typical amplitude 0.1–0.5), label names
        ``("rest", "arithmetic")``; ``info`` holds ``n_subjects``, ``n_windows``,
        and the site's ``gain``, ``noise_floor`` and ``bad_channels``. See
        :func:`make_synthetic_site` for the shapes under heterogeneity.
    """
    check_range("n_sites", n_sites, low=1, kind=(int, np.integer))
    return [
        make_synthetic_site(i, subjects_per_site=subjects_per_site, windows_per_class=windows_per_class,
                            window_seconds=window_seconds, sfreq=sfreq, ch_names=ch_names, seed=seed,
                            heterogeneity=heterogeneity)
        for i in range(int(n_sites))
    ]


# eegmat's EEG channel names as recorded, in file order.
_EEGMAT_RAW_NAMES = tuple(
    "EEG " + n
    for n in "Fp1 Fp2 F3 F4 F7 F8 T3 T4 C3 C4 T5 T6 P3 P4 O1 O2 Fz Cz Pz".split()
)


def make_synthetic_raw(n_chans: int = 19, duration: float = 20.0, sfreq: float = 500.0, seed: int = 0):
    """A continuous eegmat-style recording in volts, for preprocessing tests.

    Parameters
    ----------
    n_chans : int
        Number of EEG channels, 1 to 19 (eegmat's, in file order: ``"EEG Fp1"``, …).
    duration : float
        Length in seconds.
    sfreq : float
        Sampling frequency in Hz.
    seed : int
        Seed.

    Returns
    -------
    raw : mne.io.RawArray
        ``n_chans + 2`` channels: the EEG channels (about 10–30 µV of pink
        noise and posterior alpha, plus a little 50 Hz mains), ``"EEG A2-A1"``
        (type eeg, the ear reference pair) and ``"ECG ECG"`` (type ecg).
    """
    import mne

    check_range("n_chans", n_chans, low=1, high=len(_EEGMAT_RAW_NAMES), kind=(int, np.integer))
    check_range("duration", duration, low=0.0, kind=(int, float))
    check_range("sfreq", sfreq, low=1.0, kind=(int, float))
    rng = np.random.default_rng(seed)
    n_times = int(round(duration * sfreq))
    if n_times < 2:
        raise ValueError(f"duration * sfreq must give at least 2 samples, got {duration} * {sfreq}.")
    names = list(_EEGMAT_RAW_NAMES[:n_chans])
    freqs = np.fft.rfftfreq(n_times, d=1.0 / sfreq)
    topo_alpha, _, _ = _topographies(EEGMAT_CHANNELS[:n_chans])
    psd = 0.12**2 * _pink_shape(freqs, n_times) + (0.15**2 * topo_alpha)[:, None] * _bump(freqs, 10.0, 1.0, n_times)
    eeg = _noise_with_psd(rng, psd, n_times)  # model units (0.1 mV)
    t = np.arange(n_times) / sfreq
    eeg += 0.02 * np.sin(2 * np.pi * 50.0 * t + rng.uniform(0, 2 * np.pi, (n_chans, 1)))
    eeg *= 1e-4  # 0.1 mV -> V
    ref = 5e-6 * _noise_with_psd(rng, _pink_shape(freqs, n_times)[None], n_times)
    beat = (np.mod(t, 0.85) < 0.04).astype(float)
    ecg = 1e-3 * np.convolve(beat, np.hanning(int(0.04 * sfreq) + 1), mode="same")[None] / max(1.0, 0.02 * sfreq)
    data = np.concatenate([eeg, ref, ecg])
    info = mne.create_info(names + ["EEG A2-A1", "ECG ECG"], sfreq, ["eeg"] * (n_chans + 1) + ["ecg"])
    return mne.io.RawArray(data, info, verbose="error")
