"""Self-describing model folders: PEFT adapter (or full weights) plus a FedEEG manifest.

A folder written by :func:`save_model_dir` holds

- ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT format) for
  LoRA strategies, or ``model.safetensors`` (all weights and buffers, e.g.
  BatchNorm statistics) for ``full`` (LaBraM or a baseline of the backbone
  registry);
- ``backbone.safetensors``: the frozen backbone weights, when the run used no
  published checkpoint (the folder is then self-contained); with a checkpoint,
  the manifest records its sha256 and the user passes the file to evaluate;
- ``fedeeg_manifest.json``: backbone name, checkpoint sha256, channels, sfreq,
  window, label names, preprocessing, LoRA setting, strategy, round, FedEEG
  version, and the sha256 of every file above.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path


from torch import nn

from . import __version__
from ._hashing import sha256_file

logger = logging.getLogger(__name__)

MANIFEST = "fedeeg_manifest.json"


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def base_state_dict(model: nn.Module) -> dict:
    """The frozen backbone weights of a peft model, under the backbone's own names.

    LoRA tensors and the trained head copies (``modules_to_save``) are left out;
    ``x.base_layer.weight`` becomes ``x.weight`` and ``head.original_module.*``
    becomes ``head.*``.
    """
    out = {}
    for key, value in model.get_base_model().state_dict().items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        key = key.replace(".base_layer.", ".").replace(".original_module.", ".")
        out[key] = value.detach().cpu().contiguous()
    return out


def _fixed_input_manifest(model: nn.Module, manifest: dict) -> dict:
    """Record a fixed-input backbone's channels and window in the manifest (they must agree with it)."""
    spec = model.input_spec()
    given_chs = manifest.get("channels")
    if given_chs and [str(c).upper() for c in given_chs] != [c.upper() for c in spec["ch_names"]]:
        raise ValueError(
            f"manifest['channels'] {list(given_chs)} differ from the channels the {type(model).__name__} was built "
            f"for {spec['ch_names']}: the folder would not load; record the model's own channels."
        )
    given_n = manifest.get("n_times")
    if given_n is not None and int(given_n) != spec["n_times"]:
        raise ValueError(f"manifest['n_times'] is {given_n} but the {type(model).__name__} was built for n_times={spec['n_times']}.")
    given_sfreq = manifest.get("sfreq")
    if given_sfreq is not None and float(given_sfreq) != spec["sfreq"]:
        raise ValueError(f"manifest['sfreq'] is {given_sfreq} but the {type(model).__name__} was built for sfreq={spec['sfreq']}.")
    return {**manifest, "channels": spec["ch_names"], "n_times": spec["n_times"], "sfreq": spec["sfreq"]}


def _batchnorm_stats(model: nn.Module) -> str | None:
    """``'trained'``, ``'initial'`` (never updated) or None (no BatchNorm with running statistics)."""
    counts = [int(m.num_batches_tracked) for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.num_batches_tracked is not None]
    if not counts:
        return None
    return "initial" if all(c == 0 for c in counts) else "trained"


