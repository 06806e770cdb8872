"""Optional backbones from braindecode (``pip install 'fedeeg[braindecode]'``).

braindecode is not a core dependency: its 1.x releases require torchaudio, and
the only torchaudio on the registry beside a CPU torch is a CUDA build whose
extension fails to load (it then breaks ``import peft`` too, as transformers
imports torchaudio when present). Everything here imports braindecode lazily
and turns its absence into one clear ImportError.

``cbramod`` wraps braindecode's ``CBraMod`` (Wang et al., ICLR 2025) in
FedEEG's calling convention. It trains in full: peft LoRA does not reach the
``nn.MultiheadAttention`` projections it is built from.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from torch import nn

from .._validation import check_range
from .eegnet import FixedInputBackbone, _check_seed

#: Raised (as ImportError) when braindecode is needed but cannot be imported.
INSTALL_HINT = (
    "This backbone needs braindecode, which is not installed (or cannot be imported). Install the optional extra "
    "with `pip install 'fedeeg[braindecode]'`. braindecode requires torchaudio, which must match your torch build: "
    "next to a CPU-only torch the registry's torchaudio (a CUDA build) fails to load and then also breaks "
    "`import peft`; use a GPU machine or a torch/torchaudio pair built together."
)


def braindecode_available() -> bool:
    """Whether braindecode is installed (found on the path; not imported)."""
    return importlib.util.find_spec("braindecode") is not None


def _import_cbramod():
    try:
        from braindecode.models import CBraMod
    except Exception as err:  # ImportError, or an OSError from a mismatched torchaudio extension
        raise ImportError(f"{INSTALL_HINT} (import error: {type(err).__name__}: {err})") from err
    return CBraMod


class BraindecodeCBraMod(FixedInputBackbone):
    """braindecode's ``CBraMod`` encoder with a FedEEG head.

    The encoder (``net``, built with ``return_encoder_output=True``) maps
    ``(batch, n_chans, n_times)`` to ``(batch, n_chans, n_patches, emb_dim)``;
    the features are that tensor flattened, and ``head`` is the Linear that
    braindecode's own ``final_layer`` would be.

    Parameters
    ----------
    ch_names : sequence of str
        The channels, in order.
    n_times : int
        Samples per window: a multiple of 200 (one-second patches at 200 Hz).
    n_outputs : int
        Classes.
    sfreq : float
        Sampling frequency in Hz (CBraMod was pretrained at 200 Hz).
    **kwargs
        Passed to ``braindecode.models.CBraMod`` (e.g. ``n_layer``).

    Raises
    ------
    ImportError
        If braindecode cannot be imported (with the install command).

    Notes
    -----
    A checkpoint of braindecode's ``CBraMod`` (keys without the ``net.``
    prefix) loads into ``net``; its ``final_layer.*`` (braindecode's head) is
    dropped, as ``head`` replaces it.
    """

    #: Checkpoint keys without this prefix are read as the encoder's (see :func:`fedeeg.models.load_weights`).
    checkpoint_prefix = "net."
    #: Checkpoint keys dropped on loading: braindecode's own classification head.
    checkpoint_ignored = ("net.final_layer.",)

    def __init__(self, ch_names: Sequence[str], n_times: int, n_outputs: int = 2, *, sfreq: float = 200.0, **kwargs) -> None:
        super().__init__(ch_names, n_times, n_outputs, sfreq)
        patch = int(kwargs.get("patch_size", 200))
        check_range("patch_size", patch, low=1, kind=int)
        if self.n_times % patch:
            raise ValueError(f"CBraMod needs n_times a multiple of its patch_size ({patch}), got n_times={self.n_times}.")
        CBraMod = _import_cbramod()
        self.net = CBraMod(
            n_outputs=self.n_outputs, n_chans=self.n_chans, n_times=self.n_times, sfreq=self.sfreq,
            return_encoder_output=True, **kwargs,
        )
        with torch.no_grad():
            probe = self.net(torch.zeros(1, self.n_chans, self.n_times))  # (1, n_chans, n_patches, emb_dim)
        self.head = nn.Linear(probe[0].numel(), self.n_outputs)

    def forward_features(self, x: torch.Tensor, ch_names: Sequence[str]) -> torch.Tensor:
        """Flattened encoder output, shape ``(batch, n_chans * n_patches * emb_dim)``."""
        self.check_input(x, ch_names)
        if x.dtype != self.head.weight.dtype:
            x = x.to(self.head.weight.dtype)
        x = self.net(x)  # (batch, n_chans, n_patches, emb_dim)
        return x.flatten(1)  # (batch, n_chans * n_patches * emb_dim)


def build_cbramod(ch_names: Sequence[str], n_times: int, *, n_outputs: int = 2, seed: int = 0, **kwargs) -> BraindecodeCBraMod:
    """A :class:`BraindecodeCBraMod` initialised from ``seed`` (global RNG untouched).

    Raises
    ------
    ImportError
        If braindecode cannot be imported.
    """
    _check_seed(seed)
    _import_cbramod()  # fail before building anything
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BraindecodeCBraMod(ch_names, n_times, n_outputs, **kwargs)


__all__ = ["INSTALL_HINT", "braindecode_available", "BraindecodeCBraMod", "build_cbramod"]
