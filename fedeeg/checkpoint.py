"""Self-describing model folders: PEFT adapter (or full weights) plus a FedEEG manifest.

A folder written by :func:`save_model_dir` holds

- ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT format) for
  LoRA strategies, or ``model.safetensors`` (all weights) for ``full``;
- ``backbone.safetensors``: the frozen backbone weights, when the run used no
  published checkpoint (the folder is then self-contained); with a checkpoint,
  the manifest records its sha256 and the user passes the file to evaluate;
- ``fedeeg_manifest.json``: backbone name, checkpoint sha256, channels, sfreq,
  window, label names, preprocessing, LoRA setting, strategy, round, FedEEG
  version, and the sha256 of every file above.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path


from torch import nn

from . import __version__

logger = logging.getLogger(__name__)

MANIFEST = "fedeeg_manifest.json"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def save_model_dir(model: nn.Module, path: str | os.PathLike, *, manifest: dict) -> Path:
    """Write the model folder atomically (write to a temporary folder, then rename).

    Parameters
    ----------
    model : nn.Module
        A peft model (LoRA strategies) or a plain backbone (``full``).
    path : path-like
        The folder to write; replaced if it exists.
    manifest : dict
        Run facts to record (backbone, channels, sfreq, window_seconds,
        label_names, preprocessing, lora, strategy, round, checkpoint_sha256, ...).
        ``fedeeg_version``, ``created`` and ``files`` are added.

    Returns
    -------
    path : Path
    """
    from safetensors.torch import save_file

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
        The backbone checkpoint file, needed when the manifest records a
        ``checkpoint_sha256`` (its hash must match).

    Returns
    -------
    model : nn.Module
        In eval mode, on CPU.
    manifest : dict
    """
    from safetensors.torch import load_file

    from .models import LoraSpec, apply_lora, build_backbone

    path = Path(path)
    manifest = read_manifest(path)
    n_outputs = len(manifest["label_names"])
    want_sha = manifest.get("checkpoint_sha256")
    if want_sha:
        if not checkpoint:
            raise ValueError(f"{path} was trained on a backbone checkpoint (sha256 {want_sha[:12]}…); pass it with --checkpoint.")
        got = sha256_file(checkpoint)
        if got != want_sha:
            raise ValueError(f"--checkpoint {checkpoint} has sha256 {got[:12]}…, but the adapter was trained on {want_sha[:12]}….")
        backbone = build_backbone(manifest["backbone"], n_outputs=n_outputs, seed=0, checkpoint=checkpoint)
    else:
        backbone = build_backbone(manifest["backbone"], n_outputs=n_outputs, seed=0)
    if manifest["kind"] == "full":
        state = load_file(str(path / "model.safetensors"))
        backbone.load_state_dict(state, strict=True)
        model = backbone
    else:
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
