"""Containers for windowed EEG held at one site.

Nothing in these containers ever leaves a site: only adapter arrays and aggregate
metrics do (see :mod:`fedeeg.federation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class WindowSet:
    """Windows of preprocessed EEG in the backbone's input units.

    Parameters
    ----------
    X : ndarray, shape (n_windows, n_chans, n_times)
        float32 EEG at ``sfreq`` in units of 0.1 mV (µV / 100).
    y : ndarray, shape (n_windows,)
        int64 class index into ``label_names``.
    subject : ndarray, shape (n_windows,)
        Subject identifier of each window (site-local; never sent anywhere).
    ch_names : tuple of str
        Channel names in the backbone's vocabulary (e.g. ``"FP1"``), length n_chans.
    sfreq : float
        Sampling frequency in Hz.
    label_names : tuple of str
        Names of the classes.
    """

    X: np.ndarray
    y: np.ndarray
    subject: np.ndarray
    ch_names: tuple[str, ...]
    sfreq: float
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        self.X = np.asarray(self.X, dtype=np.float32)
        self.y = np.asarray(self.y, dtype=np.int64)
        self.subject = np.asarray(self.subject).astype(str)
        self.ch_names = tuple(self.ch_names)
        self.label_names = tuple(self.label_names)
        if self.X.ndim != 3:
            raise ValueError(f"X must have shape (n_windows, n_chans, n_times), got shape {self.X.shape} instead.")
        n = self.X.shape[0]
        if self.y.shape != (n,) or self.subject.shape != (n,):
            raise ValueError(
                f"y and subject must have shape ({n},) to match X, got {self.y.shape} and {self.subject.shape} instead."
            )
        if len(self.ch_names) != self.X.shape[1]:
            raise ValueError(f"ch_names has {len(self.ch_names)} names but X has {self.X.shape[1]} channels.")
        if n and (self.y.min() < 0 or self.y.max() >= len(self.label_names)):
            raise ValueError(f"y must hold class indices in [0, {len(self.label_names) - 1}], got {np.unique(self.y).tolist()}.")

    @property
    def n_windows(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_chans(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_times(self) -> int:
        return int(self.X.shape[2])

    @property
    def subjects(self) -> list[str]:
        """Sorted unique subject ids."""
        return sorted(set(self.subject.tolist()))

    def subset(self, mask: np.ndarray) -> "WindowSet":
        """Return the windows selected by a boolean mask or an index array."""
        return WindowSet(self.X[mask], self.y[mask], self.subject[mask], self.ch_names, self.sfreq, self.label_names)

    def select_subjects(self, subjects) -> "WindowSet":
        """Return the windows of the given subjects."""
        return self.subset(np.isin(self.subject, list(subjects)))

    def class_counts(self) -> np.ndarray:
        """Windows per class, shape (n_classes,)."""
        return np.bincount(self.y, minlength=len(self.label_names))

    @staticmethod
    def concatenate(sets: list["WindowSet"]) -> "WindowSet":
        """Concatenate window sets that share channels, sfreq and labels."""
        if not sets:
            raise ValueError("Cannot concatenate an empty list of WindowSets.")
        first = sets[0]
        for s in sets[1:]:
            if s.ch_names != first.ch_names or s.sfreq != first.sfreq or s.label_names != first.label_names:
                raise ValueError(
                    "Cannot pool windows with different channels, sfreq or labels: "
                    f"{first.ch_names}/{first.sfreq}/{first.label_names} vs {s.ch_names}/{s.sfreq}/{s.label_names}."
                )
        return WindowSet(
            np.concatenate([s.X for s in sets]),
            np.concatenate([s.y for s in sets]),
            np.concatenate([s.subject for s in sets]),
            first.ch_names,
            first.sfreq,
            first.label_names,
        )


@dataclass
class Site:
    """One hospital's data: its name, windows and non-identifying metadata."""

    name: str
    windows: WindowSet
    info: dict = field(default_factory=dict)


def split_subjects(windows: WindowSet, test_fraction: float, seed: int) -> tuple[WindowSet, WindowSet]:
    """Hold out a fraction of subjects (not windows) for testing.

    At least one subject goes to each side. Deterministic for a given seed.

    Parameters
    ----------
    windows : WindowSet
        The site's windows.
    test_fraction : float
        Fraction of the site's subjects held out, in (0, 1).
    seed : int
        Seed of the split.

    Returns
    -------
    train, test : WindowSet
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r} instead.")
    subjects = windows.subjects
    if len(subjects) < 2:
        raise ValueError(
            f"A site needs at least 2 subjects to hold some out for testing, got {len(subjects)} ({subjects}). "
            "Use fewer sites or a split that gives every site two or more subjects."
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(subjects))
    n_test = int(round(test_fraction * len(subjects)))
    n_test = min(max(n_test, 1), len(subjects) - 1)
    test_subjects = {subjects[i] for i in order[:n_test]}
    mask = np.isin(windows.subject, sorted(test_subjects))
    return windows.subset(~mask), windows.subset(mask)
