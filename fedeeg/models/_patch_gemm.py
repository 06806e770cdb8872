"""LaBraM's patch embedding as one dense matrix product per stage (``FEDEEG_PATCH_EMBED=gemm``).

Each of the three temporal convolutions of :class:`~fedeeg.models.labram.TemporalConv`
acts on every (channel, patch) token by itself: its kernels are one row high,
so it is a linear map of the token's ``n_maps * n_steps`` values (200: one
map of 200 samples for the first stage, ``out_chans`` maps of 25 steps for the
others) onto ``out_chans * 25`` values, i.e. a banded ``(200, 200)`` matrix
(labram-base). Here that matrix is built, differentiably, by passing an
identity basis through the convolution with the module's own weights
(``conv._conv_forward(eye(n).view(n, n_maps, 1, n_steps), weight, None)``,
then flattened in (map, step) order), and each stage becomes

``y = x_rows @ T + bias`` with ``x_rows`` of shape ``(batch * n_tokens, 200)``,

one GEMM instead of a convolution with cuDNN's NCHW/NHWC conversions. The
GroupNorm (statistics per window over all tokens, the group's maps and the
steps; per-map affine) is computed in that row layout, then GELU. The third
stage's matrix has its columns in (step, map) order, so its output is already
LaBraM's ``'B C NA T -> B NA (T C)'`` token layout and no transpose follows.

peft LoRA layers wrapped around the convolutions (``peft.tuners.lora.layer.Conv2d``)
are computed as peft's forward does, ``base(x) + lora_B(lora_A(dropout(x))) * scaling``:
``y = x @ T + b + scaling * dropout(x) @ (T_A @ T_B)``, where ``T_A @ T_B`` is
the identity basis passed through ``lora_A`` then ``lora_B``. The dropout is the
layer's own module, applied (when active) to the input laid out as the
convolution sees it, ``(batch, n_maps, n_tokens, n_steps)`` and contiguous, so
that the same RNG state draws the same mask as the convolution path (see
:data:`EXACT_DROPOUT`). Whatever this module does not reproduce exactly (DoRA
and other LoRA variants, merged adapters, several active adapters, a
``lora_B`` bias, mixed weight dtypes, convolutions of another geometry) makes
:func:`stage_plans` return None, and the convolution path runs instead.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_option
from ._cuda_paths import compiled_on_cuda

#: The implementations of the patch embedding; ``'auto'`` picks one of the other two per call.
MODES = ("auto", "conv", "gemm")


def _mode_from_env() -> str:
    mode = os.environ.get("FEDEEG_PATCH_EMBED", "auto").strip().lower() or "auto"
    return check_option("FEDEEG_PATCH_EMBED", mode, MODES)


#: Which implementation :class:`~fedeeg.models.labram.TemporalConv` uses: ``'conv'`` (three
#: Conv2d → GroupNorm → GELU stages), ``'gemm'`` (this module) or ``'auto'`` (``'gemm'`` on CUDA
#: inside torch.compile, where it was measured faster, ``'conv'`` elsewhere; see :func:`resolve_mode`).
#: Read from FEDEEG_PATCH_EMBED at import (default ``'auto'``); set this attribute to switch at run
#: time (e.g. in tests).
MODE = _mode_from_env()


def resolve_mode(x: torch.Tensor) -> str:
    """``'conv'`` or ``'gemm'``: :data:`MODE`, with ``'auto'`` resolved for the input ``x``.

    ``'auto'`` is ``'gemm'`` for a CUDA input inside ``torch.compile`` (measured
    there: H100, LaBraM-Base, LoRA ``paper``, batch 1024, bf16, 18,927 against
    17,582 windows/s; ``simulations/RESULTS.md``) and ``'conv'`` elsewhere (the
    CPU, eager GPU training: not measured, so unchanged).
    """
    mode = check_option("FEDEEG_PATCH_EMBED", MODE, MODES)
    if mode == "auto":
        return "gemm" if compiled_on_cuda(x) else "conv"
    return mode

#: Apply an active LoRA dropout to a contiguous copy of the input in the convolution's layout
#: ``(batch, n_maps, n_tokens, n_steps)``, so that the mask equals the convolution path's for the
#: same RNG state (eager mode; verified on CPU). False: apply it to the rows directly, which draws a
#: mask of the same distribution but a different one, and saves two transposing copies per adapted
#: stage 2 and 3 (the first stage has one map, so its rows already are in that order).
EXACT_DROPOUT = True

#: A stage's plan: the base convolution and the one active adapter to add (None: none).
StagePlan = tuple[nn.Conv2d, "str | None"]


def _row_local(conv: nn.Module) -> bool:
    """Whether the convolution maps each row (height index) on its own: one-row kernel, stride and padding."""
    if type(conv) is not nn.Conv2d:
        return False
    padding = conv.padding
    return conv.kernel_size[0] == 1 and conv.stride[0] == 1 and (isinstance(padding, str) or padding[0] == 0)


def _stage_plan(module: nn.Module) -> StagePlan | None:
    """What the gemm path computes for one of ``conv1/2/3``; None where it cannot match the module's forward.

    Parameters
    ----------
    module : nn.Module
        A plain ``nn.Conv2d`` or a peft ``lora.Conv2d`` around one.

    Returns
    -------
    plan : (nn.Conv2d, str | None) | None
        The base convolution and the name of the active adapter to add (None
        for the base alone, as peft does with adapters disabled or none
        active); None to fall back to the convolution path.
    """
    if type(module) is nn.Conv2d:
        return (module, None) if _row_local(module) else None
    lora = sys.modules.get("peft.tuners.lora.layer")  # loaded whenever peft has wrapped a module
    if lora is None or type(module) is not lora.Conv2d:
        return None
    base = module.base_layer
    if not _row_local(base) or module.merged:  # merged: peft's forward may also unmerge in place
        return None
    if module.disable_adapters:
        return base, None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if not active:
        return base, None
    if len(active) > 1:
        return None
    name = active[0]
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    if (
        name in getattr(module, "lora_variant", {})  # DoRA and other variants have their own forward
        or module.use_dora.get(name, False)
        or not _row_local(lora_a)
        or not _row_local(lora_b)
        or lora_b.kernel_size != (1, 1)
        or lora_b.groups != 1
        or lora_b.bias is not None
        or lora_a.weight.dtype != base.weight.dtype
        or lora_b.weight.dtype != base.weight.dtype
    ):
        return None
    return base, name


def stage_plans(temporal_conv: nn.Module) -> list[StagePlan] | None:
    """The plans of ``conv1``, ``conv2``, ``conv3``; None if any stage needs the convolution path.

    GroupNorm must be a plain ``nn.GroupNorm`` whose groups divide the maps.
    """
    plans = []
    for i in (1, 2, 3):
        conv, norm = getattr(temporal_conv, f"conv{i}"), getattr(temporal_conv, f"norm{i}")
        plan = _stage_plan(conv)
        if plan is None or type(norm) is not nn.GroupNorm or plan[0].out_channels != norm.num_channels:
            return None
        plans.append(plan)
    return plans


def _basis(n_maps: int, n_steps: int, like: torch.Tensor) -> torch.Tensor:
    """Identity basis of a token: shape ``(n, n_maps, 1, n_steps)``, ``n = n_maps * n_steps``, (map, step) order."""
    n = n_maps * n_steps
    return torch.eye(n, dtype=like.dtype, device=like.device).view(n, n_maps, 1, n_steps)


def _flatten(maps: torch.Tensor, step_major: bool) -> torch.Tensor:
    """``(n, out_maps, 1, out_steps)`` images → ``(n, out_maps * out_steps)`` columns in (map, step) or (step, map) order."""
    n = maps.shape[0]
    if step_major:
        return maps.squeeze(2).transpose(1, 2).reshape(n, -1)  # (n, out_steps * out_maps)
    return maps.reshape(n, -1)  # (n, out_maps * out_steps)


def _no_autocast(device: torch.device):
    """The matrices are built in the weights' dtype; autocast applies to the GEMMs that use them."""
    return torch.autocast(device.type, enabled=False)


