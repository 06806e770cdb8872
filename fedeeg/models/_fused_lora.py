"""A fused forward and backward pass for peft LoRA Linear layers (one GEMM each way).

peft computes a LoRA Linear layer as separate ops::

    y = base(x) + B(A(drop(x))) * s

which costs, besides the base GEMM, a rank-r GEMM writing a second
``(M, N)`` output, an add reading both, and in the backward pass a second full
read of ``dY`` for ``dh = dY @ B``. With LaBraM-Base at batch 1024 (78,848
token rows per Linear, r = 2) these memory-bound side paths cost more than the
weight gradients of full fine-tuning.

Here, with ``h = A(drop(x))`` (``(M, r)``, computed by the layer's own
``lora_A`` and ``lora_dropout`` modules, so the same RNG state gives the same
dropout mask as peft) and the frozen base weight ``W`` (``(N, K)``):

* forward: one GEMM ``y = [x, h, 0] @ [W, s*B, 0]^T + bias``, the inner
  dimension ``K + r`` padded with zeros to a multiple of :data:`PAD_TO`
  (tensor-core alignment);
* backward: one GEMM ``g = dY @ [W, s*B, 0]`` gives ``dx`` (``g[:, :K]``)
  and ``dh`` (``g[:, K:K+r]``) together; ``dB = s * dY^T h`` (a skinny
  reduction over the M rows, optionally split into chunks of
  :data:`SPLIT_K_ROWS` rows with a batched GEMM, partial sums added in
  float32); the frozen ``W`` gets no gradient. ``dh`` flows back through
  ``lora_A`` and the dropout by autograd.

The Function saves only ``h`` (``(M, r)``) and the small concatenated
weight ``(N, K + r + pad)``: the base input ``x`` is not needed, since ``W``
is frozen (peft's graph saves ``h`` and ``W^T``). In both, the adapter's
input path saves the dropout mask and ``drop(x)`` (``(M, K)`` each).

Use
---
:func:`use_fused_lora_linear` switches a peft model's ``lora.Linear`` layers
to :class:`FusedLoraLinear` (a subclass: same module tree, same parameter
names, same state dict; only ``forward`` differs).
:func:`fedeeg.models.apply_lora` does so unless :data:`LORA_LINEAR` is
``'peft'`` (environment variable ``FEDEEG_LORA_LINEAR``). A switched layer checks
:data:`LORA_LINEAR` at each call:

* ``'auto'`` (the default): the fused path on CUDA inside ``torch.compile``,
  where it was measured faster (H100, LaBraM-Base, LoRA ``paper``, batch
  1024, bf16: 19,627 against 17,582 windows/s alone, 22,249 with the other
  two CUDA paths; ``simulations/RESULTS.md``), peft's forward elsewhere (CPU,
  eager GPU training: not measured, so unchanged);
* ``'fused'``: the fused path wherever it applies (CPU included);
* ``'peft'``: peft's own forward everywhere (and :func:`apply_lora` leaves
  the layers' class alone).

With ``FEDEEG_LORA_INPUT_KERNEL=1`` (off by default, not yet run on a GPU), a
fused layer on CUDA builds ``[x, h, 0]`` with :mod:`._lora_input`'s kernel
(dropout drawn in the kernel, no stored mask) and multiplies it in
:class:`FusedLoraCatLinearFunction`; :func:`fused_gelu_linear` lets an MLP
move its GELU into that kernel.

Whatever the fused path does not cover falls back to peft's forward, per call:
adapters disabled or merged, several active adapters, variants (DoRA, ...),
``lora_bias``, ``fan_in_fan_out``, extra forward arguments
(``adapter_names``), a base layer that is not an ``nn.Linear`` or whose weight
trains, and inconsistent dtypes.

Tuning knobs (module attributes, read at each call; environment variables set
their start values):

* :data:`FORWARD` (``FEDEEG_LORA_FUSED_FORWARD``, default ``'auto'``): ``'cat'`` (the one-GEMM
  forward above), ``'addmm'`` (``t = h @ (s*B)^T + bias`` then
  ``y = t + x @ W^T`` in one ``addmm``: no copy of ``x``, but an extra
  ``(M, N)`` write and read) or ``'auto'`` (``'cat'`` where ``K <= N``, i.e.
  ``qkv`` and ``fc1``; ``'addmm'`` where ``K > N``, i.e. ``fc2``: the fewer
  extra bytes);
* :data:`PAD_TO` (``FEDEEG_LORA_PAD_TO``): multiple of the padded inner width
  (1: no padding);
* :data:`SPLIT_K_ROWS` (``FEDEEG_LORA_SPLIT_K_ROWS``): rows per chunk of the
  ``dB`` reduction (0: one GEMM over all rows).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import _lora_input
from ._cuda_paths import compiled_on_cuda

#: The implementations of a LoRA Linear layer: ``'auto'`` picks between the other two per call.
LORA_LINEAR_MODES = ("auto", "peft", "fused")
#: Forward strategies of the fused path.
FORWARD_MODES = ("cat", "addmm", "auto")

#: ``'auto'`` (fused on CUDA under torch.compile, else peft's), ``'peft'`` (peft's own forward) or
#: ``'fused'`` (:class:`FusedLoraLinear` wherever it applies); from FEDEEG_LORA_LINEAR (default ``'auto'``).
#: Read by :func:`fedeeg.models.apply_lora` (which switches the layers unless ``'peft'``) and by every
#: switched layer at each call, so tests can flip it.
LORA_LINEAR = os.environ.get("FEDEEG_LORA_LINEAR", "auto").strip().lower() or "auto"
#: Forward strategy of the fused path: ``'cat'``, ``'addmm'`` or ``'auto'`` (see the module docstring).
FORWARD = os.environ.get("FEDEEG_LORA_FUSED_FORWARD", "auto").strip().lower() or "auto"
#: The inner width ``K + r`` is padded with zeros to a multiple of this (8: 16-byte rows in bf16).
PAD_TO = int(os.environ.get("FEDEEG_LORA_PAD_TO", "8"))
#: Rows per chunk of the split-K reduction ``dB = s * dY^T h``; 0 (or >= M): one GEMM.
SPLIT_K_ROWS = int(os.environ.get("FEDEEG_LORA_SPLIT_K_ROWS", "0"))

#: Dtypes that autocast casts a Linear's inputs from/to.
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_lora_linear_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`LORA_LINEAR_MODES`, else a ValueError naming FEDEEG_LORA_LINEAR."""
    if mode not in LORA_LINEAR_MODES:
        raise ValueError(
            f"Invalid LoRA Linear implementation {mode!r} (environment variable FEDEEG_LORA_LINEAR or "
            f"fedeeg.models._fused_lora.LORA_LINEAR): allowed values are {', '.join(map(repr, LORA_LINEAR_MODES))}."
        )
    return mode


