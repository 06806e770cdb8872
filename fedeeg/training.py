"""Local training and evaluation of a backbone (with or without LoRA) on one site's windows.

Flower-free: the ClientApp, the centralized and the local-only baselines all call
these functions, so every mode trains the same way.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ._validation import check_option
from .data.base import WindowSet
from .metrics import compute_metrics

logger = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """Return the torch device for ``device`` in {"auto", "cpu", "cuda"}.

    ``"cuda"`` without a GPU is an error that says so, rather than torch's.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA GPU; use device='auto' or 'cpu'.")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"Invalid value for the 'device' parameter. Allowed values are 'auto', 'cpu', 'cuda', but got {device!r} instead.")
    return torch.device(device)


def _autocast(device: torch.device, amp: bool):
    """bf16 autocast on GPUs that support it; a no-op elsewhere."""
    if amp and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`train_epochs` did (aggregate numbers only)."""

    loss: float
    n_examples: int
    epochs: int
    seconds: float
    windows_per_second: float


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights, shape (n_classes,); absent classes get 0."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)


#: Windows kept on a GPU between calls: at most this fraction of the device's memory.
_DEVICE_CACHE_FRACTION = 0.25
#: The one cached entry: (key, weak reference to the host array, X on the device, y on the device).
_device_cache: list = []


def _windows_on_device(windows: WindowSet, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)`` of the windows on ``dev``; on a GPU, the copy is kept for the next call.

    A site trains on the same windows every round: on CUDA the last windows
    copied are kept on the device (if they take at most a quarter of its
    memory), so later rounds skip the host-to-device copy. The cached copy is
    used only for the very same host arrays, which are made read-only so that
    an in-place change cannot leave a stale copy behind (it raises instead).
    """
    if dev.type != "cuda":
        return torch.from_numpy(windows.X), torch.from_numpy(windows.y)
    X_host, y_host = windows.X, windows.y
    key = (id(X_host), X_host.shape, X_host.dtype.str, id(y_host), y_host.shape, str(dev))
    if _device_cache:
        ckey, ref, X_dev, y_dev = _device_cache[0]
        if ckey == key and ref() is X_host and not X_host.flags.writeable and not y_host.flags.writeable:
            return X_dev, y_dev
    _device_cache.clear()
    X_dev = torch.from_numpy(X_host).to(dev, non_blocking=True)
    y_dev = torch.from_numpy(y_host).to(dev, non_blocking=True)
    total = torch.cuda.get_device_properties(dev).total_memory
    if X_host.nbytes + y_host.nbytes <= _DEVICE_CACHE_FRACTION * total:
        try:
            ref = weakref.ref(X_host)
        except TypeError:  # a view of a non-owning buffer: do not cache
            return X_dev, y_dev
        X_host.flags.writeable = False
        y_host.flags.writeable = False
        _device_cache.append((key, ref, X_dev, y_dev))
    return X_dev, y_dev


def release_device_cache() -> None:
    """Drop the windows kept on the GPU by :func:`train_epochs`."""
    _device_cache.clear()


#: The modes ``train_epochs(compile=...)`` accepts besides True/False.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compiled(model: nn.Module, compile: bool | str) -> nn.Module:
    """``model`` itself, or wrapped by ``torch.compile`` in the given mode."""
    if compile is False or compile is None:
        return model
    if compile is True:
        return torch.compile(model)
    check_option("compile", compile, COMPILE_MODES)
    return torch.compile(model, mode=compile)