def _gelu_group_norm(y: torch.Tensor, norm: nn.GroupNorm, batch: int, n_steps: int, step_major: bool) -> torch.Tensor:
    """GroupNorm then GELU, on rows as the stage's GEMM writes them.

    Parameters
    ----------
    y : torch.Tensor
        Shape ``(batch * n_tokens, n_maps * n_steps)``, each row in (map, step)
        order, or (step, map) order if ``step_major``.
    norm : nn.GroupNorm
        Its ``num_groups`` groups of consecutive maps are normalised per window
        over all tokens, the group's maps and the steps, as ``nn.GroupNorm``
        does on ``(batch, n_maps, n_tokens, n_steps)``.
    batch, n_steps : int
        Windows, and steps per map.
    step_major : bool
        Row order of ``y`` (and of the result).

    Returns
    -------
    torch.Tensor
        Same shape and row order as ``y``. Statistics and the affine map are
        computed in float32; the result has the dtype ``F.group_norm`` would
        give: float32 under CUDA autocast (which runs group_norm in float32),
        else ``y``'s dtype (CPU autocast keeps group_norm in bfloat16).
    """
    groups = norm.num_groups
    per_group = norm.num_channels // groups
    if step_major:
        yv = y.view(batch, -1, n_steps, groups, per_group)  # (batch, n_tokens, n_steps, groups, maps per group)
        dims = (1, 2, 4)
        param_shape = (groups, per_group)
    else:
        yv = y.view(batch, -1, groups, per_group, n_steps)  # (batch, n_tokens, groups, maps per group, n_steps)
        dims = (1, 3, 4)
        param_shape = (groups, per_group, 1)
    var, mean = torch.var_mean(yv.float(), dim=dims, correction=0, keepdim=True)  # each (batch, 1, ..., groups, ...)
    scale = torch.rsqrt(var + norm.eps)  # (batch, 1, ..., groups, ...)
    if norm.affine:
        scale = scale * norm.weight.float().view(param_shape)  # (batch, 1, ..., groups, maps per group, ...)
        shift = norm.bias.float().view(param_shape) - mean * scale
    else:
        shift = -mean * scale
    out = torch.addcmul(shift, yv, scale)  # float32, shape of yv
    out_dtype = torch.float32 if y.device.type == "cuda" and torch.is_autocast_enabled("cuda") else y.dtype
    if out.dtype != out_dtype:
        out = out.to(out_dtype)
    return F.gelu(out).view(y.shape)  # (batch * n_tokens, n_maps * n_steps)


