"""Personalisation under site shift: tensors kept local (FedBN-style) and a local fine-tune.

Two options known to help when sites differ (amplifiers, montages, label mix):

* **kept local** (``personalise``): the classification head (``"head"``), the
  normalisation layers (``"norm"``: LayerNorm / GroupNorm / BatchNorm affine
  parameters and BatchNorm statistics, as FedBN), or both (``"norm+head"``)
  train at each site and never travel; every other trainable tensor is
  averaged as usual. Under LoRA the normalisation layers are frozen by
  default; :func:`enable_local_training` makes them train (locally).
* **local fine-tune** (``finetune_epochs``): after the federation, each site
  fine-tunes a copy of the final global model on its own training windows and
  is evaluated on its held-out data, reported beside the global model
  (:func:`finetune_and_evaluate`).

Everything here is Flower-free; :mod:`fedeeg.federation` calls it (see issue 7's
integration notes): the client loads ``merge_state(global_shared, local)``,
trains, uploads ``split_state(trained, local_names)[0]`` and stores the local
part in a :class:`LocalStateStore`.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from torch import nn

from ._validation import check_option, check_range

logger = logging.getLogger(__name__)

#: What ``personalise`` keeps local.
PERSONALISE_MODES = ("none", "head", "norm", "norm+head")
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
#: Parameter names of a classification head: ``head.*`` (LaBraM, baselines), also under peft's ``modules_to_save``.
_HEAD = re.compile(r"(^|\.)head\.")


def _norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Normalisation modules by name, without peft's frozen ``original_module`` copies."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _NORM_TYPES) and "original_module" not in n}


def local_parameter_names(model: nn.Module, mode: str) -> list[str]:
    """Names (as in the model's trainable state dict) of the tensors that stay at the site.

    Parameters
    ----------
    model : nn.Module
        The run's model (after :func:`enable_local_training` for ``norm``
        modes, so that the norms are trainable).
    mode : {"none", "head", "norm", "norm+head"}
        What is kept local.

    Returns
    -------
    names : list of str
        Sorted; a subset of :func:`fedeeg.models.trainable_state_dict`'s keys
        (frozen tensors never travel anyway, so they are not listed).
    """
    check_option("personalise", mode, PERSONALISE_MODES)
    from .models import trainable_state_dict

    trainable = list(trainable_state_dict(model))
    out: set[str] = set()
    if "head" in mode:
        out.update(n for n in trainable if _HEAD.search(n) and "original_module" not in n)
    if "norm" in mode:
        prefixes = tuple(f"{name}." for name in _norm_modules(model))
        out.update(n for n in trainable if n.startswith(prefixes))
    return sorted(out)


def enable_local_training(model: nn.Module, mode: str) -> list[str]:
    """Make the normalisation layers trainable for ``norm`` modes (they are frozen under LoRA).

    Call it identically on the server and at every site (the set of trainable
    tensors must match). Returns the names of the parameters it switched on.
    """
    check_option("personalise", mode, PERSONALISE_MODES)
    if "norm" not in mode:
        return []
    switched = []
    for mod_name, mod in _norm_modules(model).items():
        for p_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                p.requires_grad_(True)
                switched.append(f"{mod_name}.{p_name}")
    return switched


def split_state(state: Mapping[str, np.ndarray], local_names: Iterable[str]) -> tuple[dict, dict]:
    """Split a trainable state into (shared: travels and is averaged, local: stays at the site)."""
    local = set(local_names)
    missing = sorted(local - set(state))
    if missing:
        raise KeyError(f"Local tensor(s) {missing} are not in the state ({len(state)} tensors).")
    return ({k: v for k, v in state.items() if k not in local}, {k: v for k, v in state.items() if k in local})


def merge_state(shared: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray]) -> dict:
    """The state a site loads: the global shared tensors plus its own local ones (which must not overlap)."""
    both = sorted(set(shared) & set(local))
    if both:
        raise ValueError(f"Tensors {both} are both shared and local; a tensor is one or the other.")
    return {**shared, **local}


class LocalStateStore:
    """Per-site local tensors between rounds, on disk (memory stays bounded with many sites).

    A simulated client process may serve many sites one after another, so the
    local tensors are keyed by site name and written to ``root/SITE.npz``.

    Parameters
    ----------
    root : path-like
        Folder (created on first write).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _path(self, site: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", site) or site.startswith("."):
            raise ValueError(f"Site name {site!r} cannot name a file: use letters, digits, '.', '_' and '-'.")
        return self.root / f"{site}.npz"

    def save(self, site: str, state: Mapping[str, np.ndarray]) -> None:
        """Write a site's local tensors (atomically)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(site)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, **{k: np.asarray(v) for k, v in state.items()})
        os.replace(tmp, path)

    def load(self, site: str, default: Mapping[str, np.ndarray] | None = None) -> dict:
        """A site's local tensors, or ``default`` (the initial values) before its first round."""
        path = self._path(site)
        if not path.is_file():
            if default is None:
                raise FileNotFoundError(f"No local state for site {site!r} in {self.root} and no default given.")
            return {k: np.array(v, copy=True) for k, v in default.items()}
        with np.load(path) as data:
            return {k: data[k] for k in data.files}

    def sites(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.npz")) if self.root.is_dir() else []


def finetune_and_evaluate(model: nn.Module, site, *, epochs: int, lr: float, weight_decay: float = 0.01,
                          batch_size: int = 32, device: str = "auto", seed: int = 0) -> dict:
    """Fine-tune a copy of the final global model on one site's training windows; evaluate on its held-out data.

    The global model is not changed. The same tensors train as in the
    federation (the adapter and head under LoRA).

    Parameters
    ----------
    model : nn.Module
        The final global model.
    site : fedeeg.experiment.SiteSplit
        The site (``train`` and ``test`` WindowSets, X of shape
        ``(n_windows, n_chans, n_times)``).
    epochs : int
        Local epochs, >= 1.
    lr, weight_decay, batch_size, device, seed
        As in :func:`fedeeg.training.train_epochs`.

    Returns
    -------
    metrics : dict
        :func:`fedeeg.training.evaluate`'s metrics of the fine-tuned copy on
        ``site.test``, plus ``finetune_epochs`` and ``finetune_loss``.
    """
    from .training import evaluate, train_epochs

    check_range("epochs", epochs, low=1, kind=int)
    local = copy.deepcopy(model)
    res = train_epochs(local, site.train, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                       device=device, seed=seed)
    metrics = evaluate(local, site.test, device=device)
    metrics.update(finetune_epochs=int(epochs), finetune_loss=float(res.loss))
    return metrics


def finetune_sites(cfg, model: nn.Module, *, epochs: int, sites: Iterable[int] | None = None) -> dict:
    """Fine-tune the final global model locally at every site (each loaded lazily) and pool the results.

    What ``finetune_epochs`` adds to a run's summary, beside the global
    model's numbers: ``{"finetune_epochs", "per_site": {site: metrics},
    "test": pooled metrics}``. Sites are loaded one at a time
    (:func:`fedeeg.experiment.prepare_site`), so memory does not grow with
    their number.

    Parameters
    ----------
    cfg : RunConfig
        The run (learning rate, batch size, device, seed).
    model : nn.Module
        The final global model (left unchanged).
    epochs : int
        Local fine-tune epochs, >= 1.
    sites : iterable of int | None
        Site indices (default: every site of the run).
    """
    from .experiment import prepare_site
    from .metrics import pool_metrics

    indices = range(cfg.federated_sites) if sites is None else sites
    per_site = {}
    for i in indices:
        site = prepare_site(cfg, int(i))
        per_site[site.name] = finetune_and_evaluate(model, site, epochs=epochs, lr=cfg.learning_rate,
                                                    weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
                                                    device=cfg.device, seed=cfg.seed * 100_003 + 7 + int(i))
    pooled = pool_metrics(list(per_site.values()))
    return {"finetune_epochs": int(epochs), "per_site": dict(sorted(per_site.items())),
            "test": {k: v for k, v in pooled.items() if k != "confusion"}}


__all__ = ["PERSONALISE_MODES", "LocalStateStore", "enable_local_training", "finetune_and_evaluate", "finetune_sites",
           "local_parameter_names", "merge_state", "split_state"]
