"""Readers: every format reads back what was written; every bad file is one DataFileError line naming it."""

import logging
import pickle
import re
import shutil

import numpy as np
import pytest
from _recordings import (
    CH_NAMES,
    duplicate_label,
    file_hashes,
    make_raw,
    truncate,
    write,
    write_bids,
    write_text_as,
    zero_length,
)

from fedeeg.data.readers import DataFileError, detect_format, find_bids_recordings, read_raw_file


@pytest.fixture(scope="module")
def raw():
    return make_raw(duration=12.0)


@pytest.mark.parametrize(
    "name, atol, descriptions",
    [
        ("rec.edf", 2e-9, ["T1", "T2", "T0"]),  # 16-bit quantisation
        ("rec.bdf", 2e-10, []),  # the test writer puts no annotations in BDF
        ("rec.vhdr", 1e-11, ["Comment/T1", "Comment/T2", "Comment/T0"]),
        ("rec.set", 1e-11, ["T1", "T2", "T0"]),
        ("rec_raw.fif", 1e-11, ["T1", "T2", "T0"]),
        ("rec_raw.fif.gz", 1e-11, ["T1", "T2", "T0"]),
    ],
)
def test_every_format_reads_back_what_was_written(tmp_path, raw, name, atol, descriptions):
    # Prepare
    path = write(raw, tmp_path / name)
    # Execute
    got = read_raw_file(path)
    # Assert
    assert got.ch_names == list(CH_NAMES)
    assert got.info["sfreq"] == 250.0
    assert got.preload
    np.testing.assert_allclose(got.get_data(), raw.get_data(), rtol=0, atol=atol)
    assert list(got.annotations.description) == descriptions


def test_format_detection_and_override(tmp_path, raw):
    # Prepare: an EDF file with the old '.rec' extension
    path = write(raw, tmp_path / "rec.edf")
    rec = path.rename(tmp_path / "old.rec")
    # Execute / Assert
    assert [detect_format(n) for n in ("a.EDF", "a.bdf", "a.vhdr", "a.set", "a.fif", "a_raw.fif.gz")] == [
        "edf", "bdf", "brainvision", "eeglab", "fif", "fif",
    ]  # fmt: skip
    with pytest.raises(DataFileError, match=r"^old\.rec: unknown EEG file extension"):
        read_raw_file(rec)
    assert read_raw_file(rec, fmt="edf").n_times == raw.n_times
    with pytest.raises(ValueError, match=r"'fmt'.*'gdf'"):
        read_raw_file(rec, fmt="gdf")
    with pytest.raises(DataFileError, match=r"^old\.rec: EEGLAB files must end in \.set"):
        read_raw_file(rec, fmt="eeglab")


