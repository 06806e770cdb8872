"""check_site: says whether a site can train, and why not, without raising for bad data."""

import json

import pytest
from _recordings import SPEC, make_raw, write, write_text_as

from fedeeg.data.check import CheckReport, check_site
from fedeeg.data.readers import DataFileError
from fedeeg.data.site import SiteConfig

LABELS = ("left", "right")


def _site(root, mapping=None, **data):
    return SiteConfig.from_dict(
        {
            "site": {"name": "hospital-a"},
            "data": {"root": str(root), **data},
            "labels": {"source": "annotations", "mapping": mapping or {"T1": "left", "T2": "right"}},
        }
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    write(make_raw(seed=1), root / "S01.edf")
    write(make_raw(seed=2), root / "S02.edf")
    write_text_as(root / "broken.edf")
    return root


def test_a_good_site_can_train(folder):
    # Execute
    check = check_site(_site(folder), SPEC, LABELS)
    text = check.format_text()
    # Assert
    assert isinstance(check, CheckReport)
    assert check.can_train and check.problems == [] and check.errors == []
    assert check.report.windows_per_label == {"left": 6, "right": 8}
    assert any("1 of 3 recording(s) skipped" in w for w in check.warnings)
    assert text.startswith("Site 'hospital-a': READY to train")
    assert "  windows: 14 (2 s each)" in text
    assert "broken.edf: not an EDF file (header does not start with '0       ')" in text
    d = json.loads(json.dumps(check.to_dict()))
    assert d["can_train"] is True and d["report"]["n_skipped"] == 1 and d["spec"]["window_seconds"] == 2.0


def test_a_missing_class_stops_training(folder):
    # Execute
    check = check_site(_site(folder, mapping={"T1": "left"}), SPEC, LABELS)
    # Assert
    assert not check.can_train
    assert check.problems == ["no window of label(s) ['right']"]
    assert "CANNOT train" in check.format_text() and "no window of label(s) ['right']" in check.format_text()


def test_only_bad_files_gives_a_report_not_an_exception(tmp_path):
    # Prepare
    write_text_as(tmp_path / "a.edf")
    write_text_as(tmp_path / "b.edf")
    # Execute
    check = check_site(_site(tmp_path), SPEC, LABELS)
    # Assert
    assert not check.can_train
    assert check.problems == ["no windows: 0 recording(s) read, 2 skipped", "no subject with windows"]
    assert [s["file"] for s in check.report.skipped] == ["a.edf", "b.edf"]


def test_an_empty_folder_is_reported(tmp_path):
    # Execute
    check = check_site(_site(tmp_path, format="edf"), SPEC, LABELS)
    # Assert
    assert not check.can_train
    assert check.report is None
    assert check.errors == [f"site 'hospital-a': no recordings matched pattern '**/*.edf' under {tmp_path}."]
    assert "Errors:" in check.format_text()
    json.dumps(check.to_dict())


def test_one_subject_warns_and_strict_raises(folder, tmp_path):
    # Prepare
    write(make_raw(seed=3), tmp_path / "only.edf")
    write_text_as(tmp_path / "broken.edf")
    # Execute
    check = check_site(_site(tmp_path), SPEC, LABELS)
    # Assert
    assert check.can_train
    assert "only 1 subject: no subject can be held out for testing at this site" in check.warnings
    with pytest.raises(DataFileError, match=r"^broken\.edf: not an EDF file"):
        check_site(_site(tmp_path), SPEC, LABELS, strict=True)
