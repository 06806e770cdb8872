"""Disk cache of preprocessed windows: keys, hits, misses, atomic writes, damaged entries, eegmat."""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import mne
import numpy as np
import pytest

from fedeeg.data import cache as cache_mod
from fedeeg.data import eegmat
from fedeeg.data.base import WindowSet
from fedeeg.data.cache import CACHE_FORMAT_VERSION, WindowCache, default_cache_dir, file_sha256
from fedeeg.data.preprocessing import PreprocessSpec
from fedeeg.data.synthetic import make_synthetic_raw


def _windows(n=6, seed=0) -> WindowSet:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 3, 200)).astype(np.float32)
    return WindowSet(X, np.arange(n) % 2, [f"S{k % 2}" for k in range(n)], ("FP1", "CZ", "O2"), 200.0, ("rest", "task"))


@pytest.fixture
def raw_files(tmp_path):
    """Two small 'raw' files (their content is all the key looks at)."""
    folder = tmp_path / "data"
    folder.mkdir()
    files = [folder / "a.edf", folder / "b.edf"]
    for k, f in enumerate(files):
        f.write_bytes(bytes(range(256)) * (40 + k))
    return files


def _assert_same(a: WindowSet, b: WindowSet) -> None:
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.subject, b.subject)
    assert (a.ch_names, a.sfreq, a.label_names) == (b.ch_names, b.sfreq, b.label_names)


# --- keys -------------------------------------------------------------------------------------


def test_key_is_stable_and_depends_on_spec_extra_and_names(tmp_path, raw_files):
    # Prepare
    cache = WindowCache(tmp_path / "cache")
    spec = PreprocessSpec()
    # Execute
    key = cache.key(raw_files, spec, {"labels": ["rest", "task"]})
    # Assert
    assert len(key) == 64 and key == WindowCache(tmp_path / "cache").key(raw_files, spec, {"labels": ["rest", "task"]})
    assert key != cache.key(raw_files, PreprocessSpec(window_seconds=8), {"labels": ["rest", "task"]})
    assert key != cache.key(raw_files, PreprocessSpec(reference="average"), {"labels": ["rest", "task"]})
    assert key != cache.key(raw_files, spec, {"labels": ["task", "rest"]})
    assert key != cache.key(raw_files[::-1], spec, {"labels": ["rest", "task"]})
    material = cache.key_material(raw_files, spec, {"labels": ["rest", "task"]})
    assert material["format_version"] == CACHE_FORMAT_VERSION
    assert [f["path"] for f in material["files"]] == ["a.edf", "b.edf"]
    assert material["files"][0] == {"path": "a.edf", "size": 256 * 40, "sha256": file_sha256(raw_files[0])}


def test_key_survives_moving_the_dataset_folder(tmp_path, raw_files):
    # Prepare
    cache = WindowCache(tmp_path / "cache")
    key = cache.key(raw_files, PreprocessSpec())
    moved = tmp_path / "elsewhere"
    (raw_files[0].parent).rename(moved)
    # Execute / Assert: relative paths + content, not absolute paths
    assert cache.key([moved / "a.edf", moved / "b.edf"], PreprocessSpec()) == key


def test_changed_file_content_is_another_key_even_at_same_size(tmp_path, raw_files):
    # Prepare: hash once (memoised), then rewrite one file with the same size
    cache = WindowCache(tmp_path / "cache")
    key = cache.key(raw_files, PreprocessSpec())
    cache.store(key, _windows())
    data = bytearray(raw_files[1].read_bytes())
    data[100] ^= 0xFF
    raw_files[1].write_bytes(bytes(data))
    # Execute
    key2 = WindowCache(tmp_path / "cache").key(raw_files, PreprocessSpec())
    # Assert: a miss, the old entry is not served
    assert key2 != key
    assert WindowCache(tmp_path / "cache").load(key2) is None


def test_file_hash_memo_is_used_for_old_files_and_distrusted_when_stat_changes(tmp_path, raw_files, monkeypatch):
    # Prepare: files last modified a minute ago
    old = time.time() - 60
    for f in raw_files:
        os.utime(f, (old, old))
    WindowCache(tmp_path / "cache").key(raw_files, PreprocessSpec())
    index = json.loads((tmp_path / "cache" / "file-hashes.json").read_text())
    assert len(index["files"]) == 2
    calls = []
    monkeypatch.setattr(cache_mod, "file_sha256", lambda p: calls.append(p) or "0" * 64)
    # Execute: a second key reads no file; after touching one file, only that one is re-hashed
    WindowCache(tmp_path / "cache").key(raw_files, PreprocessSpec())
    n_memo = len(calls)
    os.utime(raw_files[0], (old + 1, old + 1))
    WindowCache(tmp_path / "cache").key(raw_files, PreprocessSpec())
    # Assert
    assert n_memo == 0
    assert [os.path.basename(p) for p in calls] == ["a.edf"]


