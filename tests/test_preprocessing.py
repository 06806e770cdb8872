"""Preprocessing: spec validation, channel picking, filters, rate, units, windows."""

import logging

import mne
import numpy as np
import pytest

from fedeeg.data.channels import EEGMAT_CHANNELS
from fedeeg.data.preprocessing import PreprocessSpec, make_windows, preprocess_raw
from fedeeg.data.synthetic import make_synthetic_raw


def _sine_raw(amplitude_uv: float, freq: float = 10.0, duration: float = 40.0, sfreq: float = 500.0, names=("EEG Cz",)):
    t = np.arange(int(duration * sfreq)) / sfreq
    data = np.tile(amplitude_uv * 1e-6 * np.sin(2 * np.pi * freq * t), (len(names), 1))
    info = mne.create_info(list(names), sfreq, "eeg")
    return mne.io.RawArray(data, info, verbose="error")


# --- PreprocessSpec ---------------------------------------------------------------------------


def test_spec_defaults_and_n_times():
    # Execute
    spec = PreprocessSpec()
    # Assert
    assert (spec.sfreq, spec.l_freq, spec.h_freq, spec.notch_freq, spec.window_seconds, spec.scale) == (
        200.0, 0.1, 75.0, 50.0, 4.0, 1e4,
    )  # fmt: skip
    assert spec.n_times == 800
    assert PreprocessSpec(window_seconds=16).n_times == 3200


def test_spec_round_trips_through_dict():
    # Prepare
    spec = PreprocessSpec(window_seconds=8, notch_freq=None, h_freq=45.0)
    # Execute
    again = PreprocessSpec.from_dict(spec.to_dict())
    # Assert
    assert again == spec
    assert spec.to_dict()["notch_freq"] is None
    assert isinstance(spec.to_dict()["window_seconds"], float)


def test_spec_is_hashable_and_frozen():
    spec = PreprocessSpec()
    assert hash(spec) == hash(PreprocessSpec())
    with pytest.raises(AttributeError):
        spec.sfreq = 100.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"window_seconds": 2.5}, ValueError, r"whole number of 1-s patches.*2\.5"),
        ({"window_seconds": 17}, ValueError, r"'window_seconds' must be <= 16"),
        ({"window_seconds": 0}, ValueError, r"'window_seconds' must be >= 1"),
        ({"h_freq": 120.0}, ValueError, r"h_freq must be below the Nyquist.*100\.0"),
        ({"l_freq": 80.0, "h_freq": 70.0}, ValueError, r"l_freq must be below h_freq"),
        ({"notch_freq": 0.0}, ValueError, r"notch_freq must be positive"),
        ({"scale": -1.0}, ValueError, r"scale must be a positive"),
        ({"sfreq": "200"}, TypeError, r"'sfreq' must be Real"),
    ],
)
def test_spec_rejects_bad_values(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PreprocessSpec(**kwargs)


def test_spec_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"Unknown preprocessing key\(s\) \['bogus'\]"):
        PreprocessSpec.from_dict({"sfreq": 200.0, "bogus": 1})


# --- preprocess_raw ---------------------------------------------------------------------------


def test_preprocess_resamples_and_drops_non_eeg(caplog):
    # Prepare
    raw = make_synthetic_raw(duration=40.0, sfreq=500.0, seed=1)
    # Execute
    with caplog.at_level(logging.INFO, logger="fedeeg.data.preprocessing"):
        data, ch_names = preprocess_raw(raw, PreprocessSpec(), source="fake.edf")
    # Assert
    assert data.dtype == np.float32
    assert data.shape == (19, 40 * 200)
    assert ch_names == EEGMAT_CHANNELS
    dropped = caplog.text
    assert "fake.edf" in dropped and "EEG A2-A1" in dropped and "ECG ECG" in dropped
    # typical EEG amplitude, 10-50 µV -> 0.1-0.5 model units
    assert 0.05 < float(np.median(data.std(axis=1))) < 0.5


