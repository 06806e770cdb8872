"""Channel names: the LaBraM vocabulary and the mapping of recorded names onto it.

The backbone has one position embedding per vocabulary entry; a channel is
usable only if its name maps to an entry. Recordings name channels in many
ways (``"EEG Fp1"``, ``"EEG FP1-REF"``, ``"Fp1."``, ``"T7"`` for ``"T3"``);
:func:`standardize_channel_name` removes the usual decorations and gives every
electrode one name, and :func:`to_vocab` checks the result.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "EEGMAT_CHANNELS",
    "LABRAM_VOCAB",
    "input_chans",
    "standardize_channel_name",
    "to_vocab",
]

#: The 136 channel names of LaBraM's position embedding, in embedding order
#: (slot ``i + 1`` belongs to ``LABRAM_VOCAB[i]``; slot 0 is the cls token).
LABRAM_VOCAB: tuple[str, ...] = tuple(
    """
    FP1 FPZ FP2 AF9 AF7 AF5 AF3 AF1 AFZ AF2 AF4 AF6 AF8 AF10 F9 F7 F5 F3 F1 FZ F2 F4 F6 F8 F10
    FT9 FT7 FC5 FC3 FC1 FCZ FC2 FC4 FC6 FT8 FT10 T9 T7 C5 C3 C1 CZ C2 C4 C6 T8 T10
    TP9 TP7 CP5 CP3 CP1 CPZ CP2 CP4 CP6 TP8 TP10 P9 P7 P5 P3 P1 PZ P2 P4 P6 P8 P10
    PO9 PO7 PO5 PO3 PO1 POZ PO2 PO4 PO6 PO8 PO10 O1 OZ O2 O9 CB1 CB2
    IZ O10 T3 T5 T4 T6 M1 M2 A1 A2
    CFC1 CFC2 CFC3 CFC4 CFC5 CFC6 CFC7 CFC8 CCP1 CCP2 CCP3 CCP4 CCP5 CCP6 CCP7 CCP8
    T1 T2 FTT9h TTP7h TPP9h FTT10h TPP8h TPP10h
    FP1-F7 F7-T7 T7-P7 P7-O1 FP2-F8 F8-T8 T8-P8 P8-O2 FP1-F3 F3-C3 C3-P3 P3-O1 FP2-F4 F4-C4 C4-P4 P4-O2
    """.split()
)

#: The 19 EEG channels of eegmat (PhysioNet "EEG During Mental Arithmetic
#: Tasks"), in file order, as vocabulary names. The files also hold
#: ``EEG A2-A1`` (the reference pair) and ``ECG ECG``, which are not used.
EEGMAT_CHANNELS: tuple[str, ...] = (
    "FP1", "FP2", "F3", "F4", "F7", "F8", "T3", "T4", "C3", "C4",
    "T5", "T6", "P3", "P4", "O1", "O2", "FZ", "CZ", "PZ",
)  # fmt: skip

# Upper-cased name -> vocabulary spelling (a few entries, e.g. "FTT9h", are not
# all upper case in the vocabulary).
_VOCAB_LOOKUP: dict[str, str] = {name.upper(): name for name in LABRAM_VOCAB}
_VOCAB_INDEX: dict[str, int] = {name: i for i, name in enumerate(LABRAM_VOCAB)}

_PREFIXES = ("EEG ", "EEG-", "EEG_")
#: Reference suffixes, longest first: common reference, linked ears, average,
#: one ear/mastoid or both (``"C3-A2"`` is C3 referenced to A2).
_SUFFIXES = ("-A1A2", "-M1M2", "-REF", "-AVG", "-CAR", "-LE", "-AR", "-AV", "-A1", "-A2", "-M1", "-M2")
#: Ear and mastoid electrodes: ``"A2-A1"`` is a derivation between reference
#: electrodes (eegmat's reference pair), not A2 referenced to A1, so it is kept whole.
_REFERENCE_ELECTRODES = frozenset({"A1", "A2", "M1", "M2"})
_EAR_SUFFIXES = frozenset({"A1", "A2", "M1", "M2", "A1A2", "M1M2"})

# Old (10-20) and new (10-10) names of the same four electrodes. LaBraM's vocabulary
# has a slot for each spelling (T3 and T7, ...), but one electrode must always get
# the same position embedding, whatever a site calls it, so every spelling is
# mapped to ONE name. For single electrodes that is the OLD name: the reference
# mapping of the checkpoint notes puts eegmat's T3/T4/T5/T6 in the old-name slots
# (89, 91, 90, 92), as LaBraM's own fine-tuning code does for TUH-style data, and
# every adapter trained so far used those slots; mapping to the new names instead
# would silently move 4 of eegmat's 19 channels to other embeddings. The vocabulary's
# bipolar derivations exist only in new names (``"T7-P7"``), so inside a bipolar
# name the new names are used (``"T3-T5"`` -> ``"T7-P7"``). The montage holds both
# spellings at the same position, so interpolation is unaffected.
_NEW_TO_OLD = {"T7": "T3", "T8": "T4", "P7": "T5", "P8": "T6"}
_OLD_TO_NEW = {old: new for new, old in _NEW_TO_OLD.items()}


def standardize_channel_name(name: str) -> str:
    """Strip the usual decorations of a recorded EEG channel name.

    Upper-cases, removes surrounding whitespace, an ``"EEG "``/``"EEG-"``/``"EEG_"``
    prefix, trailing dots (EEGBCI: ``"Fc5."``, ``"Cz.."``) and a reference
    suffix (``"-REF"``, ``"-LE"``, ``"-AR"``, ``"-AVG"``, ``"-AV"``, ``"-CAR"``,
    ``"-A1"``, ``"-A2"``, ``"-A1A2"``, ``"-M1"``, ``"-M2"``, ``"-M1M2"``; a
    derivation between ear/mastoid electrodes such as ``"A2-A1"`` is kept whole).
    Then gives each electrode one name: the 10-10 names T7, T8, P7, P8 become
    the 10-20 names T3, T4, T5, T6, whose slots LaBraM's reference channel
    mapping uses; inside a bipolar name (``"T3-T5"``) the 10-10 names are used,
    as in the vocabulary's bipolar entries (``"T7-P7"``). Does not check that
    the result is in the vocabulary (see :func:`to_vocab`).

    Parameters
    ----------
    name : str
        A channel name as recorded, e.g. ``"EEG Fp1"`` or ``"Fc5."``.

    Returns
    -------
    name : str
        The standardized name, e.g. ``"FP1"`` or ``"FC5"``.

    Examples
    --------
    >>> standardize_channel_name("EEG Fp1")
    'FP1'
    >>> standardize_channel_name("EEG FP1-REF")
    'FP1'
    >>> standardize_channel_name("Fc5.")
    'FC5'
    >>> standardize_channel_name("T7..")
    'T3'
    >>> standardize_channel_name("EEG T3-T5")
    'T7-P7'
    """
    if not isinstance(name, str):
        raise TypeError(f"A channel name must be a str, got {type(name).__name__} ({name!r}) instead.")
    out = name.strip().upper()
    for prefix in _PREFIXES:
        if out.startswith(prefix):
            out = out[len(prefix):].strip()
            break
    out = out.rstrip(".").strip()
    for suffix in _SUFFIXES:
        if out.endswith(suffix) and len(out) > len(suffix):
            head = out[: -len(suffix)].strip()
            if not (head in _REFERENCE_ELECTRODES and suffix[1:] in _EAR_SUFFIXES):
                out = head
            break
    out = out.rstrip(".").strip()
    parts = out.split("-")
    if len(parts) == 2 and all(parts):
        return "-".join(_OLD_TO_NEW.get(part.strip(), part.strip()) for part in parts)
    return _NEW_TO_OLD.get(out, out)


def _vocab_name(name: str) -> str | None:
    return _VOCAB_LOOKUP.get(standardize_channel_name(name))


def to_vocab(ch_names: Iterable[str]) -> tuple[str, ...]:
    """Map recorded channel names onto the LaBraM vocabulary.

    Parameters
    ----------
    ch_names : iterable of str
        Channel names as recorded (length n_chans).

    Returns
    -------
    ch_names : tuple of str
        The vocabulary names, in the same order (length n_chans).

    Raises
    ------
    ValueError
        If a name has no vocabulary entry (all such names are listed), or if two
        names map to the same entry.
    """
    ch_names = list(ch_names)
    if not ch_names:
        raise ValueError("ch_names is empty: at least one channel is needed.")
    mapped: list[str] = []
    unknown: list[str] = []
    for name in ch_names:
        vocab = _vocab_name(name)
        if vocab is None:
            unknown.append(f"{name!r} (standardized: {standardize_channel_name(name)!r})")
        else:
            mapped.append(vocab)
    if unknown:
        raise ValueError(
            f"{len(unknown)} of {len(ch_names)} channel name(s) are not in the LaBraM channel vocabulary, "
            f"so the backbone has no position embedding for them: {', '.join(unknown)}. "
            "Rename those channels to 10-20/10-10 names (e.g. 'Fp1', 'T3', 'Cz') or drop them "
            "(e.g. with raw.rename_channels(...) or raw.drop_channels(...)) before using this recording."
        )
    seen: dict[str, str] = {}
    duplicates: list[str] = []
    for original, vocab in zip(ch_names, mapped):
        if vocab in seen:
            duplicates.append(f"{seen[vocab]!r} and {original!r} -> {vocab!r}")
        else:
            seen[vocab] = original
    if duplicates:
        raise ValueError(
            f"Several channels map to the same vocabulary name: {'; '.join(duplicates)}. "
            "Keep only one channel per electrode (drop or rename the others)."
        )
    return tuple(mapped)


def input_chans(ch_names: Iterable[str]) -> list[int]:
    """Position-embedding indices of channels: ``[0] + [vocab index + 1, ...]``.

    Slot 0 is the cls token. Names are standardized and checked with
    :func:`to_vocab` first.

    Parameters
    ----------
    ch_names : iterable of str
        Channel names (recorded or vocabulary names), length n_chans.

    Returns
    -------
    input_chans : list of int
        Length n_chans + 1.

    Examples
    --------
    >>> input_chans(["EEG Fp1", "EEG Cz"])
    [0, 1, 42]
    """
    return [0] + [_VOCAB_INDEX[name] + 1 for name in to_vocab(ch_names)]
