"""The data layer: channel names, preprocessing, datasets split into sites.

Sites hold windows of EEG in the backbone's units (0.1 mV at 200 Hz by
default); nothing here sends data anywhere.
"""

from __future__ import annotations

import os

from .._validation import check_option
from .base import Site, WindowSet, split_subjects
from .channels import EEGMAT_CHANNELS, LABRAM_VOCAB, input_chans, standardize_channel_name, to_vocab
from .eegmat import load_eegmat_sites, load_eegmat_subject, read_subject_info
from .cache import WindowCache, default_cache_dir
from .preprocessing import HarmoniseReport, PreprocessSpec, make_windows, preprocess_raw, reject_windows
from .synthetic import make_synthetic_raw, make_synthetic_sites
from .check import CheckReport, check_site
from .labels import LabelError, Segment, label_from_filename, read_label_table, segments_from_annotations
from .readers import DataFileError, find_bids_recordings, read_raw_file
from .site import SiteConfig, load_site_windows_cached, site_source_files, SiteConfigError, SiteDataError, SiteReport, load_site_config, load_site_windows

__all__ = [
    "DATASETS",
    "EEGMAT_CHANNELS",
    "LABRAM_VOCAB",
    "PreprocessSpec",
    "Site",
    "WindowSet",
    "input_chans",
    "load_eegmat_sites",
    "load_eegmat_subject",
    "load_sites",
    "make_synthetic_raw",
    "make_synthetic_sites",
    "make_windows",
    "preprocess_raw",
    "read_subject_info",
    "split_subjects",
    "standardize_channel_name",
    "to_vocab",
    # hospital data in common formats (readers, labels, site files, checks)
    "CheckReport",
    "DataFileError",
    "LabelError",
    "Segment",
    "SiteConfig",
    "SiteConfigError",
    "SiteDataError",
    "SiteReport",
    "check_site",
    "find_bids_recordings",
    "label_from_filename",
    "load_site_config",
    "load_site_windows",
    "load_site_windows_cached",
    "site_source_files",
    "read_label_table",
    "read_raw_file",
    "segments_from_annotations",
    # harmonisation and the preprocessed cache
    "HarmoniseReport",
    "WindowCache",
    "default_cache_dir",
    "reject_windows",
]

#: Datasets :func:`load_sites` knows.
DATASETS = ("synthetic", "eegmat", "folder")


def load_sites(
    dataset: str,
    *,
    data_dir=None,
    n_sites: int = 3,
    split: str = "year",
    spec: PreprocessSpec = PreprocessSpec(),
    seed: int = 0,
    site_files=(),
    label_names=None,
    cache_dir=None,
) -> list[Site]:
    """Load a dataset as a list of sites.

    Parameters
    ----------
    dataset : {"synthetic", "eegmat", "folder"}
        ``"synthetic"``: :func:`make_synthetic_sites` (``split`` does not apply;
        windows follow ``spec.window_seconds`` and ``spec.sfreq``).
        ``"eegmat"``: :func:`load_eegmat_sites` from ``data_dir``.
        ``"folder"``: one site per site file (:func:`load_site_config`), read
        with :func:`load_site_windows` (any format MNE reads, labels from the
        site file).
    data_dir : path-like | None
        The eegmat folder (required for ``"eegmat"``).
    n_sites : int
        Number of sites (for eegmat's year split it must equal the number of
        recording years, 3).
    split : {"year", "subject"}
        How eegmat subjects are grouped into sites.
    spec : PreprocessSpec
        Preprocessing (window length and rate).
    seed : int
        Seed of the synthetic data.
    site_files : sequence of path-like
        ``"folder"``: the sites' TOML files, one site each, in order.
    label_names : sequence of str | None
        ``"folder"``: the federation's classes (required).
    cache_dir : path-like | None
        Preprocessed-window cache (eegmat and folder); None: no disk cache.

    Returns
    -------
    sites : list of Site
    """
    check_option("dataset", dataset, DATASETS)
    check_option("split", split, ("year", "subject"))
    if dataset == "synthetic":
        return make_synthetic_sites(n_sites, window_seconds=spec.window_seconds, sfreq=spec.sfreq, seed=seed)
    if dataset == "folder":
        if isinstance(site_files, (str, os.PathLike)):
            site_files = [site_files]
        if not site_files:
            raise ValueError("dataset='folder' needs the sites' TOML files (site_files=..., --site SITE.toml); got none.")
        if not label_names:
            raise ValueError("dataset='folder' needs the federation's label names (label_names=..., --labels a,b); got none.")
        sites = []
        for path in site_files:
            cfg = load_site_config(path)
            windows = load_site_windows_cached(cfg, spec, tuple(label_names), cache_dir=cache_dir)
            sites.append(Site(cfg.name, windows, {"site_file": str(path), "format": cfg.data.format}))
        names = [s.name for s in sites]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"Site names must be unique across site files, got {dup} more than once: set [site] name.")
        return sites
    if data_dir is None or str(data_dir) == "":
        raise ValueError(
            "dataset='eegmat' needs the folder of the eegmat recordings: pass --data-dir "
            "(data_dir=...) pointing to the folder with subject-info.csv and SubjectNN_1.edf / SubjectNN_2.edf."
        )
    return load_eegmat_sites(data_dir, split=split, n_sites=n_sites, spec=spec, cache_dir=cache_dir)
