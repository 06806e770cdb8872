"""Harmonisation to the model's spec: fixed channel list, interpolation, re-reference, resampling, rejection."""

import json
import logging

import mne
import numpy as np
import pytest

from fedeeg.data.channels import EEGMAT_CHANNELS
from fedeeg.data.preprocessing import HarmoniseReport, PreprocessSpec, preprocess_raw, reject_windows

#: The output channels of the montage tests: eegmat's 19, in another order than any recording.
SPEC_CHANNELS = ("FZ", "CZ", "PZ", "FP1", "FP2", "F3", "F4", "F7", "F8", "C3", "C4", "T3", "T4", "T5", "T6", "P3", "P4", "O1", "O2")
#: Site B lacks these three (T4 would be called T8 there).
SITE_B_MISSING = ("C3", "PZ", "T4")
_NEW_NAMES = {"T3": "T7", "T4": "T8", "T5": "P7", "T6": "P8"}
DURATION = 40.0  # s; the 0.1 Hz high-pass needs > 33 s
MIDDLE = slice(10 * 200, 30 * 200)  # away from the filter edges, at 200 Hz


def _positions() -> dict[str, np.ndarray]:
    name = "colin27_1005" if "colin27_1005" in mne.channels.get_builtin_montages() else "standard_1005"
    montage = mne.channels.make_standard_montage(name)
    return {k.upper(): v for k, v in montage.get_positions()["ch_pos"].items()}


def _polynomial_field(xyz: np.ndarray) -> float:
    """A smooth second-order potential over the scalp."""
    x, y, z = (xyz - np.array([0.0, -0.015, 0.0])) / 0.09
    return 1.0 + 0.8 * x - 0.6 * y + 0.5 * z + 0.7 * x * y - 0.4 * y * z + 0.3 * x * x


def _dipole_field(xyz: np.ndarray) -> float:
    """Potential of a deep current dipole (infinite medium), smooth at the scalp."""
    r0, moment = np.array([0.01, -0.01, 0.02]), np.array([0.3, -0.2, 1.0])
    d = xyz - r0
    return float(moment @ d / np.linalg.norm(d) ** 3)


def _field_raw(names, vocab_names, sfreq, field, amplitude_uv=20.0):
    """Channels ``names`` carrying ``field`` (at the positions of ``vocab_names``) times a 10 Hz sine."""
    pos = _positions()
    norm = np.sqrt(np.mean([field(pos[v]) ** 2 for v in EEGMAT_CHANNELS]))  # the same at every site
    values = np.array([field(pos[v]) for v in vocab_names]) / norm
    t = np.arange(int(DURATION * sfreq)) / sfreq
    data = amplitude_uv * 1e-6 * values[:, None] * np.sin(2 * np.pi * 10.0 * t)
    return mne.io.RawArray(data, mne.create_info(list(names), sfreq, "eeg"), verbose="error")


def _site_a(field):
    """eegmat-like: 19 channels named "EEG Fp1", ..., at 500 Hz."""
    names = [f"EEG {n.capitalize() if len(n) > 2 else n}" for n in EEGMAT_CHANNELS]
    return _field_raw(names, EEGMAT_CHANNELS, 500.0, field)


def _site_b(field):
    """TUH-like: 16 channels named "EEG FP1-REF" with 10-10 names (T7, P7, ...), at 256 Hz."""
    kept = [c for c in EEGMAT_CHANNELS if c not in SITE_B_MISSING]
    names = [f"EEG {_NEW_NAMES.get(c, c)}-REF" for c in kept]
    return _field_raw(names, kept, 256.0, field)


def _rel_rms(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((estimate - truth) ** 2)) / np.sqrt(np.mean(truth**2)))


# --- spec -------------------------------------------------------------------------------------


def test_spec_harmonisation_fields_round_trip_through_json():
    # Prepare
    spec = PreprocessSpec(
        channels=["EEG Fp1", "T7", "cz"], max_interpolated=2, reference="average",
        reject_peak_to_peak=150, resample_method="polyphase",
    )  # fmt: skip
    # Execute
    again = PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    # Assert: names stored in vocabulary form (T7 -> T3), hashable, equal after the round trip
    assert spec.channels == ("FP1", "T3", "CZ")
    assert again == spec and hash(again) == hash(spec)
    assert spec.to_dict()["channels"] == ["FP1", "T3", "CZ"]
    assert spec.reject_peak_to_peak == 150.0