def save_model_dir(model: nn.Module, path: str | os.PathLike, *, manifest: dict) -> Path:
    """Write the model folder atomically (write to a temporary folder, then rename).

    Parameters
    ----------
    model : nn.Module
        A peft model (LoRA strategies) or a plain backbone (``full``), e.g.
        from :func:`fedeeg.models.load_backbone`.
    path : path-like
        The folder to write; replaced if it exists.
    manifest : dict
        Run facts to record (backbone, channels, sfreq, window_seconds,
        n_times, label_names, preprocessing, lora, strategy, round,
        checkpoint_sha256, ...). ``fedeeg_version``, ``created``, ``kind`` and
        ``files`` are added; ``backbone`` defaults to the model's
        ``backbone_name``. For a fixed-input baseline (EEGNet, ...) its own
        ``channels``, ``n_times`` and ``sfreq`` are recorded (a manifest that
        contradicts them is a ValueError), and for a model with BatchNorm
        ``batchnorm_stats`` says whether its running statistics were ever
        updated (``'trained'``/``'initial'``; saving ``'initial'`` ones logs a
        warning).

    Returns
    -------
    path : Path
    """
    from safetensors.torch import save_file

    base = model.get_base_model() if _is_peft(model) else model
    name = getattr(base, "backbone_name", None)
    if manifest.get("backbone") is None and name:
        manifest = {**manifest, "backbone": name}
    elif name and manifest.get("backbone") != name:
        raise ValueError(f"manifest['backbone'] is {manifest.get('backbone')!r} but the model is {name!r}.")
    if hasattr(base, "input_spec"):  # a fixed-input baseline: its channels and window are part of the model
        manifest = _fixed_input_manifest(base, manifest)
    bn_stats = _batchnorm_stats(base)
    if bn_stats is not None:
        manifest = {**manifest, "batchnorm_stats": bn_stats}
        if bn_stats == "initial":
            logger.warning(
                "Saving %s with BatchNorm running statistics that were never updated (mean 0, variance 1): in eval "
                "mode its predictions differ from those of the trained sites. This happens to a federated model, "
                "since only parameters travel, not BatchNorm buffers.", name or type(base).__name__,
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if _is_peft(model):
            model.save_pretrained(str(tmp))
            kind = "lora"
        else:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
            kind = "full"
        if kind == "lora" and not manifest.get("checkpoint_sha256"):
            # The frozen backbone travels with the adapter, so the folder is self-contained.
            save_file(base_state_dict(model), str(tmp / "backbone.safetensors"))
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        full_manifest = {
            **manifest,
            "kind": kind,
            "fedeeg_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(full_manifest, indent=2, sort_keys=True, default=str))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and verify a model folder's manifest (every file's sha256).

    Raises
    ------
    FileNotFoundError
        If the folder or its manifest is missing.
    ValueError
        If a file listed in the manifest is missing or its hash differs
        (a tampered or truncated folder).
    """
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(
            f"{path} is not a FedEEG model folder: {MANIFEST} is missing. Pass the 'adapter/' folder written by "
            "`fedeeg simulate` (or a federation's output)."
        )
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{mpath} is not valid JSON ({exc}); the folder is damaged.") from exc
    for name, digest in manifest.get("files", {}).items():
        fpath = path / name
        if not fpath.is_file():
            raise ValueError(f"{fpath} is listed in {MANIFEST} but missing; copy the whole folder again.")
        got = sha256_file(fpath)
        if got != digest:
            raise ValueError(f"{fpath} does not match its sha256 in {MANIFEST} (expected {digest[:12]}…, got {got[:12]}…): "
                             "the file was changed or damaged after it was written.")
    return manifest


def load_model_dir(path: str | os.PathLike, *, checkpoint: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model saved by :func:`save_model_dir`.

    Parameters
    ----------
    path : path-like
        The model folder.
    checkpoint : str | None
        The backbone checkpoint file, needed for a LoRA folder whose manifest
        records a ``checkpoint_sha256`` (its hash must match). A ``full``
        folder holds every weight and does not need it (if given, its hash is
        still checked).

    Returns
    -------
    model : nn.Module
        In eval mode, on CPU.
    manifest : dict
    """
    from safetensors.torch import load_file

    from .models import BACKBONE_REGISTRY, LoraSpec, apply_lora, load_backbone

    path = Path(path)
    manifest = read_manifest(path)
    n_outputs = len(manifest["label_names"])
    name = manifest.get("backbone")
    if name not in BACKBONE_REGISTRY:
        raise ValueError(
            f"{path / MANIFEST} names the backbone {name!r}, which this FedEEG version does not know "
            f"(known: {', '.join(BACKBONE_REGISTRY)}); use the FedEEG version that wrote it ({manifest.get('fedeeg_version')})."
        )
    entry = BACKBONE_REGISTRY[name]
    kind = manifest["kind"]
    if kind != "full" and not entry.supports_lora:
        raise ValueError(f"{path} holds a {kind!r} adapter for {name!r}, which has no LoRA; the folder is inconsistent.")
    shape: dict = {}
    if entry.fixed_input:
        missing = [k for k in ("channels", "sfreq") if not manifest.get(k)]
        if missing:
            raise ValueError(f"{path / MANIFEST} lacks {missing}, which the {name!r} backbone is built from.")
        n_times = manifest.get("n_times") or int(round(float(manifest["window_seconds"]) * float(manifest["sfreq"])))
        shape = {"ch_names": list(manifest["channels"]), "n_times": int(n_times), "sfreq": float(manifest["sfreq"])}
    want_sha = manifest.get("checkpoint_sha256")
    if want_sha and checkpoint:
        got = sha256_file(checkpoint)
        if got != want_sha:
            raise ValueError(f"--checkpoint {checkpoint} has sha256 {got[:12]}…, but the adapter was trained on {want_sha[:12]}….")
    if kind == "full":
        # model.safetensors holds every weight: the backbone checkpoint is not needed.
        backbone = load_backbone(name, n_outputs=n_outputs, seed=0, **shape)
        state = load_file(str(path / "model.safetensors"))
        own = backbone.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [f"{k} ({list(state[k].shape)} vs {list(own[k].shape)})" for k in state
                 if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            raise ValueError(f"{path / 'model.safetensors'} does not fit the {name!r} model described by the manifest: "
                             f"missing {missing[:10]}, unexpected {unexpected[:10]}, shape mismatches {wrong[:10]}.")
        backbone.load_state_dict(state, strict=True)
        backbone.checkpoint_sha256 = want_sha or None
        model = backbone
    else:
        if want_sha:
            if not checkpoint:
                raise ValueError(f"{path} was trained on a backbone checkpoint (sha256 {want_sha[:12]}…); pass it with --checkpoint.")
            backbone = load_backbone(name, n_outputs=n_outputs, seed=0, checkpoint=checkpoint)
        else:
            backbone = load_backbone(name, n_outputs=n_outputs, seed=0)
        if not want_sha:
            state = load_file(str(path / "backbone.safetensors"))
            missing, unexpected = backbone.load_state_dict(state, strict=False)
            bad = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
            if bad or unexpected:
                raise ValueError(f"backbone.safetensors does not fit {manifest['backbone']}: missing {bad}, unexpected {unexpected}.")
        spec = LoraSpec(**manifest["lora"])
        model = apply_lora(backbone, spec)
        from peft import set_peft_model_state_dict

        adapter = load_file(str(path / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, adapter)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"adapter_model.safetensors has tensors the model lacks: {unexpected[:5]}.")
    model.eval()
    return model, manifest


__all__ = ["MANIFEST", "sha256_file", "base_state_dict", "save_model_dir", "read_manifest", "load_model_dir"]