def test_key_errors_name_the_problem(tmp_path, raw_files):
    cache = WindowCache(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"no such file.*nope\.edf"):
        cache.key([tmp_path / "nope.edf"], PreprocessSpec())
    with pytest.raises(TypeError, match=r"extra must be JSON-serialisable"):
        cache.key(raw_files, PreprocessSpec(), {"f": object()})
    with pytest.raises(TypeError, match=r"spec must be a PreprocessSpec"):
        cache.key(raw_files, {"sfreq": 200})
    with pytest.raises(ValueError, match=r"64 lower-case hex digits.*'\.\./x'"):
        cache.load("../x")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDEEG_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FEDEEG_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "fedeeg"


# --- store / load -----------------------------------------------------------------------------


def test_hit_after_store_returns_identical_memory_mapped_arrays(tmp_path, raw_files):
    # Prepare
    cache = WindowCache(tmp_path / "cache")
    key = cache.key(raw_files, PreprocessSpec(), {"labels": ["rest", "task"]})
    windows = _windows()
    # Execute
    path = cache.store(key, windows, {"subject": "S0"})
    again = WindowCache(tmp_path / "cache").load(key, verify=True)
    # Assert
    assert again is not None
    _assert_same(again, windows)
    assert isinstance(again.X.base, np.memmap) or isinstance(again.X, np.memmap)
    assert not again.X.flags.writeable
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["key"] == key and manifest["meta"] == {"subject": "S0"}
    assert manifest["key_material"]["extra"] == {"labels": ["rest", "task"]}
    assert manifest["arrays"]["X"]["shape"] == [6, 3, 200] and manifest["arrays"]["X"]["dtype"] == "<f4"
    assert manifest["arrays"]["X"]["sha256"] == file_sha256(path / "X.npy")
    assert sorted(p.name for p in path.parent.iterdir()) == [key]  # no temporary folder left


def test_empty_window_set_round_trips(tmp_path, raw_files):
    # Prepare: e.g. every window of a recording rejected as an artifact
    cache = WindowCache(tmp_path / "cache")
    key = cache.key(raw_files, PreprocessSpec())
    empty = _windows().subset(np.zeros(6, bool))
    # Execute
    cache.store(key, empty)
    again = cache.load(key, verify=True)
    # Assert
    assert again is not None and again.X.shape == (0, 3, 200) and again.ch_names == empty.ch_names


def test_changed_spec_is_a_miss(tmp_path, raw_files):
    # Prepare
    cache = WindowCache(tmp_path / "cache")
    cache.store(cache.key(raw_files, PreprocessSpec()), _windows())
    # Execute
    other = cache.load(cache.key(raw_files, PreprocessSpec(h_freq=45.0)))
    # Assert
    assert other is None


