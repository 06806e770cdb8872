"""Flower-free glue of a run: sites and their splits, the model, and the
centralized and local-only baselines that the federated run is compared with.

The federated mode lives in :mod:`fedeeg.federation` (the only place that
imports Flower) and uses the same pieces.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from .config import RunConfig
from .data.base import WindowSet, split_subjects
from .data.channels import EEGMAT_CHANNELS
from .metrics import pool_metrics
from .training import evaluate, resolve_device, train_epochs

logger = logging.getLogger(__name__)

#: Label names of the built-in datasets (the federation's label set).
DATASET_LABELS = {"synthetic": ("rest", "arithmetic"), "eegmat": ("rest", "arithmetic")}
#: Channels of the built-in datasets, in the windows' order (synthetic sites mimic eegmat's montage).
DATASET_CHANNELS = {"synthetic": EEGMAT_CHANNELS, "eegmat": EEGMAT_CHANNELS}


@dataclass
class SiteSplit:
    """One site's training and held-out test windows (subjects disjoint)."""

    name: str
    train: WindowSet
    test: WindowSet
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """Aggregate counts only (no identifiers)."""
        return {
            "train_windows": self.train.n_windows,
            "test_windows": self.test.n_windows,
            "train_subjects": len(self.train.subjects),
            "test_subjects": len(self.test.subjects),
            **{k: v for k, v in self.info.items() if isinstance(v, (int, float, str))},
        }


def preprocess_spec(cfg: RunConfig):
    """The preprocessing every site applies for this run."""
    from .data.preprocessing import PreprocessSpec

    return PreprocessSpec(
        window_seconds=float(cfg.window_seconds),
        channels=cfg.channel_list or None,
        max_interpolated=int(cfg.max_interpolated),
        reference=cfg.reference or None,
        reject_peak_to_peak=float(cfg.reject_uv) or None,
    )


def run_labels(cfg: RunConfig) -> tuple[str, ...]:
    """The federation's classes: the built-in dataset's, or ``cfg.labels`` for folder datasets."""
    return cfg.label_names if cfg.dataset == "folder" else DATASET_LABELS[cfg.dataset]


#: Ways to hold out test data inside a site: whole subjects (default), or the last windows of every subject in
#: time (for sites of one subject, e.g. the eegmat one-subject-per-site scenario).
HOLDOUTS = ("subjects", "time")


def synthetic_settings(cfg: RunConfig) -> tuple[int, int, "SiteHeterogeneity | None"]:
    """The synthetic sites' size and heterogeneity a run config asks for.

    Read with defaults from the optional fields ``synth_subjects``,
    ``synth_windows_per_class``, ``label_alpha``, ``montage_drop``,
    ``site_sfreqs``, ``amplitude_shift``, ``noise_shift`` and ``size_skew``
    (see :mod:`fedeeg.scenarios`), so a config without them gives today's
    sites exactly.

    Returns
    -------
    subjects_per_site : int
    windows_per_class : int
    heterogeneity : SiteHeterogeneity | None
        None when every knob is off.
    """
    from .data.synthetic import SiteHeterogeneity

    het = SiteHeterogeneity(
        label_alpha=float(getattr(cfg, "label_alpha", 0.0)),
        montage_drop=float(getattr(cfg, "montage_drop", 0.0)),
        site_sfreqs=getattr(cfg, "site_sfreqs", ()) or (),
        amplitude_shift=float(getattr(cfg, "amplitude_shift", 0.0)),
        noise_shift=float(getattr(cfg, "noise_shift", 0.0)),
        size_skew=float(getattr(cfg, "size_skew", 0.0)),
    )
    return (int(getattr(cfg, "synth_subjects", 6) or 6), int(getattr(cfg, "synth_windows_per_class", 20) or 20),
            het if het.active else None)


