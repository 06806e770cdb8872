"""Site files and site loading: every format gives the windows of the in-memory recording, with its labels."""

import datetime
import json

import numpy as np
import pytest
from _recordings import (
    CH_NAMES,
    EEGBCI_CHANNELS,
    EVENTS,
    SPEC,
    file_hashes,
    make_raw,
    reference_windows,
    write,
    write_bids,
)

from fedeeg.data.channels import to_vocab
from fedeeg.data.labels import LabelError
from fedeeg.data.site import (
    SiteConfig,
    SiteConfigError,
    SiteDataError,
    load_site_config,
    load_site_windows,
)

LABELS = ("left", "right")
MAPPING = {"T1": "left", "T2": "right"}
#: EVENTS as labelled segments (annotation spans).
SEGMENTS = [(on, dur, MAPPING[d]) for on, dur, d in EVENTS if d in MAPPING]
ATOL = 1e-4  # model units (0.1 mV); signals are about 0.2 units, EDF's 16-bit step is about 1e-5


def _site(root, *, data=None, labels=None, channels=None):
    return SiteConfig.from_dict(
        {
            "site": {"name": "hospital-a"},
            "data": {"root": str(root), **(data or {})},
            "labels": labels or {"source": "annotations", "mapping": MAPPING},
            **({"channels": channels} if channels else {}),
        }
    )


def _expected(raws, segments=SEGMENTS, label_names=LABELS):
    parts = [reference_windows(raw, segments, list(label_names)) for raw in raws]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@pytest.fixture(scope="module")
def raws():
    return [make_raw(seed=1), make_raw(seed=2)]


@pytest.fixture(scope="module")
def expected(raws):
    return _expected(raws)