def fused_wanted(x: torch.Tensor) -> bool:
    """Whether :data:`LORA_LINEAR` asks for the fused path for input ``x`` (before :func:`fused_supported`).

    ``'auto'``: only for a CUDA input inside ``torch.compile`` (the setting it
    was measured in; ``torch.compiler.is_compiling()`` is a constant there).
    """
    if LORA_LINEAR == "fused":
        return True
    return LORA_LINEAR == "auto" and compiled_on_cuda(x)


def _pad_width(k: int, r: int, pad_to: int) -> int:
    """Zero columns after ``[x, h]`` so that ``k + r + pad`` is a multiple of ``pad_to``."""
    return (-(k + r)) % pad_to if pad_to > 1 else 0


def rows_t_matmul(a: torch.Tensor, b: torch.Tensor, chunk_rows: int = 0) -> torch.Tensor:
    """``a^T @ b`` reduced over the rows, in float32: the skinny ``dB`` reduction.

    Parameters
    ----------
    a : torch.Tensor
        Shape ``(M, N)`` (``dY``).
    b : torch.Tensor
        Shape ``(M, R)`` (``h``, padded), same dtype as ``a``.
    chunk_rows : int
        0 (or ``>= M``): one GEMM. Else the first ``(M // chunk_rows) *
        chunk_rows`` rows are split into chunks of ``chunk_rows`` rows, one
        ``bmm`` computes each chunk's ``(N, R)`` partial product (float32
        accumulation inside, rounded to the inputs' dtype) and the partials
        are summed in float32; a GEMM adds the remaining rows.

    Returns
    -------
    out : torch.Tensor
        Shape ``(N, R)``, float32.
    """
    m = a.shape[0]
    if chunk_rows <= 0 or m <= chunk_rows:
        return (a.t() @ b).float()  # (N, R)
    n_chunks = m // chunk_rows
    main = n_chunks * chunk_rows
    a_c = a[:main].reshape(n_chunks, chunk_rows, a.shape[1])  # (C, rows, N)
    b_c = b[:main].reshape(n_chunks, chunk_rows, b.shape[1])  # (C, rows, R)
    out = torch.bmm(a_c.transpose(1, 2), b_c).sum(0, dtype=torch.float32)  # (C, N, R) -> (N, R)
    if main < m:
        out = out + (a[main:].t() @ b[main:]).float()  # (N, R)
    return out