def split_in_time(windows: WindowSet, test_fraction: float) -> tuple[WindowSet, WindowSet]:
    """Hold out the last ``test_fraction`` of every subject's windows of every class (in recording order).

    For sites with a single subject, where whole subjects cannot be held out;
    the test windows then come from the same people as the training windows
    (a subject-dependent evaluation: say so when reporting it).

    Parameters
    ----------
    windows : WindowSet
        The site's windows, in recording order within each subject and class.
    test_fraction : float
        Fraction held out, in (0, 1); at least one window of each subject and
        class goes to each side when it has two or more.

    Returns
    -------
    train, test : WindowSet
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r} instead.")
    test = np.zeros(windows.n_windows, dtype=bool)
    for subject in windows.subjects:
        for c in range(len(windows.label_names)):
            idx = np.flatnonzero((windows.subject == subject) & (windows.y == c))
            if idx.size < 2:
                continue
            n_test = min(max(int(round(test_fraction * idx.size)), 1), idx.size - 1)
            test[idx[-n_test:]] = True
    return windows.subset(~test), windows.subset(test)


def _hold_out(windows: WindowSet, test_fraction: float, seed: int, index: int, holdout: str) -> tuple[WindowSet, WindowSet]:
    if holdout == "time":
        return split_in_time(windows, test_fraction)
    return split_subjects(windows, test_fraction, seed=seed * 1009 + index)


@functools.lru_cache(maxsize=8)
def _prepare_sites_cached(dataset: str, data_dir: str, sites: int, split: str, test_fraction: float, seed: int, spec,
                          site_files: tuple[str, ...] = (), label_names: tuple[str, ...] = (),
                          cache_dir: str | None = None, synthetic: tuple = (), holdout: str = "subjects") -> tuple[SiteSplit, ...]:
    from .data import load_sites, make_synthetic_sites

    if dataset == "synthetic" and synthetic:
        n_subjects, n_windows, het = synthetic
        loaded = make_synthetic_sites(sites, subjects_per_site=n_subjects, windows_per_class=n_windows,
                                      window_seconds=spec.window_seconds, sfreq=spec.sfreq, seed=seed, heterogeneity=het)
    elif dataset == "eegmat" and holdout == "time":  # sites may hold one subject (load_sites wants two per site)
        n = len(_eegmat_groups(data_dir, split, sites))
        loaded = [_load_site(i, dataset, data_dir, sites, split, seed, spec, site_files, label_names, cache_dir, synthetic)
                  for i in range(n)]
    else:
        loaded = load_sites(dataset, data_dir=data_dir or None, n_sites=sites, split=split, spec=spec, seed=seed,
                            site_files=site_files, label_names=label_names or None, cache_dir=cache_dir)
    out = []
    for i, site in enumerate(loaded):
        train, test = _hold_out(site.windows, test_fraction, seed, i, holdout)
        out.append(SiteSplit(site.name, train, test, dict(site.info)))
    return tuple(out)


def _synthetic_key(cfg: RunConfig) -> tuple:
    """() for today's synthetic sites (the memo key stays the same), else the settings."""
    settings = synthetic_settings(cfg)
    return () if settings == (6, 20, None) else settings


def _holdout(cfg: RunConfig) -> str:
    from ._validation import check_option

    return check_option("site_holdout", str(getattr(cfg, "site_holdout", "subjects") or "subjects"), HOLDOUTS)


def prepare_sites(cfg: RunConfig) -> list[SiteSplit]:
    """Load the run's sites and hold out subjects inside every site.

    Memoised in-process: a simulated client asks for its site on every message.
    Loads every site: for centralized and local-only runs; a simulated client
    loads only its own with :func:`prepare_site`.
    """
    cache = cfg.cache_path if cfg.dataset != "synthetic" else None
    return list(_prepare_sites_cached(cfg.dataset, cfg.data_dir, cfg.sites, cfg.split, cfg.test_fraction, cfg.seed,
                                      preprocess_spec(cfg), cfg.site_list, run_labels(cfg), cache,
                                      _synthetic_key(cfg), _holdout(cfg)))


def _eegmat_groups(data_dir: str, split: str, n_sites: int) -> list[tuple[str, list[str]]]:
    """eegmat's sites as (name, subjects), as :func:`fedeeg.data.load_eegmat_sites` deals them (no EEG read)."""
    from .data.eegmat import _available_subjects, _data_dir, read_subject_info

    path = _data_dir(data_dir)
    info = read_subject_info(path)
    present = _available_subjects(path, info, None)
    if split == "year":
        years = sorted({info[s]["recording_year"] for s in present})
        return [(f"year-{y}", [s for s in present if info[s]["recording_year"] == y]) for y in years]
    if len(present) < n_sites:
        raise ValueError(f"split='subject' with sites={n_sites} needs at least {n_sites} eegmat subjects, but only "
                         f"{len(present)} are available in {data_dir}. Use fewer sites.")
    return [(f"site-{k}", present[k::n_sites]) for k in range(n_sites)]


