"""Typed, frozen run configuration, validated at the edge.

One :class:`RunConfig` describes a simulation or a federated run. It is built
from the CLI, from Flower's run config (``[tool.flwr.app.config]`` in
``pyproject.toml``, keys in kebab-case) or from a dict, and every field is
checked in ``__post_init__`` so that a wrong value fails at once with a message
naming the parameter, the allowed values and the value got.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from ._validation import check_option, check_range

DATASETS = ("synthetic", "eegmat", "folder")
SPLITS = ("year", "subject")
MODES = ("federated", "centralized", "local")
STRATEGIES = ("ffa", "fedit", "full")
LORA_PRESETS = ("paper", "attention", "all-linear")
DEVICES = ("auto", "cpu", "cuda")
#: Backbone names: the keys of :data:`fedeeg.models.BACKBONE_REGISTRY` (a test keeps them equal; listed here so
#: that validating a config does not import torch).
BACKBONE_NAMES = ("labram-small", "labram-base", "labram-large", "labram-huge", "eegnet", "eeg-inception", "cbramod")
#: Backbones that take LoRA adapters (strategies ``ffa``/``fedit``); the others train in full.
LORA_BACKBONES = ("labram-small", "labram-base", "labram-large", "labram-huge")
#: Backbones that need an optional package: name -> (import name, pip extra).
OPTIONAL_BACKBONES = {"cbramod": ("braindecode", "fedeeg[braindecode]")}

#: Default learning rates: LoRA adapters take a larger step than full fine-tuning.
DEFAULT_LR = {"ffa": 1e-2, "fedit": 5e-3, "full": 5e-4}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run (simulation or federation).

    Parameters
    ----------
    dataset : {"synthetic", "eegmat", "folder"}
        Where the sites' EEG comes from: generated, the eegmat recordings, or
        any recordings described by site TOML files (``site_files``).
    data_dir : str
        Folder of the eegmat recordings (required for ``dataset="eegmat"``).
    sites : int
        Number of sites (synthetic, or eegmat with ``split="subject"``); for
        ``folder`` it is set to the number of site files.
    site_files : str
        ``folder``: the sites' TOML files, comma-separated (one site each; see
        :func:`fedeeg.data.load_site_config`).
    labels : str
        ``folder``: the federation's classes, comma-separated (e.g.
        ``"left,right"``); built-in datasets have their own.
    channels : str
        Channels every site's windows hold, comma-separated 10-20/10-10 names
        ("" = each site keeps the channels it has; baselines then need the
        dataset's own list). Missing ones are interpolated up to
        ``max_interpolated``.
    max_interpolated : int
        Most channels a recording may lack (spherical-spline interpolation)
        before it is refused.
    cache_dir : str
        Preprocessed-window cache ("" = ``$FEDEEG_CACHE_DIR`` or
        ``~/.cache/fedeeg``; ``"off"`` = none).
    split : {"year", "subject"}
        How eegmat subjects are dealt to sites: by recording year (3 sites) or
        round-robin over subjects.
    test_fraction : float
        Fraction of subjects held out for testing inside every site, in (0, 1).
    mode : {"federated", "centralized", "local"}
        Federated over Flower, one model on the pooled training data, or one
        model per site on its own data. All three train the same model for the
        same number of epochs (``rounds * local_epochs``).
    strategy : {"ffa", "fedit", "full"}
        ``ffa``: LoRA with A frozen from the shared seed, only B and the head
        train (exact under averaging). ``fedit``: LoRA A and B both train and
        are averaged separately. ``full``: full fine-tuning (the baseline).
    rounds, local_epochs : int
        Federated rounds and local epochs per round.
    backbone : str
        Name in :data:`fedeeg.models.BACKBONE_REGISTRY`: ``labram-small``,
        ``labram-base``, ``labram-large``, ``labram-huge`` (LoRA-capable), or
        the baselines ``eegnet``, ``eeg-inception`` and ``cbramod`` (needs
        braindecode), which have no LoRA and need ``strategy='full'``.
    checkpoint : str
        Path of a backbone checkpoint ("" = deterministic init from ``seed``):
        an official LaBraM file for LaBraM, a state dict or safetensors file
        for a baseline (see :func:`fedeeg.models.load_backbone`).
    lora_preset, lora_rank, lora_alpha, lora_dropout, conv_rank
        LoRA setting (see :class:`fedeeg.models.LoraSpec`). ``conv_rank=0``
        disables LoRA on the temporal convolutions.
    lr : float | None
        AdamW learning rate; None picks :data:`DEFAULT_LR` for the strategy.
    weight_decay, batch_size
        Optimiser settings.
    seed : int
        Seeds the backbone init, LoRA A, the subject split and training.
    window_seconds : float
        Window length in seconds (a whole number of 1-s patches).
    device : {"auto", "cpu", "cuda"}
        Where sites train; ``auto`` takes CUDA when present.
    out : str
        Output folder ("" = no files written, e.g. inside tests).
    """

    dataset: str = "synthetic"
    data_dir: str = ""
    sites: int = 3
    site_files: str = ""
    labels: str = ""
    channels: str = ""
    max_interpolated: int = 0
    cache_dir: str = ""
    split: str = "year"
    test_fraction: float = 0.34
    mode: str = "federated"
    strategy: str = "fedit"
    rounds: int = 10
    local_epochs: int = 2
    backbone: str = "labram-small"
    checkpoint: str = ""
    lora_preset: str = "paper"
    lora_rank: int = 2
    lora_alpha: float = 8.0
    lora_dropout: float = 0.5
    conv_rank: int = 4
    lr: float | None = None
    weight_decay: float = 0.01
    batch_size: int = 32
    seed: int = 0
    window_seconds: float = 4.0
    device: str = "auto"
    out: str = ""

    def __post_init__(self) -> None:
        check_option("dataset", self.dataset, DATASETS)
        check_option("split", self.split, SPLITS)
        check_option("mode", self.mode, MODES)
        check_option("strategy", self.strategy, STRATEGIES)
        check_option("backbone", self.backbone, BACKBONE_NAMES)
        if self.backbone not in LORA_BACKBONES and self.strategy != "full":
            raise ValueError(
                f"The backbone {self.backbone!r} is a baseline without LoRA adapters (it trains in full), so "
                f"strategy={self.strategy!r} does not apply: use strategy='full' (--strategy full), or a LaBraM "
                f"backbone ({', '.join(LORA_BACKBONES)}) for LoRA."
            )
        if self.backbone in OPTIONAL_BACKBONES:
            import importlib.util

            module, extra = OPTIONAL_BACKBONES[self.backbone]
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"The backbone {self.backbone!r} needs {module}, which is not installed: "
                                  f"pip install '{extra}'.")
        check_option("lora_preset", self.lora_preset, LORA_PRESETS)
        check_option("device", self.device, DEVICES)
        check_range("sites", self.sites, low=1, kind=int)
        check_range("test_fraction", self.test_fraction, low=0.01, high=0.99)
        check_range("rounds", self.rounds, low=1, kind=int)
        check_range("local_epochs", self.local_epochs, low=1, kind=int)
        check_range("lora_rank", self.lora_rank, low=1, kind=int)
        check_range("lora_alpha", self.lora_alpha, low=0)
        check_range("lora_dropout", self.lora_dropout, low=0, high=0.99)
        check_range("conv_rank", self.conv_rank, low=0, kind=int)
        if self.lr is not None:
            check_range("lr", self.lr, low=1e-8, high=1.0)
        check_range("weight_decay", self.weight_decay, low=0)
        check_range("batch_size", self.batch_size, low=1, kind=int)
        check_range("seed", self.seed, low=0, kind=int)
        check_range("window_seconds", self.window_seconds, low=1, high=16)
        if float(self.window_seconds) != int(self.window_seconds):
            raise ValueError(
                f"'window_seconds' must be a whole number of 1-s patches, got {self.window_seconds!r} instead."
            )
        check_range("max_interpolated", self.max_interpolated, low=0, kind=int)
        if self.dataset == "folder":
            if not self.site_list:
                raise ValueError("dataset='folder' needs 'site_files' (--site SITE.toml, once per site): the sites' TOML files.")
            if len(self.label_names) < 2:
                raise ValueError(f"dataset='folder' needs 'labels' (--labels a,b): at least two class names, got {self.labels!r}.")
            object.__setattr__(self, "sites", len(self.site_list))
        else:
            for name in ("site_files", "labels"):
                if getattr(self, name):
                    raise ValueError(f"'{name}' only applies to dataset='folder', got dataset={self.dataset!r} and {name}={getattr(self, name)!r}.")
        if self.channels:
            from .data.channels import to_vocab

            names = self.channel_list
            if len(set(names)) != len(names):
                raise ValueError(f"'channels' names a channel twice: {self.channels!r}.")
            try:
                to_vocab(names)
            except (KeyError, ValueError) as err:
                raise ValueError(f"'channels' must hold 10-20/10-10 names of LaBraM's vocabulary: {err}") from err
        if self.dataset == "eegmat" and not self.data_dir:
            raise ValueError(
                "The eegmat dataset needs 'data_dir' (--data-dir): the folder holding SubjectNN_1.edf, "
                "SubjectNN_2.edf and subject-info.csv from PhysioNet's 'EEG During Mental Arithmetic Tasks'."
            )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _split(text: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in str(text).split(",") if part.strip())

    @property
    def site_list(self) -> tuple[str, ...]:
        """``site_files`` as a tuple of paths."""
        return self._split(self.site_files)

    @property
    def label_names(self) -> tuple[str, ...]:
        """``labels`` as a tuple (folder datasets)."""
        return self._split(self.labels)

    @property
    def channel_list(self) -> tuple[str, ...]:
        """``channels`` as a tuple (empty: keep each site's)."""
        return self._split(self.channels)

    @property
    def cache_path(self) -> str | None:
        """The cache folder to use, or None when ``cache_dir='off'``."""
        if self.cache_dir == "off":
            return None
        if self.cache_dir:
            return self.cache_dir
        from .data.cache import default_cache_dir

        return str(default_cache_dir())

    @property
    def learning_rate(self) -> float:
        """The effective learning rate (``lr`` or the strategy's default)."""
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.strategy]

    @property
    def uses_lora(self) -> bool:
        return self.strategy != "full"

    @property
    def total_epochs(self) -> int:
        """Epochs every mode trains for: ``rounds * local_epochs``."""
        return self.rounds * self.local_epochs

    def replace(self, **changes: Any) -> "RunConfig":
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------- Flower bridge
    def to_flower(self) -> dict[str, Any]:
        """Flower run config (kebab-case keys; ``lr=None`` is sent as 0.0)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                value = 0.0
            out[f.name.replace("_", "-")] = value
        return out

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any]) -> "RunConfig":
        """Build from a dict with snake- or kebab-case keys (e.g. Flower's run config).

        Unknown keys are an error naming them and listing the known ones.
        """
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in mapping.items():
            name = str(key).replace("-", "_")
            if name not in known:
                unknown.append(key)
                continue
            kwargs[name] = _coerce(name, value, known[name].type)
        if unknown:
            allowed = ", ".join(sorted(n.replace("_", "-") for n in known))
            raise ValueError(f"Unknown run config key(s) {sorted(unknown)}. Known keys are: {allowed}.")
        return cls(**kwargs)


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Coerce TOML/Flower scalars to the field's type (ints given as floats etc.)."""
    ann = str(annotation)
    if name == "lr":
        return None if value in (None, "", 0, 0.0) else float(value)
    if ann.startswith("int") and isinstance(value, float) and value.is_integer():
        return int(value)
    if ann.startswith("float") and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


__all__ = ["RunConfig", "DATASETS", "SPLITS", "MODES", "STRATEGIES", "LORA_PRESETS", "DEFAULT_LR", "BACKBONE_NAMES", "LORA_BACKBONES"]
