"""LoRA adapters on a LaBraM backbone (through peft), and the trainable-tensor helpers.

The federation exchanges only the tensors that train: :func:`trainable_state_dict`
and :func:`load_trainable_state_dict` move exactly those, by name. peft is
imported lazily (it costs about 10 s), only inside :func:`apply_lora`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._validation import check_option, check_range
from . import _fused_lora

logger = logging.getLogger(__name__)

#: Names of the LoRA presets.
LORA_PRESETS = ("paper", "attention", "all-linear", "qkv", "mlp", "convs", "qkv+convs", "mlp+convs", "custom")

#: Regular expressions (peft ``re.fullmatch`` on module names) of the presets' Linear targets.
_LINEAR_TARGETS = {
    "paper": r"blocks\.\d+\.(?:attn\.qkv|mlp\.fc1|mlp\.fc2)",
    "attention": r"blocks\.\d+\.attn\.(?:qkv|proj)",
    "all-linear": r"blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))",
    # the target subsets of the seed study: the paper preset's parts alone or paired with the convolutions
    "qkv": r"blocks\.\d+\.attn\.qkv",
    "mlp": r"blocks\.\d+\.mlp\.(?:fc1|fc2)",
    "convs": None,
    "qkv+convs": r"blocks\.\d+\.attn\.qkv",
    "mlp+convs": r"blocks\.\d+\.mlp\.(?:fc1|fc2)",
}
#: Presets whose convolution adapters are always on (at ``conv_rank``), and the paper preset's optional ones.
_WITH_CONVS = ("convs", "qkv+convs", "mlp+convs")
#: The temporal convolutions (paper preset, at ``conv_rank``).
_CONV_TARGETS = r"patch_embed\.conv[123]"
#: Trained in full next to the adapters, never adapted.
MODULES_TO_SAVE = ("fc_norm", "head")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSpec:
    """Where and how LoRA adapts the backbone.

    Parameters
    ----------
    preset : str
        ``'paper'`` (Lee et al., ICML 2025): the blocks' ``attn.qkv``,
        ``mlp.fc1`` and ``mlp.fc2`` at ``rank``, plus ``patch_embed.conv1/2/3``
        at ``conv_rank``; ``attn.proj`` stays frozen. ``'attention'``: ``attn.qkv``
        and ``attn.proj``. ``'all-linear'``: ``qkv``, ``proj``, ``fc1``, ``fc2``.
        The seed study's target subsets: ``'qkv'`` (``attn.qkv``), ``'mlp'``
        (``mlp.fc1``/``fc2``), ``'convs'`` (``patch_embed.conv1/2/3`` at
        ``conv_rank``), ``'qkv+convs'`` and ``'mlp+convs'``; ``'paper'`` is
        qkv + MLP + convs, and with ``conv_rank=0`` qkv + MLP.
        ``'custom'``: the modules in ``target_modules``.
    rank : int
        LoRA rank of the Linear layers (and of every custom target).
    alpha : float
        LoRA alpha; the update is scaled by ``alpha / r``. The same alpha
        applies to the convolutions: at the paper setting (r=2, conv r=4,
        alpha=8) the Linear adapters are scaled by 4 and the conv adapters by
        2, which is what a single ``lora_alpha`` with peft's ``rank_pattern``
        gives, i.e. the paper's "α = 8" taken literally.
    dropout : float
        Dropout on the adapters' input, in [0, 1).
    conv_rank : int | None
        Rank of the temporal-convolution adapters in the ``'paper'`` preset
        (None or 0: none) and in the ``*convs`` presets (required there).
        Ignored by the other presets.
    target_modules : tuple of str | None
        Required iff ``preset == 'custom'``: module names or name suffixes
        (peft semantics: ``'qkv'`` matches every ``blocks.N.attn.qkv``), of
        Linear or Conv2d modules; ``head`` and ``fc_norm`` are not allowed
        (they are trained in full).
    """

    preset: str = "paper"
    rank: int = 2
    alpha: float = 8.0
    dropout: float = 0.5
    conv_rank: int | None = 4
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_option("preset", self.preset, LORA_PRESETS)
        check_range("rank", self.rank, low=1, kind=int)
        check_range("alpha", self.alpha, kind=(int, float))
        if not self.alpha > 0:
            raise ValueError(f"'alpha' must be > 0, got {self.alpha!r} instead.")
        check_range("dropout", self.dropout, low=0, kind=(int, float))
        if self.dropout >= 1:
            raise ValueError(f"'dropout' must be < 1, got {self.dropout!r} instead.")
        if self.conv_rank is not None:
            check_range("conv_rank", self.conv_rank, low=0, kind=int)
            if self.conv_rank == 0:
                object.__setattr__(self, "conv_rank", None)
        if self.preset in _WITH_CONVS and self.conv_rank is None:
            raise ValueError(f"preset={self.preset!r} adapts the temporal convolutions at 'conv_rank', which is 0/None; "
                             "give conv_rank >= 1 (e.g. 4, the paper's) or choose a preset without convs.")
        if self.preset == "custom":
            if self.target_modules is None or isinstance(self.target_modules, str) or len(self.target_modules) == 0:
                raise ValueError(
                    "preset='custom' needs 'target_modules': a non-empty tuple of module names, "
                    f"e.g. ('attn.qkv', 'mlp.fc2'); got {self.target_modules!r}."
                )
            targets = tuple(self.target_modules)
            bad = [t for t in targets if not isinstance(t, str) or not t.strip(".")]
            if bad:
                raise ValueError(f"'target_modules' must hold non-empty module names, got {bad!r}.")
            banned = [t for t in targets if t.split(".")[-1] in MODULES_TO_SAVE]
            if banned:
                raise ValueError(f"'target_modules' may not include {banned!r}: {', '.join(MODULES_TO_SAVE)} are trained in full.")
            object.__setattr__(self, "target_modules", targets)
        elif self.target_modules is not None:
            raise ValueError(f"'target_modules' is only used with preset='custom', got preset={self.preset!r} and target_modules={self.target_modules!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict of the spec."""
        return {
            "preset": self.preset,
            "rank": self.rank,
            "alpha": float(self.alpha),
            "dropout": float(self.dropout),
            "conv_rank": self.conv_rank,
            "target_modules": list(self.target_modules) if self.target_modules is not None else None,
        }

    def peft_targets(self) -> tuple[str | list[str], dict[str, int]]:
        """The peft ``target_modules`` (regex string or list of names) and ``rank_pattern``."""
        if self.preset == "custom":
            return list(self.target_modules), {}
        linear = _LINEAR_TARGETS[self.preset]
        if linear is None:  # convolutions only
            return _CONV_TARGETS, {_CONV_TARGETS: self.conv_rank}
        if self.preset in _WITH_CONVS or (self.preset == "paper" and self.conv_rank is not None):
            return f"(?:{linear})|(?:{_CONV_TARGETS})", {_CONV_TARGETS: self.conv_rank}
        return linear, {}


