"""The input side of a fused LoRA Linear in one Triton kernel each way: dropout, ``h = A drop(x)``, ``[x, h, 0]``.

peft computes a LoRA Linear's adapter input as ``h = lora_A(dropout(x))``.
Inside ``torch.compile`` on CUDA that becomes a fused kernel writing the
dropout mask and ``drop(x)`` (both ``(M, K)``, both kept for the backward
pass), a rank-r GEMM reading ``drop(x)`` again, and a copy of ``x`` and
``h`` into the ``[x, h, 0]`` operand of :mod:`fedeeg.models._fused_lora`'s
one-GEMM forward. The backward pass reads ``drop(x)`` for ``dA`` in a skinny
GEMM and the mask for ``dx``. At batch 1024 with LaBraM-Base (78,848 token
rows; ``K`` = 200 for ``qkv`` and ``fc1``, 800 for ``fc2``), these
memory-bound side paths cost more than the base GEMMs.

Here, for ``x`` of shape ``(M, K)``, the adapter's down-projection ``A``
(``(r, K)``), the dropout probability ``p`` and a seed:

* forward (one kernel, one read of ``x``): ``x_cat = [x, h, 0]`` of shape
  ``(M, K + r + pad)``, with ``h = (x * keep / (1 - p)) @ A^T`` accumulated
  in float32 and rounded to ``x``'s dtype; ``keep`` is drawn in the kernel
  (Philox, :func:`triton.language.rand` of the seed and the element's flat
  index ``row * K + col``), so no mask is stored;
* backward (one kernel, one read of ``g`` and ``x``): given ``g``, the
  gradient of ``x_cat`` (``dY @ [W, s B, 0]``, whose columns ``K:K+r`` are
  ``dh``), ``dx = g[:, :K] + (dh @ A) * keep / (1 - p)`` and ``dA = dh^T @
  (x * keep / (1 - p))``, the mask regenerated from the same seed; ``dA`` is
  summed in float32 per program over blocks of rows, then over programs.

Only ``x_cat`` (which holds ``x`` and ``h``), ``A`` and the seed are kept for
the backward pass. The mask has the distribution of ``nn.Dropout``'s (each
element kept with probability ``1 - p``, kept ones scaled by ``1 / (1 - p)``)
but not its random stream: the same seed gives the same mask here, not the
mask peft's module would draw. :func:`keep_mask` returns the mask a seed gives
(for tests).

With ``activation="gelu"`` the kernel reads a pre-activation ``f`` and uses
``gelu(f)`` as ``x`` (the MLP's ``fc2``: one read of ``f`` instead of a GELU
kernel writing ``gelu(f)`` and this one reading it); the backward then
returns the gradient of ``f`` and keeps ``f`` for it.

The ops are registered with :func:`torch.library.triton_op`, so inductor sees
the kernels and launches them from its own generated code (no Python
dispatch per call) and CUDA graphs can capture them.

:mod:`fedeeg.models._fused_lora` uses these kernels for CUDA inputs only where
:data:`ENABLED` is set (``FEDEEG_LORA_INPUT_KERNEL=1``). They are off by
default: they pass their tests in Triton's CPU interpreter
(``tests/test_lora_input.py``) but have not yet run on a GPU, so neither their
correctness there nor their speed is measured.
"""

from __future__ import annotations

import os

import torch

from . import _short_attention

#: Triton imports and torch has ``torch.library.triton_op`` (as decided by :mod:`._short_attention`).
TRITON_AVAILABLE = _short_attention.TRITON_OP
#: Whether the fused LoRA Linear uses these kernels where they apply (CUDA inputs). Off by default
#: (FEDEEG_LORA_INPUT_KERNEL=1 turns them on): they pass their tests in Triton's CPU interpreter but have
#: not yet run on a GPU. Off: peft's dropout and ``lora_A``, then the ``[x, h]`` copy, as before.
ENABLED = os.environ.get("FEDEEG_LORA_INPUT_KERNEL", "0").strip().lower() in ("1", "true", "yes", "on")
#: Run the kernels on CPU tensors too when Triton's interpreter is on (``TRITON_INTERPRET=1``); for tests.
ON_CPU_UNDER_INTERPRETER = False
#: Largest LoRA rank the kernels take (the rank-r terms are unrolled).
MAX_RANK = 64
#: Largest input width (one row is one tile).
MAX_K = 8192
#: Elements of one (rows x K) tile: 2048 with 8 warps is 8 per thread (16-byte bf16 loads), 47-53 registers
#: forward and 76-79 backward (ptxas for sm_90a, K = 200 and 800), so several programs share an SM; 8192 took
#: 172-239 registers, one program per SM.
TILE_ELEMENTS = 2048
#: Rows per program of the backward kernel (its float32 ``dA`` partial sums are per program).
BWD_ROWS_PER_PROGRAM = 256