def train_epochs(
    model: nn.Module,
    windows: WindowSet,
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 0.01,
    batch_size: int = 32,
    device: str | torch.device = "auto",
    seed: int = 0,
    amp: bool = True,
    max_grad_norm: float = 1.0,
    compile: bool | str = False,
) -> TrainResult:
    """Train the model's trainable parameters with AdamW and a class-balanced loss.

    Parameters
    ----------
    model : nn.Module
        Called as ``model(x, ch_names)`` on x of shape (batch, n_chans, n_times),
        returning logits of shape (batch, n_outputs). Only parameters with
        ``requires_grad`` are optimised.
    windows : WindowSet
        Training windows, X of shape (n_windows, n_chans, n_times).
    epochs : int
        Passes over the windows.
    lr, weight_decay : float
        AdamW settings.
    batch_size : int
        Windows per step.
    device : str | torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or a device.
    seed : int
        Seeds the shuffling and dropout of this call.
    amp : bool
        Mixed precision (bf16) on CUDA.
    max_grad_norm : float
        Gradient clipping norm.
    compile : bool | str
        Run the forward pass through ``torch.compile`` (pays on GPUs for
        long runs; the first steps then include compilation). A string is
        the compile mode: ``'default'``, ``'reduce-overhead'`` (CUDA graphs),
        ``'max-autotune'`` or ``'max-autotune-no-cudagraphs'``.

    Returns
    -------
    result : TrainResult
    """
    if windows.n_windows == 0:
        raise ValueError("Cannot train on zero windows: the site has no training data after the subject split.")
    dev = resolve_device(device) if isinstance(device, str) else device
    n_classes = len(windows.label_names)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters: check the LoRA setting or the strategy.")
    model.to(dev).train()
    # The fused CUDA kernel updates all parameters in one launch.
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=dev.type == "cuda")
    forward = _compiled(model, compile)
    criterion = nn.CrossEntropyLoss(weight=class_weights(windows.y, n_classes).to(dev))
    # Data on the device ahead of the steps (kept there between calls on a GPU); no host syncs inside the loop.
    X, y = _windows_on_device(windows, dev)
    ch_names = list(windows.ch_names)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks
    total_loss = torch.zeros((), device=dev)
    n_steps = 0
    if dev.type == "cuda":  # windows/s counts the steps, not a first round's host-to-device copy
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(windows.n_windows, generator=gen).to(dev)
        for i in range(0, windows.n_windows, batch_size):
            idx = order[i : i + batch_size]
            xb, yb = X[idx], y[idx]  # (batch, n_chans, n_times), (batch,)
            with _autocast(dev, amp):
                logits = forward(xb, ch_names)  # (batch, n_outputs)
                loss = criterion(logits.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            total_loss += loss.detach()
            n_steps += 1
    mean_loss = float(total_loss.item() / max(n_steps, 1))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    n_seen = windows.n_windows * epochs
    if not np.isfinite(mean_loss):
        raise FloatingPointError(f"Training diverged (loss={mean_loss}); lower the learning rate (lr={lr}).")
    wps = n_seen / seconds if seconds > 0 else float("inf")
    logger.debug("trained %d epochs on %d windows: loss %.4f, %.1f windows/s", epochs, windows.n_windows, mean_loss, wps)
    return TrainResult(mean_loss, windows.n_windows, epochs, seconds, wps)


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    windows: WindowSet,
    *,
    batch_size: int = 128,
    device: str | torch.device = "auto",
    amp: bool = True,
) -> np.ndarray:
    """Class probabilities, shape (n_windows, n_outputs)."""
    dev = resolve_device(device) if isinstance(device, str) else device
    model.to(dev).eval()
    ch_names = list(windows.ch_names)
    out = []
    for i in range(0, windows.n_windows, batch_size):
        batch = windows.X[i : i + batch_size]
        if not batch.flags.writeable:  # read-only windows (kept on a device, or from a window pack): torch warns
            batch = batch.copy()
        xb = torch.from_numpy(batch).to(dev)  # (batch, n_chans, n_times)
        with _autocast(dev, amp):
            logits = model(xb, ch_names)  # (batch, n_outputs)
        out.append(torch.softmax(logits.float(), dim=-1).cpu())
    if not out:
        return np.zeros((0, len(windows.label_names)), dtype=np.float32)
    return torch.cat(out).numpy()


def evaluate(model: nn.Module, windows: WindowSet, *, device: str | torch.device = "auto", batch_size: int = 128) -> dict:
    """Metrics of the model on windows (see :func:`fedeeg.metrics.compute_metrics`)."""
    if windows.n_windows == 0:
        raise ValueError("Cannot evaluate on zero windows.")
    proba = predict_proba(model, windows, device=device, batch_size=batch_size)
    return compute_metrics(windows.y, proba)


__all__ = ["resolve_device", "TrainResult", "class_weights", "train_epochs", "predict_proba", "evaluate"]
