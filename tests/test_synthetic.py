"""Synthetic multi-site EEG."""

import numpy as np
import pytest

from fedeeg.data import load_sites
from fedeeg.data.channels import EEGMAT_CHANNELS
from fedeeg.data.preprocessing import PreprocessSpec
from fedeeg.data.synthetic import make_synthetic_raw, make_synthetic_sites


@pytest.fixture(scope="module")
def sites():
    return make_synthetic_sites(3, seed=0)


def test_shapes_names_and_dtype(sites):
    # Assert
    assert [s.name for s in sites] == ["site-0", "site-1", "site-2"]
    for k, site in enumerate(sites):
        w = site.windows
        assert w.X.shape == (6 * 2 * 20, 19, 800)
        assert w.X.dtype == np.float32
        assert w.y.dtype == np.int64
        assert w.ch_names == EEGMAT_CHANNELS
        assert w.sfreq == 200.0
        assert w.label_names == ("rest", "arithmetic")
        assert w.subjects == [f"site{k}-sub{j:02d}" for j in range(6)]
        assert site.info["n_subjects"] == 6 and site.info["n_windows"] == 240
        assert np.isfinite(w.X).all()


def test_classes_balanced_per_subject(sites):
    for site in sites:
        for subject in site.windows.subjects:
            counts = site.windows.select_subjects([subject]).class_counts()
            assert counts.tolist() == [20, 20]


def test_amplitude_in_model_units(sites):
    # Assert: typical EEG 10-50 µV -> 0.1-0.5 units of 0.1 mV
    std = np.concatenate([s.windows.X.std(axis=-1).ravel() for s in sites])
    assert 0.08 < np.median(std) < 0.5
    assert std.max() < 3.0


def test_deterministic_and_seed_dependent():
    # Execute
    a = make_synthetic_sites(2, subjects_per_site=2, windows_per_class=3, seed=7)
    b = make_synthetic_sites(2, subjects_per_site=2, windows_per_class=3, seed=7)
    c = make_synthetic_sites(2, subjects_per_site=2, windows_per_class=3, seed=8)
    # Assert
    for sa, sb, sc in zip(a, b, c):
        np.testing.assert_array_equal(sa.windows.X, sb.windows.X)
        assert sa.info == sb.info
        assert not np.allclose(sa.windows.X, sc.windows.X)


def test_site_does_not_depend_on_number_of_sites():
    # Execute
    two = make_synthetic_sites(2, subjects_per_site=2, windows_per_class=2, seed=3)
    four = make_synthetic_sites(4, subjects_per_site=2, windows_per_class=2, seed=3)
    # Assert
    np.testing.assert_array_equal(two[1].windows.X, four[1].windows.X)
    assert not np.allclose(four[0].windows.X, four[1].windows.X)


def test_task_lowers_posterior_alpha(sites):
    # Prepare
    from scipy.signal import welch

    for site in sites:
        w = site.windows
        f, p = welch(w.X[:, list(w.ch_names).index("O1")], fs=w.sfreq, nperseg=200, axis=-1)
        alpha = np.log(p[:, (f >= 8) & (f < 13)].mean(axis=-1))
        # Assert: rest has more alpha than arithmetic at the back of the head
        assert alpha[w.y == 0].mean() > alpha[w.y == 1].mean() + 0.3


def test_custom_window_rate_and_channels():
    # Execute
    (site,) = make_synthetic_sites(1, subjects_per_site=2, windows_per_class=2, window_seconds=2.0, sfreq=100.0,
                                   ch_names=["EEG Fp1", "Cz", "O2"])  # fmt: skip
    # Assert
    assert site.windows.X.shape == (8, 3, 200)
    assert site.windows.ch_names == ("FP1", "CZ", "O2")


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="'n_sites' must be >= 1"):
        make_synthetic_sites(0)
    with pytest.raises(ValueError, match="not in the LaBraM channel vocabulary"):
        make_synthetic_sites(1, ch_names=["EEG Fp1", "ECG"])


def test_load_sites_synthetic_follows_spec():
    # Execute
    sites = load_sites("synthetic", n_sites=2, spec=PreprocessSpec(window_seconds=2), seed=1)
    # Assert
    assert len(sites) == 2
    assert sites[0].windows.X.shape[1:] == (19, 400)
    np.testing.assert_array_equal(sites[0].windows.X, make_synthetic_sites(2, window_seconds=2.0, seed=1)[0].windows.X)


def test_make_synthetic_raw_is_eegmat_like():
    # Execute
    raw = make_synthetic_raw(n_chans=4, duration=5.0, sfreq=500.0, seed=0)
    # Assert
    assert raw.ch_names == ["EEG Fp1", "EEG Fp2", "EEG F3", "EEG F4", "EEG A2-A1", "ECG ECG"]
    assert raw.get_channel_types() == ["eeg"] * 5 + ["ecg"]
    assert raw.n_times == 2500
    eeg_std = raw.get_data(picks=[0, 1, 2, 3]).std(axis=1)
    assert np.all((5e-6 < eeg_std) & (eeg_std < 5e-5))  # volts: 5-50 µV
    np.testing.assert_array_equal(raw.get_data(), make_synthetic_raw(n_chans=4, duration=5.0, seed=0).get_data())
