"""Self-supervised masked-patch pretraining of a LaBraM backbone (Flower-free).

No pretrained LaBraM checkpoint can be downloaded everywhere, so a consortium
must be able to make one from its own unlabeled EEG. This module pretrains the
backbone the way LaBraM does, without the VQ tokenizer: the tokens are
(channel, 1-s patch) pairs built exactly as in :meth:`LaBraM.forward_features`;
a ``mask_ratio`` of them per window is replaced by a learned ``mask_token``; the
transformer sees the whole sequence; a linear decoder predicts, from each masked
token's output, a per-patch z-scored target of that patch; the loss is the MSE
on the masked tokens only.

Targets (``target``):

- ``"spectrum"`` (default): the Fourier amplitude and phase of the patch (the
  ``rfft`` of its 200 samples: 101 amplitudes and 101 phases), each z-scored
  over the patch. This is what LaBraM's neural tokenizer is trained to
  reconstruct (Jiang et al., 2024, amplitude and phase, each standardised), so
  the backbone learns the same kind of representation as the published
  checkpoint; the amplitude part is insensitive to small time shifts inside
  the patch, which makes it a steadier target than the waveform.
- ``"raw"``: the patch's 200 samples, z-scored (CBraMod-style reconstruction).

Z-scoring every target vector per patch makes the loss scale-free: a site whose
amplifier gain differs or a quiet channel weighs as much as any other.

Symmetric masking (``symmetric=True``, LaBraM's): each window is seen twice per
step, once with its random mask and once with the complementary mask, so every
token is predicted exactly once per step.

Data: only each site's **training** windows (the subjects left after
:func:`fedeeg.experiment.prepare_sites` holds out ``test_fraction`` of every
site's subjects) are used; labels are ignored. The held-out subjects are never
seen in pretraining, so a later fine-tuning run with the same ``dataset``,
``split``, ``sites``, ``test_fraction`` and ``seed`` tests on EEG the backbone
has never seen. There is deliberately no option to include them.

The federated version (full weights averaged FedAvg-style, every site training
on its own windows) lives in :mod:`fedeeg.federation.pretrain`; both write the
same checkpoint with :func:`write_pretrain_outputs`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from ._validation import check_option, check_range, dataclass_kwargs
from .config import DEVICES, SPLITS, RunConfig
from .data.base import WindowSet

logger = logging.getLogger(__name__)

#: Backbones that can be pretrained: the LaBraM sizes (keys of :data:`fedeeg.models.BACKBONES`; a test keeps
#: them equal, listed here so that validating a config does not build models).
PRETRAIN_BACKBONES = ("labram-small", "labram-base", "labram-large", "labram-huge")
#: Datasets pretraining reads (the built-in ones; site-TOML folders are not wired in yet).
PRETRAIN_DATASETS = ("synthetic", "eegmat")
#: What the decoder predicts for each masked patch.
TARGETS = ("spectrum", "raw")
#: Backbone parameters that pretraining does not use (new for fine-tuning); they are neither trained, nor sent,
#: nor written to the checkpoint (``load_checkpoint`` accepts their absence, so any ``n_outputs`` fits).
FINE_TUNING_ONLY_PREFIXES = ("fc_norm.", "head.")
#: Files of a pretraining output folder.
WEIGHTS_FILE = "backbone.safetensors"
MANIFEST_FILE = "pretrain_manifest.json"
CURVE_FILE = "loss_curve.png"
#: The final learning rate of the cosine schedule, as a fraction of ``lr``.
MIN_LR_FRACTION = 0.01


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that defines one pretraining run (central or federated).

    Parameters
    ----------
    backbone : str
        LaBraM size to pretrain: one of :data:`PRETRAIN_BACKBONES`.
    dataset : {"synthetic", "eegmat"}
        Where the sites' unlabeled windows come from.
    data_dir : str
        Folder of the eegmat recordings (required for ``dataset="eegmat"``).
    sites : int
        Number of sites (synthetic, or eegmat with ``split="subject"``).
    split : {"year", "subject"}
        How eegmat subjects are dealt to sites.
    test_fraction : float
        Fraction of every site's subjects held out (never used here), in (0, 1).
        Use the fine-tuning run's value so that its test subjects stay unseen.
    seed : int
        Seeds the subject split (use the fine-tuning run's seed), the
        initialisation, the masks and the shuffling.
    window_seconds : float
        Window length (a whole number of 1-s patches, at most 16).
    federated : bool
        Pretrain over Flower (sites keep their windows, full weights are
        averaged) rather than on the pooled training windows.
    epochs : int
        Central: passes over the pooled training windows.
    rounds, local_epochs : int
        Federated: rounds, and local epochs per round at every site.
    mask_ratio : float
        Fraction of a window's tokens that are masked, in [0.05, 0.95].
    symmetric : bool
        Also train on the complementary mask in the same step (LaBraM).
    target : {"spectrum", "raw"}
        Per-patch z-scored Fourier amplitude and phase, or raw samples.
    lr : float
        Peak AdamW learning rate (cosine schedule with linear warm-up).
    weight_decay : float
        AdamW weight decay (not on biases, norms, layer scales and embeddings).
    batch_size : int
        Windows per step (twice as many sequences with ``symmetric``).
    warmup : float
        Fraction of all steps spent warming the learning rate up, in [0, 0.5].
    max_grad_norm : float
        Gradient clipping norm (0 = none).
    checkpoint : str
        Continue from these LaBraM weights ("" = the seeded random init).
    device : {"auto", "cpu", "cuda"}
        Where training runs (``auto``: CUDA when present; bf16 autocast there).
    out : str
        Output folder ("" = none).
    """

    backbone: str = "labram-small"
    dataset: str = "synthetic"
    data_dir: str = ""
    sites: int = 3
    split: str = "year"
    test_fraction: float = 0.34
    seed: int = 0
    window_seconds: float = 4.0
    federated: bool = False
    epochs: int = 20
    rounds: int = 10
    local_epochs: int = 2
    mask_ratio: float = 0.5
    symmetric: bool = True
    target: str = "spectrum"
    lr: float = 5e-4
    weight_decay: float = 0.05
    batch_size: int = 32
    warmup: float = 0.1
    max_grad_norm: float = 3.0
    checkpoint: str = ""
    device: str = "auto"
    out: str = ""

    def __post_init__(self) -> None:
        check_option("backbone", self.backbone, PRETRAIN_BACKBONES)
        check_option("dataset", self.dataset, PRETRAIN_DATASETS)
        check_option("split", self.split, SPLITS)
        check_option("target", self.target, TARGETS)
        check_option("device", self.device, DEVICES)
        for name in ("federated", "symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name!r} must be bool, got {type(getattr(self, name)).__name__} ({getattr(self, name)!r}) instead.")
        check_range("sites", self.sites, low=1, kind=int)
        check_range("test_fraction", self.test_fraction, low=0.01, high=0.99)
        check_range("seed", self.seed, low=0, kind=int)
        check_range("window_seconds", self.window_seconds, low=1, high=16)
        if float(self.window_seconds) != int(self.window_seconds):
            raise ValueError(f"'window_seconds' must be a whole number of 1-s patches, got {self.window_seconds!r} instead.")
        check_range("epochs", self.epochs, low=1, kind=int)
        check_range("rounds", self.rounds, low=1, kind=int)
        check_range("local_epochs", self.local_epochs, low=1, kind=int)
        check_range("mask_ratio", self.mask_ratio, low=0.05, high=0.95)
        check_range("lr", self.lr, low=1e-8, high=1.0)
        check_range("weight_decay", self.weight_decay, low=0)
        check_range("batch_size", self.batch_size, low=1, kind=int)
        check_range("warmup", self.warmup, low=0.0, high=0.5)
        check_range("max_grad_norm", self.max_grad_norm, low=0)
        if self.dataset == "eegmat" and not self.data_dir:
            raise ValueError(
                "The eegmat dataset needs 'data_dir' (--data-dir): the folder holding SubjectNN_1.edf, "
                "SubjectNN_2.edf and subject-info.csv from PhysioNet's 'EEG During Mental Arithmetic Tasks'."
            )

    # ------------------------------------------------------------------ helpers
    @property
    def mode(self) -> str:
        """``"federated"`` or ``"central"``."""
        return "federated" if self.federated else "central"

    @property
    def total_epochs(self) -> int:
        """Passes over each window: ``epochs`` (central) or ``rounds * local_epochs`` (federated)."""
        return self.rounds * self.local_epochs if self.federated else self.epochs

    def run_config(self) -> RunConfig:
        """The data-layer part as a :class:`fedeeg.config.RunConfig` (for :func:`fedeeg.experiment.prepare_sites`)."""
        return RunConfig(dataset=self.dataset, data_dir=self.data_dir, sites=self.sites, split=self.split,
                         test_fraction=self.test_fraction, seed=self.seed, window_seconds=float(self.window_seconds),
                         device=self.device)

    def replace(self, **changes: Any) -> "PretrainConfig":
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flower(self) -> dict[str, Any]:
        """Flower run config (kebab-case keys)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "PretrainConfig":
        """Build from a dict with snake- or kebab-case keys (e.g. Flower's run config).

        Unknown keys are an error naming them and listing the known ones.
        """
        return cls(**dataclass_kwargs(cls, mapping, what="pretraining config"))


# ---------------------------------------------------------------------------------------------- the model
def _znorm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Z-score over the last dimension (a constant vector becomes zeros)."""
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)