class FusedLoraLinearFunction(torch.autograd.Function):
    """``y = x @ W^T + s * h @ B^T + bias`` with one GEMM forward and one backward (``W`` frozen).

    All arguments but ``weight``, ``lora_b`` and ``bias`` are in the compute
    dtype (that of ``x``); those three are cast to it here, and their
    gradients come back in their own dtypes.

    Parameters
    ----------
    (of ``FusedLoraLinearFunction.apply``)

    x : torch.Tensor
        Base input, shape ``(M, K)``.
    h : torch.Tensor
        LoRA down-projection ``A(drop(x))``, shape ``(M, r)``, dtype of ``x``.
    weight : torch.Tensor
        Frozen base weight ``W``, shape ``(N, K)``; gets no gradient.
    lora_b : torch.Tensor
        LoRA up-projection ``B``, shape ``(N, r)``.
    bias : torch.Tensor | None
        Base bias, shape ``(N,)``.
    scaling : float
        LoRA scale ``s`` (alpha / r).
    pad_to : int
        Pad the inner width ``K + r`` with zero columns to a multiple of this.
    chunk_rows : int
        Split-K chunk of the ``dB`` reduction (see :func:`rows_t_matmul`).
    forward_mode : str
        ``'cat'`` or ``'addmm'`` (already resolved from ``'auto'``).

    Returns
    -------
    y : torch.Tensor
        Shape ``(M, N)``, dtype of ``x``.
    """

    @staticmethod
    def forward(ctx, x, h, weight, lora_b, bias, scaling, pad_to, chunk_rows, forward_mode):
        k, r = x.shape[1], h.shape[1]
        dtype = x.dtype
        pad = _pad_width(k, r, pad_to)
        b_pad = lora_b.to(dtype) * scaling  # (N, r)
        if pad:
            b_pad = F.pad(b_pad, (0, pad))  # (N, r + pad)
        w_cat = torch.cat([weight.to(dtype), b_pad], dim=1)  # (N, K + r + pad)
        bias_c = None if bias is None else bias.to(dtype)  # (N,)
        if forward_mode == "addmm":
            h_pad = F.pad(h, (0, pad)) if pad else h  # (M, r + pad)
            lora_out = F.linear(h_pad, b_pad, bias_c)  # (M, N): s * h @ B^T + bias
            y = torch.addmm(lora_out, x, w_cat[:, :k].t())  # (M, N)
        else:
            # no separate padded h here: torch.compile could then save it for the backward as a view into x_cat
            pieces = [x, h] + ([h.new_zeros(h.shape[0], pad)] if pad else [])
            x_cat = torch.cat(pieces, dim=1)  # (M, K + r + pad)
            y = F.linear(x_cat, w_cat, bias_c)  # (M, N)
        ctx.save_for_backward(h, w_cat)
        ctx.scaling = scaling
        ctx.chunk_rows = chunk_rows
        ctx.pad_to = pad_to
        ctx.k, ctx.r = k, r
        ctx.lora_b_dtype = lora_b.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        # dy: (M, N)
        h, w_cat = ctx.saved_tensors  # (M, r), (N, K + r + pad)
        k, r = ctx.k, ctx.r
        need_x, need_h, _, need_b, need_bias = ctx.needs_input_grad[:5]
        dx = dh = d_b = d_bias = None
        if need_h:
            g = dy @ w_cat  # (M, K + r + pad): [dx, dh, junk]
            dx = g[:, :k] if need_x else None  # (M, K)
            dh = g[:, k : k + r]  # (M, r)
        elif need_x:
            dx = dy @ w_cat[:, :k]  # (M, K)
        if need_b:
            pad_h = (-r) % ctx.pad_to  # aligned rows of h for the GEMM
            h_pad = F.pad(h, (0, pad_h)) if pad_h else h  # (M, r + pad_h)
            d_b = (rows_t_matmul(dy, h_pad, ctx.chunk_rows)[:, :r] * ctx.scaling).to(ctx.lora_b_dtype)  # (N, r)
        if need_bias:
            d_bias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)  # (N,)
        return dx, dh, None, d_b, d_bias, None, None, None, None


