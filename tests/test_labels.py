"""Label sources: annotations with a mapping and a window, a CSV/TSV table, file-name patterns."""

import mne
import numpy as np
import pytest
from _recordings import make_raw

from fedeeg.data.labels import (
    LabelError,
    Segment,
    annotation_onsets,
    label_from_filename,
    read_label_table,
    segments_from_annotations,
)

LABELS = ("left", "right")


def test_annotations_with_tmin_tmax_and_own_span():
    # Prepare
    raw = make_raw(duration=12.0)  # T1 @1 (4 s), T2 @5.5 (4 s), T0 @10 (1 s)
    mapping = {"T1": "left", "T2": "right"}
    # Execute
    own = segments_from_annotations(raw, mapping, label_names=LABELS)
    cut = segments_from_annotations(raw, mapping, tmin=0.5, tmax=2.5, label_names=LABELS)
    # Assert
    assert own == [Segment(1.0, 4.0, "left"), Segment(5.5, 4.0, "right")]
    assert cut == [Segment(1.5, 2.0, "left"), Segment(6.0, 2.0, "right")]


def test_brainvision_style_descriptions_match_their_tail():
    # Prepare
    raw = make_raw(duration=12.0, events=((1.0, 2.0, "Comment/T1"), (4.0, 2.0, "Stimulus/S  2"), (7.0, 2.0, "T2")))
    # Execute
    segments = segments_from_annotations(raw, {"T1": "left", "S  2": "right", "T2": "right"})
    # Assert
    assert [s.label for s in segments] == ["left", "right", "right"]


def test_onsets_count_from_the_first_sample_after_cropping():
    # Prepare: crop 2 s off the start; with and without a measurement date
    raws = [make_raw(duration=12.0), make_raw(duration=12.0)]
    raws[1].set_meas_date(1_600_000_000)
    for raw in raws:
        raw.set_annotations(mne.Annotations([5.0], [1.0], ["T1"], orig_time=raw.info["meas_date"]))
        raw.crop(2.0)
    # Execute
    onsets = [annotation_onsets(raw) for raw in raws]
    # Assert
    for got in onsets:
        np.testing.assert_allclose(got, [3.0])


def test_label_not_in_federation_names_file_and_value():
    # Prepare
    raw = make_raw(duration=12.0)
    # Execute / Assert
    with pytest.raises(LabelError, match=r"^rec\.edf: .*labels \('left', 'right'\): mapping 'T2' -> 'rigth'"):
        segments_from_annotations(raw, {"T1": "left", "T2": "rigth"}, label_names=LABELS, source="rec.edf")
    with pytest.raises(LabelError, match=r"both tmin and tmax"):
        segments_from_annotations(raw, {"T1": "left"}, tmin=0.0)


@pytest.fixture
def root(tmp_path):
    for name in ("S01.edf", "sub/S02.edf"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_label_table_csv_and_tsv(root):
    # Prepare
    (root / "labels.csv").write_text("file,label,onset,duration,note\nS01.edf,left,0,4\nS01.edf,right,10,\n\nsub/S02.edf,right,,\n")
    (root / "labels.tsv").write_text("file\tlabel\nS01.edf\tleft\n")
    # Execute
    csv_table = read_label_table(root / "labels.csv", root=root, label_names=LABELS)
    tsv_table = read_label_table(root / "labels.tsv", root=root, label_names=LABELS)
    # Assert
    assert csv_table.files == {
        root / "S01.edf": (Segment(0.0, 4.0, "left"), Segment(10.0, None, "right")),
        root / "sub/S02.edf": (Segment(0.0, None, "right"),),
    }
    assert tsv_table.files == {root / "S01.edf": (Segment(0.0, None, "left"),)}
    assert csv_table.missing == ()


def test_label_table_missing_file_names_row_and_file(root):
    # Prepare
    (root / "labels.csv").write_text("file,label\nS01.edf,left\nS09.edf,right\n")
    # Execute
    lenient = read_label_table(root / "labels.csv", root=root, strict=False)
    # Assert
    assert list(lenient.files) == [root / "S01.edf"]
    assert lenient.missing == (("S09.edf", f"labels.csv row 3: file 'S09.edf' not found under {root}"),)
    with pytest.raises(LabelError, match=r"labels\.csv row 3: file 'S09\.edf' not found"):
        read_label_table(root / "labels.csv", root=root)


@pytest.mark.parametrize(
    "text, match",
    [
        ("file,lab\nS01.edf,left\n", r"needs columns 'file' and 'label'.*missing \['label'\]"),
        ("file,label\nS01.edf,Left\n", r"labels\.csv row 2 \(file 'S01\.edf'\): label 'Left' is not one of"),
        ("file,label,onset\nS01.edf,left,soon\n", r"row 2 .*onset must be a number of seconds, got 'soon'"),
        ("file,label,duration\nS01.edf,left,0\n", r"row 2 .*duration must be a positive number"),
        ("file,label\n", r"no rows"),
    ],
)
def test_label_table_errors(root, text, match):
    # Prepare
    (root / "labels.csv").write_text(text)
    # Execute / Assert
    with pytest.raises(LabelError, match=match):
        read_label_table(root / "labels.csv", root=root, label_names=LABELS)


def test_label_from_filename_glob_and_regex():
    # Prepare
    patterns = {"*_1.edf": "rest", "re:_2\\.edf$": "arithmetic"}
    # Execute
    got = [label_from_filename(p, patterns, label_names=("rest", "arithmetic")) for p in ("a/S01_1.edf", "S01_2.edf", "S01_3.edf")]
    # Assert
    assert got == ["rest", "arithmetic", None]


def test_label_from_filename_errors():
    # Execute / Assert
    with pytest.raises(LabelError, match=r"S01_1\.edf: file-name patterns give different labels"):
        label_from_filename("S01_1.edf", {"*_1.edf": "rest", "S01*": "arithmetic"})
    with pytest.raises(LabelError, match=r"pattern '\*_1\.edf' -> 'Rest'"):
        label_from_filename("S01_1.edf", {"*_1.edf": "Rest"}, label_names=("rest",))
