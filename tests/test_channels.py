"""Channel names: the LaBraM vocabulary and the mapping onto it."""

import pytest

from fedeeg.data.channels import EEGMAT_CHANNELS, LABRAM_VOCAB, input_chans, standardize_channel_name, to_vocab

EEGMAT_RAW = [f"EEG {n}" for n in "Fp1 Fp2 F3 F4 F7 F8 T3 T4 C3 C4 T5 T6 P3 P4 O1 O2 Fz Cz Pz".split()]
EEGMAT_INPUT_CHANS = [0, 1, 3, 18, 22, 16, 24, 89, 91, 40, 44, 90, 92, 62, 66, 81, 83, 20, 42, 64]


def test_vocab_has_136_unique_names_in_notes_order():
    # Prepare / Execute
    vocab = LABRAM_VOCAB
    # Assert
    assert len(vocab) == 136
    assert len(set(vocab)) == 136
    assert vocab[:3] == ("FP1", "FPZ", "FP2")
    assert vocab[86:90] == ("IZ", "O10", "T3", "T5")
    assert vocab[-1] == "P4-O2"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("EEG Fp1", "FP1"),
        ("EEG T3", "T3"),
        ("EEG-Cz", "CZ"),
        ("EEG FP1-REF", "FP1"),
        ("EEG C3-LE", "C3"),
        ("O2-Ref", "O2"),
        ("Fc5.", "FC5"),
        ("Fp1..", "FP1"),
        ("  pz  ", "PZ"),
        ("EEG A2-A1", "A2-A1"),
        ("ECG ECG", "ECG ECG"),
        ("FP1-F7", "FP1-F7"),
    ],
)
def test_standardize_channel_name(raw, expected):
    # Execute / Assert
    assert standardize_channel_name(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        # case and prefixes
        ("fp1", "FP1"), ("EEG_Fz", "FZ"), ("EEG-C4", "C4"),
        # reference suffixes: common, linked ears, average, one ear/mastoid or both
        ("EEG FP1-REF", "FP1"), ("EEG O1-AVG", "O1"), ("Cz-AV", "CZ"), ("EEG C3-CAR", "C3"), ("F4-AR", "F4"),
        ("EEG C3-A2", "C3"), ("EEG C4-A1", "C4"), ("P3-M2", "P3"), ("P4-M1", "P4"), ("O2-A1A2", "O2"),
        ("EEG A1-REF", "A1"),
        # derivations between ear/mastoid electrodes stay whole (not in the vocabulary: dropped)
        ("EEG A2-A1", "A2-A1"), ("M1-M2", "M1-M2"),
        # one name per electrode: 10-10 T7/T8/P7/P8 -> the 10-20 slots LaBraM's reference mapping uses
        ("T7", "T3"), ("EEG T8-REF", "T4"), ("P7", "T5"), ("p8", "T6"), ("T3", "T3"), ("EEG T6-LE", "T6"),
        # EEGBCI trailing dots
        ("Cz..", "CZ"), ("Fc5.", "FC5"), ("T7..", "T3"), ("Afz.", "AFZ"), ("Iz..", "IZ"),
        # bipolar names use the vocabulary's bipolar spelling (10-10 names)
        ("EEG T3-T5", "T7-P7"), ("F8-T4", "F8-T8"), ("T6-O2", "P8-O2"), ("EEG FP1-F7", "FP1-F7"),
    ],
)  # fmt: skip
def test_standardize_channel_name_renaming_rules(raw, expected):
    # Execute / Assert
    assert standardize_channel_name(raw) == expected


def test_old_and_new_names_of_one_electrode_share_one_embedding_slot():
    # Execute
    old = input_chans(["T3", "T4", "T5", "T6"])
    new = input_chans(["EEG T7-REF", "T8..", "P7", "EEG P8"])
    bipolar = input_chans(["EEG T3-T5"]) + input_chans(["T7-P7"])
    # Assert: slots 89, 91, 90, 92 (the checkpoint notes' eegmat mapping), whichever spelling
    assert old == new == [0, 89, 91, 90, 92]
    assert bipolar == [0, LABRAM_VOCAB.index("T7-P7") + 1] * 2


def test_to_vocab_rejects_old_and_new_name_of_the_same_electrode():
    with pytest.raises(ValueError, match=r"'T3' and 'T7' -> 'T3'"):
        to_vocab(["T3", "Cz", "T7"])


def test_to_vocab_maps_eegmat_names_in_order():
    # Execute
    names = to_vocab(EEGMAT_RAW)
    # Assert
    assert names == EEGMAT_CHANNELS
    assert len(EEGMAT_CHANNELS) == 19


def test_to_vocab_returns_vocab_spelling_for_mixed_case_entries():
    # Execute / Assert: the vocabulary spells a few names with a lower-case h
    assert to_vocab(["ftt9h", "EEG TPP10H"]) == ("FTT9h", "TPP10h")


def test_to_vocab_lists_every_unknown_name_and_says_what_to_do():
    # Prepare
    names = ["EEG Fp1", "EEG A2-A1", "ECG ECG", "EEG Cz"]
    # Execute
    with pytest.raises(ValueError) as err:
        to_vocab(names)
    # Assert
    msg = str(err.value)
    assert "'EEG A2-A1' (standardized: 'A2-A1')" in msg
    assert "'ECG ECG' (standardized: 'ECG ECG')" in msg
    assert "2 of 4" in msg
    assert "Rename" in msg and "drop" in msg
    assert "EEG Fp1" not in msg


def test_to_vocab_rejects_duplicates_after_standardization():
    # Execute / Assert
    with pytest.raises(ValueError, match=r"'EEG Fp1' and 'FP1-REF' -> 'FP1'"):
        to_vocab(["EEG Fp1", "EEG Cz", "FP1-REF"])


def test_to_vocab_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        to_vocab([])


def test_input_chans_of_eegmat_matches_labram():
    # Execute
    from_raw = input_chans(EEGMAT_RAW)
    from_vocab = input_chans(EEGMAT_CHANNELS)
    # Assert
    assert from_raw == EEGMAT_INPUT_CHANS
    assert from_vocab == EEGMAT_INPUT_CHANS


def test_input_chans_slot_zero_is_cls():
    # Execute
    idx = input_chans(["FP1", "P4-O2"])
    # Assert
    assert idx == [0, 1, 136]


def test_input_chans_unknown_name_errors():
    with pytest.raises(ValueError, match="not in the LaBraM channel vocabulary"):
        input_chans(["EEG Fp1", "X1"])


@pytest.mark.realdata
def test_eegmat_channels_match_edf_header(eegmat_dir):
    # Prepare
    import mne

    raw = mne.io.read_raw_edf(eegmat_dir / "Subject04_1.edf", preload=False, verbose="error")
    # Execute
    eeg = [n for n in raw.ch_names if n not in ("EEG A2-A1", "ECG ECG")]
    # Assert
    assert eeg == EEGMAT_RAW
    assert to_vocab(eeg) == EEGMAT_CHANNELS