def _dropout(dropout: nn.Module, rows: torch.Tensor, batch: int, n_maps: int, n_steps: int) -> torch.Tensor:
    """The adapter's dropout on rows ``(batch * n_tokens, n_maps * n_steps)``, drawing the convolution path's mask.

    peft applies it to the convolution's input ``(batch, n_maps, n_tokens,
    n_steps)``; CPU (and CUDA) dropout draws its mask in the order of a
    contiguous tensor of that shape, so with :data:`EXACT_DROPOUT` the rows
    are laid out so before the call and back after it.
    """
    if isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and (not dropout.training or dropout.p == 0)):
        return rows
    if n_maps == 1:  # the convolution's input has the rows' memory order
        return dropout(rows.view(batch, 1, -1, n_steps)).view(rows.shape)  # (batch * n_tokens, n_steps)
    if not EXACT_DROPOUT:
        return dropout(rows)
    conv_layout = rows.view(batch, -1, n_maps, n_steps).transpose(1, 2).contiguous()  # (batch, n_maps, n_tokens, n_steps)
    dropped = dropout(conv_layout)  # (batch, n_maps, n_tokens, n_steps)
    return dropped.transpose(1, 2).reshape(rows.shape)  # (batch * n_tokens, n_maps * n_steps)


def _stage(
    module: nn.Module,
    plan: StagePlan,
    norm: nn.GroupNorm,
    rows: torch.Tensor,
    batch: int,
    n_maps: int,
    n_steps: int,
    step_major: bool,
) -> tuple[torch.Tensor, int, int]:
    """One conv → GroupNorm → GELU stage as GEMMs on rows.

    Parameters
    ----------
    module : nn.Module
        ``convN`` as registered (plain or peft-wrapped).
    plan : (nn.Conv2d, str | None)
        From :func:`_stage_plan`.
    norm : nn.GroupNorm
        ``normN``.
    rows : torch.Tensor
        Shape ``(batch * n_tokens, n_maps * n_steps)``, rows in (map, step) order.
    batch, n_maps, n_steps : int
        Windows; maps and steps of the input rows.
    step_major : bool
        Write the output rows in (step, map) order instead of (map, step).

    Returns
    -------
    rows : torch.Tensor
        Shape ``(batch * n_tokens, out_maps * out_steps)``.
    out_maps, out_steps : int
    """
    base, adapter = plan
    with _no_autocast(rows.device):
        maps = base._conv_forward(_basis(n_maps, n_steps, base.weight), base.weight, None)  # (n_in, out_maps, 1, out_steps)
        out_maps, out_steps = maps.shape[1], maps.shape[3]
        matrix = _flatten(maps, step_major)  # (n_in, n_out)
        if base.bias is not None:
            bias = base.bias.repeat(out_steps) if step_major else base.bias.repeat_interleave(out_steps)  # (n_out,)
        if adapter is not None:
            lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
            low = lora_a._conv_forward(_basis(n_maps, n_steps, lora_a.weight), lora_a.weight, None)  # (n_in, r, 1, out_steps)
            delta = _flatten(lora_b._conv_forward(low, lora_b.weight, None), step_major)  # (n_in, n_out)
    y = torch.addmm(bias, rows, matrix) if base.bias is not None else rows @ matrix  # (batch * n_tokens, n_out)
    if adapter is not None:
        x = rows
        lora_dtype = module.lora_A[adapter].weight.dtype
        if x.dtype != lora_dtype and getattr(module, "cast_input_dtype_enabled", True):  # as peft casts
            x = x.to(lora_dtype)
        x = _dropout(module.lora_dropout[adapter], x, batch, n_maps, n_steps)  # (batch * n_tokens, n_in)
        y = torch.addmm(y, x, delta, alpha=module.scaling[adapter])  # (batch * n_tokens, n_out)
    return _gelu_group_norm(y, norm, batch, out_steps, step_major), out_maps, out_steps