class FusedLoraCatLinearFunction(torch.autograd.Function):
    """``y = x_cat @ [W, s B, 0]^T + bias`` for an ``x_cat = [x, h, 0]`` built by :mod:`._lora_input`.

    As :class:`FusedLoraLinearFunction`, but the operand ``[x, h, 0]``
    arrives whole (the input kernel writes it), and the backward pass returns
    the gradient of all of it, ``g = dY @ [W, s B, 0]`` (``(M, K + r +
    pad)``), which the input kernel's backward turns into ``dx`` and ``dA``.
    Saves ``x_cat`` (kept by the input kernel anyway) and the small
    concatenated weight.

    Parameters
    ----------
    (of ``FusedLoraCatLinearFunction.apply``)

    x_cat : torch.Tensor
        Shape ``(M, K + r + pad)``, the compute dtype.
    weight : torch.Tensor
        Frozen ``W``, shape ``(N, K)``; gets no gradient.
    lora_b : torch.Tensor
        ``B``, shape ``(N, r)``.
    bias : torch.Tensor | None
        Shape ``(N,)``.
    scaling : float
        ``s``.
    k, r : int
        Widths of ``x`` and ``h`` inside ``x_cat``.
    chunk_rows : int
        Split-K chunk of the ``dB`` reduction (see :func:`rows_t_matmul`).
    """

    @staticmethod
    def forward(ctx, x_cat, weight, lora_b, bias, scaling, k, r, chunk_rows):
        dtype = x_cat.dtype
        pad = x_cat.shape[1] - k - r
        b_s = lora_b.to(dtype) * scaling  # (N, r)
        w_cat = torch.cat([weight.to(dtype), F.pad(b_s, (0, pad)) if pad else b_s], dim=1)  # (N, K + r + pad)
        y = F.linear(x_cat, w_cat, None if bias is None else bias.to(dtype))  # (M, N)
        ctx.save_for_backward(x_cat, w_cat)
        ctx.scaling, ctx.k, ctx.r, ctx.chunk_rows = scaling, k, r, chunk_rows
        ctx.lora_b_dtype = lora_b.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        # dy: (M, N)
        x_cat, w_cat = ctx.saved_tensors
        k, r = ctx.k, ctx.r
        need_x, _, need_b, need_bias = ctx.needs_input_grad[:4]
        g = d_b = d_bias = None
        if need_x:
            g = dy @ w_cat  # (M, K + r + pad): [dx_base, dh, 0]
        if need_b:
            h_pad = x_cat[:, k:]  # (M, r + pad): h and its zero columns, aligned as x_cat's rows
            d_b = (rows_t_matmul(dy, h_pad, ctx.chunk_rows)[:, :r] * ctx.scaling).to(ctx.lora_b_dtype)  # (N, r)
        if need_bias:
            d_bias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype)  # (N,)
        return g, None, d_b, d_bias, None, None, None, None