def test_bids_events_and_bad_channels(tmp_path, raw):
    # Prepare
    marked = raw.copy()
    marked.info["bads"] = ["C4"]
    write_bids(marked, tmp_path, "01", task="rest")
    write_bids(raw, tmp_path, "02", task="rest")
    write_bids(raw, tmp_path, "02", task="other")
    # Execute
    found = find_bids_recordings(tmp_path, {"task": "rest"})
    got = read_raw_file(found[0].fpath, fmt="bids")
    # Assert
    assert [p.subject for p in found] == ["01", "02"]
    assert got.info["bads"] == ["C4"]
    assert list(got.annotations.description) == ["T1", "T2", "T0"]
    np.testing.assert_allclose(got.annotations.onset, [1.0, 5.5, 10.0])
    with pytest.raises(ValueError, match=r"Unknown BIDS entit.*'tsk'"):
        find_bids_recordings(tmp_path, {"tsk": "rest"})


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, raw):
    """One damaged file per case, next to the good files they were made from."""
    folder = tmp_path_factory.mktemp("bad")
    good = write(raw, folder / "good.edf")
    write(raw, folder / "good_raw.fif")
    write(raw, folder / "good.vhdr")
    write_text_as(folder / "notes.edf")
    write_text_as(folder / "notes.bdf")
    write_text_as(folder / "notes.vhdr")
    write_text_as(folder / "notes.set")
    write_text_as(folder / "notes_raw.fif")
    (folder / "empty.edf").write_bytes(b"")
    truncate(good, folder / "cut.edf", keep_seconds=3)
    zero_length(good, folder / "zero.edf")
    duplicate_label(good, folder / "dup.edf", 0, 1)
    fif = (folder / "good_raw.fif").read_bytes()
    (folder / "cut_raw.fif").write_bytes(fif[: len(fif) // 2])
    shutil.copy(folder / "good.vhdr", folder / "orphan.vhdr")  # names good.eeg ...
    vhdr = (folder / "good.vhdr").read_text().replace("good.eeg", "gone.eeg")
    (folder / "nodata.vhdr").write_text(vhdr)
    eeg = (folder / "good.eeg").read_bytes()
    (folder / "odd.eeg").write_bytes(eeg[:1001])
    (folder / "odd.vhdr").write_text((folder / "good.vhdr").read_text().replace("good.eeg", "odd.eeg"))
    return folder


@pytest.mark.parametrize(
    "name, reason",
    [
        ("notes.edf", r"not an EDF file \(header does not start with '0       '\)"),
        ("notes.bdf", r"not a BDF file"),
        ("notes.vhdr", r"not a BrainVision header"),
        ("notes.set", r"could not be read as EEGLAB \(ValueError: .*\)"),
        ("notes_raw.fif", r"could not be read as FIF \(ValueError: .*file id tag.*\)"),
        ("empty.edf", r"empty file \(0 bytes\)"),
        ("cut.edf", r"truncated: header says 12 s, file holds 3 s"),
        ("zero.edf", r"zero-length recording"),
        ("dup.edf", r"duplicate channel names \{'Fp1'\}"),
        ("cut_raw.fif", r"could not be read as FIF \(.*\)"),
        ("nodata.vhdr", r"data file 'gone\.eeg' named in the header is missing"),
        ("odd.vhdr", r"truncated or corrupt: data file 'odd\.eeg' holds 1001 bytes"),
        ("missing.edf", r"file not found"),
    ],
)
def test_bad_file_is_one_line_naming_file_and_problem(bad_files, name, reason):
    # Prepare
    before = file_hashes(bad_files)
    # Execute
    with pytest.raises(DataFileError) as info:
        read_raw_file(bad_files / name)
    # Assert
    err = info.value
    assert str(err).startswith(f"{name}: ")
    assert "\n" not in str(err)
    assert err.path == bad_files / name
    assert str(err) == f"{name}: {err.reason}"
    assert re.search(reason, err.reason), err.reason
    assert file_hashes(bad_files) == before


def test_data_file_error_is_a_value_error_and_pickles():
    # Execute
    err = pickle.loads(pickle.dumps(DataFileError("/x/y.edf", "zero-length recording\n(no data)")))
    # Assert
    assert isinstance(err, ValueError)
    assert str(err) == "y.edf: zero-length recording (no data)"
    assert err.reason == "zero-length recording (no data)"


def test_mne_warnings_become_log_lines_naming_the_file(bad_files, caplog, tmp_path):
    # Prepare: a BrainVision file whose data stop at 4 s while its markers go on to 11 s
    raw = make_raw(duration=12.0)
    write(raw, tmp_path / "short.vhdr")
    eeg = (tmp_path / "short.eeg").read_bytes()
    (tmp_path / "short.eeg").write_bytes(eeg[: 4 * 250 * len(CH_NAMES) * 4])
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedeeg.data.readers"):
        got = read_raw_file(tmp_path / "short.vhdr")
    # Assert
    assert got.n_times == 1000
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("short.vhdr: Omitted") and "outside data range" in line for line in lines), lines