def _load_site(index: int, dataset: str, data_dir: str, sites: int, split: str, seed: int, spec,
               site_files: tuple[str, ...], label_names: tuple[str, ...], cache_dir: str | None, synthetic: tuple):
    """One site's windows (a :class:`fedeeg.data.Site`), without loading the others."""
    from .data.base import Site

    if dataset == "synthetic":
        from .data.synthetic import make_synthetic_site

        n_subjects, n_windows, het = synthetic or (6, 20, None)
        site = make_synthetic_site(index, subjects_per_site=n_subjects, windows_per_class=n_windows,
                                   window_seconds=spec.window_seconds, sfreq=spec.sfreq, seed=seed, heterogeneity=het)
    elif dataset == "folder":
        from .data import load_site_config, load_site_windows_cached

        path = site_files[index]
        site_cfg = load_site_config(path)
        windows = load_site_windows_cached(site_cfg, spec, tuple(label_names), cache_dir=cache_dir)
        site = Site(site_cfg.name, windows, {"site_file": str(path), "format": site_cfg.data.format})
    else:
        from .data import load_eegmat_subject

        name, members = _eegmat_groups(data_dir, split, sites)[index]
        windows = WindowSet.concatenate([load_eegmat_subject(data_dir, s, spec, cache_dir=cache_dir) for s in members])
        site = Site(name, windows, {"n_subjects": len(members), "n_windows": windows.n_windows})
    return site


@functools.lru_cache(maxsize=2)
def _prepare_site_cached(index: int, dataset: str, data_dir: str, sites: int, split: str, test_fraction: float,
                         seed: int, spec, site_files: tuple[str, ...], label_names: tuple[str, ...],
                         cache_dir: str | None, synthetic: tuple, holdout: str) -> SiteSplit:
    site = _load_site(index, dataset, data_dir, sites, split, seed, spec, site_files, label_names, cache_dir, synthetic)
    train, test = _hold_out(site.windows, test_fraction, seed, index, holdout)
    return SiteSplit(site.name, train, test, dict(site.info))


def prepare_site(cfg: RunConfig, index: int) -> SiteSplit:
    """Load ONE site of the run (by index) and hold out its test data, without building the others.

    What a simulated client needs: its memory does not grow with the number of
    sites. The same site as ``prepare_sites(cfg)[index]`` (same windows, same
    split). Memoised for the last two sites asked for (a client trains, then
    evaluates, the same site), so a process never holds more than two.

    Parameters
    ----------
    cfg : RunConfig
        The run.
    index : int
        The site, in ``[0, number of sites)`` (the partition id).

    Returns
    -------
    site : SiteSplit
    """
    n = cfg.federated_sites
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
        raise ValueError(f"Site index must be an int in [0, {n}) for this run ({n} sites), got {index!r}.")
    cache = cfg.cache_path if cfg.dataset != "synthetic" else None
    return _prepare_site_cached(int(index), cfg.dataset, cfg.data_dir, n, cfg.split, cfg.test_fraction, cfg.seed,
                                preprocess_spec(cfg), cfg.site_list, run_labels(cfg), cache, _synthetic_key(cfg),
                                _holdout(cfg))


def lora_spec(cfg: RunConfig):
    """The :class:`fedeeg.models.LoraSpec` of a run config."""
    from .models import LoraSpec

    return LoraSpec(
        preset=cfg.lora_preset,
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        conv_rank=cfg.conv_rank or None,
    )


def run_input(cfg: RunConfig) -> tuple[tuple[str, ...], int]:
    """The channels and window length (in samples) of the run's data.

    Known from the config alone, so the server, which never sees EEG, builds
    the same model as the sites: the dataset fixes the channels
    (:data:`DATASET_CHANNELS`) and the preprocessing the window
    (``window_seconds * sfreq``).

    Returns
    -------
    ch_names : tuple of str
        Vocabulary names, in the order of the windows' rows.
    n_times : int
        Samples per window.
    """
    spec = preprocess_spec(cfg)
    n_times = int(round(spec.window_seconds * spec.sfreq))
    if cfg.channel_list:
        from .data.channels import to_vocab

        return tuple(to_vocab(cfg.channel_list)), n_times
    if cfg.dataset not in DATASET_CHANNELS:
        raise ValueError(
            f"The channels of dataset={cfg.dataset!r} are only known from the sites' data; backbone "
            f"{cfg.backbone!r} is built for a fixed channel list, so set 'channels' (--channels Fp1,Fp2,...)."
        )
    return tuple(DATASET_CHANNELS[cfg.dataset]), n_times


