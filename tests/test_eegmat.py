"""eegmat loader: on a tiny fake folder (EDF written by MNE), and on the real data when present."""

import logging

import mne
import numpy as np
import pytest

from fedeeg.data import load_sites
from fedeeg.data.channels import EEGMAT_CHANNELS
from fedeeg.data.eegmat import load_eegmat_sites, load_eegmat_subject, read_subject_info
from fedeeg.data.preprocessing import PreprocessSpec, make_windows, preprocess_raw
from fedeeg.data.synthetic import make_synthetic_raw

CSV = """Subject,Age,Gender,Recording year,Number of subtractions,Count quality
Subject01,17,F,2010,8.6,0
Subject02,18,M,2010,20.71,1
Subject03,19,F,2011,4.35,0
Subject09,20,M,2012,13.38,1
"""
REST_S, TASK_S = 70.0, 62.0  # rest longer than the 60 s used; task as in eegmat


def _export(raw, fname):
    mne.export.export_raw(fname, raw, fmt="edf", overwrite=True, verbose="error")


@pytest.fixture(scope="module")
def fake_eegmat(tmp_path_factory):
    """Three subjects with files (2010, 2010, 2011) plus Subject09 listed in the CSV without files."""
    root = tmp_path_factory.mktemp("eegmat")
    (root / "subject-info.csv").write_text(CSV)
    for k, subject in enumerate(["Subject01", "Subject02", "Subject03"]):
        _export(make_synthetic_raw(duration=REST_S, seed=10 * k), root / f"{subject}_1.edf")
        _export(make_synthetic_raw(duration=TASK_S, seed=10 * k + 1), root / f"{subject}_2.edf")
    return root


def test_read_subject_info_types(fake_eegmat):
    # Execute
    info = read_subject_info(fake_eegmat)
    # Assert
    assert sorted(info) == ["Subject01", "Subject02", "Subject03", "Subject09"]
    assert info["Subject02"] == {
        "age": 18, "gender": "M", "recording_year": 2010, "number_of_subtractions": 20.71, "count_quality": 1,
    }  # fmt: skip


def test_missing_folder_or_csv_says_where_data_comes_from(tmp_path):
    # Execute / Assert
    with pytest.raises(FileNotFoundError, match=r"does not exist.*PhysioNet.*eegmat.*v1\.0\.0"):
        read_subject_info(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"No subject-info\.csv.*SubjectNN_1\.edf"):
        read_subject_info(tmp_path)


def test_load_subject_windows_and_labels(fake_eegmat):
    # Execute
    w = load_eegmat_subject(fake_eegmat, "Subject01")
    # Assert: 60 s of rest and 62 s of task in 4-s windows -> 15 + 15
    assert w.X.shape == (30, 19, 800)
    assert w.class_counts().tolist() == [15, 15]
    assert w.y[:15].tolist() == [0] * 15
    assert w.label_names == ("rest", "arithmetic")
    assert w.ch_names == EEGMAT_CHANNELS
    assert w.subjects == ["Subject01"]
    assert w.sfreq == 200.0


def test_rest_is_the_last_60_seconds(fake_eegmat):
    # Prepare
    spec = PreprocessSpec()
    raw = mne.io.read_raw_edf(fake_eegmat / "Subject02_1.edf", preload=True, verbose="error")
    data, _ = preprocess_raw(raw, spec)
    expected = make_windows(data[:, -60 * 200 :], spec.n_times)
    # Execute
    w = load_eegmat_subject(fake_eegmat, 2, spec)
    # Assert
    np.testing.assert_array_equal(w.X[w.y == 0], expected)


def test_load_subject_is_memoised_and_returns_copies(fake_eegmat):
    # Prepare
    a = load_eegmat_subject(fake_eegmat, "Subject03")
    # Execute
    a.X[:] = 0.0
    b = load_eegmat_subject(fake_eegmat, "Subject03")
    # Assert
    assert np.abs(b.X).max() > 0
    assert b.X.flags.writeable


def test_load_subject_window_length_follows_spec(fake_eegmat):
    # Execute
    w = load_eegmat_subject(fake_eegmat, "Subject01", PreprocessSpec(window_seconds=10))
    # Assert
    assert w.X.shape == (12, 19, 2000)
    assert w.class_counts().tolist() == [6, 6]


def test_unreadable_edf_names_the_file(tmp_path):
    # Prepare
    (tmp_path / "subject-info.csv").write_text(CSV)
    (tmp_path / "Subject01_1.edf").write_bytes(b"this is not an EDF file")
    (tmp_path / "Subject01_2.edf").write_bytes(b"nor is this")
    # Execute / Assert
    with pytest.raises(OSError, match=r"Could not read the EDF file .*Subject01_1\.edf"):
        load_eegmat_subject(tmp_path, "Subject01")


def test_year_split_skips_subjects_without_files(fake_eegmat, caplog):
    # Execute
    with caplog.at_level(logging.INFO, logger="fedeeg.data.eegmat"):
        sites = load_eegmat_sites(fake_eegmat, split="year", n_sites=2)
    # Assert
    assert [s.name for s in sites] == ["year-2010", "year-2011"]
    assert sites[0].windows.subjects == ["Subject01", "Subject02"]
    assert sites[0].info == {"year": 2010, "n_subjects": 2, "n_windows": 60}
    assert sites[1].info == {"year": 2011, "n_subjects": 1, "n_windows": 30}
    assert "skipping Subject09" in caplog.text
    assert "Subject03 loaded" in caplog.text


