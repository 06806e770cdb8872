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

from ._validation import check_option, check_range, coerce_scalar, dataclass_kwargs

DATASETS = ("synthetic", "eegmat", "folder")
SPLITS = ("year", "subject")
MODES = ("federated", "centralized", "local")
STRATEGIES = ("ffa", "fedit", "full", "rolora", "head")
#: Strategies without LoRA adapters: the plain backbone trains (all of it, or only its head).
NO_LORA_STRATEGIES = ("full", "head")
#: Server-side merge rules; the robust ones need each update in the clear (not with ``secure``).
AGGREGATIONS = ("mean", "median", "trimmed-mean")
#: Stages at which ``fail_sites`` sites fail in simulation (``unmask`` only exists with ``secure``).
FAIL_STAGES = ("train", "upload", "unmask")
#: How the sites evaluate a federated round's global model (``RunConfig.evaluate_in``).
EVALUATE_IN = ("next-train", "separate")
#: Norm bound of a secure run when ``clip`` is 0 (the fixed-point encoding needs one).
SECURE_DEFAULT_CLIP = 100.0
LORA_PRESETS = ("paper", "attention", "all-linear", "qkv", "mlp", "convs", "qkv+convs", "mlp+convs")
DEVICES = ("auto", "cpu", "cuda")
#: ``compile`` settings: off, or torch.compile the model for training on CUDA (in this mode).
COMPILE_MODES = ("off", "on", "reduce-overhead", "max-autotune-no-cudagraphs")
#: Backbone names: the keys of :data:`fedeeg.models.BACKBONE_REGISTRY` (a test keeps them equal; listed here so
#: that validating a config does not import torch).
BACKBONE_NAMES = ("labram-small", "labram-base", "labram-large", "labram-huge", "eegnet", "eeg-inception", "cbramod")
#: Backbones that take LoRA adapters (strategies ``ffa``/``fedit``); the others train in full.
LORA_BACKBONES = ("labram-small", "labram-base", "labram-large", "labram-huge")
#: Backbones that need an optional package: name -> (import name, pip extra).
OPTIONAL_BACKBONES = {"cbramod": ("braindecode", "fedeeg[braindecode]")}