def _matches(spec_targets: str | list[str], name: str) -> bool:
    """peft's matching rule: regex fullmatch for a string, name or suffix match for a list."""
    if isinstance(spec_targets, str):
        return re.fullmatch(spec_targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec_targets)


def _resolve_targets(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Full names of the modules the spec adapts; raises on bad custom targets."""
    targets, _ = spec.peft_targets()
    names = [n for n, _ in model.named_modules() if n and _matches(targets, n)]
    if spec.preset == "custom":
        unmatched = [t for t in spec.target_modules if not any(_matches([t], n) for n in names)]
        if unmatched:
            raise ValueError(f"LoRA target_modules {unmatched!r} match no module of the backbone.")
    wrong = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in names if not isinstance(model.get_submodule(n), (nn.Linear, nn.Conv2d))]
    if wrong:
        raise ValueError(f"LoRA can only adapt Linear or Conv2d modules here, but the targets include {', '.join(wrong)}.")
    saved = [n for n in names if n.split(".")[0] in MODULES_TO_SAVE]
    if saved:
        raise ValueError(f"LoRA targets {saved!r} are trained in full and cannot also be adapted.")
    if not names:
        raise ValueError(f"The LoRA spec {spec.to_dict()} adapts no module of the backbone.")
    return names


def apply_lora(model: nn.Module, spec: LoraSpec, *, freeze_a: bool = False, seed: int = 0) -> nn.Module:
    """Wrap a backbone with peft LoRA adapters; ``fc_norm`` and ``head`` train in full.

    Parameters
    ----------
    model : LaBraM
        The backbone (see :func:`fedeeg.models.build_backbone`); modified in
        place by peft.
    spec : LoraSpec
        Targets, rank, alpha, dropout.
    freeze_a : bool
        If True (FFA-LoRA), every ``lora_A`` is frozen: only the ``lora_B``
        matrices, ``fc_norm`` and ``head`` train.
    seed : int
        Seeds the ``lora_A`` initialisation (peft's Kaiming-uniform), drawn
        inside :func:`torch.random.fork_rng` so the global RNG is untouched and
        every site building the same model gets the same A. ``lora_B`` starts
        at zero, so the wrapped model's output equals the backbone's.

    Returns
    -------
    model : peft.PeftModel
        Call it like the backbone: ``model(x, ch_names)`` with x of shape
        ``(batch, n_chans, n_times)`` → logits ``(batch, n_outputs)``
        (``PeftModel.forward`` passes its arguments on to the backbone).
        ``model.save_pretrained(dir)`` writes ``adapter_config.json`` and
        ``adapter_model.safetensors``; attributes such as
        ``model.checkpoint_sha256`` and ``model.forward_features`` resolve to
        the backbone.

    Notes
    -----
    The adapted Linear layers become :mod:`fedeeg.models._fused_lora`'s
    subclass of peft's layer, which computes base and adapter in one GEMM
    forward and one backward on CUDA inside ``torch.compile`` (the default,
    ``FEDEEG_LORA_LINEAR=auto``), everywhere with ``fused``, and never with
    ``peft`` (which also keeps peft's class); otherwise it runs peft's own
    forward. Parameter names and the state dict are peft's either way.
    """
    if not isinstance(spec, LoraSpec):
        raise TypeError(f"'spec' must be a LoraSpec, got {type(spec).__name__}.")
    if hasattr(model, "peft_config"):
        raise ValueError("The model already has peft adapters: apply LoRA to a fresh backbone from build_backbone().")
    check_range("seed", seed, low=0, kind=int)
    linear_mode = _fused_lora.check_lora_linear_mode(_fused_lora.LORA_LINEAR)
    names = _resolve_targets(model, spec)
    target_modules, rank_pattern = spec.peft_targets()

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target_modules,
        rank_pattern=rank_pattern,
        bias="none",
        modules_to_save=list(MODULES_TO_SAVE),
        init_lora_weights=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    if freeze_a:
        for n, p in peft_model.named_parameters():
            if ".lora_A." in n:
                p.requires_grad_(False)
    if linear_mode != "peft":
        n_fused = _fused_lora.use_fused_lora_linear(peft_model)
        where = "everywhere" if linear_mode == "fused" else "on CUDA under torch.compile"
        logger.debug("LoRA Linear layers: %d use the fused forward/backward %s (FEDEEG_LORA_LINEAR=%s).", n_fused, where, linear_mode)
    trainable, total = count_parameters(peft_model)
    logger.info(
        "LoRA %s on %d modules (freeze_a=%s): %d trainable of %d parameters.", spec.preset, len(names), freeze_a, trainable, total
    )
    return peft_model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of exactly the parameters with ``requires_grad=True``.

    Plus the BatchNorm running statistics (``running_mean``, ``running_var``,
    ``num_batches_tracked``) of BatchNorm layers that train, which a model
    learns too (baselines such as EEGNet; LaBraM has none).

    Names are the model's parameter names (for a peft model e.g.
    ``base_model.model.blocks.0.attn.qkv.lora_B.default.weight``,
    ``base_model.model.head.modules_to_save.default.weight``), identical for
    identically built models.
    """
    state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    # 0-d buffers (num_batches_tracked) travel as shape (1,): Flower's ArrayRecord has no 0-d arrays.
    state.update({n: b.detach().to("cpu", copy=True).reshape(-1) if b.ndim == 0 else b.detach().to("cpu", copy=True)
                  for n, b in _travelling_buffers(model).items()})
    return state


def _travelling_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm running statistics of modules whose parameters train.

    They are part of what a model *learned* (eval mode normalises with them),
    so they travel and are averaged with the parameters; without them a
    federated EEGNet's global model would keep the initial mean 0 / variance 1.
    LaBraM has none (GroupNorm/LayerNorm only).
    """
    out = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or not mod.track_running_stats:
            continue
        if not any(p.requires_grad for p in mod.parameters(recurse=False)):
            continue
        for buf_name in ("running_mean", "running_var", "num_batches_tracked"):
            buf = getattr(mod, buf_name, None)
            if buf is not None:
                out[f"{mod_name}.{buf_name}" if mod_name else buf_name] = buf
    return out


def load_trainable_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters, in place.

    Every name, shape and dtype is checked against the model's trainable
    parameters before anything changes.

    Raises
    ------
    ValueError
        Naming every missing name, unexpected name, wrong shape and wrong dtype.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params.update(_travelling_buffers(model))
    tensors = {}
    problems = []
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            try:
                value = torch.as_tensor(value)
            except (TypeError, RuntimeError, ValueError):
                problems.append(f"{name}: not a tensor ({type(value).__name__})")
                continue
        tensors[name] = value
    missing = [n for n in params if n not in state]
    unexpected = [n for n in state if n not in params]
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected (not trainable parameters or BatchNorm statistics of this model): {', '.join(unexpected)}")
    for name, value in tensors.items():
        if name not in params:
            continue
        p = params[name]
        if p.ndim == 0 and tuple(value.shape) == (1,):
            value = tensors[name] = value.reshape(())
        if tuple(value.shape) != tuple(p.shape):
            problems.append(f"{name}: shape {list(value.shape)}, expected {list(p.shape)}")
        elif value.dtype != p.dtype:
            problems.append(f"{name}: dtype {value.dtype}, expected {p.dtype}")
    if problems:
        raise ValueError("The trainable state does not match the model (nothing was loaded): " + "; ".join(problems) + ".")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Numbers of trainable and of all parameters.

    peft keeps a frozen copy of each module in ``modules_to_save``
    (``...original_module...``); it is not used while the adapter is active
    and is left out of the total.

    Returns
    -------
    trainable, total : int
    """
    trainable = total = 0
    for n, p in model.named_parameters():
        if ".original_module." in n:
            continue
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def lora_pairs(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The (A, B) matrices of each adapted module, as 2-D views.

    Parameters
    ----------
    model : peft.PeftModel
        A model from :func:`apply_lora`.
    adapter_name : str
        peft adapter name.

    Returns
    -------
    pairs : dict of str → (Tensor, Tensor)
        Keyed by the backbone's module name (e.g. ``'blocks.0.attn.qkv'``,
        ``'patch_embed.conv1'``). ``A`` has shape ``(r, fan_in)`` and ``B``
        ``(out_features, r)``; both are views sharing storage with the
        parameters (``lora_A.weight``, ``lora_B.weight``). For a Linear,
        ``fan_in = in_features`` and these are the weights themselves. For a
        Conv2d, ``A`` is the ``(r, in_channels, kh, kw)`` kernel flattened to
        ``(r, in_channels * kh * kw)`` and ``B`` the 1x1 kernel
        ``(out_channels, r, 1, 1)`` flattened to ``(out_channels, r)``. In both
        cases the weight update is
        ``scaling * (B @ A).reshape(base_weight.shape)``, with
        ``scaling = alpha / r`` (``module.scaling[adapter_name]``).
    """
    pairs = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter_name not in lora_a:
            continue
        a = lora_a[adapter_name].weight
        b = module.lora_B[adapter_name].weight
        key = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
        pairs[key] = (a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
    return pairs


def check_lora_effective(
    peft_model: nn.Module,
    x: torch.Tensor,
    ch_names,
    *,
    adapter_name: str = "default",
    raise_error: bool = True,
    seed: int = 0,
) -> dict[str, str]:
    """Check that every LoRA adapter of a model takes part in its forward pass.

    A LoRA layer is silently useless where the model reads a wrapped module's
    weight directly (``F.linear(x, self.qkv.weight)``, as braindecode's Labram
    does for qkv) instead of calling the module. Two tests, on ``x``:

    1. Gradients: with every ``lora_B`` set to small random values (so that
       ``lora_A`` gets a gradient too), one backward pass of a random projection
       of the output must give every ``lora_A`` and ``lora_B`` a non-zero
       gradient (frozen ones included: their ``requires_grad`` is switched on
       for the check).
    2. Perturbation: from the model's own weights, setting one module's
       ``lora_B`` to random values must change the output, for each adapted
       module in turn.

    The model runs in eval mode (no dropout) and everything is put back
    afterwards: weights, gradients, ``requires_grad`` flags and train/eval mode.
    The global RNG is not used.

    Parameters
    ----------
    peft_model : nn.Module
        A model with LoRA layers (e.g. from :func:`apply_lora`), called as
        ``peft_model(x, ch_names)``.
    x : torch.Tensor
        A small input batch, shape ``(batch, n_chans, n_times)``.
    ch_names : sequence of str
        The ``n_chans`` channel names.
    adapter_name : str
        peft adapter name.
    raise_error : bool
        If True (default), raise when a module fails; else return the problems.
    seed : int
        Seed of the random B values and output projection.

    Returns
    -------
    problems : dict of str → str
        Module name (as :func:`lora_pairs`) → why its adapter is useless; empty
        when every adapter works.

    Raises
    ------
    ValueError
        If the model has no LoRA layer.
    RuntimeError
        If ``raise_error`` and some adapter has no effect, naming each module.
    """
    layers = {}
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter_name in lora_a:
            key = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
            layers[key] = (lora_a[adapter_name].weight, module.lora_B[adapter_name].weight)
    if not layers:
        raise ValueError(f"The model has no LoRA layer for adapter {adapter_name!r}: nothing to check.")
    params = list(peft_model.parameters())
    saved_data = {id(p): p.detach().clone() for a_b in layers.values() for p in a_b}
    saved_grad = [(p, None if p.grad is None else p.grad.clone()) for p in params]
    saved_flags = [(p, p.requires_grad) for p in params]
    was_training = peft_model.training
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand_like(t: torch.Tensor, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(t.shape, generator=gen, dtype=torch.float32) * std).to(device=t.device, dtype=t.dtype)

    problems: dict[str, list[str]] = {}
    try:
        peft_model.eval()
        for p in params:
            p.requires_grad_(False)
        for a, b in layers.values():
            a.requires_grad_(True)
            b.requires_grad_(True)
            a.grad = None
            b.grad = None
        # 1. gradients reach every A and B
        with torch.no_grad():
            for _, b in layers.values():
                b.copy_(rand_like(b, 0.01))
        with torch.enable_grad():
            out = peft_model(x, ch_names)
            proj = rand_like(out.detach().float())
            (out.float() * proj).sum().backward()
        for name, (a, b) in layers.items():
            for label, p in (("lora_A", a), ("lora_B", b)):
                if p.grad is None or not bool(torch.any(p.grad != 0)):
                    problems.setdefault(name, []).append(f"{label} gets no gradient")
        # 2. each module's B changes the output
        with torch.no_grad():
            for _, b in layers.values():
                b.copy_(saved_data[id(b)])
            ref = peft_model(x, ch_names)
            noise = float((peft_model(x, ch_names) - ref).abs().max())  # non-determinism floor
            for name, (_, b) in layers.items():
                b.copy_(rand_like(b))
                change = float((peft_model(x, ch_names) - ref).abs().max())
                b.copy_(saved_data[id(b)])
                if not change > 10 * noise:
                    problems.setdefault(name, []).append("perturbing lora_B leaves the output unchanged")
    finally:
        with torch.no_grad():
            for a, b in layers.values():
                a.copy_(saved_data[id(a)])
                b.copy_(saved_data[id(b)])
        for p, grad in saved_grad:
            p.grad = grad
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        peft_model.train(was_training)
    report = {name: "; ".join(why) for name, why in problems.items()}
    if report and raise_error:
        listing = "; ".join(f"{name} ({why})" for name, why in report.items())
        raise RuntimeError(
            f"{len(report)} of {len(layers)} LoRA adapters have no effect on the output: {listing}. The model reads "
            "these modules' weights directly (e.g. F.linear(x, module.weight)) instead of calling them, so the "
            "adapters are bypassed: call the modules, or leave them out of the LoRA targets."
        )
    if report:
        logger.warning("LoRA adapters without effect: %s", report)
    return report


__all__ = [
    "LORA_PRESETS",
    "MODULES_TO_SAVE",
    "LoraSpec",
    "apply_lora",
    "trainable_state_dict",
    "load_trainable_state_dict",
    "count_parameters",
    "lora_pairs",
    "check_lora_effective",
]