def test_killed_write_leaves_nothing_loadable_and_next_store_succeeds(tmp_path, raw_files, monkeypatch):
    # Prepare: the second array write dies (as a full disk or a kill would)
    cache = WindowCache(tmp_path / "cache")
    key = cache.key(raw_files, PreprocessSpec())
    real_write = WindowCache._write_array
    calls = []

    def dying_write(fname, arr):
        calls.append(fname.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(fname, arr)

    monkeypatch.setattr(WindowCache, "_write_array", staticmethod(dying_write))
    # Execute
    with pytest.raises(OSError, match="No space left"):
        cache.store(key, _windows())
    monkeypatch.setattr(WindowCache, "_write_array", staticmethod(real_write))
    # Assert: nothing loadable, no folder left; a later store works
    assert cache.load(key) is None
    assert list((tmp_path / "cache" / "windows").iterdir()) == []
    cache.store(key, _windows())
    _assert_same(cache.load(key), _windows())


def test_killed_before_manifest_publish_is_never_read(tmp_path, raw_files, monkeypatch):
    # Prepare: the process dies after the arrays are written, before the manifest (no cleanup runs)
    cache = WindowCache(tmp_path / "cache")
    key = cache.key(raw_files, PreprocessSpec())

    def killed(fname, manifest):
        raise KeyboardInterrupt  # stands in for SIGKILL at this point

    monkeypatch.setattr(WindowCache, "_write_manifest", staticmethod(killed))
    monkeypatch.setattr(cache_mod.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing
    with pytest.raises(KeyboardInterrupt):
        cache.store(key, _windows())
    monkeypatch.undo()
    leftovers = list((tmp_path / "cache" / "windows").iterdir())
    # Execute
    loaded = cache.load(key)
    # Assert: a temporary folder with arrays and no manifest exists, and is not an entry
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp.")
    assert {p.name for p in leftovers[0].iterdir()} == {"X.npy", "y.npy", "subject.npy"}
    assert loaded is None


def test_stale_temporary_folders_are_removed_by_the_next_store(tmp_path, raw_files):
    # Prepare: one left by a dead process on this host, one old from another host, one in flight
    cache = WindowCache(tmp_path / "cache")
    entries = tmp_path / "cache" / "windows"
    entries.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = cache_mod._host_tag()
    by_dead = entries / f".tmp.{host}.{dead_pid}.aaaa"
    old_other = entries / ".tmp.ffffffff.1.bbbb"
    live = entries / f".tmp.{host}.{os.getpid()}.cccc"
    for folder in (by_dead, old_other, live):
        folder.mkdir()
        np.save(folder / "X.npy", np.zeros((2, 3, 4), np.float32))
    hour_ago = time.time() - 2 * 3600
    os.utime(old_other, (hour_ago, hour_ago))
    key = cache.key(raw_files, PreprocessSpec())
    # Execute
    cache.store(key, _windows())
    # Assert
    assert not by_dead.exists() and not old_other.exists()
    assert live.exists()
    assert cache.load(key) is not None


def test_truncated_array_is_rejected_with_a_warning_and_replaced(tmp_path, raw_files, caplog):
    # Prepare: a complete entry whose X.npy later lost its tail
    cache = WindowCache(tmp_path / "cache")
    key = cache.key(raw_files, PreprocessSpec())
    path = cache.store(key, _windows())
    size = (path / "X.npy").stat().st_size
    with open(path / "X.npy", "r+b") as f:
        f.truncate(size - 100)
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedeeg.data.cache"):
        loaded = cache.load(key)
    cache.store(key, _windows(seed=0))
    # Assert
    assert loaded is None
    assert "X.npy has" in caplog.text and "truncated" in caplog.text
    _assert_same(cache.load(key, verify=True), _windows())


def test_altered_array_is_caught_by_verify_only(tmp_path, raw_files, caplog):
    # Prepare: same size, different bytes
    cache = WindowCache(tmp_path / "cache")
    key = cache.key(raw_files, PreprocessSpec())
    path = cache.store(key, _windows())
    with open(path / "X.npy", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x7f")
    # Execute
    cheap = cache.load(key)
    with caplog.at_level(logging.WARNING, logger="fedeeg.data.cache"):
        full = cache.load(key, verify=True)
    # Assert
    assert cheap is not None and full is None
    assert "does not match its sha256" in caplog.text


@pytest.mark.parametrize("damage", ["no_manifest", "bad_json", "other_version", "other_key", "wrong_shape"])
def test_damaged_manifest_is_never_a_hit(tmp_path, raw_files, damage, caplog):
    # Prepare
    cache = WindowCache(tmp_path / "cache")
    key = cache.key(raw_files, PreprocessSpec())
    path = cache.store(key, _windows())
    manifest_file = path / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    if damage == "no_manifest":
        manifest_file.unlink()
    elif damage == "bad_json":
        manifest_file.write_text(manifest_file.read_text()[:50])
    else:
        if damage == "other_version":
            manifest["format_version"] = CACHE_FORMAT_VERSION + 1
        elif damage == "other_key":
            manifest["key"] = "0" * 64
        else:
            manifest["arrays"]["X"]["shape"] = [6, 3, 100]
        manifest_file.write_text(json.dumps(manifest))
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedeeg.data.cache"):
        loaded = cache.load(key)
    # Assert
    assert loaded is None
    assert "Ignoring the cache entry" in caplog.text


def test_store_keeps_an_existing_valid_entry(tmp_path, raw_files):
    # Prepare
    cache = WindowCache(tmp_path / "cache")
    key = cache.key(raw_files, PreprocessSpec())
    path = cache.store(key, _windows())
    before = (path / "manifest.json").read_text()
    # Execute
    again = cache.store(key, _windows())
    # Assert
    assert again == path and (path / "manifest.json").read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [key]


def test_store_rejects_bad_input(tmp_path, raw_files):
    cache = WindowCache(tmp_path / "cache")
    key = cache.key(raw_files, PreprocessSpec())
    with pytest.raises(TypeError, match="windows must be a WindowSet"):
        cache.store(key, np.zeros((2, 3, 4)))
    with pytest.raises(TypeError, match="meta must be JSON-serialisable"):
        cache.store(key, _windows(), {"x": np.float32(1)})
    assert cache.load(key) is None


# --- eegmat -----------------------------------------------------------------------------------

CSV = "Subject,Age,Gender,Recording year,Number of subtractions,Count quality\nSubject01,17,F,2010,8.6,0\n"


@pytest.fixture
def tiny_eegmat(tmp_path):
    root = tmp_path / "eegmat"
    root.mkdir()
    (root / "subject-info.csv").write_text(CSV)
    for part, seed in ((1, 0), (2, 1)):
        raw = make_synthetic_raw(duration=62.0, seed=seed)
        mne.export.export_raw(root / f"Subject01_{part}.edf", raw, fmt="edf", overwrite=True, verbose="error")
    return root


def test_eegmat_subject_through_the_disk_cache(tiny_eegmat, tmp_path, monkeypatch):
    # Prepare
    cache_dir = tmp_path / "cache"
    spec = PreprocessSpec(window_seconds=2)
    computed = []
    real = eegmat._compute_subject
    monkeypatch.setattr(eegmat, "_compute_subject", lambda *a: computed.append(a[2]) or real(*a))
    # Execute: cold (computes, stores), then warm in a cleared in-process memo
    cold = eegmat.load_eegmat_subject(tiny_eegmat, "Subject01", spec, cache_dir=cache_dir)
    eegmat._load_subject_cached.cache_clear()
    warm = eegmat.load_eegmat_subject(tiny_eegmat, "Subject01", spec, cache_dir=cache_dir)
    eegmat._load_subject_cached.cache_clear()
    plain = eegmat.load_eegmat_subject(tiny_eegmat, "Subject01", spec)
    # Assert: computed twice (cold, no cache), read once from disk; all identical, writable copies
    assert computed == ["Subject01", "Subject01"]
    _assert_same(cold, warm)
    _assert_same(cold, plain)
    assert warm.X.flags.writeable and not isinstance(warm.X, np.memmap)
    (entry,) = (cache_dir / "windows").iterdir()
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["meta"] == {"dataset": "eegmat", "subject": "Subject01"}
    assert [f["path"] for f in manifest["key_material"]["files"]] == ["Subject01_1.edf", "Subject01_2.edf"]
    assert manifest["key_material"]["extra"]["label_names"] == ["rest", "arithmetic"]


def test_eegmat_sites_pass_the_cache_dir_and_reject_artifacts(tiny_eegmat, tmp_path, caplog):
    # Prepare: a threshold near the median of the windows' largest peak-to-peak (µV)
    plain = eegmat.load_eegmat_subject(tiny_eegmat, 1, PreprocessSpec(window_seconds=2))
    ptp_uv = (plain.X.max(axis=-1) - plain.X.min(axis=-1)).max(axis=-1) * 100.0
    ordered = np.sort(ptp_uv)
    threshold = float(ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # between two windows
    spec = PreprocessSpec(window_seconds=2, reject_peak_to_peak=threshold)
    # Execute
    with caplog.at_level(logging.INFO, logger="fedeeg.data.preprocessing"):
        (site,) = eegmat.load_eegmat_sites(tiny_eegmat, split="year", n_sites=1, spec=spec, cache_dir=tmp_path / "c")
    # Assert: exactly the windows under the threshold are kept, counts logged per label
    keep = ptp_uv <= threshold
    assert len(list((tmp_path / "c" / "windows").iterdir())) == 1
    np.testing.assert_array_equal(site.windows.X, plain.X[keep])
    np.testing.assert_array_equal(site.windows.y, plain.y[keep])
    n_rest = int((~keep[plain.y == 0]).sum())
    assert 0 < (~keep).sum() < len(keep)
    assert f"Subject01 rest: rejected {n_rest} of {int((plain.y == 0).sum())} window(s)" in caplog.text