def build_model(
    cfg: RunConfig,
    *,
    n_outputs: int,
    ch_names: tuple[str, ...] | list[str] | None = None,
    n_times: int | None = None,
) -> nn.Module:
    """The run's model, identical at every site for the same config.

    The backbone (:func:`fedeeg.models.load_backbone`) is initialised from
    ``cfg.seed`` (or loaded from ``cfg.checkpoint``); LoRA A matrices are drawn
    from the same seed, so under ``ffa`` every site holds the same frozen A.
    Baselines without LoRA (``eegnet``, ``eeg-inception``, ``cbramod``) train
    in full and are built for one channel list and window length.

    Parameters
    ----------
    cfg : RunConfig
        The run.
    n_outputs : int
        Classes.
    ch_names : sequence of str | None
        The input's channels, in order; None: the dataset's (:func:`run_input`).
        Only the fixed-input baselines depend on it (LaBraM checks the names).
    n_times : int | None
        Samples per window; None: from the preprocessing (:func:`run_input`).

    Returns
    -------
    model : nn.Module
        A peft model (``ffa``/``fedit``/``rolora``), the plain backbone with
        every parameter trainable (``full``), or with only ``fc_norm`` and
        ``head`` trainable (``head``).
    """
    from .models import BACKBONE_REGISTRY, apply_lora, load_backbone
    from .models.lora import MODULES_TO_SAVE

    entry = BACKBONE_REGISTRY[cfg.backbone]
    if cfg.strategy != "full" and not entry.supports_lora:
        raise ValueError(f"The backbone {cfg.backbone!r} has no LoRA adapters: use strategy='full', got {cfg.strategy!r}.")
    spec = preprocess_spec(cfg)
    if entry.fixed_input and (ch_names is None or n_times is None):
        default_chs, default_n_times = run_input(cfg)
        ch_names = default_chs if ch_names is None else ch_names
        n_times = default_n_times if n_times is None else n_times
    backbone = load_backbone(cfg.backbone, checkpoint=cfg.checkpoint or None, n_outputs=n_outputs, seed=cfg.seed,
                             ch_names=None if ch_names is None else list(ch_names),
                             n_times=None if n_times is None else int(n_times), sfreq=spec.sfreq)
    if cfg.strategy == "full":
        for p in backbone.parameters():
            p.requires_grad_(True)
        return backbone
    if cfg.strategy == "head":  # a linear probe: only fc_norm and head train (and travel)
        for name, p in backbone.named_parameters():
            p.requires_grad_(name.split(".")[0] in MODULES_TO_SAVE)
        return backbone
    return apply_lora(backbone, lora_spec(cfg), freeze_a=cfg.strategy == "ffa", seed=cfg.seed)


@dataclass
class RunResult:
    """What a run produced, ready for :func:`fedeeg.outputs.write_outputs`."""

    history: list[dict]
    per_site: dict[str, dict]
    test: dict
    models: dict[str, nn.Module]
    communication: dict
    sites: dict[str, dict]
    channels: tuple[str, ...] = ()
    sfreq: float = 200.0
    label_names: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


def round_record(rnd: int, per_site: dict[str, dict], losses: list[tuple[float, int]], seconds: float, **extra) -> dict:
    """One round's record; ``per_site`` empty for a round without evaluation (then ``test`` is empty too)."""
    pooled = pool_metrics(list(per_site.values())) if per_site else {}
    n = sum(w for _, w in losses)
    return {
        "round": rnd,
        "train_loss": float(sum(l * w for l, w in losses) / n) if n else float("nan"),
        "test": {k: v for k, v in pooled.items() if k != "confusion"},
        "per_site": {s: {k: v for k, v in m.items() if k != "confusion"} for s, m in per_site.items()},
        "seconds": round(seconds, 3),
        **extra,
    }