def test_preprocess_scales_volts_to_tenth_millivolt():
    # Prepare: 10 Hz sine of 50 µV amplitude (within the pass band)
    raw = _sine_raw(50.0)
    # Execute
    data, _ = preprocess_raw(raw, PreprocessSpec(), source="sine")
    # Assert: 50 µV = 0.5 units of 0.1 mV; check away from the filter edges
    middle = data[0, 10 * 200 : 30 * 200]
    assert np.max(np.abs(middle)) == pytest.approx(0.5, rel=0.02)
    assert middle.std() == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_preprocess_does_not_modify_the_callers_raw():
    # Prepare
    raw = make_synthetic_raw(duration=40.0, seed=2)
    before = raw.get_data().copy()
    names = list(raw.ch_names)
    # Execute
    preprocess_raw(raw, PreprocessSpec())
    # Assert
    assert raw.ch_names == names
    assert raw.info["sfreq"] == 500.0
    np.testing.assert_array_equal(raw.get_data(), before)


def test_preprocess_nan_names_the_source():
    # Prepare
    raw = make_synthetic_raw(duration=40.0, seed=3)
    raw._data[2, 100] = np.nan
    # Execute / Assert
    with pytest.raises(ValueError, match=r"Subject99_1\.edf: non-finite values.*\['EEG F3'\]"):
        preprocess_raw(raw, PreprocessSpec(), source="Subject99_1.edf")


def test_preprocess_too_short_errors():
    # Prepare
    raw = make_synthetic_raw(duration=3.0, seed=4)
    # Execute / Assert
    with pytest.raises(ValueError, match=r"short\.edf: the recording lasts 3\.000 s, shorter than one window"):
        preprocess_raw(raw, PreprocessSpec(window_seconds=4), source="short.edf")


def test_preprocess_without_usable_channels_errors():
    # Prepare
    info = mne.create_info(["EEG A2-A1", "ECG ECG"], 500.0, ["eeg", "ecg"])
    raw = mne.io.RawArray(np.zeros((2, 5000)), info, verbose="error")
    # Execute / Assert
    with pytest.raises(ValueError, match=r"ref\.edf: no usable EEG channels"):
        preprocess_raw(raw, PreprocessSpec(), source="ref.edf")


def test_preprocess_skips_notch_and_lowpass_above_nyquist(caplog):
    # Prepare: 90 Hz recording, Nyquist 45 Hz < notch 50 Hz and h_freq 75 Hz
    raw = _sine_raw(20.0, duration=40.0, sfreq=90.0, names=("EEG Cz", "EEG Pz"))
    # Execute
    with caplog.at_level(logging.DEBUG, logger="fedeeg.data.preprocessing"):
        data, ch_names = preprocess_raw(raw, PreprocessSpec(), source="slow")
    # Assert
    assert data.shape == (2, 40 * 200)
    assert ch_names == ("CZ", "PZ")
    assert "notch at 50.0 Hz skipped" in caplog.text


# --- make_windows -----------------------------------------------------------------------------


def test_make_windows_shapes_and_order():
    # Prepare
    data = np.arange(3 * 1000, dtype=np.float32).reshape(3, 1000)
    # Execute
    windows = make_windows(data, 300)
    # Assert: 3 complete windows, tail of 100 samples dropped
    assert windows.shape == (3, 3, 300)
    assert windows.dtype == np.float32
    np.testing.assert_array_equal(windows[1], data[:, 300:600])
    np.testing.assert_array_equal(windows[2, 2], data[2, 600:900])


def test_make_windows_shorter_than_one_window_is_empty():
    assert make_windows(np.zeros((2, 10)), 20).shape == (0, 2, 20)


def test_make_windows_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shape \(n_chans, n_samples\)"):
        make_windows(np.zeros((2, 3, 4)), 2)
    with pytest.raises(ValueError, match=r"'n_times' must be >= 1"):
        make_windows(np.zeros((2, 10)), 0)
