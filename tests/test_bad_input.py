"""Bad input: each bad file is skipped with one line naming it and the problem; the good files give the same windows.

Every case adds one bad file to a folder of two good EDF recordings and checks
the skip line, the report, that ``strict`` makes it fatal, and that no file
changed.
"""

import logging
import re
import shutil

import numpy as np
import pytest
from _recordings import SPEC, duplicate_label, file_hashes, make_raw, truncate, write, write_text_as, zero_length

from fedeeg.data.channels import to_vocab
from fedeeg.data.labels import LabelError
from fedeeg.data.readers import DataFileError
from fedeeg.data.site import SiteConfig, SiteDataError, load_site_windows

LABELS = ("left", "right")
MAPPING = {"T1": "left", "T2": "right"}


def _site(root, **data):
    labels = data.pop("labels", {"source": "annotations", "mapping": MAPPING})
    return SiteConfig.from_dict({"site": {"name": "h"}, "data": {"root": str(root), **data}, "labels": labels})


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Two good recordings and the windows they give alone."""
    folder = tmp_path_factory.mktemp("good")
    write(make_raw(seed=1), folder / "S01.edf")
    write(make_raw(seed=2), folder / "S02.edf")
    windows, _ = load_site_windows(_site(folder), SPEC, LABELS)
    return folder, windows


@pytest.fixture
def site_dir(tmp_path, good):
    folder = tmp_path / "site"
    shutil.copytree(good[0], folder)
    return folder


def _nan_fif(folder):
    raw = make_raw(seed=3)
    raw._data[2, 100:110] = np.nan  # C3
    write(raw, folder / "nan_raw.fif")


def _flat_fif(folder):
    raw = make_raw(seed=3)
    raw._data[:] = 0.0
    write(raw, folder / "flat_raw.fif")


def _corrupt_fif(folder):
    write(make_raw(seed=3), folder / "tmp_raw.fif")
    data = (folder / "tmp_raw.fif").read_bytes()
    (folder / "tmp_raw.fif").unlink()
    (folder / "cut_raw.fif").write_bytes(data[: len(data) // 2])


CASES = {
    "notes.edf": (lambda f: write_text_as(f / "notes.edf"), r"not an EDF file \(header does not start with '0       '\)"),
    "cut.edf": (lambda f: truncate(f / "S01.edf", f / "cut.edf", 3), r"truncated: header says 20 s, file holds 3 s"),
    "zero.edf": (lambda f: zero_length(f / "S01.edf", f / "zero.edf"), r"zero-length recording"),
    "dup.edf": (lambda f: duplicate_label(f / "S02.edf", f / "dup.edf", 0, 1), r"duplicate channel names \{'Fp1'\}"),
    "nan_raw.fif": (_nan_fif, r"NaN or infinite values in channel\(s\) C3"),
    "flat_raw.fif": (_flat_fif, r"all 7 EEG channel\(s\) are flat \(robust std < 0\.1 µV\)"),
    "cut_raw.fif": (_corrupt_fif, r"could not be read as FIF \(.+\)"),
    "notes.vhdr": (lambda f: write_text_as(f / "notes.vhdr"), r"not a BrainVision header"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_file_is_skipped_with_one_line(site_dir, good, caplog, name):
    # Prepare
    make, reason = CASES[name]
    make(site_dir)
    before = file_hashes(site_dir)
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedeeg.data.site"):
        windows, report = load_site_windows(_site(site_dir), SPEC, LABELS)
    # Assert
    np.testing.assert_array_equal(windows.X, good[1].X)
    np.testing.assert_array_equal(windows.y, good[1].y)
    np.testing.assert_array_equal(windows.subject, good[1].subject)
    assert [s["file"] for s in report.skipped] == [name]
    assert re.match(reason, report.skipped[0]["reason"]), report.skipped[0]["reason"]
    skip_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert skip_lines == [f"skipping {name}: {report.skipped[0]['reason']}"]
    assert "\n" not in skip_lines[0]
    assert (report.n_found, report.n_read, report.n_skipped) == (3, 2, 1)
    assert file_hashes(site_dir) == before


@pytest.mark.parametrize("name", ["notes.edf", "nan_raw.fif"])
def test_strict_makes_a_bad_file_fatal(site_dir, name):
    # Prepare
    make, reason = CASES[name]
    make(site_dir)
    # Execute / Assert
    with pytest.raises(DataFileError, match=rf"^{name.replace('.', '[.]')}: {reason}"):
        load_site_windows(_site(site_dir, strict=True), SPEC, LABELS)
    with pytest.raises(DataFileError):
        load_site_windows(_site(site_dir), SPEC, LABELS, strict=True)


def test_one_flat_channel_is_dropped_with_a_warning(site_dir, good):
    # Prepare
    raw = make_raw(seed=3)
    raw._data[3] = 0.0  # C4
    write(raw, site_dir / "S03_raw.fif")
    # Execute
    windows, report = load_site_windows(_site(site_dir), SPEC, LABELS)
    # Assert
    s03 = report.files[2]
    assert (s03.file, s03.flat, s03.bads) == ("S03_raw.fif", ["C4"], ["C4"])
    assert any("flat channel(s) C4" in w for w in s03.warnings)
    assert report.channels == [c for c in good[1].ch_names if c != "C4"]
    keep = [good[1].ch_names.index(c) for c in report.channels]
    first = windows.select_subjects(["S01", "S02"])
    np.testing.assert_array_equal(first.X, good[1].X[:, keep])


def test_clipped_channel_is_reported_and_kept(site_dir, good):
    # Prepare: O1 saturates at ±10 µV
    raw = make_raw(seed=3)
    raw._data[4] = np.clip(raw._data[4], -10e-6, 10e-6)
    write(raw, site_dir / "S03.edf")
    # Execute
    windows, report = load_site_windows(_site(site_dir), SPEC, LABELS)
    # Assert
    assert report.files[2].clipped == ["O1"]
    assert report.files[2].flat == [] and report.files[0].clipped == []
    assert any("clipped/saturated channel(s) O1" in w for w in report.files[2].warnings)
    assert report.channels == list(good[1].ch_names)
    np.testing.assert_array_equal(windows.select_subjects(["S01", "S02"]).X, good[1].X)


def test_label_table_row_with_missing_file(site_dir, tmp_path):
    # Prepare
    rows = "file,label,onset,duration\nS01.edf,left,1,4\nS02.edf,right,5.5,4\n"
    (tmp_path / "ok.csv").write_text(rows)
    (tmp_path / "labels.csv").write_text(rows + "S09.edf,left,0,4\n")
    table = {"source": "table", "table": str(tmp_path / "labels.csv")}
    expected, _ = load_site_windows(_site(site_dir, labels={"source": "table", "table": str(tmp_path / "ok.csv")}), SPEC, LABELS)
    # Execute
    windows, report = load_site_windows(_site(site_dir, labels=table), SPEC, LABELS)
    # Assert
    np.testing.assert_array_equal(windows.X, expected.X)
    np.testing.assert_array_equal(windows.y, [0, 0, 1, 1])
    assert report.skipped == [{"file": "S09.edf", "reason": f"labels.csv row 4: file 'S09.edf' not found under {site_dir}"}]
    with pytest.raises(LabelError, match=r"labels\.csv row 4: file 'S09\.edf' not found"):
        load_site_windows(_site(site_dir, labels=table, strict=True), SPEC, LABELS)


def test_mixed_sampling_rates_are_resampled_and_reported(site_dir, good):
    # Prepare
    write(make_raw(seed=3, sfreq=500.0), site_dir / "S03.edf")
    # Execute
    windows, report = load_site_windows(_site(site_dir), SPEC, LABELS)
    # Assert
    assert report.sfreqs == [250.0, 500.0]
    assert [f.sfreq for f in report.files] == [250.0, 250.0, 500.0]
    assert windows.select_subjects(["S03"]).X.shape == (7, 7, 400)
    np.testing.assert_array_equal(windows.select_subjects(["S01", "S02"]).X, good[1].X)
    assert windows.ch_names == to_vocab(("Fp1", "Fp2", "C3", "C4", "O1", "O2", "Cz"))


def test_empty_folder(tmp_path):
    # Prepare
    (tmp_path / "readme.txt").write_text("no EEG here")
    # Execute / Assert
    with pytest.raises(SiteDataError, match=rf"no recordings matched pattern '\*\*/\*\.edf' under {tmp_path}"):
        load_site_windows(_site(tmp_path, format="edf"), SPEC, LABELS)
    with pytest.raises(SiteDataError, match=r"no recordings matched pattern 'eeg/\*\.bdf'"):
        load_site_windows(_site(tmp_path, pattern="eeg/*.bdf"), SPEC, LABELS)
    with pytest.raises(SiteDataError, match=r"root .*nope.* is not a folder"):
        load_site_windows(_site(tmp_path / "nope"), SPEC, LABELS)