def complete_evaluation(rec: dict, per_site: dict[str, dict]) -> dict:
    """Fill in a round record's held-out metrics that came later (``evaluate_in='next-train'``), in place.

    ``rec`` is a :func:`round_record` made without evaluation and marked
    ``evaluation_pending``; ``per_site`` the sites' metrics of that round's
    global model. Returns ``rec``, now as :func:`round_record` would have made it.
    """
    done = round_record(rec["round"], per_site, [], 0.0)
    rec.pop("evaluation_pending", None)
    rec.update(test=done["test"], per_site=done["per_site"])
    return rec


def run_centralized(cfg: RunConfig, sites: list[SiteSplit], on_round: Callable[[dict], None] | None = None) -> RunResult:
    """One model on the pooled training windows of all sites, same budget as federated.

    Trains ``rounds`` blocks of ``local_epochs`` epochs and evaluates on every
    site's held-out subjects after each block.
    """
    device = resolve_device(cfg.device)
    pooled = WindowSet.concatenate([s.train for s in sites])
    model = build_model(cfg, n_outputs=len(pooled.label_names), ch_names=pooled.ch_names, n_times=pooled.X.shape[-1])
    history = []
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        res = train_epochs(model, pooled, epochs=cfg.local_epochs, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                           batch_size=cfg.batch_size, device=device, seed=cfg.seed * 100_003 + rnd,
                           compile=cfg.compile_for(device))
        per_site = {s.name: evaluate(model, s.test, device=device) for s in sites}
        rec = round_record(rnd, per_site, [(res.loss, res.n_examples)], time.perf_counter() - t0,
                            windows_per_second=round(res.windows_per_second, 1))
        history.append(rec)
        if on_round:
            on_round(rec)
    final = {s.name: evaluate(model, s.test, device=device) for s in sites}
    return RunResult(history, final, pool_metrics(list(final.values())), {"global": model},
                     {"bytes_up_per_site_per_round": 0, "bytes_down_per_site_per_round": 0},
                     {s.name: s.describe() for s in sites}, pooled.ch_names, pooled.sfreq, pooled.label_names)


def run_local(cfg: RunConfig, sites: list[SiteSplit], on_round: Callable[[dict], None] | None = None) -> RunResult:
    """One model per site on its own training windows, evaluated on its own held-out subjects.

    Same model and budget as the federated run; no communication. The pooled
    ``test`` sums the sites' confusion matrices (each site's own model on its
    own patients); ``per_site_mean`` in ``extra`` is the mean over sites.
    """
    device = resolve_device(cfg.device)
    models = {s.name: build_model(cfg, n_outputs=len(s.train.label_names), ch_names=s.train.ch_names,
                                  n_times=s.train.X.shape[-1]) for s in sites}
    history = []
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        per_site, losses = {}, []
        for i, s in enumerate(sites):
            res = train_epochs(models[s.name], s.train, epochs=cfg.local_epochs, lr=cfg.learning_rate,
                               weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, device=device,
                               seed=cfg.seed * 100_003 + rnd * 101 + i, compile=cfg.compile_for(device))
            losses.append((res.loss, res.n_examples))
            per_site[s.name] = evaluate(models[s.name], s.test, device=device)
        rec = round_record(rnd, per_site, losses, time.perf_counter() - t0)
        history.append(rec)
        if on_round:
            on_round(rec)
    final = {s.name: evaluate(models[s.name], s.test, device=device) for s in sites}
    first = sites[0].train
    mean = {k: float(np.mean([m[k] for m in final.values()])) for k in ("balanced_accuracy", "cohen_kappa", "macro_f1", "auroc")}
    return RunResult(history, final, pool_metrics(list(final.values())), models,
                     {"bytes_up_per_site_per_round": 0, "bytes_down_per_site_per_round": 0},
                     {s.name: s.describe() for s in sites}, first.ch_names, first.sfreq, first.label_names,
                     extra={"per_site_mean": mean})


__all__ = ["run_labels", "DATASET_LABELS", "DATASET_CHANNELS", "SiteSplit", "prepare_sites", "prepare_site", "split_in_time", "synthetic_settings", "HOLDOUTS", "lora_spec", "run_input", "build_model", "RunResult", "round_record", "complete_evaluation", "run_centralized", "run_local", "preprocess_spec"]
