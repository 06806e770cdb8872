"""Runs on hospital folders: site TOML files in, the same windows at every site, the cache, evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _recordings import CH_NAMES, make_raw, write
from fedeeg.config import RunConfig
from fedeeg.data.channels import to_vocab

SITE_TOML = """
[site]
name = "{name}"
[data]
root = "{root}"
format = "{fmt}"
subject_pattern = "(?P<subject>S\\\\d+)"
[labels]
source = "annotations"
mapping = {{ T1 = "left", T2 = "right" }}
"""


def _site(tmp_path: Path, name: str, fmt: str, ext: str, ch_names, sfreq: float, n_subjects: int = 3) -> Path:
    root = tmp_path / name
    for i in range(n_subjects):
        write(make_raw(duration=20.0, sfreq=sfreq, ch_names=ch_names, seed=10 * i + len(name)), root / f"S{i + 1:02d}{ext}")
    toml = tmp_path / f"{name}.toml"
    toml.write_text(SITE_TOML.format(name=name, root=root.as_posix(), fmt=fmt))
    return toml


@pytest.fixture()
def two_sites(tmp_path):
    """Site A: EDF, 7 channels at 250 Hz. Site B: BrainVision at 200 Hz without Cz."""
    a = _site(tmp_path, "hospital-a", "edf", ".edf", CH_NAMES, 250.0)
    b = _site(tmp_path, "hospital-b", "brainvision", ".vhdr", [c for c in CH_NAMES if c != "Cz"], 200.0)
    return a, b


def _cfg(two_sites, tmp_path, **kw) -> RunConfig:
    base = dict(dataset="folder", site_files=",".join(str(p) for p in two_sites), labels="left,right",
                channels=",".join(CH_NAMES), max_interpolated=1, window_seconds=2.0, mode="centralized",
                rounds=1, local_epochs=1, batch_size=8, device="cpu", cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return RunConfig(**base)


def test_folder_sites_share_channels_and_shape(two_sites, tmp_path):
    # Prepare
    from fedeeg.experiment import _prepare_sites_cached, prepare_sites

    _prepare_sites_cached.cache_clear()
    cfg = _cfg(two_sites, tmp_path)
    # Execute
    sites = prepare_sites(cfg)
    # Assert: Cz interpolated at site B, same channel order and window shape everywhere
    assert cfg.sites == 2 and [s.name for s in sites] == ["hospital-a", "hospital-b"]
    for s in sites:
        assert s.train.ch_names == to_vocab(CH_NAMES)
        assert s.train.X.shape[1:] == (len(CH_NAMES), 400)
        assert s.train.label_names == ("left", "right")
        assert s.train.n_windows > 0 and s.test.n_windows > 0
        assert set(s.train.subjects).isdisjoint(s.test.subjects)


def test_second_read_comes_from_the_cache(two_sites, tmp_path, monkeypatch):
    # Prepare: a first read fills the cache
    import fedeeg.data.site as site_mod
    from fedeeg.experiment import _prepare_sites_cached, prepare_sites

    _prepare_sites_cached.cache_clear()
    cfg = _cfg(two_sites, tmp_path)
    first = prepare_sites(cfg)
    _prepare_sites_cached.cache_clear()

    def no_reading(*args, **kwargs):
        raise AssertionError("the recordings were read again")

    monkeypatch.setattr(site_mod, "load_site_windows", no_reading)
    # Execute
    second = prepare_sites(cfg)
    # Assert
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.train.X, b.train.X)
        np.testing.assert_array_equal(a.test.y, b.test.y)
    # ... and a changed recording is a miss (it is read again)
    _prepare_sites_cached.cache_clear()
    victim = sorted((tmp_path / "hospital-a").glob("S01.edf"))[0]
    write(make_raw(duration=20.0, sfreq=250.0, seed=99), victim)
    with pytest.raises(AssertionError, match="read again"):
        prepare_sites(cfg)


def test_missing_channels_beyond_the_limit_name_them(two_sites, tmp_path):
    # Prepare
    from fedeeg.data.site import SiteDataError
    from fedeeg.experiment import _prepare_sites_cached, prepare_sites

    _prepare_sites_cached.cache_clear()
    cfg = _cfg(two_sites, tmp_path, max_interpolated=0, cache_dir="off")
    # Execute / Assert: every file of site B lacks Cz, so site B has no windows and says why
    with pytest.raises(SiteDataError, match=r"(?s)hospital-b.*CZ"):
        prepare_sites(cfg)


def test_centralized_run_then_evaluate_on_the_folders(two_sites, tmp_path):
    # Prepare
    from fedeeg.evaluation import evaluate_model_dir
    from fedeeg.experiment import _prepare_sites_cached, prepare_sites, run_centralized
    from fedeeg.outputs import write_outputs

    _prepare_sites_cached.cache_clear()
    cfg = _cfg(two_sites, tmp_path, out=str(tmp_path / "run"))
    # Execute
    result = run_centralized(cfg, prepare_sites(cfg))
    write_outputs(cfg, result, wall_seconds=1.0)
    scores = evaluate_model_dir(tmp_path / "run" / "adapter", dataset="folder", site_files=cfg.site_list,
                                cache_dir=tmp_path / "cache", device="cpu")
    # Assert: every window of both sites scored with the manifest's preprocessing
    n_all = sum(s.train.n_windows + s.test.n_windows for s in prepare_sites(cfg))
    assert scores["n_windows"] == n_all
    assert set(scores["per_site"]) == {"hospital-a", "hospital-b"}
    assert 0.0 <= scores["balanced_accuracy"] <= 1.0


def test_folder_config_errors():
    with pytest.raises(ValueError, match="needs 'site_files'"):
        RunConfig(dataset="folder", labels="a,b")
    with pytest.raises(ValueError, match="needs 'labels'"):
        RunConfig(dataset="folder", site_files="x.toml")
    with pytest.raises(ValueError, match="only applies to dataset='folder'"):
        RunConfig(labels="a,b")
    with pytest.raises(ValueError, match="names a channel twice"):
        RunConfig(channels="Fp1,Fp1")


def test_amplitude_rejection_is_counted_per_label(tmp_path):
    # Prepare: one recording with a 2-mV artifact inside the first T1 epoch (1-5 s)
    from fedeeg.data.preprocessing import PreprocessSpec
    from fedeeg.data.site import load_site_config, load_site_windows

    raw = make_raw(duration=20.0, sfreq=250.0, seed=3)
    raw._data[2, int(2.2 * 250):int(2.4 * 250)] += 2e-3
    write(raw, tmp_path / "site" / "S01.edf")
    toml = tmp_path / "site.toml"
    toml.write_text(SITE_TOML.format(name="s", root=(tmp_path / "site").as_posix(), fmt="edf"))
    site = load_site_config(toml)
    # Execute
    kept, report_kept = load_site_windows(site, PreprocessSpec(window_seconds=2.0), ("left", "right"))
    clean, report = load_site_windows(site, PreprocessSpec(window_seconds=2.0, reject_peak_to_peak=500.0), ("left", "right"))
    # Assert: exactly the artifact's window goes, counted under its label
    assert kept.n_windows - clean.n_windows == 1
    assert report.files[0].rejected_per_label == {"left": 1}
    assert any("rejected" in w for w in report.files[0].warnings)
    assert report_kept.files[0].rejected_per_label == {}
