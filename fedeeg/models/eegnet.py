"""EEGNet (Lawhern et al., 2018), written for FedEEG's calling convention.

EEGNet-8,2: a temporal convolution (F1 = 8 filters of half a second), a
depthwise spatial convolution (D = 2 spatial filters per temporal filter, with
a max-norm constraint), a separable convolution (F2 = 16), two average pools
and a linear head. It is one of the small baselines that LaBraM is compared
with; it trains in full (no LoRA).

This module also holds what the fixed-input baselines share:
:class:`FixedInputBackbone` (input checks against the channels and window
length the model was built for) and :class:`Conv2dMaxNorm`.

Input convention (as LaBraM): ``model(x, ch_names)`` with x of shape
``(batch, n_chans, n_times)`` in 0.1 mV at 200 Hz. Unlike LaBraM, a baseline is
built for one channel list (in order) and one window length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._validation import check_range

#: Keras' BatchNormalization epsilon (the published EEGNet/EEG-Inception code).
BN_EPS = 1e-3


class Conv2dMaxNorm(nn.Conv2d):
    """Conv2d whose kernel is renormalised so each output filter has L2 norm ≤ ``max_norm``.

    The constraint is applied in the forward pass (``torch.renorm`` of the
    stored kernel, differentiable), so the kernel in use always satisfies it,
    whatever the optimiser or the federated average did to the stored one.
    Keras' ``max_norm`` instead projects the stored kernel after each step;
    both constrain the network to the same set of functions.

    Parameters
    ----------
    *args, **kwargs
        As :class:`torch.nn.Conv2d`.
    max_norm : float | None
        Largest L2 norm of each output filter's kernel; None: no constraint.
    """

    def __init__(self, *args, max_norm: float | None = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if max_norm is not None:
            check_range("max_norm", max_norm, kind=(int, float))
            if not max_norm > 0:
                raise ValueError(f"'max_norm' must be > 0 or None, got {max_norm!r} instead.")
        self.max_norm = None if max_norm is None else float(max_norm)

    def constrained_weight(self) -> torch.Tensor:
        """The kernel used in the forward pass, same shape as ``weight``."""
        if self.max_norm is None:
            return self.weight
        return torch.renorm(self.weight, p=2, dim=0, maxnorm=self.max_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.constrained_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", max_norm={self.max_norm}"


class SameConv2d(nn.Conv2d):
    """Conv2d (stride 1) with Keras' 'same' padding, also for even kernels.

    Pads ``(k - 1) // 2`` before and the rest after along each axis, as Keras and
    PyTorch's ``padding='same'`` do, without the copy warning PyTorch gives for
    even kernels. Parameters as :class:`torch.nn.Conv2d` (no ``padding``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], **kwargs) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=0, **kwargs)
        kh, kw = self.kernel_size
        self._pad = ((kw - 1) // 2, kw - 1 - (kw - 1) // 2, (kh - 1) // 2, kh - 1 - (kh - 1) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self._pad):
            x = nn.functional.pad(x, self._pad)
        return super().forward(x)


def _names(ch_names: Sequence[str], what: str = "ch_names") -> tuple[str, ...]:
    if isinstance(ch_names, str) or not isinstance(ch_names, Sequence):
        raise TypeError(f"{what!r} must be a sequence of channel names, got {type(ch_names).__name__} ({ch_names!r}).")
    bad = [c for c in ch_names if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"{what!r} must hold non-empty channel names (str), got {bad!r}.")
    return tuple(ch_names)


def _short(names: Sequence[str], limit: int = 24) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


class FixedInputBackbone(nn.Module):
    """Base of the baselines: a model built for one channel list and one window length.

    Holds ``ch_names``, ``n_chans``, ``n_times``, ``sfreq`` and ``n_outputs``,
    checks every input against them (:meth:`check_input`) and carries the
    registry attributes ``backbone_name``, ``checkpoint_sha256`` and
    ``supports_lora`` (False: baselines train in full).

    Parameters
    ----------
    ch_names : sequence of str
        The channels, in the order of x's rows.
    n_times : int
        Samples per window.
    n_outputs : int
        Outputs of the head (classes).
    sfreq : float
        Sampling frequency in Hz (sets the temporal kernel lengths).
    """

    #: Baselines have no LoRA targets: they train in full (strategy='full').
    supports_lora = False

    def __init__(self, ch_names: Sequence[str], n_times: int, n_outputs: int, sfreq: float) -> None:
        super().__init__()
        names = _names(ch_names)
        if not names:
            raise ValueError("'ch_names' must name at least one channel, got an empty sequence.")
        dupes = sorted({c for c in names if names.count(c) > 1})
        if dupes:
            raise ValueError(f"'ch_names' must not repeat a channel, got {dupes!r} more than once.")
        check_range("n_times", n_times, low=1, kind=int)
        check_range("n_outputs", n_outputs, low=1, kind=int)
        check_range("sfreq", sfreq, low=1, kind=(int, float))
        self.ch_names = names
        self.n_chans = len(names)
        self.n_times = int(n_times)
        self.n_outputs = int(n_outputs)
        self.sfreq = float(sfreq)
        self.backbone_name: str | None = None
        self.checkpoint_sha256: str | None = None

    @property
    def n_features(self) -> int:
        """Width of :meth:`forward_features`' output (the head's input)."""
        return self.head.in_features

    @property
    def embed_dim(self) -> int:
        """Alias of :attr:`n_features` (LaBraM's name for the pooled width)."""
        return self.n_features

    def input_spec(self) -> dict:
        """The fixed input: ``{'ch_names': [...], 'n_times': int, 'sfreq': float}``."""
        return {"ch_names": list(self.ch_names), "n_times": self.n_times, "sfreq": self.sfreq}

    def check_input(self, x: torch.Tensor, ch_names: Sequence[str]) -> None:
        """Raise a clear error unless x and ch_names are what the model was built for.

        Parameters
        ----------
        x : torch.Tensor
            Shape ``(batch, n_chans, n_times)``, floating point.
        ch_names : sequence of str
            The names of x's channels, in order (compared case-insensitively).
        """
        kind = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (batch, n_chans, n_times), got {type(x).__name__}.")
        if x.ndim != 3:
            raise ValueError(f"x must have shape (batch, n_chans, n_times), got {x.ndim} dimensions {tuple(x.shape)}.")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}.")
        _, n_chans, n_times = x.shape
        if n_chans != self.n_chans:
            raise ValueError(
                f"x has {n_chans} channels but this {kind} was built for n_chans={self.n_chans} "
                f"({_short(self.ch_names)}): pick those channels, in that order, or build the model for your montage "
                f"(load_backbone(..., ch_names=...))."
            )
        if n_times != self.n_times:
            raise ValueError(
                f"x has n_times={n_times} samples per window but this {kind} was built for n_times={self.n_times} "
                f"({self.n_times / self.sfreq:g} s at {self.sfreq:g} Hz): cut windows of {self.n_times} samples or "
                f"build the model with n_times={n_times}."
            )
        names = _names(ch_names)
        if len(names) != n_chans:
            raise ValueError(f"ch_names must name each of the {n_chans} channels of x, got {len(names)} names.")
        got = [c.upper() for c in names]
        want = [c.upper() for c in self.ch_names]
        if got != want:
            if sorted(got) == sorted(want):
                first = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
                raise ValueError(
                    f"ch_names holds the channels this {kind} was built with, but in another order (position {first}: "
                    f"got {names[first]!r}, expected {self.ch_names[first]!r}). Reorder x's channels to "
                    f"({_short(self.ch_names)})."
                )
            missing = [c for c, u in zip(self.ch_names, want) if u not in got]
            extra = [c for c, u in zip(names, got) if u not in want]
            raise ValueError(
                f"ch_names do not match the channels this {kind} was built with: missing {missing}, unexpected "
                f"{extra}. Expected ({_short(self.ch_names)}); got ({_short(list(names))})."
            )

    def forward_features(self, x: torch.Tensor, ch_names: Sequence[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ch_names: Sequence[str]) -> torch.Tensor:
        """Class logits.

        Parameters
        ----------
        x : torch.Tensor
            EEG of shape ``(batch, n_chans, n_times)``.
        ch_names : sequence of str
            The ``n_chans`` channel names, in the order the model was built with.

        Returns
        -------
        logits : torch.Tensor
            Shape ``(batch, n_outputs)``.
        """
        return self.head(self.forward_features(x, ch_names))  # (batch, n_outputs)


class EEGNet(FixedInputBackbone):
    """EEGNet (Lawhern et al., 2018), by default EEGNet-8,2.

    Layers: temporal Conv2d (``F1`` filters, ``kernel_length`` samples, 'same'
    padding) → BatchNorm → depthwise spatial Conv2d over all channels (``D``
    filters per temporal filter, max-norm ``max_norm``) → BatchNorm → ELU →
    AvgPool 4 → Dropout → separable Conv2d (depthwise ``separable_kernel_length``
    then pointwise to ``F2``) → BatchNorm → ELU → AvgPool 8 → Dropout →
    flatten → ``head`` (Linear). No bias in the convolutions (as the paper).

    Parameters
    ----------
    ch_names : sequence of str
        The channels the model is built for, in order.
    n_times : int
        Samples per window (at least ``pool1 * pool2``).
    n_outputs : int
        Classes.
    sfreq : float
        Sampling frequency in Hz.
    F1, D, F2 : int
        Temporal filters, spatial filters per temporal filter, pointwise filters.
    kernel_length : int | None
        Temporal kernel in samples; None: half a second (``round(sfreq / 2)``,
        100 at 200 Hz; the paper's 64 at 128 Hz).
    separable_kernel_length : int
        Kernel of the depthwise part of the separable convolution (16 as the
        paper; 500 ms of the 4x pooled signal at 128 Hz).
    pool1, pool2 : int
        Average-pool widths after the spatial and the separable convolution.
    drop_prob : float
        Dropout probability (0.25 as the paper's cross-subject setting).
    max_norm : float | None
        Max-norm of each spatial filter (1.0 as the paper); None: unconstrained.

    Notes
    -----
    BatchNorm uses Keras' epsilon (1e-3) and PyTorch's default momentum (0.1):
    FedEEG runs are short, and the Keras momentum (0.99, i.e. 0.01 here)
    leaves the running statistics near their initial values for the first
    hundreds of steps. The paper's max-norm 0.25 on the dense layer is left
    out: ``head`` is a plain Linear as in every FedEEG backbone.

    At 19 channels x 800 samples and 2 outputs EEGNet-8,2 has 2,498 parameters.
    """

    def __init__(
        self,
        ch_names: Sequence[str],
        n_times: int,
        n_outputs: int = 2,
        *,
        sfreq: float = 200.0,
        F1: int = 8,
        D: int = 2,
        F2: int = 16,
        kernel_length: int | None = None,
        separable_kernel_length: int = 16,
        pool1: int = 4,
        pool2: int = 8,
        drop_prob: float = 0.25,
        max_norm: float | None = 1.0,
    ) -> None:
        super().__init__(ch_names, n_times, n_outputs, sfreq)
        if kernel_length is None:
            kernel_length = max(1, int(round(self.sfreq / 2)))
        for name, value in (("F1", F1), ("D", D), ("F2", F2), ("kernel_length", kernel_length),
                            ("separable_kernel_length", separable_kernel_length), ("pool1", pool1), ("pool2", pool2)):
            check_range(name, value, low=1, kind=int)
        check_range("drop_prob", drop_prob, low=0, high=1, kind=(int, float))
        n_out = self.n_times // pool1 // pool2
        if n_out < 1:
            raise ValueError(
                f"EEGNet needs n_times >= pool1 * pool2 = {pool1 * pool2} samples, got n_times={self.n_times}."
            )
        self.hparams = {
            "F1": F1, "D": D, "F2": F2, "kernel_length": kernel_length,
            "separable_kernel_length": separable_kernel_length, "pool1": pool1, "pool2": pool2,
            "drop_prob": float(drop_prob), "max_norm": max_norm,
        }  # fmt: skip
        self.conv_temporal = SameConv2d(1, F1, (1, kernel_length), bias=False)
        self.bn1 = nn.BatchNorm2d(F1, eps=BN_EPS)
        self.conv_spatial = Conv2dMaxNorm(F1, F1 * D, (self.n_chans, 1), groups=F1, bias=False, max_norm=max_norm)
        self.bn2 = nn.BatchNorm2d(F1 * D, eps=BN_EPS)
        self.pool1 = nn.AvgPool2d((1, pool1))
        self.drop1 = nn.Dropout(drop_prob)
        self.conv_separable_depth = SameConv2d(F1 * D, F1 * D, (1, separable_kernel_length), groups=F1 * D, bias=False)
        self.conv_separable_point = nn.Conv2d(F1 * D, F2, (1, 1), bias=False)
        self.bn3 = nn.BatchNorm2d(F2, eps=BN_EPS)
        self.pool2 = nn.AvgPool2d((1, pool2))
        self.drop2 = nn.Dropout(drop_prob)
        self.head = nn.Linear(F2 * n_out, self.n_outputs)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Keras' defaults, from the global torch RNG: Glorot-uniform kernels, zero biases, BatchNorm 1/0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward_features(self, x: torch.Tensor, ch_names: Sequence[str]) -> torch.Tensor:
        """Flattened output of the last block (the head's input).

        Parameters
        ----------
        x : torch.Tensor
            EEG of shape ``(batch, n_chans, n_times)`` in 0.1 mV.
        ch_names : sequence of str
            The ``n_chans`` channel names, in the order the model was built with.

        Returns
        -------
        features : torch.Tensor
            Shape ``(batch, F2 * (n_times // pool1 // pool2))``, e.g. (batch, 400)
            at 800 samples.
        """
        self.check_input(x, ch_names)
        if x.dtype != self.head.weight.dtype:
            x = x.to(self.head.weight.dtype)
        x = x.unsqueeze(1)  # (batch, 1, n_chans, n_times)
        x = self.bn1(self.conv_temporal(x))  # (batch, F1, n_chans, n_times)
        x = self.bn2(self.conv_spatial(x))  # (batch, F1 * D, 1, n_times)
        x = self.drop1(self.pool1(nn.functional.elu(x)))  # (batch, F1 * D, 1, n_times // pool1)
        x = self.conv_separable_point(self.conv_separable_depth(x))  # (batch, F2, 1, n_times // pool1)
        x = self.bn3(x)  # (batch, F2, 1, n_times // pool1)
        x = self.drop2(self.pool2(nn.functional.elu(x)))  # (batch, F2, 1, n_times // pool1 // pool2)
        return x.flatten(1)  # (batch, F2 * n_times // pool1 // pool2)


def _check_seed(seed: int) -> int:
    return check_range("seed", seed, low=0, kind=int)


def build_eegnet(ch_names: Sequence[str], n_times: int, *, n_outputs: int = 2, seed: int = 0, **kwargs) -> EEGNet:
    """An :class:`EEGNet` initialised from ``seed`` (the global torch RNG is left untouched).

    Parameters
    ----------
    ch_names, n_times, n_outputs
        See :class:`EEGNet`.
    seed : int
        Seed of the initialisation; the same seed gives identical weights.
    **kwargs
        Other :class:`EEGNet` parameters (``sfreq``, ``F1``, ...).
    """
    _check_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EEGNet(ch_names, n_times, n_outputs, **kwargs)


__all__ = ["BN_EPS", "Conv2dMaxNorm", "SameConv2d", "FixedInputBackbone", "EEGNet", "build_eegnet"]