def test_year_split_rejects_other_site_count(fake_eegmat):
    with pytest.raises(ValueError, match=r"year split has exactly 2 site\(s\).*n_sites=3"):
        load_eegmat_sites(fake_eegmat, split="year", n_sites=3)


def test_subject_split_round_robin(fake_eegmat):
    # Execute
    (site,) = load_eegmat_sites(fake_eegmat, split="subject", n_sites=1)
    two = load_eegmat_sites(fake_eegmat, split="year", n_sites=None, subjects=["Subject01", "Subject03"])
    # Assert
    assert site.name == "site-0"
    assert site.windows.subjects == ["Subject01", "Subject02", "Subject03"]
    assert site.info == {"n_subjects": 3, "n_windows": 90}
    assert [s.name for s in two] == ["year-2010", "year-2011"]


def test_subject_split_needs_two_subjects_per_site(fake_eegmat):
    with pytest.raises(ValueError, match=r"needs at least 4 subjects.*only 3"):
        load_eegmat_sites(fake_eegmat, split="subject", n_sites=2)


def test_bad_split_and_unknown_subject(fake_eegmat):
    with pytest.raises(ValueError, match=r"'split'.*'year', 'subject'.*'hospital'"):
        load_eegmat_sites(fake_eegmat, split="hospital")
    with pytest.raises(ValueError, match=r"\['Subject42'\] are not in"):
        load_eegmat_sites(fake_eegmat, split="subject", n_sites=1, subjects=["Subject42"])


def test_load_sites_dispatch(fake_eegmat):
    # Execute
    sites = load_sites("eegmat", data_dir=fake_eegmat, n_sites=1, split="subject")
    # Assert
    assert len(sites) == 1 and sites[0].windows.n_windows == 90
    with pytest.raises(ValueError, match=r"--data-dir"):
        load_sites("eegmat")
    with pytest.raises(ValueError, match=r"'dataset'.*'synthetic', 'eegmat'.*'tuh'"):
        load_sites("tuh")


# --- real data -------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_subject(eegmat_dir):
    # Execute
    w = load_eegmat_subject(eegmat_dir, "Subject04")
    # Assert
    assert w.X.shape == (30, 19, 800)
    assert w.class_counts().tolist() == [15, 15]
    assert w.ch_names == EEGMAT_CHANNELS
    assert 0.03 < float(np.median(w.X.std(axis=-1))) < 0.5  # about 3-50 µV


@pytest.mark.realdata
def test_real_subject_info(eegmat_dir):
    info = read_subject_info(eegmat_dir)
    assert len(info) >= 24
    assert {row["recording_year"] for row in info.values()} == {2010, 2011, 2012}


@pytest.mark.realdata
@pytest.mark.slow
def test_real_year_split(eegmat_dir):
    # Execute
    sites = load_eegmat_sites(eegmat_dir, split="year")
    # Assert
    assert [s.name for s in sites] == ["year-2010", "year-2011", "year-2012"]
    for site in sites:
        counts = site.windows.class_counts()
        assert counts[0] == counts[1] == 15 * site.info["n_subjects"]


# --- window packs (export_eegmat_pack): the eegmat folder without EDF files or MNE ---------------------------------


def test_window_pack_gives_the_same_sites_bit_for_bit(fake_eegmat, tmp_path):
    # Prepare
    from fedeeg.data.eegmat import PACK_MANIFEST, export_eegmat_pack

    pack = export_eegmat_pack(fake_eegmat, tmp_path / "pack")
    # Execute
    a = load_eegmat_sites(fake_eegmat, n_sites=None)
    b = load_eegmat_sites(pack, n_sites=None)
    # Assert: same sites, subjects and windows; no EDF file in the pack, only arrays + the CSV + the manifest
    assert not list(pack.glob("*.edf"))
    assert (pack / PACK_MANIFEST).is_file() and (pack / "subject-info.csv").is_file()
    assert [(s.name, s.info) for s in a] == [(s.name, s.info) for s in b]
    for sa, sb in zip(a, b):
        assert sa.windows.X.tobytes() == sb.windows.X.tobytes()
        assert sa.windows.y.tolist() == sb.windows.y.tolist()
        assert sa.windows.subject.tolist() == sb.windows.subject.tolist()
        assert sa.windows.ch_names == sb.windows.ch_names and sa.windows.sfreq == sb.windows.sfreq


def test_window_pack_serves_only_its_spec_and_checks_its_arrays(fake_eegmat, tmp_path):
    # Prepare
    from fedeeg.data.eegmat import export_eegmat_pack

    pack = export_eegmat_pack(fake_eegmat, tmp_path / "pack", subjects=["Subject01"])
    # Execute / Assert: another spec needs the EDF files
    with pytest.raises(ValueError, match=r"pack .* holds windows preprocessed with .* serves only"):
        load_eegmat_subject(pack, "Subject01", PreprocessSpec(window_seconds=2.0))
    # a damaged array is refused, naming the file
    fname = pack / "Subject01.f32shuf.xz"
    import lzma

    data = bytearray(lzma.decompress(fname.read_bytes()))
    data[0] ^= 1
    fname.write_bytes(lzma.compress(bytes(data)))
    with pytest.raises(OSError, match=r"Subject01\.f32shuf\.xz.*checksum"):
        load_eegmat_subject(pack, "Subject01")


def test_window_pack_refuses_the_edf_folder_itself(fake_eegmat):
    from fedeeg.data.eegmat import export_eegmat_pack

    with pytest.raises(ValueError, match="another folder"):
        export_eegmat_pack(fake_eegmat, fake_eegmat)