def _compute_dtype(layer: nn.Module, x: torch.Tensor, adapter: str) -> torch.dtype | None:
    """The dtype peft's base GEMM runs in, or None where the fused path does not apply."""
    base = layer.get_base_layer()
    params = [base.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
    if base.bias is not None:
        params.append(base.bias)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        if x.dtype not in _AUTOCAST_DTYPES or any(p.dtype not in _AUTOCAST_DTYPES for p in params):
            return None
        return torch.get_autocast_dtype(device_type)
    if not x.is_floating_point() or any(p.dtype != x.dtype for p in params):
        return None
    return x.dtype


def fused_supported(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether the fused path computes exactly what peft's ``lora.Linear.forward`` would.

    Parameters
    ----------
    layer : peft.tuners.lora.layer.Linear
        The LoRA layer.
    x : torch.Tensor
        Its input, shape ``(..., in_features)``.
    """
    if layer.disable_adapters or layer.merged or getattr(layer, "fan_in_fan_out", False):
        return False
    adapters = layer.active_adapters
    if len(adapters) != 1:
        return False
    adapter = adapters[0]
    # (getattr: older peft versions lack some of these attributes)
    if adapter not in layer.lora_A or adapter in getattr(layer, "lora_variant", {}):
        return False
    if getattr(layer, "use_dora", {}).get(adapter, False) or getattr(layer, "lora_bias", {}).get(adapter, False):
        return False
    base = layer.get_base_layer()
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(base) is not nn.Linear or type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        return False
    if base.weight.requires_grad or lora_b.bias is not None or lora_a.bias is not None:
        return False
    if x.shape[-1] != base.in_features or x.device != base.weight.device:
        return False
    return _compute_dtype(layer, x, adapter) is not None


def input_kernel_applies(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`fused_lora_linear` builds the adapter input with :mod:`._lora_input`'s kernel.

    Where :func:`fused_supported` holds, the layer's dropout is ``nn.Dropout``
    or ``nn.Identity`` and the kernel takes ``x`` (CUDA, rank and size limits).
    """
    adapter = layer.active_adapters[0]
    dropout = layer.lora_dropout[adapter]
    return type(dropout) in (nn.Dropout, nn.Identity) and _lora_input.supported(x, layer.lora_A[adapter].weight.shape[0])


def fused_gelu_linear(layer: nn.Module, f: torch.Tensor) -> torch.Tensor | None:
    """``layer(F.gelu(f))`` with the GELU inside the LoRA input kernel, or None where that path does not apply.

    For an MLP's second Linear: the kernel reads the pre-activation ``f``
    once and keeps it for the backward pass, instead of a GELU kernel
    writing ``gelu(f)`` and the input kernel reading it again.

    Parameters
    ----------
    layer : nn.Module
        Any module; only a :class:`FusedLoraLinear` on the fused path
        (:func:`fused_wanted`, :func:`fused_supported`,
        :func:`input_kernel_applies`) is handled.
    f : torch.Tensor
        The pre-activation, shape ``(..., K)``.

    Returns
    -------
    y : torch.Tensor or None
        Shape ``(..., N)``; None: call ``layer(F.gelu(f))`` instead.
    """
    # by name: calling the cached _fused_class() inside torch.compile would make dynamo trace the class statement
    if getattr(layer, "lora_A", None) is None or type(layer).__name__ != "FusedLoraLinear":
        return None
    if not (fused_wanted(f) and fused_supported(layer, f) and input_kernel_applies(layer, f)):
        return None
    return fused_lora_linear(layer, f, activation="gelu")


def fused_lora_linear(layer: nn.Module, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """The fused forward of a peft LoRA Linear layer (check :func:`fused_supported` first).

    Parameters
    ----------
    layer : peft.tuners.lora.layer.Linear
        One active, unmerged, plain LoRA adapter on an ``nn.Linear`` with a
        frozen weight.
    x : torch.Tensor
        Shape ``(..., K)``.
    activation : {None, "gelu"}
        ``"gelu"``: ``x`` is a pre-activation and the layer is applied to
        ``F.gelu(x)``, computed inside the LoRA input kernel (only where
        :func:`fedeeg.models._lora_input.supported` holds: check
        :func:`input_kernel_applies` first).

    Returns
    -------
    y : torch.Tensor
        Shape ``(..., N)``: ``base(x) + lora_B(lora_A(dropout(x))) * scaling``
        in the dtype peft's forward gives (autocast's under autocast).
    """
    adapter = layer.active_adapters[0]
    base = layer.get_base_layer()
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    dtype = _compute_dtype(layer, x, adapter)
    k, n = base.in_features, base.out_features
    dropout = layer.lora_dropout[adapter]
    r = lora_a.weight.shape[0]
    if input_kernel_applies(layer, x):
        # one kernel: (gelu,) dropout (mask drawn in the kernel, not stored), h = A drop(x), [x, h, 0]
        p = float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        x_cat = _lora_input.lora_input(
            x.reshape(-1, k).to(dtype), lora_a.weight.to(dtype), p, _pad_width(k, r, max(int(PAD_TO), 1)),
            activation=activation,
        )  # (M, K + r + pad)
        y = FusedLoraCatLinearFunction.apply(
            x_cat, base.weight, lora_b.weight, base.bias, float(layer.scaling[adapter]), k, r, int(SPLIT_K_ROWS),
        )  # (M, N)
        return y.reshape(*x.shape[:-1], n)  # (..., N)
    if activation is not None:
        raise ValueError(f"activation={activation!r} needs the LoRA input kernel, which does not apply here.")
    # as peft: the adapter input in lora_A's dtype, dropout by the layer's own module (same RNG use)
    cast = getattr(layer, "_cast_input_dtype", None)
    x_a = cast(x, lora_a.weight.dtype) if cast is not None else x.to(lora_a.weight.dtype)
    h = lora_a(layer.lora_dropout[adapter](x_a))  # (..., r)
    r = h.shape[-1]
    forward_mode = FORWARD
    if forward_mode == "auto":
        forward_mode = "cat" if k <= n else "addmm"
    elif forward_mode not in FORWARD_MODES:
        raise ValueError(f"Invalid fused LoRA forward {FORWARD!r} (FEDEEG_LORA_FUSED_FORWARD): allowed values are "
                         f"{', '.join(map(repr, FORWARD_MODES))}.")
    y = FusedLoraLinearFunction.apply(
        x.reshape(-1, k).to(dtype),  # (M, K)
        h.reshape(-1, r).to(dtype),  # (M, r)
        base.weight,  # (N, K)
        lora_b.weight,  # (N, r)
        base.bias,  # (N,) or None
        float(layer.scaling[adapter]),
        max(int(PAD_TO), 1),
        int(SPLIT_K_ROWS),
        forward_mode,
    )  # (M, N)
    return y.reshape(*x.shape[:-1], n)  # (..., N)


@functools.cache
def _fused_class() -> type:
    """:class:`FusedLoraLinear`, built on first use (peft is imported lazily: it takes seconds)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    class FusedLoraLinear(LoraLinear):
        """peft's ``lora.Linear`` whose forward is :func:`fused_lora_linear` where that applies.

        Same attributes, submodules, parameter names and state dict as peft's
        layer (instances are switched with :func:`use_fused_lora_linear`);
        merge, unmerge, save and load are peft's own.
        """

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if not args and not kwargs and fused_wanted(x) and fused_supported(self, x):
                return fused_lora_linear(self, x)
            return super().forward(x, *args, **kwargs)

    FusedLoraLinear.__module__ = __name__
    FusedLoraLinear.__qualname__ = "FusedLoraLinear"
    return FusedLoraLinear


def __getattr__(name: str):
    # FusedLoraLinear resolves lazily (so that pickled models unpickle, and peft loads only when needed)
    if name == "FusedLoraLinear":
        return _fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use_fused_lora_linear(model: nn.Module, enabled: bool = True) -> int:
    """Switch a model's peft ``lora.Linear`` layers to :class:`FusedLoraLinear`, or back.

    Only the layers' class changes (in place): module names, parameters and
    state dict stay as they are.

    Parameters
    ----------
    model : nn.Module
        A model with peft LoRA layers (e.g. from :func:`fedeeg.models.apply_lora`).
    enabled : bool
        True: peft ``lora.Linear`` -> :class:`FusedLoraLinear` (which then
        follows :data:`LORA_LINEAR` at each call, see :func:`fused_wanted`);
        False: back to peft's class.

    Returns
    -------
    n_switched : int
        Number of layers whose class changed.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    fused = _fused_class()
    src, dst = (LoraLinear, fused) if enabled else (fused, LoraLinear)
    n = 0
    for module in model.modules():
        if type(module) is src:  # exact: other lora.Linear subclasses (quantised layers, ...) keep theirs
            module.__class__ = dst
            n += 1
    return n


__all__ = [
    "LORA_LINEAR_MODES",
    "FORWARD_MODES",
    "LORA_LINEAR",
    "FORWARD",
    "PAD_TO",
    "SPLIT_K_ROWS",
    "check_lora_linear_mode",
    "fused_wanted",
    "rows_t_matmul",
    "FusedLoraLinearFunction",
    "fused_supported",
    "fused_lora_linear",
    "input_kernel_applies",
    "fused_gelu_linear",
    "use_fused_lora_linear",
]