def temporal_conv_gemm(temporal_conv: nn.Module, x: torch.Tensor, plans: list[StagePlan]) -> torch.Tensor:
    """:class:`~fedeeg.models.labram.TemporalConv`'s forward pass as three GEMM stages.

    Parameters
    ----------
    temporal_conv : TemporalConv
        Its ``conv1/2/3`` (plain or peft-wrapped) and ``norm1/2/3``.
    x : torch.Tensor
        Patches, shape ``(batch, n_tokens, patch_size)``.
    plans : list of (nn.Conv2d, str | None)
        From :func:`stage_plans` (not None).

    Returns
    -------
    torch.Tensor
        Tokens, shape ``(batch, n_tokens, n_steps * out_chans)`` in (step, map)
        order, equal to the convolution path's output.
    """
    batch, n_tokens, patch_size = x.shape
    rows = x.reshape(batch * n_tokens, patch_size)  # (batch * n_tokens, patch_size): one map of patch_size steps
    n_maps, n_steps = 1, patch_size
    for i, plan in enumerate(plans, start=1):
        module, norm = getattr(temporal_conv, f"conv{i}"), getattr(temporal_conv, f"norm{i}")
        rows, n_maps, n_steps = _stage(module, plan, norm, rows, batch, n_maps, n_steps, step_major=i == len(plans))
        # rows: (batch * n_tokens, out_chans * 25), (map, step) order; after the last stage (step, map)
    return rows.view(batch, n_tokens, n_steps * n_maps)  # (batch, n_tokens, 25 * out_chans)