@pytest.mark.parametrize("fmt, ext", [("edf", "edf"), ("brainvision", "vhdr"), ("eeglab", "set"), ("fif", "fif")])
def test_each_format_gives_the_in_memory_windows(tmp_path, raws, expected, fmt, ext):
    # Prepare
    for k, raw in enumerate(raws, start=1):
        write(raw, tmp_path / "recordings" / f"S0{k}" / f"S0{k}_run1{'_raw' if fmt == 'fif' else ''}.{ext}")
    site = _site(tmp_path / "recordings", data={"format": fmt, "subject_pattern": r"(?P<subject>S\d+)/"})
    before = file_hashes(tmp_path)
    # Execute
    windows, report = load_site_windows(site, SPEC, LABELS)
    # Assert
    X, y = expected
    assert windows.X.shape == X.shape == (14, 7, 400)
    np.testing.assert_allclose(windows.X, X, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(windows.y, y)
    assert windows.subject.tolist() == ["S01"] * 7 + ["S02"] * 7
    assert windows.ch_names == to_vocab(CH_NAMES)
    assert (windows.sfreq, windows.label_names) == (200.0, LABELS)
    assert report.windows_per_label == {"left": 6, "right": 8}
    assert report.windows_per_subject == {"S01": 7, "S02": 7}
    assert (report.n_found, report.n_read, report.n_skipped) == (2, 2, 0)
    assert file_hashes(tmp_path) == before


def test_bdf_with_a_label_table(tmp_path, raws, expected):
    # Prepare
    rows = ["file,label,onset,duration"]
    for k, raw in enumerate(raws, start=1):
        write(raw, tmp_path / "data" / f"S0{k}.bdf")
        rows += [f"S0{k}.bdf,{label},{on},{dur}" for on, dur, label in SEGMENTS]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    site = _site(tmp_path / "data", labels={"source": "table", "table": str(tmp_path / "labels.csv")})
    # Execute
    windows, report = load_site_windows(site, SPEC, LABELS)
    # Assert
    np.testing.assert_allclose(windows.X, expected[0], rtol=0, atol=ATOL)
    np.testing.assert_array_equal(windows.y, expected[1])
    assert windows.subjects == ["S01", "S02"]


@pytest.mark.parametrize("bids_format", ["EDF", "BrainVision"])
def test_bids_dataset(tmp_path, raws, bids_format):
    # Prepare: sub-01 marks C4 bad in channels.tsv, so the site keeps the channels common to both
    marked = raws[0].copy()
    marked.info["bads"] = ["C4"]
    write_bids(marked, tmp_path, "01", fmt=bids_format)
    write_bids(raws[1], tmp_path, "02", fmt=bids_format)
    write_bids(raws[1], tmp_path, "02", task="other", fmt=bids_format)
    site = _site(tmp_path, data={"format": "bids", "entities": {"task": "rest"}})
    keep = [c for c in CH_NAMES if c != "C4"]
    X0, y0 = reference_windows(raws[0].copy().pick(keep), SEGMENTS, list(LABELS))
    X1, y1 = reference_windows(raws[1], SEGMENTS, list(LABELS))
    before = file_hashes(tmp_path)
    # Execute
    windows, report = load_site_windows(site, SPEC, LABELS)
    # Assert
    assert file_hashes(tmp_path) == before  # no file changed, none left behind (mne-bids' transient locks)
    assert windows.ch_names == to_vocab(keep)
    assert windows.subject.tolist() == ["sub-01"] * 7 + ["sub-02"] * 7
    np.testing.assert_allclose(windows.X[:7], X0, rtol=0, atol=ATOL)
    np.testing.assert_allclose(windows.X[7:], X1[:, [CH_NAMES.index(c) for c in keep]], rtol=0, atol=ATOL)
    np.testing.assert_array_equal(windows.y, np.concatenate([y0, y1]))
    assert report.files[0].bads == ["C4"]
    assert report.files[1].channels_found == list(to_vocab(CH_NAMES))
    assert any("C4 left out" in w for w in report.warnings)


def test_eegbci_style_edf(tmp_path):
    # Prepare: 64 channels named 'Fc5.', 'Cz..', 160 Hz, T0 rest / T1 / T2 of about 4.1 s
    events = ((0.0, 4.2, "T0"), (4.2, 4.1, "T1"), (8.3, 4.2, "T0"), (12.5, 4.1, "T2"), (16.6, 3.4, "T0"))
    raw = make_raw(duration=20.0, sfreq=160.0, ch_names=EEGBCI_CHANNELS, events=events)
    write(raw, tmp_path / "S001" / "S001R04.edf")
    site = _site(
        tmp_path,
        data={"format": "edf", "subject_pattern": r"^(S\d{3})/"},
        labels={"source": "annotations", "mapping": MAPPING, "tmin": 0.0, "tmax": 4.0},
    )
    X, y = reference_windows(raw, [(4.2, 4.0, "left"), (12.5, 4.0, "right")], list(LABELS))
    # Execute
    windows, report = load_site_windows(site, SPEC, LABELS)
    # Assert
    assert windows.ch_names == to_vocab(EEGBCI_CHANNELS)
    assert windows.ch_names[:3] == ("FC5", "FC3", "FC1") and "IZ" in windows.ch_names
    np.testing.assert_allclose(windows.X, X, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(windows.y, [0, 0, 1, 1])
    assert windows.subjects == ["S001"]
    assert report.files[0].sfreq == 160.0


def test_filename_labels_like_eegmat(tmp_path):
    # Prepare
    raws = {f"Subject0{k}_{r}.edf": make_raw(duration=10.0, seed=10 * k + r, events=()) for k in (1, 2) for r in (1, 2)}
    for name, raw in raws.items():
        write(raw, tmp_path / name)
    site = _site(
        tmp_path,
        data={"subject_pattern": r"(Subject\d+)_"},
        labels={"source": "filename", "filename": {"*_1.edf": "rest", "*_2.edf": "arithmetic"}},
    )
    label_names = ("rest", "arithmetic")
    expected = [reference_windows(raws[n], [(0.0, None, lab)], list(label_names)) for n, lab in
                zip(sorted(raws), ["rest", "arithmetic"] * 2)]  # fmt: skip
    # Execute
    windows, report = load_site_windows(site, SPEC, label_names)
    # Assert
    np.testing.assert_allclose(windows.X, np.concatenate([e[0] for e in expected]), rtol=0, atol=ATOL)
    np.testing.assert_array_equal(windows.y, [0] * 5 + [1] * 5 + [0] * 5 + [1] * 5)
    assert report.windows_per_subject == {"Subject01": 10, "Subject02": 10}


def test_renames_bads_and_common_channels(tmp_path):
    # Prepare: a's 'EEG Fpz-Cz' is renamed Fpz; b lacks O2; T3 and C4 are bad everywhere
    a = make_raw(ch_names=("EEG Fpz-Cz", "C3", "C4", "O1", "O2", "T3"), seed=3)
    b = make_raw(ch_names=("Fpz", "C3", "C4", "O1", "T3"), seed=4)
    write(a, tmp_path / "a.edf")
    write(b, tmp_path / "b.edf")
    site = _site(tmp_path, channels={"rename": {"EEG Fpz-Cz": "Fpz", "EEG Oz": "Oz"}, "bads": ["T3", "c4"]})
    # Execute
    windows, report = load_site_windows(site, SPEC, LABELS)
    # Assert
    assert windows.ch_names == ("FPZ", "C3", "O1")
    assert report.channels == ["FPZ", "C3", "O1"]
    assert report.files[0].bads == ["C4", "T3"]
    assert report.files[1].channels_missing == ["O2"]
    assert any("O2 left out" in w and "b.edf" in w for w in report.warnings)
    assert any("rename key(s) ['EEG Oz'] occur in no recording" in w for w in report.warnings)
    Xa, _ = reference_windows(a.copy().rename_channels({"EEG Fpz-Cz": "Fpz"}).pick(["Fpz", "C3", "O1"]), SEGMENTS, list(LABELS))
    np.testing.assert_allclose(windows.X[:7], Xa, rtol=0, atol=ATOL)


def test_pick_skips_recordings_lacking_a_channel(tmp_path):
    # Prepare
    write(make_raw(seed=5), tmp_path / "full.edf")
    write(make_raw(ch_names=("Fp1", "Fp2", "C3"), seed=6), tmp_path / "partial.edf")
    site = _site(tmp_path, channels={"pick": ["C3", "Cz"]})
    # Execute
    windows, report = load_site_windows(site, SPEC, LABELS)
    # Assert
    assert windows.ch_names == ("C3", "CZ")
    assert windows.subjects == ["full"]
    assert report.skipped == [{"file": "partial.edf", "reason": "lacks channel(s) ['CZ'] of [channels] pick (bad or flat: [])"}]


def test_report_is_json_and_holds_no_identifiers(tmp_path):
    # Prepare: the EDF header carries a patient code and a measurement date
    raw = make_raw(seed=7)
    raw.set_meas_date(datetime.datetime(2021, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc))
    raw.info["subject_info"] = {"his_id": "PATIENT4711", "last_name": "Doe"}
    write(raw, tmp_path / "rec.edf")
    site = _site(tmp_path, labels={"source": "annotations", "mapping": {**MAPPING, "T9": "left"}})
    # Execute
    _, report = load_site_windows(site, SPEC, LABELS)
    text = json.dumps(report.to_dict())
    # Assert
    assert "PATIENT4711" not in text and "Doe" not in text and "2021" not in text
    d = json.loads(text)
    assert d["files"][0]["robust_std_uv"].keys() == set(CH_NAMES)
    assert 10 < d["files"][0]["robust_std_uv"]["Cz"] < 30
    assert d["n_windows"] == 7
    assert any("mapping key(s) ['T9'] occur in no recording" in w for w in d["warnings"])


def test_no_windows_is_an_error_with_the_report(tmp_path):
    # Prepare: no annotation matches the mapping
    write(make_raw(seed=8), tmp_path / "rec.edf")
    site = _site(tmp_path, labels={"source": "annotations", "mapping": {"X1": "left"}})
    # Execute
    with pytest.raises(SiteDataError, match=r"no windows from 1 recording") as info:
        load_site_windows(site, SPEC, LABELS)
    # Assert
    assert info.value.report.n_read == 1
    assert any("no annotation matches [labels] mapping" in w for w in info.value.report.files[0].warnings)


def test_label_outside_federation_is_an_error(tmp_path):
    # Prepare
    write(make_raw(seed=8), tmp_path / "rec.edf")
    site = _site(tmp_path, labels={"source": "annotations", "mapping": {"T1": "Left"}})
    # Execute / Assert
    with pytest.raises(LabelError, match=r"mapping 'T1' -> 'Left'"):
        load_site_windows(site, SPEC, LABELS)


# --- the site file --------------------------------------------------------------------------------

EXAMPLE = r"""
[site]
name = "hospital-a"

[data]
root = "recordings"
format = "edf"
pattern = "**/*.edf"
subject_pattern = "(?P<subject>S\\d+)"
strict = false

[labels]
source = "annotations"
mapping = { T1 = "left", T2 = "right" }
tmin = 0.0
tmax = 4.0

[channels]
rename = { "EEG Fpz-Cz" = "Fpz" }
bads = ["T3"]
"""


def test_example_site_file_loads_and_reads(tmp_path):
    # Prepare
    (tmp_path / "site.toml").write_text(EXAMPLE)
    write(make_raw(seed=9), tmp_path / "recordings" / "S07_night.edf")
    # Execute
    site = load_site_config(tmp_path / "site.toml")
    windows, _ = load_site_windows(site, SPEC, LABELS)
    # Assert
    assert site.data.root == tmp_path / "recordings"
    assert site.labels.mapping == {"T1": "left", "T2": "right"}
    assert site.channels.bads == ("T3",)
    assert hash(site) == hash(load_site_config(tmp_path / "site.toml"))
    assert windows.subjects == ["S07"]
    np.testing.assert_array_equal(windows.y, [0, 0, 1, 1, 1, 1, 0, 0])  # [0, 4) s after each event: 2 windows
    assert site.to_dict()["labels"] == {"source": "annotations", "mapping": MAPPING, "tmin": 0.0, "tmax": 4.0}


@pytest.mark.parametrize(
    "edit, match",
    [
        (("[data]", "[data]\nrot = 'x'"), r"site\.toml: unknown key\(s\) \['rot'\] in \[data\]; allowed keys are \['root', 'format', 'pattern'"),
        (("[channels]", "[chanels]"), r"unknown key\(s\) \['chanels'\] in the site file; allowed keys are \['site', 'data', 'labels', 'channels'\]"),
        (("format = \"edf\"", "format = \"gdf\""), r"'format'.*'bids', 'auto', but got 'gdf'"),
        (("strict = false", "strict = 'no'"), r"\[data\]: strict must be true or false"),
        (("tmax = 4.0", ""), r"\[labels\]: give both tmin and tmax"),
        (("source = \"annotations\"", "source = \"filename\""), r"\['mapping', 'tmin', 'tmax'\] do\(es\) not apply to source = 'filename'"),
        (("bads = [\"T3\"]", "bads = \"T3\""), r"\[channels\]: bads must be a list of channel names"),
        (("bads = [\"T3\"]", "pick = [\"C3\", \"XY9\"]"), r"\[channels\]: pick: .*'XY9'"),
        (("format = \"edf\"", "format = \"bids\""), r"pattern does not apply to format = 'bids'"),
        (("subject_pattern = \"(?P<subject>S\\\\d+)\"", "subject_pattern = \"(S\""), r"subject_pattern '\(S' is not a valid regular expression"),
        (("name = \"hospital-a\"", "name = 'a'\nname = 'b'"), r"not valid TOML"),
    ],
)
def test_site_file_errors(tmp_path, edit, match):
    # Prepare
    old, new = edit
    assert old in EXAMPLE
    (tmp_path / "site.toml").write_text(EXAMPLE.replace(old, new, 1))
    # Execute / Assert
    with pytest.raises(SiteConfigError, match=match):
        load_site_config(tmp_path / "site.toml")


def test_site_file_missing_table_and_file(tmp_path):
    # Prepare
    (tmp_path / "site.toml").write_text("[site]\nname = 'a'\n[data]\nroot = '.'\n")
    # Execute / Assert
    with pytest.raises(SiteConfigError, match=r"missing table\(s\) \['\[labels\]'\]"):
        load_site_config(tmp_path / "site.toml")
    with pytest.raises(FileNotFoundError, match=r"nope\.toml"):
        load_site_config(tmp_path / "nope.toml")


@pytest.mark.realdata
def test_eegmat_folder_as_a_site(eegmat_dir):
    # Prepare: eegmat's own loader takes the last 60 s of _1 as rest and all of _2 as arithmetic
    from fedeeg.data.eegmat import load_eegmat_subject
    from fedeeg.data.preprocessing import PreprocessSpec

    site = _site(
        eegmat_dir,
        data={"pattern": "Subject04_*.edf", "subject_pattern": r"(Subject\d+)_"},
        labels={"source": "filename", "filename": {"*_1.edf": "rest", "*_2.edf": "arithmetic"}},
    )
    spec = PreprocessSpec()
    reference = load_eegmat_subject(eegmat_dir, 4, spec)
    # Execute
    windows, report = load_site_windows(site, spec, ("rest", "arithmetic"))
    # Assert
    assert windows.ch_names == reference.ch_names
    np.testing.assert_array_equal(windows.X[windows.y == 1], reference.X[reference.y == 1])
    assert report.files[0].channels_dropped == ["EEG A2-A1", "ECG ECG"]
    assert report.files[0].flat == [] and report.files[0].clipped == []
