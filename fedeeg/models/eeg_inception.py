"""EEG-Inception (Santamaría-Vázquez et al., 2020), written for FedEEG's calling convention.

EEG-Inception was designed for ERP-based BCIs: two inception modules whose
branches look at three temporal scales (500, 250 and 125 ms), a depthwise
spatial convolution in the first module, average pools, and a small output
block. It is one of the small baselines that LaBraM is compared with; it trains
in full (no LoRA). The original code takes ``(n_times, n_chans, 1)`` inputs;
this version takes ``(batch, n_chans, n_times)`` (channels as the height of a
2-D feature map, time as its width) and keeps the same layers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .._validation import check_range
from .eegnet import BN_EPS, Conv2dMaxNorm, FixedInputBackbone, SameConv2d, _check_seed


def _temporal_unit(in_maps: int, out_maps: int, kernel: int, drop_prob: float) -> nn.Sequential:
    """Conv (1 x kernel, 'same', no bias) → BatchNorm → ELU → Dropout."""
    return nn.Sequential(OrderedDict([
        ("conv", SameConv2d(in_maps, out_maps, (1, kernel), bias=False)),
        ("bn", nn.BatchNorm2d(out_maps, eps=BN_EPS)),
        ("act", nn.ELU()),
        ("drop", nn.Dropout(drop_prob)),
    ]))  # fmt: skip


class EEGInception(FixedInputBackbone):
    """EEG-Inception (Santamaría-Vázquez et al., 2020).

    For each scale ``s`` in ``scales_seconds`` (kernel ``k = round(s * sfreq)``:
    100, 50, 25 samples at 200 Hz):

    1. Inception module 1, one branch per scale: Conv (1 x k, ``n_filters``) →
       BN → ELU → Dropout → depthwise spatial Conv over all channels
       (``depth_multiplier`` per filter, max-norm ``max_norm``) → BN → ELU →
       Dropout. The branches are concatenated (``3 * n_filters * depth_multiplier``
       maps) → AvgPool 4.
    2. Inception module 2, one branch per scale: Conv (1 x k // 4,
       ``n_filters``) → BN → ELU → Dropout; concatenated (``3 * n_filters``) →
       AvgPool 2.
    3. Output block: Conv (1 x 8, ``3 * n_filters // 2``) → BN → ELU → AvgPool 2
       → Dropout → Conv (1 x 4, ``3 * n_filters // 4``) → BN → ELU → AvgPool 2 →
       Dropout → flatten → ``head`` (Linear).

    Parameters
    ----------
    ch_names : sequence of str
        The channels the model is built for, in order.
    n_times : int
        Samples per window (at least 32, the total pooling).
    n_outputs : int
        Classes.
    sfreq : float
        Sampling frequency in Hz.
    n_filters : int
        Filters per branch (8 as the paper); a multiple of 4.
    scales_seconds : sequence of float
        Temporal scales of the branches in seconds.
    depth_multiplier : int
        Spatial filters per temporal filter (2 as the paper).
    drop_prob : float
        Dropout probability (0.25 as the paper).
    max_norm : float | None
        Max-norm of each spatial filter (1.0 as the paper); None: unconstrained.

    Notes
    -----
    Convolution kernels are He-normal as the original code; BatchNorm uses
    Keras' epsilon (1e-3) and PyTorch's default momentum (see
    :class:`fedeeg.models.EEGNet`). The paper's max-norm 0.25 on the dense
    layer is left out (``head`` is a plain Linear).

    At 19 channels x 800 samples and 2 outputs it has 21,946 parameters.
    """

    def __init__(
        self,
        ch_names: Sequence[str],
        n_times: int,
        n_outputs: int = 2,
        *,
        sfreq: float = 200.0,
        n_filters: int = 8,
        scales_seconds: Sequence[float] = (0.5, 0.25, 0.125),
        depth_multiplier: int = 2,
        drop_prob: float = 0.25,
        max_norm: float | None = 1.0,
    ) -> None:
        super().__init__(ch_names, n_times, n_outputs, sfreq)
        check_range("n_filters", n_filters, low=4, kind=int)
        if n_filters % 4:
            raise ValueError(f"'n_filters' must be a multiple of 4 (the output block uses n_filters * 3 // 4), got {n_filters}.")
        check_range("depth_multiplier", depth_multiplier, low=1, kind=int)
        check_range("drop_prob", drop_prob, low=0, high=1, kind=(int, float))
        if isinstance(scales_seconds, (str, bytes)) or not isinstance(scales_seconds, Sequence) or not scales_seconds:
            raise TypeError(f"'scales_seconds' must be a non-empty sequence of seconds, got {scales_seconds!r}.")
        for s in scales_seconds:
            check_range("scales_seconds", s, low=0, kind=(int, float))
        kernels = [max(1, int(round(s * self.sfreq))) for s in scales_seconds]
        pools = (4, 2, 2, 2)
        n_out = self.n_times
        for p in pools:
            n_out //= p
        if n_out < 1:
            raise ValueError(f"EEGInception needs n_times >= 32 samples (pools of 4, 2, 2, 2), got n_times={self.n_times}.")
        n_scales = len(kernels)
        maps1 = n_filters * depth_multiplier  # per branch of module 1
        self.hparams = {
            "n_filters": n_filters, "scales_seconds": [float(s) for s in scales_seconds],
            "depth_multiplier": depth_multiplier, "drop_prob": float(drop_prob), "max_norm": max_norm,
            "kernels": kernels,
        }  # fmt: skip
        self.inception1 = nn.ModuleList()
        for k in kernels:
            branch = _temporal_unit(1, n_filters, k, drop_prob)
            branch.add_module("spatial", Conv2dMaxNorm(
                n_filters, maps1, (self.n_chans, 1), groups=n_filters, bias=False, max_norm=max_norm))
            branch.add_module("spatial_bn", nn.BatchNorm2d(maps1, eps=BN_EPS))
            branch.add_module("spatial_act", nn.ELU())
            branch.add_module("spatial_drop", nn.Dropout(drop_prob))
            self.inception1.append(branch)
        self.pool1 = nn.AvgPool2d((1, pools[0]))
        self.inception2 = nn.ModuleList(
            [_temporal_unit(n_scales * maps1, n_filters, max(1, k // 4), drop_prob) for k in kernels]
        )
        self.pool2 = nn.AvgPool2d((1, pools[1]))
        mid, last = n_filters * n_scales // 2, n_filters * n_scales // 4
        self.output_block = nn.Sequential(OrderedDict([
            ("conv1", SameConv2d(n_scales * n_filters, mid, (1, 8), bias=False)),
            ("bn1", nn.BatchNorm2d(mid, eps=BN_EPS)),
            ("act1", nn.ELU()),
            ("pool1", nn.AvgPool2d((1, pools[2]))),
            ("drop1", nn.Dropout(drop_prob)),
            ("conv2", SameConv2d(mid, last, (1, 4), bias=False)),
            ("bn2", nn.BatchNorm2d(last, eps=BN_EPS)),
            ("act2", nn.ELU()),
            ("pool2", nn.AvgPool2d((1, pools[3]))),
            ("drop2", nn.Dropout(drop_prob)),
        ]))  # fmt: skip
        self.head = nn.Linear(last * n_out, self.n_outputs)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As the original code, from the global torch RNG: He-normal conv kernels, Glorot-uniform head."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward_features(self, x: torch.Tensor, ch_names: Sequence[str]) -> torch.Tensor:
        """Flattened output of the output block (the head's input).

        Parameters
        ----------
        x : torch.Tensor
            EEG of shape ``(batch, n_chans, n_times)`` in 0.1 mV.
        ch_names : sequence of str
            The ``n_chans`` channel names, in the order the model was built with.

        Returns
        -------
        features : torch.Tensor
            Shape ``(batch, 3 * n_filters // 4 * (n_times // 32))``, e.g. (batch, 150)
            at 800 samples.
        """
        self.check_input(x, ch_names)
        if x.dtype != self.head.weight.dtype:
            x = x.to(self.head.weight.dtype)
        x = x.unsqueeze(1)  # (batch, 1, n_chans, n_times)
        x = torch.cat([branch(x) for branch in self.inception1], dim=1)  # (batch, n_scales * F * D, 1, n_times)
        x = self.pool1(x)  # (batch, n_scales * F * D, 1, n_times // 4)
        x = torch.cat([branch(x) for branch in self.inception2], dim=1)  # (batch, n_scales * F, 1, n_times // 4)
        x = self.pool2(x)  # (batch, n_scales * F, 1, n_times // 8)
        x = self.output_block(x)  # (batch, n_scales * F // 4, 1, n_times // 32)
        return x.flatten(1)  # (batch, n_scales * F // 4 * (n_times // 32))


def build_eeg_inception(
    ch_names: Sequence[str], n_times: int, *, n_outputs: int = 2, seed: int = 0, **kwargs
) -> EEGInception:
    """An :class:`EEGInception` initialised from ``seed`` (the global torch RNG is left untouched).

    Parameters
    ----------
    ch_names, n_times, n_outputs
        See :class:`EEGInception`.
    seed : int
        Seed of the initialisation; the same seed gives identical weights.
    **kwargs
        Other :class:`EEGInception` parameters (``sfreq``, ``n_filters``, ...).
    """
    _check_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EEGInception(ch_names, n_times, n_outputs, **kwargs)


__all__ = ["EEGInception", "build_eeg_inception"]