#: Default learning rates: LoRA adapters take a larger step than full fine-tuning.
DEFAULT_LR = {"ffa": 1e-2, "fedit": 5e-3, "full": 5e-4, "rolora": 1e-2, "head": 5e-3}


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
    reference : {"", "average"}
        Re-reference every recording ("" = keep the recorded reference).
    reject_uv : float
        Drop windows whose peak-to-peak amplitude exceeds this in any channel,
        in µV (0 = keep all); counted per label in the site report.
    split : {"year", "subject"}
        How eegmat subjects are dealt to sites: by recording year (3 sites) or
        round-robin over subjects.
    test_fraction : float
        Fraction of subjects held out for testing inside every site, in (0, 1).
    mode : {"federated", "centralized", "local"}
        Federated over Flower, one model on the pooled training data, or one
        model per site on its own data. All three train the same model for the
        same number of epochs (``rounds * local_epochs``).
    strategy : {"ffa", "fedit", "full", "rolora", "head"}
        ``ffa``: LoRA with A frozen from the shared seed, only B and the head
        train (exact under averaging). ``fedit``: LoRA A and B both train and
        are averaged separately. ``full``: full fine-tuning (the baseline).
        ``rolora``: A and B train in alternate rounds (B and the head in odd
        rounds, A and the head in even rounds; only those travel), each round
        exact under averaging. ``head``: the backbone stays frozen and only
        its ``fc_norm`` and ``head`` train and travel (a linear probe of the
        pooled features; LaBraM backbones only).
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
    compile : {"off", "on", "reduce-overhead", "max-autotune-no-cudagraphs"}
        ``torch.compile`` the model for training where a site trains on CUDA
        (CPU sites train eagerly whatever this says): ``on`` is the default
        compile mode, the others torch's modes of those names. Compiling
        costs about a minute per site process, once per run; it pays for
        long local training on a GPU (LaBraM-Base, LoRA, batch 1024 on an
        H200: 19,205 windows/s compiled against 8,553 eager; see
        ``simulations/RESULTS.md``), not for a few thousand windows a round.
    aggregation : {"mean", "median", "trimmed-mean"}
        How the server merges the sites' tensors: example-weighted mean, or the
        robust coordinate-wise median / 20 %-trimmed mean (unweighted; not with
        ``secure``, which only reveals sums).
    clip : float
        L2 norm bound of a site's update (the change of its travelling tensors
        in a round); a longer update is scaled down at the site, and the server
        rejects a plain update above it. 0 = no bound in plain runs; secure
        runs then use :data:`SECURE_DEFAULT_CLIP`.
    secure : bool
        Secure aggregation (:mod:`fedeeg.secagg`): the server only learns the
        sum of the sites' clipped, fixed-point updates.
    dp_sigma : float
        Distributed DP noise multiplier: the secure sum carries Gaussian noise
        of std ``dp_sigma * clip`` (each site adds its share). 0 = none. Needs
        ``secure``.
    dp_delta : float
        The delta of the reported (epsilon, delta)-DP.
    secagg_threshold : float
        Shamir threshold: a fraction in (0.5, 1) of each site's share holders
        (itself and its neighbours), or a whole count; a round needs that many
        surviving sites.
    secagg_neighbours : int
        Neighbours of each site in the masking graph (0 = all other sites up to
        10 sites, then about 3 log2(n)).
    secagg_weight_cap : int
        Training windows at which a site's weight in the secure mean stops
        growing (bounds the fixed-point sum).
    quant_scale : float
        Fixed-point scale of secure updates (0 = the largest that cannot
        overflow the 32-bit ring for the run's sites).
    fail_sites : int
        Simulation only: the first ``fail_sites`` sites (partition ids) fail
        every round at ``fail_at`` (testing and demos of dropouts).
    fail_at : {"train", "upload", "unmask"}
        Where they fail: during training, after training (the upload is lost),
        or, with ``secure``, after uploading their masked input.
    reply_timeout : float
        Seconds the server waits for the sites' replies to one message; sites
        that have not answered count as dropped (0 = wait for every site).
    evaluate_every : int
        Federated runs: the sites evaluate the global model after every
        ``evaluate_every``-th round and after the last one (1 = every round).
        A round without evaluation has no held-out metrics in its record.
    evaluate_in : {"next-train", "separate"}
        Federated runs: how the sites evaluate a round's global model.
        ``"next-train"`` (default): with the next round's training message,
        before they train, so every round is one message exchange; the round's
        record gets its held-out metrics one round later, and the last round
        is evaluated in an evaluate message of its own. ``"separate"``: an
        evaluate message right after the round (two exchanges per evaluated
        round). Runs with secure aggregation, partial participation, dropouts
        or injected failures always evaluate ``"separate"``ly, so that every
        site evaluates every evaluated round.
    sites_per_round : int
        Sites sampled per federated round (0 = all; :func:`fedeeg.scenarios.sample_sites`).
    dropout : float
        Simulation: probability that a sampled site drops out of a round.
    parallel_clients : int
        Simulation: clients that run at once (0 = one per CPU); bounds Ray
        actors and memory.
    personalise : {"none", "head", "norm", "norm+head"}
        Tensors kept local at each site (:mod:`fedeeg.personalisation`).
    finetune_epochs : int
        Local fine-tune epochs of the final model at every site, reported
        beside it (0 = none).
    site_holdout : {"subjects", "time"}
        Test data inside a site: held-out subjects, or the last windows of
        every subject (sites of one subject).
    synth_subjects, synth_windows_per_class : int
        Synthetic sites' subjects and windows per subject and class.
    label_alpha, montage_drop, site_sfreqs, amplitude_shift, noise_shift, size_skew
        Synthetic heterogeneity (:class:`fedeeg.data.synthetic.SiteHeterogeneity`;
        ``site_sfreqs`` comma-separated).
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
    reference: str = ""
    reject_uv: float = 0.0
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
    compile: str = "off"
    aggregation: str = "mean"
    clip: float = 0.0
    secure: bool = False
    dp_sigma: float = 0.0
    dp_delta: float = 1e-5
    secagg_threshold: float = 0.6
    secagg_neighbours: int = 0
    secagg_weight_cap: int = 10_000
    quant_scale: float = 0.0
    fail_sites: int = 0
    fail_at: str = "train"
    reply_timeout: float = 0.0
    evaluate_every: int = 1
    evaluate_in: str = "next-train"
    sites_per_round: int = 0
    dropout: float = 0.0
    parallel_clients: int = 0
    personalise: str = "none"
    finetune_epochs: int = 0
    site_holdout: str = "subjects"
    synth_subjects: int = 6
    synth_windows_per_class: int = 20
    label_alpha: float = 0.0
    montage_drop: float = 0.0
    site_sfreqs: str = ""
    amplitude_shift: float = 0.0
    noise_shift: float = 0.0
    size_skew: float = 0.0
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
                f"backbone ({', '.join(LORA_BACKBONES)}) for LoRA or a head-only probe."
            )
        if self.backbone in OPTIONAL_BACKBONES:
            import importlib.util

            module, extra = OPTIONAL_BACKBONES[self.backbone]
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"The backbone {self.backbone!r} needs {module}, which is not installed: "
                                  f"pip install '{extra}'.")
        check_option("lora_preset", self.lora_preset, LORA_PRESETS)
        check_option("device", self.device, DEVICES)
        check_option("compile", self.compile, COMPILE_MODES)
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
        check_option("reference", self.reference, ("", "average"))
        check_range("reject_uv", self.reject_uv, low=0)
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
        self._check_secure()
        from .scenarios import check_settings  # issue 7: participation, personalisation, synthetic heterogeneity

        check_settings(self.to_dict())
        if self.dataset == "eegmat" and not self.data_dir:
            raise ValueError(
                "The eegmat dataset needs 'data_dir' (--data-dir): the folder holding SubjectNN_1.edf, "
                "SubjectNN_2.edf and subject-info.csv from PhysioNet's 'EEG During Mental Arithmetic Tasks'."
            )

    def _check_secure(self) -> None:
        """Aggregation, secure aggregation, DP and failure-injection settings."""
        check_option("aggregation", self.aggregation, AGGREGATIONS)
        check_option("fail_at", self.fail_at, FAIL_STAGES)
        if not isinstance(self.secure, bool):
            raise TypeError(f"'secure' must be bool, got {type(self.secure).__name__} ({self.secure!r}) instead.")
        check_range("clip", self.clip, low=0)
        check_range("dp_sigma", self.dp_sigma, low=0)
        check_range("dp_delta", self.dp_delta, low=1e-300, high=0.5)
        check_range("secagg_threshold", self.secagg_threshold, low=0.5)
        if self.secagg_threshold == 0.5 or (self.secagg_threshold >= 1 and float(self.secagg_threshold) != int(self.secagg_threshold)):
            raise ValueError(f"'secagg_threshold' must be a fraction in (0.5, 1) or a whole count >= 1, got "
                             f"{self.secagg_threshold!r} instead.")
        check_range("secagg_neighbours", self.secagg_neighbours, low=0, kind=int)
        check_range("secagg_weight_cap", self.secagg_weight_cap, low=1, kind=int)
        check_range("quant_scale", self.quant_scale, low=0)
        check_range("fail_sites", self.fail_sites, low=0, high=self.federated_sites, kind=int)
        check_range("reply_timeout", self.reply_timeout, low=0)
        check_range("evaluate_every", self.evaluate_every, low=1, kind=int)
        check_option("evaluate_in", self.evaluate_in, EVALUATE_IN)
        if (self.secure or self.aggregation != "mean") and self.mode != "federated":
            raise ValueError(f"'secure' and 'aggregation' apply to mode='federated', got mode={self.mode!r}.")
        if self.secure and self.aggregation != "mean":
            raise ValueError(f"aggregation={self.aggregation!r} needs every update in the clear; with 'secure' the "
                             f"server only learns the sum, so use aggregation='mean' (or drop --secure).")
        if self.dp_sigma > 0 and not self.secure:
            raise ValueError(f"dp_sigma={self.dp_sigma!r} adds distributed noise inside the secure sum; it needs "
                             f"secure=True (--secure).")
        if self.fail_at == "unmask" and self.fail_sites and not self.secure:
            raise ValueError("fail_at='unmask' is a stage of secure aggregation; it needs secure=True (--secure), "
                             "or use fail_at='train' or 'upload'.")
        if self.secure:
            from .secagg.encoding import ring_capacity_problem

            problem = ring_capacity_problem(clip=self.norm_bound, n_sites=self.federated_sites,
                                            weight_cap=self.secagg_weight_cap,
                                            noise_std=self.dp_sigma * self.norm_bound, scale=self.quant_scale)
            if problem:
                raise ValueError(f"Secure aggregation cannot encode this run: {problem}.")

    # ------------------------------------------------------------------ helpers
    @property
    def federated_sites(self) -> int:
        """Sites of a federated run: 3 for the eegmat year split, else ``sites``."""
        return 3 if self.dataset == "eegmat" and self.split == "year" else int(self.sites)

    @property
    def norm_bound(self) -> float:
        """The L2 bound of a site's update: ``clip``, or :data:`SECURE_DEFAULT_CLIP` for a secure run with ``clip=0``; 0 = none."""
        if self.clip > 0:
            return float(self.clip)
        return SECURE_DEFAULT_CLIP if self.secure else 0.0

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
        return self.strategy not in NO_LORA_STRATEGIES

    def evaluates_after(self, rnd: int) -> bool:
        """Whether the sites evaluate the global model after federated round ``rnd``."""
        return rnd % self.evaluate_every == 0 or rnd >= self.rounds

    @property
    def evaluates_with_next_train(self) -> bool:
        """Whether a round's evaluation rides on the next round's training message (see ``evaluate_in``)."""
        return (self.evaluate_in == "next-train" and not self.secure and not self.sites_per_round
                and self.dropout == 0 and self.fail_sites == 0)

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

    def compile_for(self, device) -> bool | str:
        """The ``compile`` argument of :func:`fedeeg.training.train_epochs` for training on ``device``.

        False off CUDA or with ``compile='off'``; True for ``'on'``; else the mode's name.
        """
        import torch

        if self.compile == "off" or torch.device(device).type != "cuda":
            return False
        return True if self.compile == "on" else self.compile

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any]) -> "RunConfig":
        """Build from a dict with snake- or kebab-case keys (e.g. Flower's run config).

        Unknown keys are an error naming them and listing the known ones.
        """
        return cls(**dataclass_kwargs(cls, mapping, what="run config", coerce=_coerce))


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Coerce TOML/Flower scalars to the field's type (``lr`` 0 is Flower's stand-in for None)."""
    if name == "lr":
        return None if value in (None, "", 0, 0.0) else float(value)
    return coerce_scalar(name, value, annotation)


__all__ = ["RunConfig", "COMPILE_MODES", "DATASETS", "SPLITS", "MODES", "STRATEGIES", "AGGREGATIONS", "FAIL_STAGES", "EVALUATE_IN", "SECURE_DEFAULT_CLIP", "LORA_PRESETS", "DEFAULT_LR", "BACKBONE_NAMES", "LORA_BACKBONES"]