def test_spec_old_manifest_loads_with_todays_behaviour():
    # Prepare: a manifest written before the harmonisation fields existed
    old = {"sfreq": 200.0, "l_freq": 0.1, "h_freq": 75.0, "notch_freq": 50.0, "window_seconds": 4.0, "scale": 1e4}
    # Execute
    spec = PreprocessSpec.from_dict(old)
    # Assert
    assert spec == PreprocessSpec()
    assert (spec.channels, spec.max_interpolated, spec.reference, spec.reject_peak_to_peak, spec.resample_method) == (
        None, 0, None, None, "fft",
    )  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"channels": ["FP1", "X9"]}, ValueError, r"'channels'.*'X9'.*not in the LaBraM channel vocabulary"),
        ({"channels": ["FP1", "EEG FP1-REF"]}, ValueError, r"'channels'.*same vocabulary name"),
        ({"channels": []}, ValueError, r"'channels'.*empty"),
        ({"channels": "FP1"}, TypeError, r"channels must be a list or tuple"),
        ({"max_interpolated": -1}, ValueError, r"'max_interpolated' must be >= 0"),
        ({"max_interpolated": 1.5}, TypeError, r"'max_interpolated' must be"),
        ({"reference": "REST"}, ValueError, r"'reference'.*None, 'average'.*'REST'"),
        ({"reject_peak_to_peak": 0.0}, ValueError, r"reject_peak_to_peak must be a positive.*µV"),
        ({"resample_method": "sinc"}, ValueError, r"'resample_method'.*'fft', 'polyphase'"),
    ],
)
def test_spec_rejects_bad_harmonisation_values(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PreprocessSpec(**kwargs)


# --- channels and interpolation ---------------------------------------------------------------


# Interpolation error limits, relative to the field's RMS over the 19 channels (an interpolated
# channel near a zero of the field would make an error relative to itself meaningless).
# Measured: polynomial 0.002 (C3), 0.008 (PZ), 0.094 (T4); dipole 0.075, 0.11, 0.17 (T4, an edge
# channel, extrapolated).
@pytest.mark.parametrize("field, limit", [(_polynomial_field, 0.12), (_dipole_field, 0.2)])
def test_two_montages_give_same_shape_order_and_close_values(field, limit):
    # Prepare: 19 channels at 500 Hz vs 16 channels at 256 Hz (3 missing), one underlying field
    spec = PreprocessSpec(channels=SPEC_CHANNELS, max_interpolated=3, resample_method="polyphase")
    raw_a, raw_b = _site_a(field), _site_b(field)
    # Execute
    data_a, names_a = preprocess_raw(raw_a, spec, source="site-a")
    data_b, names_b, report = preprocess_raw(raw_b, spec, source="site-b", return_report=True)
    # Assert: same shape and channel order, the spec's
    assert data_a.shape == data_b.shape == (19, int(DURATION) * 200)
    assert names_a == names_b == SPEC_CHANNELS
    assert report.missing == report.interpolated == ("PZ", "C3", "T4")  # in output order
    field_rms = np.sqrt(np.mean(data_a[:, MIDDLE] ** 2))
    errors = {n: np.sqrt(np.mean((data_b[i, MIDDLE] - data_a[i, MIDDLE]) ** 2)) / field_rms for i, n in enumerate(SPEC_CHANNELS)}
    # recorded channels agree across rates and names; interpolated ones are close
    assert max(e for n, e in errors.items() if n not in SITE_B_MISSING) < 0.005
    assert max(errors[n] for n in SITE_B_MISSING) < limit
    assert not raw_b.info["dig"] and raw_b.ch_names[0] == "EEG FP1-REF"  # caller's raw untouched


@pytest.mark.parametrize("held_out", ["C3", "CZ", "P4", "T3"])
def test_interpolated_channel_matches_held_out_truth(held_out):
    # Prepare: the full recording, and the same recording without one channel
    spec = PreprocessSpec(channels=EEGMAT_CHANNELS, max_interpolated=1)
    full = _site_a(_polynomial_field)
    without = full.copy().drop_channels([f"EEG {held_out.capitalize() if len(held_out) > 2 else held_out}"])
    # Execute
    truth, _ = preprocess_raw(full, spec)
    estimate, names = preprocess_raw(without, spec)
    # Assert: relative RMS error on the held-out channel (measured 0.000-0.04 for these channels)
    i = names.index(held_out)
    assert _rel_rms(estimate[i, MIDDLE], truth[i, MIDDLE]) < 0.1


def test_bad_channel_is_interpolated_not_passed_through():
    # Prepare: CZ carries a large artifact and is marked bad (as recorded: "EEG Cz")
    spec = PreprocessSpec(channels=EEGMAT_CHANNELS, max_interpolated=1)
    clean = _site_a(_polynomial_field)
    broken = clean.copy()
    broken._data[EEGMAT_CHANNELS.index("CZ")] += 500e-6 * np.sign(np.sin(np.arange(broken.n_times) / 7.0))
    # Execute
    truth, _ = preprocess_raw(clean, spec)
    fixed, names, report = preprocess_raw(broken, spec, bads=["EEG Cz"], return_report=True)
    # Assert
    i = names.index("CZ")
    assert report.interpolated == ("CZ",) and report.missing == ()
    assert "CZ" in report.found and "EEG Cz" not in report.dropped
    assert _rel_rms(fixed[i, MIDDLE], truth[i, MIDDLE]) < 0.1


def test_too_many_missing_channels_error_lists_them():
    # Prepare: site B lacks 3 of the 19 output channels, only 2 may be interpolated
    spec = PreprocessSpec(channels=SPEC_CHANNELS, max_interpolated=2)
    # Execute
    with pytest.raises(ValueError) as err:
        preprocess_raw(_site_b(_polynomial_field), spec, source="hospital-b/rec01.edf")
    # Assert
    msg = str(err.value)
    assert msg.startswith("hospital-b/rec01.edf: 3 of the 19 output channel(s)")
    assert "['PZ', 'C3', 'T4']" in msg and "max_interpolated=2" in msg and "Raise max_interpolated" in msg


def test_default_max_interpolated_refuses_any_missing_channel():
    # Prepare
    spec = PreprocessSpec(channels=("CZ", "OZ"))
    raw = _field_raw(["EEG Cz", "EEG Pz", "EEG Fz"], ["CZ", "PZ", "FZ"], 200.0, _polynomial_field)
    # Execute / Assert
    with pytest.raises(ValueError, match=r"missing from the recording: \['OZ'\].*max_interpolated=0"):
        preprocess_raw(raw, spec, source="r.edf")


def test_channel_without_template_position_cannot_be_interpolated():
    # Prepare: CB1 is in the vocabulary but not in the 10-05 montage
    spec = PreprocessSpec(channels=("CZ", "PZ", "FZ", "C3", "CB1"), max_interpolated=1)
    raw = _field_raw(["Cz", "Pz", "Fz", "C3"], ["CZ", "PZ", "FZ", "C3"], 200.0, _polynomial_field)
    # Execute / Assert
    with pytest.raises(ValueError, match=r"cannot interpolate channel\(s\) \['CB1'\]: they have no position"):
        preprocess_raw(raw, spec, source="r.edf")


def test_picks_subset_and_reports_dropped_channels():
    # Prepare: output 3 of 19 channels, plus a non-EEG channel in the recording
    raw = _site_a(_polynomial_field)
    raw.add_channels([mne.io.RawArray(np.zeros((1, raw.n_times)), mne.create_info(["ECG"], 500.0, "ecg"), verbose="error")])
    spec = PreprocessSpec(channels=("O2", "CZ", "FP1"))
    before = raw.get_data().copy()
    # Execute
    data, names, report = preprocess_raw(raw, spec, source="a.edf", return_report=True)
    full, full_names = preprocess_raw(raw, PreprocessSpec())
    # Assert: exactly those rows, in that order, as without the selection; raw untouched
    assert names == ("O2", "CZ", "FP1")
    for i, name in enumerate(names):
        np.testing.assert_allclose(data[i], full[full_names.index(name)], atol=1e-6)
    assert isinstance(report, HarmoniseReport)
    assert report.found == names and report.missing == report.interpolated == ()
    assert len(report.dropped) == 17 and "ECG" in report.dropped and "EEG Cz" not in report.dropped
    assert report.to_dict()["sfreq_in"] == 500.0 and report.to_dict()["duration_s"] == DURATION
    json.dumps(report.to_dict())
    np.testing.assert_array_equal(raw.get_data(), before)
    assert not raw.info["dig"]  # no montage set on the caller's raw


def test_unknown_bad_channel_is_ignored_with_a_warning(caplog):
    # Prepare
    raw = _field_raw(["Cz", "Pz"], ["CZ", "PZ"], 200.0, _polynomial_field)
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedeeg.data.preprocessing"):
        data, names = preprocess_raw(raw, PreprocessSpec(), bads=["O1"], source="r.edf")
    # Assert
    assert names == ("CZ", "PZ")
    assert "r.edf: ignoring bad channel(s) 'O1'" in caplog.text


# --- reference --------------------------------------------------------------------------------


def test_average_reference_over_output_channels_after_interpolation():
    # Prepare: 5 output channels (1 missing, interpolated) plus non-output channels with a
    # large signal of their own; every channel shares a common 10 Hz component
    sfreq, n = 200.0, int(DURATION * 200)
    t = np.arange(n) / sfreq
    common = 30e-6 * np.sin(2 * np.pi * 10 * t)
    rng = np.random.default_rng(0)
    names = ["Cz", "C3", "C4", "Fz", "O1", "O2", "Fp1"]
    own = 5e-6 * np.sin(2 * np.pi * rng.uniform(5, 20, (len(names), 1)) * t)
    own[4:] *= 40.0  # O1, O2, Fp1: not output channels, large
    raw = mne.io.RawArray(own + common, mne.create_info(names, sfreq, "eeg"), verbose="error")
    spec = PreprocessSpec(channels=("CZ", "C3", "C4", "FZ", "PZ"), max_interpolated=1, reference="average")
    # Execute
    data, out_names = preprocess_raw(raw, spec)
    kept, _ = preprocess_raw(raw, PreprocessSpec(channels=("CZ", "C3", "C4", "FZ", "PZ"), max_interpolated=1))
    # Assert: zero mean over the 5 output channels; equals the unreferenced output minus its mean
    assert out_names == ("CZ", "C3", "C4", "FZ", "PZ")
    assert np.abs(data.mean(axis=0)).max() < 1e-5 * np.abs(data).max()
    np.testing.assert_allclose(data, kept - kept.mean(axis=0, keepdims=True), atol=1e-5)
    # the common component (0.3 model units) is gone from a recorded channel
    assert np.abs(data[0, MIDDLE]).max() < 0.3


# --- resampling -------------------------------------------------------------------------------


@pytest.mark.parametrize("sfreq", [500.0, 256.0, 1000.0, 512.0])
@pytest.mark.parametrize("duration", [40.0, 37.3])
def test_polyphase_resampling_keeps_time_aligned(sfreq, duration):
    # Prepare: a 10 Hz sine starting at t = 0
    t = np.arange(int(duration * sfreq)) / sfreq
    raw = mne.io.RawArray(20e-6 * np.sin(2 * np.pi * 10 * t)[None], mne.create_info(["Cz"], sfreq, "eeg"), verbose="error")
    spec = PreprocessSpec(resample_method="polyphase")
    # Execute
    data, _ = preprocess_raw(raw, spec)
    # Assert: the same sine at 200 Hz, no time shift, MNE's length
    assert data.shape == (1, int(round(len(t) * 200 / sfreq)))
    expected = 0.2 * np.sin(2 * np.pi * 10 * np.arange(data.shape[1]) / 200)
    assert _rel_rms(data[0, MIDDLE], expected[MIDDLE]) < 0.01


# --- artifact rejection -----------------------------------------------------------------------


def test_reject_windows_by_peak_to_peak_with_counts(caplog):
    # Prepare: 10 windows of 0.2 units (20 µV) peak-to-peak, 3 with a 200 µV jump in one channel
    rng = np.random.default_rng(1)
    windows = (0.1 * np.sin(np.linspace(0, 20, 800)) * np.ones((10, 4, 1))).astype(np.float32)
    windows += 0.001 * rng.standard_normal(windows.shape).astype(np.float32)
    for k, ch in [(1, 0), (4, 3), (7, 2)]:
        windows[k, ch, 400:] += 2.0
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    spec = PreprocessSpec(reject_peak_to_peak=100.0)  # µV -> 1.0 model unit
    # Execute
    with caplog.at_level(logging.INFO, logger="fedeeg.data.preprocessing"):
        kept, mask = reject_windows(windows, spec, source="Subject01")
    # Assert
    assert mask.dtype == bool and mask.tolist() == [True, False, True, True, False, True, True, False, True, True]
    np.testing.assert_array_equal(kept, windows[mask])
    assert np.bincount(y[~mask], minlength=2).tolist() == [2, 1]
    assert "Subject01: rejected 3 of 10 window(s)" in caplog.text and "100 µV" in caplog.text


def test_reject_windows_threshold_follows_scale_and_none_keeps_all():
    # Prepare: one window of 150 µV peak-to-peak, in model units of two scales
    w_01mv = np.zeros((1, 1, 10), np.float32)
    w_01mv[0, 0, 5] = 1.5  # 150 µV at scale 1e4
    w_uv = w_01mv * 100  # 150 µV at scale 1e6
    # Execute / Assert
    assert reject_windows(w_01mv, PreprocessSpec(reject_peak_to_peak=100.0))[1].tolist() == [False]
    assert reject_windows(w_01mv, PreprocessSpec(reject_peak_to_peak=200.0))[1].tolist() == [True]
    assert reject_windows(w_uv, PreprocessSpec(reject_peak_to_peak=100.0, scale=1e6))[1].tolist() == [False]
    kept, mask = reject_windows(w_01mv, PreprocessSpec())
    assert mask.tolist() == [True] and kept.shape == (1, 1, 10)


def test_reject_windows_drops_non_finite_and_checks_shape():
    # Prepare
    windows = np.zeros((2, 1, 4), np.float32)
    windows[1, 0, 2] = np.nan
    # Execute
    _, mask = reject_windows(windows, PreprocessSpec(reject_peak_to_peak=100.0))
    # Assert
    assert mask.tolist() == [True, False]
    with pytest.raises(ValueError, match=r"shape \(n_windows, n_chans, n_times\)"):
        reject_windows(np.zeros((2, 4)), PreprocessSpec())