def _next_pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1)."""
    return _short_attention._next_pow2(n, low=1)


def supported(x: torch.Tensor, rank: int) -> bool:
    """Whether the kernels take this ``(..., K)`` input (as ``(M, K)`` rows) and rank.

    CUDA inputs; CPU inputs only under Triton's interpreter with
    :data:`ON_CPU_UNDER_INTERPRETER` set (tests).
    """
    if not (ENABLED and TRITON_AVAILABLE) or x.ndim < 1 or not x.is_floating_point():
        return False
    if not (x.is_cuda or (ON_CPU_UNDER_INTERPRETER and os.environ.get("TRITON_INTERPRET", "") == "1")):
        return False
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    # the Philox offsets row * K + col are 32-bit
    return 0 < rank <= MAX_RANK and 0 < k <= MAX_K and 0 < m * k < 2**31


if TRITON_AVAILABLE:
    # Module-level @triton.jit functions (defined only where Triton imports) so that
    # torch.library.triton_op finds them in the ops' source (their code enters the compile cache's key).
    import triton
    import triton.language as tl

    @triton.jit
    def lora_input_fwd(
        X, A, SEED, XC,
        M, K, stride_x, stride_xc, p, drop_scale,
        R: tl.constexpr, R_P2: tl.constexpr, TAIL: tl.constexpr, TAIL_P2: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_DROP: tl.constexpr, GELU: tl.constexpr,
    ):
        pid = tl.program_id(0)
        p = tl.cast(p, tl.float32)  # inductor may pass Python floats as fp64: keep the arithmetic fp32
        drop_scale = tl.cast(drop_scale, tl.float32)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_K)
        rm = rows < M
        cm = cols < K
        m2 = rm[:, None] & cm[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m2, other=0.0)  # (BLOCK_M, BLOCK_K)
        if GELU:  # x is the pre-activation f: the operand is gelu(f) (erf form), rounded to f's dtype
            f = x.to(tl.float32)
            x = (0.5 * f * (1.0 + tl.math.erf(f * 0.7071067811865476))).to(x.dtype)
        tl.store(XC + rows[:, None] * stride_xc + cols[None, :], x, mask=m2)
        xf = x.to(tl.float32)
        if HAS_DROP:
            seed = tl.load(SEED)
            keep = tl.rand(seed, rows[:, None] * K + cols[None, :]) >= p
            xf = tl.where(keep, xf * drop_scale, 0.0)
        # x_d rounded as peft's bf16/fp16 dropout output would be (exact for 1 / (1 - p) = 2)
        xf = xf.to(x.dtype).to(tl.float32)
        tail = tl.arange(0, TAIL_P2)
        hv = tl.zeros((BLOCK_M, TAIL_P2), dtype=tl.float32)
        for j in tl.static_range(R):
            a = tl.load(A + j * K + cols, mask=cm, other=0.0).to(tl.float32)  # (BLOCK_K,)
            hj = tl.sum(xf * a[None, :], axis=1)  # (BLOCK_M,)
            hv = tl.where(tail[None, :] == j, hj[:, None], hv)
        tmask = rm[:, None] & (tail[None, :] < TAIL)
        tl.store(XC + rows[:, None] * stride_xc + K + tail[None, :], hv.to(XC.dtype.element_ty), mask=tmask)

    @triton.jit
    def lora_input_bwd(
        G, XC, A, SEED, DX, DA, F,
        M, K, stride_g, stride_xc, stride_dx, stride_f, p, drop_scale, rows_per_program,
        R: tl.constexpr, R_P2: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_DROP: tl.constexpr, GELU: tl.constexpr,
    ):
        pid = tl.program_id(0)
        p = tl.cast(p, tl.float32)  # inductor may pass Python floats as fp64: keep the arithmetic fp32
        drop_scale = tl.cast(drop_scale, tl.float32)
        cols = tl.arange(0, BLOCK_K)
        cm = cols < K
        jr = tl.arange(0, R_P2)
        a_all = tl.load(A + jr[:, None] * K + cols[None, :], mask=(jr[:, None] < R) & cm[None, :], other=0.0)
        a_all = a_all.to(tl.float32)  # (R_P2, BLOCK_K)
        acc = tl.zeros((R_P2, BLOCK_K), dtype=tl.float32)  # this program's dA rows
        if HAS_DROP:
            seed = tl.load(SEED)
        first = pid * rows_per_program
        for start in range(first, first + rows_per_program, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            rm = rows < M
            m2 = rm[:, None] & cm[None, :]
            g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            x = tl.load(XC + rows[:, None] * stride_xc + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_DROP:
                keep = tl.rand(seed, rows[:, None] * K + cols[None, :]) >= p
                x = tl.where(keep, x * drop_scale, 0.0)
            lora_g = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for j in tl.static_range(R):
                dh_j = tl.load(G + rows * stride_g + K + j, mask=rm, other=0.0).to(tl.float32)  # (BLOCK_M,)
                a_j = tl.sum(tl.where(jr[:, None] == j, a_all, 0.0), axis=0)  # (BLOCK_K,)
                lora_g += dh_j[:, None] * a_j[None, :]
                contrib = tl.sum(dh_j[:, None] * x, axis=0)  # (BLOCK_K,)
                acc += tl.where(jr[:, None] == j, contrib[None, :], 0.0)
            if HAS_DROP:
                lora_g = tl.where(keep, lora_g * drop_scale, 0.0)
            dx = g + lora_g
            if GELU:  # through the activation: gelu'(f) = Phi(f) + f phi(f)
                f = tl.load(F + rows[:, None] * stride_f + cols[None, :], mask=m2, other=0.0).to(tl.float32)
                cdf = 0.5 * (1.0 + tl.math.erf(f * 0.7071067811865476))
                pdf = tl.exp(-0.5 * f * f) * 0.3989422804014327
                dx = dx * (cdf + f * pdf)
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=m2)
        out = DA + pid * R * K + jr[:, None] * K + cols[None, :]
        tl.store(out, acc, mask=(jr[:, None] < R) & cm[None, :])

    @triton.jit
    def keep_mask_kernel(SEED, OUT, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        p = tl.cast(p, tl.float32)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_K)
        m2 = (rows < M)[:, None] & (cols < K)[None, :]
        seed = tl.load(SEED)
        keep = tl.rand(seed, rows[:, None] * K + cols[None, :]) >= p
        tl.store(OUT + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=m2)


def _kernels() -> dict:
    """The forward, backward and mask kernels (needs Triton)."""
    if not TRITON_AVAILABLE:
        raise ImportError("fedeeg's LoRA input kernels need Triton (CPU builds of torch do not ship it)")
    return {"fwd": lora_input_fwd, "bwd": lora_input_bwd, "mask": keep_mask_kernel}


def _tile(k: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_K, num_warps)`` for rows of width ``k``."""
    block_k = _next_pow2(k)
    block_m = max(1, min(64, TILE_ELEMENTS // block_k))
    warps = 8 if block_m * block_k >= 2048 else 4
    return block_m, block_k, warps


def _wrap(kernel):
    """``torch.library.wrap_triton(kernel)``, or the kernel itself under Triton's CPU interpreter."""
    return _short_attention.wrap_triton(kernel)


def _cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def _drop_scale(p: float) -> float:
    """What kept elements are multiplied by: ``1 / (1 - p)`` (1 without dropout)."""
    return 1.0 / (1.0 - p) if p > 0 else 1.0


if TRITON_AVAILABLE:  # (registering a triton_op without Triton logs a warning at import)

    @torch.library.triton_op("fedeeg::lora_input_fwd", mutates_args=())
    def _fwd_op(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float, pad: int, gelu: bool) -> torch.Tensor:
        m, k = x.shape
        r = a.shape[0]
        x_cat = torch.empty((m, k + r + pad), dtype=x.dtype, device=x.device)
        block_m, block_k, warps = _tile(k)
        _wrap(_kernels()["fwd"])[(_cdiv(m, block_m),)](
            x, a, seed, x_cat,
            m, k, x.stride(0), x_cat.stride(0), float(p), _drop_scale(p),
            R=r, R_P2=_next_pow2(max(r, 2)), TAIL=r + pad, TAIL_P2=_next_pow2(r + pad),
            BLOCK_M=block_m, BLOCK_K=block_k, HAS_DROP=p > 0, GELU=gelu, num_warps=warps,
        )
        return x_cat

    @torch.library.triton_op("fedeeg::lora_input_bwd", mutates_args=())
    def _bwd_op(
        g: torch.Tensor, x_cat: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float, f: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = x_cat.shape[0]
        r, k = a.shape
        dx = torch.empty((m, k), dtype=x_cat.dtype, device=x_cat.device)
        block_m, block_k, warps = _tile(k)
        rows = max(block_m, (BWD_ROWS_PER_PROGRAM // block_m) * block_m)
        n_prog = _cdiv(m, rows)
        partial = torch.empty((n_prog, r, k), dtype=torch.float32, device=x_cat.device)
        _wrap(_kernels()["bwd"])[(n_prog,)](
            g, x_cat, a, seed, dx, partial, x_cat if f is None else f,
            m, k, g.stride(0), x_cat.stride(0), dx.stride(0), x_cat.stride(0) if f is None else f.stride(0),
            float(p), _drop_scale(p), rows,
            R=r, R_P2=_next_pow2(max(r, 2)), BLOCK_M=block_m, BLOCK_K=block_k, HAS_DROP=p > 0, GELU=f is not None, num_warps=warps,
        )
        return dx, partial.sum(0)

    def _setup_context(ctx, inputs, output) -> None:
        x, a, seed, p, pad, gelu = inputs
        ctx.save_for_backward(output, a, seed, x if gelu else None)
        ctx.p = p
        ctx.a_dtype = a.dtype

    def _backward(ctx, g: torch.Tensor):
        x_cat, a, seed, f = ctx.saved_tensors
        if g.stride(-1) != 1:
            g = g.contiguous()
        dx, da = _bwd_op(g, x_cat, a, seed, ctx.p, f)
        return dx, da.to(ctx.a_dtype), None, None, None, None

    _fwd_op.register_autograd(_backward, setup_context=_setup_context)

else:  # pragma: no cover - CPU installs without Triton: supported() is False, nothing calls these
    _fwd_op = _bwd_op = None


def lora_input(
    x: torch.Tensor, a: torch.Tensor, p: float, pad: int = 0, seed: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """``[x, h, 0]`` with ``h = dropout(x) @ a^T``, in one kernel (gradients by one kernel too).

    Parameters
    ----------
    x : torch.Tensor
        Shape ``(M, K)``, the adapter's input (contiguous rows).
    a : torch.Tensor
        LoRA down-projection ``A``, shape ``(r, K)``, in ``x``'s dtype.
    p : float
        Dropout probability in ``[0, 1)`` (0: no dropout).
    pad : int
        Zero columns after ``h``.
    seed : torch.Tensor | None
        One-element int64 tensor on ``x``'s device seeding the mask; None
        draws one from torch's generator of that device.
    activation : {None, "gelu"}
        ``"gelu"``: ``x`` is a pre-activation ``f`` and the operand is
        ``gelu(f)`` (erf form, as ``F.gelu``), computed in the kernel; the
        gradient returned is that of ``f`` (``f`` is kept for it).

    Returns
    -------
    x_cat : torch.Tensor
        Shape ``(M, K + r + pad)``, ``x``'s dtype.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"Invalid dropout probability p={p!r}: expected 0 <= p < 1.")
    if activation not in (None, "gelu"):
        raise ValueError(f"Invalid activation {activation!r}: allowed values are None and 'gelu'.")
    if x.stride(-1) != 1:
        x = x.contiguous()
    a = a.contiguous()
    if seed is None:
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
    return _fwd_op(x, a, seed, float(p), int(pad), activation == "gelu")


def keep_mask(seed: torch.Tensor, m: int, k: int, p: float) -> torch.Tensor:
    """The keep mask (bool, ``(m, k)``) the kernels draw for ``seed`` and ``p``."""
    out = torch.empty((m, k), dtype=torch.int8, device=seed.device)
    block_m, block_k, warps = _tile(k)
    _kernels()["mask"][(_cdiv(m, block_m),)](seed, out, m, k, float(p), BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps)
    return out.bool()


__all__ = ["ENABLED", "TRITON_AVAILABLE", "supported", "lora_input", "keep_mask"]