def patch_targets(patches: torch.Tensor, target: str = "spectrum") -> torch.Tensor:
    """Per-patch z-scored prediction targets.

    Parameters
    ----------
    patches : torch.Tensor
        Shape ``(batch, n_tokens, patch_size)``.
    target : {"spectrum", "raw"}
        ``"spectrum"``: z-scored ``|rfft|`` then z-scored ``angle(rfft)``
        (``2 * (patch_size // 2 + 1)`` values); ``"raw"``: the z-scored samples.

    Returns
    -------
    targets : torch.Tensor
        float32, shape ``(batch, n_tokens, target_dim)``.
    """
    check_option("target", target, TARGETS)
    patches = patches.float()
    if target == "raw":
        return _znorm(patches)
    spec = torch.fft.rfft(patches, dim=-1)  # (batch, n_tokens, patch_size // 2 + 1)
    return torch.cat([_znorm(spec.abs()), _znorm(spec.angle())], dim=-1)


def target_dim(target: str, patch_size: int = 200) -> int:
    """Length of one patch's target vector."""
    check_option("target", target, TARGETS)
    return patch_size if target == "raw" else 2 * (patch_size // 2 + 1)


def random_mask(batch: int, n_tokens: int, mask_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask exactly ``round(mask_ratio * n_tokens)`` random tokens per window.

    At least one token is masked and one left visible.

    Parameters
    ----------
    batch, n_tokens : int
        Windows, and tokens per window (``n_chans * n_patches``).
    mask_ratio : float
        Fraction masked, in (0, 1).
    generator : torch.Generator | None
        CPU generator (seeded by the caller for reproducible masks).

    Returns
    -------
    mask : torch.Tensor
        bool, shape ``(batch, n_tokens)``; True = masked.
    """
    if n_tokens < 2:
        raise ValueError(f"Masking needs at least 2 tokens per window (n_chans * n_patches), got {n_tokens}.")
    n_mask = min(max(int(round(mask_ratio * n_tokens)), 1), n_tokens - 1)
    ranks = torch.rand(batch, n_tokens, generator=generator).argsort(dim=1).argsort(dim=1)  # a random permutation per row
    return ranks < n_mask


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked tokens only.

    Parameters
    ----------
    pred, target : torch.Tensor
        Shape ``(batch, n_tokens, target_dim)``.
    mask : torch.Tensor
        bool, shape ``(batch, n_tokens)``; True = masked (counted).

    Returns
    -------
    loss : torch.Tensor
        Scalar: the squared error averaged over the target values of masked tokens.
    """
    per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (batch, n_tokens)
    weight = mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


class MaskedPatchPretrainer(nn.Module):
    """A LaBraM backbone, a mask token and a linear decoder for masked-patch prediction.

    The token path reuses the backbone's own ``patch_embed``, ``cls_token``,
    ``pos_embed``, ``time_embed`` and ``blocks`` and builds the tokens exactly
    as :meth:`fedeeg.models.LaBraM.forward_features` does; with no mask the
    sequence fed to the blocks is the same. Masked patches are replaced by
    ``mask_token`` after the temporal convolution, before the position and
    time embeddings are added (as in LaBraM's masked EEG modelling). The
    blocks' output goes through the backbone's final ``norm`` (as in LaBraM's
    pretraining; mean-pooling fine-tuning does not use it) and then the
    decoder.

    Prefer :func:`build_pretrainer`, which seeds the initialisation.

    Parameters
    ----------
    backbone : fedeeg.models.LaBraM
        The backbone to pretrain (its ``fc_norm`` and ``head`` are frozen and unused).
    target : {"spectrum", "raw"}
        What the decoder predicts (see :func:`patch_targets`).
    """

    def __init__(self, backbone: nn.Module, *, target: str = "spectrum") -> None:
        super().__init__()
        from .models.labram import LaBraM, _trunc_normal_

        if not isinstance(backbone, LaBraM):
            raise TypeError(f"'backbone' must be a fedeeg.models.LaBraM (build it with build_backbone), got {type(backbone).__name__}.")
        check_option("target", target, TARGETS)
        self.backbone = backbone
        self.target = target
        cfg = backbone.backbone_config
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.decoder = nn.Linear(cfg.embed_dim, target_dim(target, cfg.patch_size))
        with torch.no_grad():
            _trunc_normal_(self.mask_token, 0.02)
            _trunc_normal_(self.decoder.weight, 0.02)
            nn.init.zeros_(self.decoder.bias)
        for name, p in backbone.named_parameters():
            if name.startswith(FINE_TUNING_ONLY_PREFIXES):
                p.requires_grad_(False)

    @property
    def patch_size(self) -> int:
        return self.backbone.backbone_config.patch_size

    def n_tokens(self, x: torch.Tensor, ch_names: Sequence[str]) -> int:
        """Tokens per window, ``n_chans * n_patches`` (validates ``x`` and ``ch_names``)."""
        return x.shape[1] * self.backbone._check_input(x, ch_names)

    def embed(self, x: torch.Tensor, ch_names: Sequence[str], mask: torch.Tensor | None = None) -> torch.Tensor:
        """The token sequence fed to the first block.

        Parameters
        ----------
        x : torch.Tensor
            EEG of shape ``(batch, n_chans, n_times)`` in 0.1 mV at 200 Hz.
        ch_names : sequence of str
            The ``n_chans`` channel names (LaBraM vocabulary).
        mask : torch.Tensor | None
            bool, shape ``(batch, n_chans * n_patches)`` in channel-major token
            order; True replaces the patch embedding by ``mask_token``.

        Returns
        -------
        tokens : torch.Tensor
            Shape ``(batch, 1 + n_chans * n_patches, embed_dim)`` (cls first).
        """
        bb = self.backbone
        n_patches = bb._check_input(x, ch_names)
        idx = bb.channel_index(ch_names, x.device)  # (1 + n_chans,)
        if x.dtype != bb.cls_token.dtype:
            x = x.to(bb.cls_token.dtype)
        batch, n_chans, _ = x.shape
        dim = bb.backbone_config.embed_dim
        n_tokens = n_chans * n_patches
        # Same steps as LaBraM.forward_features (channel-major patches).
        x = x.reshape(batch, n_tokens, self.patch_size)  # (batch, n_tokens, patch_size)
        x = bb.patch_embed(x)  # (batch, n_tokens, embed_dim)
        if mask is not None:
            if mask.shape != (batch, n_tokens):
                raise ValueError(f"'mask' must have shape (batch, n_chans * n_patches) = {(batch, n_tokens)}, got {tuple(mask.shape)}.")
            x = torch.where(mask.to(x.device).unsqueeze(-1), self.mask_token.to(x.dtype), x)  # (batch, n_tokens, embed_dim)
        pos = bb.pos_embed[:, idx]  # (1, 1 + n_chans, embed_dim)
        pos_patch = pos[:, 1:].unsqueeze(2).expand(-1, -1, n_patches, -1).reshape(1, n_tokens, dim)  # (1, n_tokens, embed_dim)
        time_emb = bb.time_embed[:, :n_patches].unsqueeze(1).expand(-1, n_chans, -1, -1).reshape(1, n_tokens, dim)  # (1, n_tokens, embed_dim)
        cls = (bb.cls_token + pos[:, :1]).expand(batch, -1, -1)  # (batch, 1, embed_dim)
        return torch.cat([cls, x + pos_patch + time_emb], dim=1)  # (batch, 1 + n_tokens, embed_dim)

    def predict(self, x: torch.Tensor, ch_names: Sequence[str], mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder output for every patch token, shape ``(batch, n_tokens, target_dim)``."""
        h = self.embed(x, ch_names, mask)  # (batch, 1 + n_tokens, embed_dim)
        for blk in self.backbone.blocks:
            h = blk(h)  # (batch, 1 + n_tokens, embed_dim)
        h = self.backbone.norm(h[:, 1:])  # (batch, n_tokens, embed_dim)
        return self.decoder(h)  # (batch, n_tokens, target_dim)

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """Per-patch targets of x (batch, n_chans, n_times), shape ``(batch, n_tokens, target_dim)``."""
        batch, n_chans, n_times = x.shape
        patches = x.reshape(batch, n_chans * (n_times // self.patch_size), self.patch_size)  # (batch, n_tokens, patch_size)
        return patch_targets(patches, self.target)

    def forward(self, x: torch.Tensor, ch_names: Sequence[str], mask: torch.Tensor,
                target: torch.Tensor | None = None) -> torch.Tensor:
        """Masked-patch loss of a batch.

        Parameters
        ----------
        x : torch.Tensor
            EEG of shape ``(batch, n_chans, n_times)``.
        ch_names : sequence of str
            The ``n_chans`` channel names.
        mask : torch.Tensor
            bool, shape ``(batch, n_tokens)``; True = masked and predicted.
        target : torch.Tensor | None
            Targets of shape ``(batch, n_tokens, target_dim)``; None computes
            them from ``x`` (:meth:`targets`).

        Returns
        -------
        loss : torch.Tensor
            Scalar MSE over the masked tokens (:func:`masked_mse`).
        """
        pred = self.predict(x, ch_names, mask)  # (batch, n_tokens, target_dim)
        if target is None:
            target = self.targets(x)
        return masked_mse(pred, target, mask)

    # ------------------------------------------------------------------ weights
    def exchange_state_dict(self) -> dict[str, torch.Tensor]:
        """What pretraining trains: backbone (without ``fc_norm``/``head``), ``mask_token``, decoder."""
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith(tuple(f"backbone.{p}" for p in FINE_TUNING_ONLY_PREFIXES))}

    def load_exchange_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the tensors of :meth:`exchange_state_dict`; any other set of names or shapes is a ValueError."""
        own = self.exchange_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
        if missing or unexpected or wrong:
            raise ValueError(
                f"The pretraining weights do not match this {self.backbone.backbone_name or 'LaBraM'} pretrainer "
                f"(target {self.target!r}): missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches "
                f"{wrong[:5]}. The server and the sites must use the same backbone and target."
            )
        self.load_state_dict(dict(state), strict=False)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone weights a checkpoint holds: LaBraM's state-dict keys without ``fc_norm``/``head``."""
        return {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()
                if not k.startswith(FINE_TUNING_ONLY_PREFIXES)}


def build_pretrainer(cfg: PretrainConfig) -> MaskedPatchPretrainer:
    """The pretrainer of a config, identical wherever it is built (server and every site).

    The backbone comes from :func:`fedeeg.models.build_backbone` (seeded by
    ``cfg.seed``, or loaded from ``cfg.checkpoint``); the mask token and the
    decoder are drawn from the same seed without touching the global RNG.
    """
    from .models import build_backbone

    backbone = build_backbone(cfg.backbone, seed=cfg.seed, checkpoint=cfg.checkpoint or None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        return MaskedPatchPretrainer(backbone, target=cfg.target)


def count_trainable(model: nn.Module) -> int:
    """Parameters that pretraining updates."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------- training
def lr_at(step: int, total_steps: int, lr: float, warmup: float) -> float:
    """Learning rate at ``step`` (0-based) of a linear warm-up then cosine decay to ``MIN_LR_FRACTION * lr``."""
    total_steps = max(int(total_steps), 1)
    n_warm = int(round(warmup * total_steps))
    if step < n_warm:
        return lr * (step + 1) / n_warm
    progress = min(max((step - n_warm) / max(total_steps - n_warm, 1), 0.0), 1.0)
    low = MIN_LR_FRACTION * lr
    return low + 0.5 * (lr - low) * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(windows: Sequence[WindowSet], batch_size: int) -> int:
    """Optimiser steps per pass (batches never mix window sets, which may have different channels)."""
    return sum(math.ceil(w.n_windows / batch_size) for w in windows)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, layer scales, embeddings and the mask token (as LaBraM)."""
    no_decay_names = ("cls_token", "pos_embed", "time_embed", "mask_token")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.split(".")[-1] in no_decay_names else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class PretrainStepsResult:
    """What one call of :func:`train_pretrainer` did (aggregate numbers only)."""

    loss: float
    epoch_losses: tuple[float, ...]
    n_windows: int
    epochs: int
    steps: int
    seconds: float
    windows_per_second: float


def train_pretrainer(
    model: MaskedPatchPretrainer,
    windows: Sequence[WindowSet],
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 0.05,
    batch_size: int = 32,
    mask_ratio: float = 0.5,
    symmetric: bool = True,
    warmup: float = 0.1,
    max_grad_norm: float = 3.0,
    device: str | torch.device = "auto",
    seed: int = 0,
    amp: bool = True,
    step_offset: int = 0,
    total_steps: int | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> PretrainStepsResult:
    """Masked-patch pretraining for some epochs with AdamW, warm-up + cosine and clipping.

    Parameters
    ----------
    model : MaskedPatchPretrainer
        Trained in place.
    windows : sequence of WindowSet
        Unlabeled windows, each X of shape ``(n_windows, n_chans, n_times)``
        (labels are ignored). A batch never mixes two sets.
    epochs : int
        Passes over all windows.
    lr, weight_decay : float
        Peak learning rate and AdamW weight decay.
    batch_size : int
        Windows per step.
    mask_ratio : float
        Fraction of each window's tokens masked.
    symmetric : bool
        Also predict the complementary mask's tokens in the same step.
    warmup : float
        Fraction of ``total_steps`` for the linear warm-up.
    max_grad_norm : float
        Gradient clipping norm (0 = none).
    device : str | torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or a device; bf16 autocast on CUDA.
    seed : int
        Seeds the shuffling and the masks of this call.
    amp : bool
        Mixed precision on CUDA.
    step_offset, total_steps : int
        Where these steps sit in the whole schedule (federated rounds continue
        one schedule); ``total_steps=None`` means this call is the whole run.
    on_epoch : callable | None
        Called after every epoch with ``{"epoch", "loss", "seconds", "windows_per_second"}``.

    Returns
    -------
    result : PretrainStepsResult
    """
    from .training import _autocast, resolve_device

    windows = [w for w in windows if w.n_windows > 0]
    if not windows:
        raise ValueError("Cannot pretrain on zero windows: the site(s) have no training windows after the subject split.")
    dev = resolve_device(device) if isinstance(device, str) else device
    spe = steps_per_epoch(windows, batch_size)
    total = total_steps if total_steps is not None else step_offset + epochs * spe
    params = [p for p in model.parameters() if p.requires_grad]
    model.to(dev).train()
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), fused=dev.type == "cuda")
    Xs = [torch.from_numpy(w.X).to(dev, non_blocking=True) for w in windows]  # each (n_windows, n_chans, n_times)
    names = [list(w.ch_names) for w in windows]
    n_total = sum(w.n_windows for w in windows)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    step = step_offset
    epoch_losses = []
    start = time.perf_counter()
    for epoch in range(epochs):
        t_epoch = time.perf_counter()
        batches = []
        for s, w in enumerate(windows):
            order = torch.randperm(w.n_windows, generator=gen)
            batches += [(s, order[i : i + batch_size]) for i in range(0, w.n_windows, batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        total_loss = torch.zeros((), device=dev)
        for s, idx in batches:
            xb = Xs[s][idx.to(dev)]  # (batch, n_chans, n_times)
            n_tok = model.n_tokens(xb, names[s])
            mask = random_mask(xb.shape[0], n_tok, mask_ratio, gen).to(dev)  # (batch, n_tokens)
            if symmetric:
                xb, mask = torch.cat([xb, xb]), torch.cat([mask, ~mask])  # (2 * batch, ...)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, lr, warmup)
            with _autocast(dev, amp):
                loss = model(xb, names[s], mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            total_loss += loss.detach()
            step += 1
        epoch_loss = float(total_loss.item() / max(len(batches), 1))
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(f"Pretraining diverged (loss={epoch_loss}); lower the learning rate (lr={lr}).")
        epoch_losses.append(epoch_loss)
        seconds = time.perf_counter() - t_epoch
        rec = {"epoch": epoch + 1, "loss": epoch_loss, "seconds": round(seconds, 3),
               "windows_per_second": round(n_total / seconds, 1) if seconds > 0 else float("inf")}
        logger.debug("pretraining epoch %d: loss %.4f, %.1f windows/s", epoch + 1, epoch_loss, rec["windows_per_second"])
        if on_epoch:
            on_epoch(rec)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    wps = n_total * epochs / seconds if seconds > 0 else float("inf")
    return PretrainStepsResult(float(np.mean(epoch_losses)), tuple(epoch_losses), n_total, epochs, step - step_offset, seconds, wps)


# --------------------------------------------------------------------------------------------------- runs
@dataclass
class PretrainResult:
    """What a pretraining run produced, ready for :func:`write_pretrain_outputs`.

    ``history`` has one record per epoch (central: ``epoch``) or round
    (federated: ``round``), each with ``loss``, ``seconds`` and
    ``windows_per_second``; ``sites`` maps site name to its number of
    training windows.
    """

    pretrainer: MaskedPatchPretrainer
    history: list[dict]
    n_windows: int
    sites: dict[str, int]
    mode: str
    extra: dict = field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        return [float(h["loss"]) for h in self.history]


def pretrain_windows(cfg: PretrainConfig) -> dict[str, WindowSet]:
    """Every site's **training** windows, by site name (labels are ignored downstream).

    The sites come from :func:`fedeeg.experiment.prepare_sites` with the
    config's dataset, split, ``test_fraction`` and ``seed``; only the ``train``
    part of each site is returned. The held-out subjects are never returned,
    so they are never seen in pretraining.
    """
    from .experiment import prepare_sites

    return {s.name: s.train for s in prepare_sites(cfg.run_config())}


def pretrain_central(
    cfg: PretrainConfig,
    windows: Mapping[str, WindowSet] | Sequence[WindowSet],
    *,
    on_epoch: Callable[[dict], None] | None = None,
) -> PretrainResult:
    """Pretrain on the pooled windows of all sites for ``cfg.epochs`` epochs.

    Parameters
    ----------
    cfg : PretrainConfig
        The run.
    windows : mapping of str to WindowSet, or sequence of WindowSet
        The sites' training windows (:func:`pretrain_windows`); never pass
        held-out subjects.
    on_epoch : callable | None
        Progress callback (see :func:`train_pretrainer`).

    Returns
    -------
    result : PretrainResult
    """
    sets = dict(windows) if isinstance(windows, Mapping) else {f"set-{i}": w for i, w in enumerate(windows)}
    model = build_pretrainer(cfg)
    history: list[dict] = []

    def _record(rec: dict) -> None:
        history.append(rec)
        if on_epoch:
            on_epoch(rec)

    res = train_pretrainer(
        model, list(sets.values()), epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size, mask_ratio=cfg.mask_ratio, symmetric=cfg.symmetric, warmup=cfg.warmup,
        max_grad_norm=cfg.max_grad_norm, device=cfg.device, seed=cfg.seed * 100_003 + 7, on_epoch=_record,
    )
    return PretrainResult(model.cpu(), history, res.n_windows, {k: v.n_windows for k, v in sets.items()}, "central",
                          extra={"windows_per_second": round(res.windows_per_second, 1), "steps": res.steps})


# ---------------------------------------------------------------------------------------------- outputs
def _plot_losses(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "round" if history and "round" in history[0] else "epoch"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([h[key] for h in history], [h["loss"] for h in history], "o-", color="C3")
    ax.set_xlabel(key)
    ax.set_ylabel("masked-patch MSE (z-scored targets)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_pretrain_outputs(cfg: PretrainConfig, result: PretrainResult, *, wall_seconds: float | None = None,
                           out: str | os.PathLike | None = None) -> Path:
    """Write the pretrained backbone, its manifest and the loss curve to ``out`` (default ``cfg.out``).

    Files:

    - ``backbone.safetensors``: the backbone's weights under LaBraM's own
      state-dict keys, without the fine-tuning-only ``fc_norm``/``head`` (no
      decoder, no mask token), so ``build_backbone(name, checkpoint=path)``
      (and ``fedeeg simulate --checkpoint``) loads it strictly for any number
      of classes;
    - ``pretrain_manifest.json``: backbone and its architecture, the config,
      the loss per epoch/round, the number of windows per site, the held-out
      split it respects, the weights' sha256 and the FedEEG version;
    - ``loss_curve.png``.

    Returns
    -------
    out : Path
    """
    from safetensors.torch import save_file

    from .checkpoint import sha256_file

    out = Path(out or cfg.out)
    if not str(out) or str(out) == ".":
        raise ValueError("write_pretrain_outputs needs an output folder: set 'out' (--out).")
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    save_file(result.pretrainer.backbone_state_dict(), str(tmp), metadata={"format": "pt", "fedeeg": __version__})
    os.replace(tmp, weights)
    sha = sha256_file(weights)
    bb = result.pretrainer.backbone
    manifest = {
        "kind": "fedeeg-pretrained-labram",
        "backbone": cfg.backbone,
        "backbone_config": bb.backbone_config.to_dict(),
        "mode": result.mode,
        "target": cfg.target,
        "config": cfg.to_dict(),
        "losses": result.losses,
        "history": result.history,
        "n_windows": result.n_windows,
        "sites": result.sites,
        "held_out": {
            "note": "Only the sites' training subjects were used; fine-tune with the same dataset, split, sites, "
                    "test_fraction and seed so that the held-out subjects stay unseen.",
            **{k: getattr(cfg, k) for k in ("dataset", "split", "sites", "test_fraction", "seed")},
        },
        "input": {"sfreq": 200.0, "unit": "0.1 mV (uV / 100)", "window_seconds": float(cfg.window_seconds)},
        "init_checkpoint_sha256": None,
        "weights": {"file": WEIGHTS_FILE, "sha256": sha, "keys": len(result.pretrainer.backbone_state_dict())},
        "trainable_parameters": count_trainable(result.pretrainer),
        "wall_seconds": None if wall_seconds is None else round(float(wall_seconds), 1),
        "fedeeg_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **result.extra,
    }
    if cfg.checkpoint:
        manifest["init_checkpoint_sha256"] = sha256_file(cfg.checkpoint)
    text = json.dumps(_json_safe(manifest), indent=2, default=str) + "\n"
    tmp_m = out / f".{MANIFEST_FILE}.tmp"
    tmp_m.write_text(text)
    os.replace(tmp_m, out / MANIFEST_FILE)
    if result.history:
        _plot_losses(result.history, out / CURVE_FILE,
                     f"{result.mode} masked-patch pretraining, {cfg.backbone} on {cfg.dataset} (seed {cfg.seed})")
    logger.info("wrote %s (sha256 %s)", weights, sha[:12])
    return out


__all__ = [
    "PRETRAIN_BACKBONES",
    "PRETRAIN_DATASETS",
    "TARGETS",
    "PretrainConfig",
    "MaskedPatchPretrainer",
    "build_pretrainer",
    "count_trainable",
    "patch_targets",
    "target_dim",
    "random_mask",
    "masked_mse",
    "lr_at",
    "steps_per_epoch",
    "train_pretrainer",
    "PretrainStepsResult",
    "PretrainResult",
    "pretrain_windows",
    "pretrain_central",
    "write_pretrain_outputs",
]
