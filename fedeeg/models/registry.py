"""The backbone registry: every model a run can use, by name, built one way.

``load_backbone(name, ...)`` returns a module called as ``model(x, ch_names)``
(x of shape ``(batch, n_chans, n_times)`` in 0.1 mV at 200 Hz) with
``forward_features``, a Linear ``head`` and the attributes ``backbone_name``,
``checkpoint_sha256`` and ``supports_lora``:

- ``labram-small`` / ``-base`` / ``-large`` / ``-huge``: LaBraM
  (:func:`fedeeg.models.build_backbone`), any channels of its vocabulary and
  up to 16 one-second patches; LoRA-capable.
- ``eegnet``, ``eeg-inception``: small baselines written here
  (:class:`fedeeg.models.EEGNet`, :class:`fedeeg.models.EEGInception`), built
  for one channel list and window length; they train in full.
- ``cbramod``: braindecode's CBraMod, when braindecode is installed
  (``pip install 'fedeeg[braindecode]'``); trains in full.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._validation import check_option, check_range
from .labram import (_WRAPPER_KEYS, BACKBONES, LaBraM, _checkpoint_file, _listing, _read_file, build_backbone,
                     load_checkpoint, state_dict_problems)

logger = logging.getLogger(__name__)

#: The sampling frequency LaBraM's one-second patches assume.
LABRAM_SFREQ = 200.0
#: Parameters that a baseline checkpoint may lack (new for the task, they keep their seeded init).
_NEW_PREFIXES = ("head.",)


@dataclass(frozen=True)
class BackboneEntry:
    """What the registry knows about one backbone.

    Parameters
    ----------
    name : str
        Registry name.
    family : str
        ``'labram'``, ``'eegnet'``, ``'eeg-inception'`` or ``'braindecode'``.
    supports_lora : bool
        Whether LoRA adapters apply (strategies ``ffa``/``fedit``); the others
        train in full (``strategy='full'``).
    fixed_input : bool
        Whether the model is built for one channel list and window length
        (``ch_names`` and ``n_times`` are then required).
    requires : str | None
        Optional package the backbone needs.
    description : str
        One line for listings.
    """

    name: str
    family: str
    supports_lora: bool
    fixed_input: bool
    requires: str | None
    description: str


BACKBONE_REGISTRY: dict[str, BackboneEntry] = {
    **{
        name: BackboneEntry(name, "labram", True, False, None,
                            f"LaBraM ({cfg.embed_dim}-d, {cfg.depth} blocks)" + (" - tiny, not published" if name == "labram-small" else ""))
        for name, cfg in BACKBONES.items()
    },
    "eegnet": BackboneEntry("eegnet", "eegnet", False, True, None, "EEGNet-8,2 (Lawhern et al., 2018)"),
    "eeg-inception": BackboneEntry("eeg-inception", "eeg-inception", False, True, None,
                                   "EEG-Inception (Santamaria-Vazquez et al., 2020)"),
    "cbramod": BackboneEntry("cbramod", "braindecode", False, True, "braindecode",
                             "CBraMod via braindecode (Wang et al., 2025); pip install 'fedeeg[braindecode]'"),
}  # fmt: skip


def _check_labram_input(model: LaBraM, ch_names: Sequence[str] | None, n_times: int | None, sfreq: float) -> None:
    if float(sfreq) != LABRAM_SFREQ:
        raise ValueError(f"LaBraM takes EEG at {LABRAM_SFREQ:g} Hz (one-second patches of 200 samples), got sfreq={sfreq}; resample to 200 Hz.")
    if ch_names is not None:
        model.channel_index(ch_names)  # raises naming a channel outside the vocabulary
    if n_times is not None:
        check_range("n_times", n_times, low=1, kind=int)
        cfg = model.backbone_config
        if n_times % cfg.patch_size or n_times // cfg.patch_size > cfg.n_time:
            raise ValueError(
                f"LaBraM takes windows of whole one-second patches ({cfg.patch_size} samples), at most {cfg.n_time}: "
                f"n_times must be a multiple of {cfg.patch_size} up to {cfg.n_time * cfg.patch_size}, got {n_times}."
            )


def _build_fixed(entry: BackboneEntry, ch_names: Sequence[str], n_times: int, n_outputs: int, seed: int, sfreq: float) -> nn.Module:
    if entry.family == "eegnet":
        from .eegnet import build_eegnet

        return build_eegnet(ch_names, n_times, n_outputs=n_outputs, seed=seed, sfreq=sfreq)
    if entry.family == "eeg-inception":
        from .eeg_inception import build_eeg_inception

        return build_eeg_inception(ch_names, n_times, n_outputs=n_outputs, seed=seed, sfreq=sfreq)
    if entry.family == "braindecode":
        from .braindecode_models import build_cbramod

        return build_cbramod(ch_names, n_times, n_outputs=n_outputs, seed=seed, sfreq=sfreq)
    raise AssertionError(f"no builder for family {entry.family!r}")  # pragma: no cover


def load_backbone(
    name: str,
    *,
    checkpoint: str | Path | None = None,
    n_outputs: int = 2,
    seed: int = 0,
    ch_names: Sequence[str] | None = None,
    n_times: int | None = None,
    strict: bool = True,
    sfreq: float = 200.0,
) -> nn.Module:
    """Build a registered backbone, deterministically initialised from ``seed``.

    Parameters
    ----------
    name : str
        A key of :data:`BACKBONE_REGISTRY`.
    checkpoint : str | Path | None
        Weights to load: for LaBraM see :func:`fedeeg.models.load_checkpoint`;
        for the others a plain state dict (``.pt``/``.pth``, read with
        ``weights_only=True``) or a ``.safetensors`` file (see :func:`load_weights`).
    n_outputs : int
        Outputs of the classification head.
    seed : int
        Seed of the initialisation (the global torch RNG is left untouched).
    ch_names : sequence of str | None
        The input's channels, in order. Required for fixed-input backbones
        (``eegnet``, ``eeg-inception``, ``cbramod``); for LaBraM only checked
        against its vocabulary.
    n_times : int | None
        Samples per window. Required for fixed-input backbones; for LaBraM
        only checked (whole one-second patches, at most 16).
    strict : bool
        Checkpoint loading: any missing, unexpected or mis-shaped key is an
        error (True) or a warning (False).
    sfreq : float
        Sampling frequency in Hz (LaBraM: 200 only; the baselines scale their
        temporal kernels with it).

    Returns
    -------
    model : nn.Module
        With ``backbone_name``, ``checkpoint_sha256`` (None without a
        checkpoint) and ``supports_lora`` set.

    Raises
    ------
    ValueError
        Unknown name (the allowed names are listed), missing ``ch_names`` /
        ``n_times`` for a fixed-input backbone, or a checkpoint that does not fit.
    ImportError
        ``cbramod`` without braindecode (with the install command).
    """
    check_option("name", name, BACKBONE_REGISTRY)
    check_range("seed", seed, low=0, kind=int)
    check_range("n_outputs", n_outputs, low=1, kind=int)
    check_range("sfreq", sfreq, low=1, kind=(int, float))
    entry = BACKBONE_REGISTRY[name]
    if entry.family == "labram":
        model = build_backbone(name, n_outputs=n_outputs, seed=seed, checkpoint=checkpoint, strict=strict)
        _check_labram_input(model, ch_names, n_times, sfreq)
    else:
        if ch_names is None or n_times is None:
            lacking = " and ".join(p for p, v in (("ch_names", ch_names), ("n_times", n_times)) if v is None)
            raise ValueError(
                f"The backbone {name!r} is built for one channel list and window length: pass {lacking} "
                f"(e.g. load_backbone({name!r}, ch_names=['FP1', 'FP2', ...], n_times=800) for 4-s windows at 200 Hz)."
            )
        model = _build_fixed(entry, ch_names, n_times, n_outputs, seed, float(sfreq))
        model.checkpoint_sha256 = None
        if checkpoint is not None:
            load_weights(model, checkpoint, strict=strict)
    model.backbone_name = name
    model.supports_lora = entry.supports_lora
    return model


def _normalise(obj: Mapping, model: nn.Module, path: Path) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Wrapped / DDP / plain layouts → (state dict, non-tensor keys, dropped keys)."""
    for wrapper in _WRAPPER_KEYS:
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            logger.debug("Checkpoint %s: using its %r entry.", path, wrapper)
            obj = inner
            break
    keys = [str(k) for k in obj]
    if keys and all(k.startswith("module.") for k in keys):  # DistributedDataParallel
        obj = {str(k)[len("module.") :]: v for k, v in obj.items()}
    prefix = getattr(model, "checkpoint_prefix", "")
    if prefix and not any(str(k).startswith(prefix) for k in obj):
        obj = {(k if str(k).startswith("head.") else prefix + str(k)): v for k, v in obj.items()}
    ignored = tuple(getattr(model, "checkpoint_ignored", ()))
    state: dict[str, torch.Tensor] = {}
    not_tensors: list[str] = []
    dropped: list[str] = []
    for k, v in obj.items():
        k = str(k)
        if ignored and k.startswith(ignored):
            dropped.append(k)
        elif isinstance(v, torch.Tensor):
            state[k] = v
        else:
            not_tensors.append(k)
    return state, not_tensors, dropped


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> str:
    """Load a state dict file into a registry backbone and return the file's SHA-256.

    For LaBraM this is :func:`fedeeg.models.load_checkpoint`. For the other
    backbones the file is a plain state dict (``.pt``/``.pth``, possibly under
    ``'model'``/``'module'``/``'state_dict'`` or with DDP's ``module.``
    prefixes, read with ``weights_only=True``) or a ``.safetensors`` file.
    ``head.*`` may be missing (it keeps its seeded initialisation).

    Parameters
    ----------
    model : nn.Module
        The backbone, before any adapter.
    path : str | Path
        The file.
    strict : bool
        If True (default), any other missing key, unexpected key or shape
        mismatch is a ValueError that names them and nothing is loaded. If
        False, the matching tensors load and a warning lists the rest.

    Returns
    -------
    sha256 : str
        Hex digest of the file; also stored as ``model.checkpoint_sha256``.
    """
    if isinstance(model, LaBraM):
        return load_checkpoint(model, path, strict=strict)
    if hasattr(model, "peft_config"):
        raise ValueError("load_weights expects the plain backbone, but this model has peft adapters.")
    path, sha = _checkpoint_file(path)
    state, not_tensors, dropped = _normalise(_read_file(path), model, path)
    if dropped:
        logger.info("Checkpoint %s: dropped %d tensors (%s).", path.name, len(dropped), _listing(dropped))
    own = model.state_dict()
    kind = getattr(model, "backbone_name", None) or type(model).__name__
    problems, mismatched = state_dict_problems(own, state, not_tensors, new_prefixes=_NEW_PREFIXES)
    if problems:
        summary = f"The checkpoint {str(path)!r} does not match the {kind} model: " + "; ".join(problems) + "."
        if mismatched and hasattr(model, "ch_names"):
            summary += (f" The model was built for {model.n_chans} channels and n_times={model.n_times}: a checkpoint "
                        f"trained on another montage or window length does not fit.")
        if strict:
            raise ValueError(summary + " Pass strict=False to load the matching tensors anyway.")
        logger.warning("%s Loading the matching tensors (strict=False).", summary)
    loadable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    model.load_state_dict(loadable, strict=False)
    model.checkpoint_sha256 = sha
    logger.info("Loaded %d tensors from %s (sha256 %s).", len(loadable), path, sha[:12])
    return sha


def describe_backbones() -> list[dict]:
    """One dict per registered backbone (name, family, supports_lora, fixed_input, requires, description)."""
    return [
        {"name": e.name, "family": e.family, "supports_lora": e.supports_lora, "fixed_input": e.fixed_input,
         "requires": e.requires, "description": e.description}
        for e in BACKBONE_REGISTRY.values()
    ]  # fmt: skip


__all__ = ["BACKBONE_REGISTRY", "BackboneEntry", "LABRAM_SFREQ", "describe_backbones", "load_backbone", "load_weights"]
