"""Fused attention for short sequences on CUDA (Triton): LaBraM's 77 tokens x 20-wide heads.

LaBraM attends over at most ``1 + n_chans * n_patches`` tokens (77 for 19
channels x 4 s) with heads 20 wide. For such shapes PyTorch's flash kernels
waste most of their work: a 20-wide head is padded, a 77-token sequence fills
part of one 128-row tile, and the backward pass runs a separate pre-processing
kernel and accumulates ``dq`` through a float32 buffer. Measured on an H200
(batch 1024, 10 heads, fwd+bwd): 1.41 ms per layer, about 17 of the 57 ms of a
LaBraM-Base LoRA training step.

Here all keys and values of one (window, head) pair fit in one tile, so one
Triton program computes the whole pair, without atomics and without a
pre-processing kernel. Two implementations, chosen by :data:`IMPL`:

``"tile"``
    The whole ``(n_tokens, n_tokens)`` score matrix in one padded tile
    (128 x 128 for 77 tokens):

    * forward: ``S = q k^T * scale``, row softmax, ``O = P v``; it also writes
      the row log-sum-exp for the backward pass;
    * backward: recomputes ``P`` from the log-sum-exp, then ``dv = P^T do``,
      ``dP = do v^T``, ``dS = P * (dP - rowsum(do * O))``,
      ``dq = dS k * scale``, ``dk = dS^T q * scale``.

    The backward holds ``S``, ``P``, ``dP`` and ``dS`` as 128 x 128 float32
    tiles: heavy register pressure, and 51 of 128 rows are padding.

``"qblock"``
    ``K`` and ``V`` (and in the backward the float32 ``dK``, ``dV``
    accumulators) stay resident while the program loops over blocks of
    :data:`BLOCK_M` query rows:

    * forward, per block: ``S_blk = q_blk k^T``, row softmax (base 2), ``O_blk =
      P_blk v / rowsum``, and the block's log-sum-exp;
    * backward, per block, with keys as rows so that the products over the
      128 key rows come first (``S_blk^T = k q_blk^T``): ``P_blk^T`` from the
      saved log-sum-exp, ``dV += P_blk^T do_blk``, ``dP_blk^T = v do_blk^T``,
      ``delta_blk = rowsum(do_blk * O_blk)``, ``dS_blk^T = P_blk^T *
      (dP_blk^T - delta_blk)``, ``dK += dS_blk^T q_blk``; and ``dq_blk =
      dS_blk k * scale``, complete (all keys are resident) and written at once.

    Only ``BLOCK_M x 128`` score tiles are live, and the padding of the query
    side shrinks to less than one block (77 rows: 80 with blocks of 16, 96
    with 32).

Both write ``O`` directly in the ``(batch, n_tokens, num_heads, head_dim)``
layout the output projection reads (no transpose copy follows), the same
natural-log log-sum-exp, and contiguous ``(batch, num_heads, n_tokens,
head_dim)`` gradients, so a forward of one may be paired with a backward of
the other. Operands of the matrix products are in the inputs' dtype (bf16 or
fp16) and the products accumulate in float32, as in flash attention.

The ops ``fedeeg::short_attention_fwd`` and ``fedeeg::short_attention_bwd`` are
registered with ``torch.library.triton_op`` (torch >= 2.6 with Triton; else
``torch.library.custom_op``), their kernels launched through
``torch.library.wrap_triton``, and the backward with ``register_autograd``, so
they work eagerly and under autograd, and under ``torch.compile`` inductor sees
the Triton kernels and launches them from its generated wrapper code (no
Python op dispatch per call; CUDA graphs capture them) instead of calling an
opaque op. Under Triton's CPU interpreter (``TRITON_INTERPRET=1``) the kernels
are launched directly, eagerly only.

Tuning knobs, read from the environment at import and kept as module
attributes. :func:`short_attention` reads them at every call and passes them
to the ops (the backward uses those of its forward call), so a benchmark may
change them between calls; under ``torch.compile`` dynamo guards on them and a
change recompiles:

``FEDEEG_SHORT_ATTENTION_IMPL`` (:data:`IMPL`)
    ``qblock`` (default since it was measured end to end: H100, LaBraM-Base,
    LoRA ``paper``, batch 1024, bf16, compiled, 18,130 and 18,196 against
    17,582 windows/s with ``tile``; ``simulations/RESULTS.md``) or ``tile``,
    or ``tile,qblock`` (forward, backward).
``FEDEEG_SHORT_ATTENTION_BLOCK_M`` (:data:`BLOCK_M`)
    Query rows per block of ``qblock``, a power of two >= 16: ``32`` for both
    passes, or ``64,16`` for the forward and the backward.
``FEDEEG_SHORT_ATTENTION_WARPS`` (:data:`NUM_WARPS`)
    Warps per program, both implementations: ``4`` or ``8,4``
    (forward, backward); ``0``: the default.
``FEDEEG_SHORT_ATTENTION_STAGES`` (:data:`NUM_STAGES`)
    Triton's ``num_stages`` (software pipelining of the ``qblock`` loop):
    ``2`` or ``3,2``; unset or ``0``: Triton's default.

:func:`short_attention_supported` says when the kernel applies; everything
else (CPU, float32, long sequences, no Triton) uses
``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

#: Whether LaBraM uses this kernel where it applies. Set FEDEEG_SHORT_ATTENTION=0 in the environment
#: (or this to False) to use ``F.scaled_dot_product_attention`` everywhere, e.g. to compare the two.
ENABLED = os.environ.get("FEDEEG_SHORT_ATTENTION", "1").strip().lower() not in ("0", "false", "no", "off")
#: Triton is importable (CUDA builds of torch ship it; CPU builds do not). Decided once, at import,
#: so that the check costs nothing inside a compiled forward.
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
if TRITON_AVAILABLE:
    try:
        import triton
        import triton.language as tl
    except ImportError:  # a broken install: behave as a CPU build
        TRITON_AVAILABLE = False

#: Longest sequence and widest head the one-tile kernel takes.
MAX_TOKENS = 128
MAX_HEAD_DIM = 64
_DTYPES = (torch.bfloat16, torch.float16)

#: The implementations :data:`IMPL` may name.
IMPLS = ("tile", "qblock")
#: Query rows per block of the ``qblock`` forward and backward when :data:`BLOCK_M` is unset.
DEFAULT_BLOCK_M = (64, 32)


def _parse_pair(name: str, value: str | None, *, pow2: bool = False) -> int | tuple[int, int] | None:
    """Parse an environment knob ``N`` or ``F,B`` (forward, backward); unset or empty: None.

    Parameters
    ----------
    name : str
        The variable's name, for the error message.
    value : str or None
        Its value.
    pow2 : bool
        Require powers of two >= 16 (block sizes); else integers >= 0, where 0 stands for the default.

    Returns
    -------
    int, tuple of two ints, or None

    Raises
    ------
    ValueError
        When the value is not one or two integers >= 0 (powers of two >= 16 with ``pow2``).
    """
    if value is None or not value.strip():
        return None
    try:
        parts = [int(x) for x in value.replace(" ", "").split(",")]
    except ValueError:
        parts = []
    ok = len(parts) in (1, 2) and all((p >= 16 and p & (p - 1) == 0) if pow2 else p >= 0 for p in parts)
    if not ok:
        want = "powers of two >= 16" if pow2 else "integers >= 0 (0: the default)"
        raise ValueError(f"{name}={value!r}: expected N or F,B (forward, backward), {want}")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _check_impl(impl: str) -> str:
    impl = impl.strip().lower()
    if impl not in IMPLS:
        raise ValueError(f"FEDEEG_SHORT_ATTENTION_IMPL: {impl!r} is not one of {', '.join(IMPLS)}")
    return impl


def _parse_impl(value: str | None) -> str | tuple[str, str]:
    """Parse ``FEDEEG_SHORT_ATTENTION_IMPL``: ``tile``, ``qblock`` or ``F,B`` (forward, backward); unset: ``qblock``."""
    parts = [_check_impl(x) for x in (value or "qblock").split(",")]
    if len(parts) > 2:
        raise ValueError(f"FEDEEG_SHORT_ATTENTION_IMPL={value!r}: expected one implementation or two (forward, backward)")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


#: Which kernels run: ``"tile"`` (one padded n_tokens x n_tokens tile) or ``"qblock"`` (loop over query
#: blocks), or a (forward, backward) pair of these.
IMPL: str | tuple[str, str] = _parse_impl(os.environ.get("FEDEEG_SHORT_ATTENTION_IMPL"))
#: Query rows per block of ``qblock``: an int for both passes, a (forward, backward) pair, or None
#: (:data:`DEFAULT_BLOCK_M`). Clamped to the padded sequence length.
BLOCK_M: int | tuple[int, int] | None = _parse_pair(
    "FEDEEG_SHORT_ATTENTION_BLOCK_M", os.environ.get("FEDEEG_SHORT_ATTENTION_BLOCK_M"), pow2=True
)
#: Warps per program: an int for both passes, a (forward, backward) pair, or None (tile: 8 for
#: 128-token tiles, else 4; qblock: 4); for tuning.
NUM_WARPS: int | tuple[int, int] | None = _parse_pair(
    "FEDEEG_SHORT_ATTENTION_WARPS", os.environ.get("FEDEEG_SHORT_ATTENTION_WARPS")
)
#: Triton ``num_stages``: an int, a (forward, backward) pair, or None (Triton's default).
NUM_STAGES: int | tuple[int, int] | None = _parse_pair(
    "FEDEEG_SHORT_ATTENTION_STAGES", os.environ.get("FEDEEG_SHORT_ATTENTION_STAGES")
)


def short_attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`short_attention` takes these ``(batch, num_heads, n_tokens, head_dim)`` tensors."""
    return (
        ENABLED
        and TRITON_AVAILABLE
        and q.is_cuda
        and q.dtype in _DTYPES
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and q.ndim == 4
        and q.shape == k.shape == v.shape
        and 0 < q.shape[2] <= MAX_TOKENS
        and 0 < q.shape[3] <= MAX_HEAD_DIM
    )


def _next_pow2(n: int, low: int = 16) -> int:
    p = low
    while p < n:
        p *= 2
    return p


if TRITON_AVAILABLE:
    # The kernels are module-level @triton.jit functions (defined only where Triton imports) so that
    # torch.library.triton_op finds them in the ops' source: their code then enters the key of
    # AOTAutograd's cache, and inductor compiles and launches them from its own wrapper.


    @triton.jit
    def tile_fwd(
        Q, K, V, O, LSE,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
        H, T, scale,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as fp64: keep the arithmetic fp32
        b = pid // H
        h = pid % H
        t = tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        tm = t < T
        m2 = tm[:, None] & (d < D)[None, :]
        q = tl.load(Q + b * sqb + h * sqh + t[:, None] * sqt + d[None, :], mask=m2, other=0.0)
        k = tl.load(K + b * skb + h * skh + t[:, None] * skt + d[None, :], mask=m2, other=0.0)
        v = tl.load(V + b * svb + h * svh + t[:, None] * svt + d[None, :], mask=m2, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_T, BLOCK_T), float32
        s = tl.where(tm[None, :], s, float("-inf"))
        mx = tl.max(s, 1)
        p = tl.exp(s - mx[:, None])
        denom = tl.sum(p, 1)
        o = tl.dot((p / denom[:, None]).to(v.dtype), v)  # (BLOCK_T, BLOCK_D)
        tl.store(O + b * sob + h * soh + t[:, None] * sot + d[None, :], o.to(O.dtype.element_ty), mask=m2)
        tl.store(LSE + pid * T + t, mx + tl.log(denom), mask=tm)

    @triton.jit
    def tile_bwd(
        Q, K, V, O, DO, LSE, DQ, DK, DV,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdb, sdh, sdt,
        H, T, scale,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as fp64: keep the arithmetic fp32
        b = pid // H
        h = pid % H
        t = tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        tm = t < T
        m2 = tm[:, None] & (d < D)[None, :]
        q = tl.load(Q + b * sqb + h * sqh + t[:, None] * sqt + d[None, :], mask=m2, other=0.0)
        k = tl.load(K + b * skb + h * skh + t[:, None] * skt + d[None, :], mask=m2, other=0.0)
        v = tl.load(V + b * svb + h * svh + t[:, None] * svt + d[None, :], mask=m2, other=0.0)
        o = tl.load(O + b * sob + h * soh + t[:, None] * sot + d[None, :], mask=m2, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + t[:, None] * sdt + d[None, :], mask=m2, other=0.0)
        lse = tl.load(LSE + pid * T + t, mask=tm, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_T, BLOCK_T), float32
        p = tl.exp(s - lse[:, None])
        p = tl.where(tm[:, None] & tm[None, :], p, 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do)  # (BLOCK_T, BLOCK_D)
        dp = tl.dot(do, tl.trans(v))  # (BLOCK_T, BLOCK_T)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq = tl.dot(ds, k) * scale
        dk = tl.dot(tl.trans(ds), q) * scale
        out = pid * T * D + t[:, None] * D + d[None, :]  # contiguous (B, H, T, D)
        tl.store(DQ + out, dq.to(DQ.dtype.element_ty), mask=m2)
        tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=m2)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=m2)

    @triton.jit
    def qblock_fwd(
        Q, K, V, O, LSE,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
        H, T, scale,
        BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as fp64: keep the arithmetic fp32
        b = pid // H
        h = pid % H
        t = tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        tm = t < T
        kv_mask = tm[:, None] & dm[None, :]
        k = tl.load(K + b * skb + h * skh + t[:, None] * skt + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + t[:, None] * svt + d[None, :], mask=kv_mask, other=0.0)
        key_bias = tl.where(tm, 0.0, float("-inf"))  # padded keys drop out of the softmax
        qk_scale = scale * 1.4426950408889634  # log2(e): scores in base-2 units, exp2 instead of exp
        q_ptr = Q + b * sqb + h * sqh
        o_ptr = O + b * sob + h * soh
        lse_ptr = LSE + pid * T
        for start in range(0, T, BLOCK_M):
            m = start + tl.arange(0, BLOCK_M)
            mm = m < T
            m2 = mm[:, None] & dm[None, :]
            q = tl.load(q_ptr + m[:, None] * sqt + d[None, :], mask=m2, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale + key_bias[None, :]  # (BLOCK_M, BLOCK_T), float32
            mx = tl.max(s, 1)
            p = tl.exp2(s - mx[:, None])
            denom = tl.sum(p, 1)
            o = tl.dot(p.to(v.dtype), v) / denom[:, None]  # (BLOCK_M, BLOCK_D)
            tl.store(o_ptr + m[:, None] * sot + d[None, :], o.to(O.dtype.element_ty), mask=m2)
            tl.store(lse_ptr + m, (mx + tl.log2(denom)) * 0.6931471805599453, mask=mm)  # ln(2): natural-log lse, as tile's

    @triton.jit
    def qblock_bwd(
        Q, K, V, O, DO, LSE, DQ, DK, DV,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdb, sdh, sdt,
        H, T, scale,
        BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as fp64: keep the arithmetic fp32
        b = pid // H
        h = pid % H
        t = tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        tm = t < T
        kv_mask = tm[:, None] & dm[None, :]
        k = tl.load(K + b * skb + h * skh + t[:, None] * skt + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + t[:, None] * svt + d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        qk_scale = scale * 1.4426950408889634  # log2(e)
        q_ptr = Q + b * sqb + h * sqh
        o_ptr = O + b * sob + h * soh
        do_ptr = DO + b * sdb + h * sdh
        lse_ptr = LSE + pid * T
        out = pid * T * D  # contiguous (B, H, T, D) gradients
        for start in range(0, T, BLOCK_M):
            # Padded query rows (m >= T) load q = do = o = 0 and lse = 0: P^T = 1 there, but
            # do = 0 and dS^T = 0, so they add nothing to dV or dK; their dq is not stored.
            m = start + tl.arange(0, BLOCK_M)
            mm = m < T
            m2 = mm[:, None] & dm[None, :]
            q = tl.load(q_ptr + m[:, None] * sqt + d[None, :], mask=m2, other=0.0)
            o = tl.load(o_ptr + m[:, None] * sot + d[None, :], mask=m2, other=0.0)
            do = tl.load(do_ptr + m[:, None] * sdt + d[None, :], mask=m2, other=0.0)
            lse = tl.load(lse_ptr + m, mask=mm, other=0.0) * 1.4426950408889634
            # Keys as rows: P^T and dS^T are the left operands of dV and dK's products as they come.
            st = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_T, BLOCK_M), float32, base-2 units
            pt = tl.exp2(st - lse[None, :])
            pt = tl.where(tm[:, None], pt, 0.0)  # padded keys (their dk, dv rows are not stored either)
            dv = tl.dot(pt.to(do.dtype), do, dv)
            dpt = tl.dot(v, tl.trans(do))  # (BLOCK_T, BLOCK_M)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,)
            dst = (pt * (dpt - delta[None, :])).to(q.dtype)
            dk = tl.dot(dst, q, dk)
            dq = tl.dot(tl.trans(dst), k) * scale  # (BLOCK_M, BLOCK_D): every key is here, so complete
            tl.store(DQ + out + m[:, None] * D + d[None, :], dq.to(DQ.dtype.element_ty), mask=m2)
        rows = out + t[:, None] * D + d[None, :]
        tl.store(DK + rows, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + rows, dv.to(DV.dtype.element_ty), mask=kv_mask)


def _kernels() -> dict:
    """The Triton kernels by implementation and pass (needs Triton).

    Returns
    -------
    dict
        ``{(impl, "fwd" | "bwd"): kernel}`` for every impl of :data:`IMPLS`: ``@triton.jit``
        functions (``InterpretedFunction`` objects under ``TRITON_INTERPRET=1``), compiled by Triton
        on their first launch.

    Raises
    ------
    ImportError
        Where Triton is not importable.
    """
    if not TRITON_AVAILABLE:
        raise ImportError("fedeeg's short-sequence attention kernels need Triton (CPU builds of torch do not ship it)")
    return {
        ("tile", "fwd"): tile_fwd,
        ("tile", "bwd"): tile_bwd,
        ("qblock", "fwd"): qblock_fwd,
        ("qblock", "bwd"): qblock_bwd,
    }


#: Whether the ops are ``torch.library.triton_op`` (torch >= 2.6 with Triton), whose kernels inductor
#: sees and launches from its own wrapper code (and captures in CUDA graphs), or opaque
#: ``torch.library.custom_op`` (older torch, or no Triton: then the ops never run).
TRITON_OP = TRITON_AVAILABLE and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
#: Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import) made the kernels ``InterpretedFunction``
#: objects, which run eagerly on CPU tensors but cannot be traced (and which torch < 2.13's
#: ``wrap_triton`` refuses).
INTERPRETED = TRITON_AVAILABLE and not isinstance(tile_fwd, triton.runtime.jit.JITFunction)

if TRITON_OP and not INTERPRETED:
    from torch.library import wrap_triton
else:

    def wrap_triton(kernel):
        """The kernel itself: launched directly (custom_op, or the interpreter's eager launches)."""
        return kernel


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _pick(value, which: str):
    """The forward's or backward's half of a knob that is an int, a (forward, backward) pair or None."""
    if isinstance(value, (tuple, list)):
        return value[0] if which == "fwd" else value[1]
    return value


def _launch_params(
    T: int,
    D: int,
    which: str = "fwd",
    impl: str | None = None,
    block_m: int | tuple[int, int] | None = None,
    num_warps: int | tuple[int, int] | None = None,
    num_stages: int | tuple[int, int] | None = None,
) -> tuple[str, dict]:
    """The implementation and the kernel's launch parameters for one pass.

    Parameters
    ----------
    T, D : int
        Sequence length and head width.
    which : {"fwd", "bwd"}
        The pass.
    impl, block_m, num_warps, num_stages : optional
        Override :data:`IMPL`, :data:`BLOCK_M`, :data:`NUM_WARPS` and :data:`NUM_STAGES` (same forms:
        one value for both passes or a (forward, backward) pair).

    Returns
    -------
    impl : str
        ``"tile"`` or ``"qblock"``.
    params : dict
        Keyword arguments of the kernel launch (constexprs, ``num_warps``, maybe ``num_stages``).
    """
    impl = _check_impl(_pick(impl if impl is not None else IMPL, which))
    block_t = _next_pow2(T)
    params = {"BLOCK_T": block_t, "BLOCK_D": _next_pow2(D), "D": D}
    warps = _pick(num_warps if num_warps is not None else NUM_WARPS, which)
    if impl == "tile":
        params["num_warps"] = warps or (8 if block_t >= 128 else 4)
    else:
        bm = _pick(block_m if block_m is not None else BLOCK_M, which)
        bm = bm or _pick(DEFAULT_BLOCK_M, which)
        params["BLOCK_M"] = min(_next_pow2(bm), block_t)
        params["num_warps"] = warps or 4
    stages = _pick(num_stages if num_stages is not None else NUM_STAGES, which)
    if stages:
        params["num_stages"] = stages
    return impl, params


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **config) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch a forward kernel (no device or dtype checks: the interpreter runs it on CPU tensors).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``(batch, num_heads, n_tokens, head_dim)``, any strides.
    scale : float
        Multiplies ``q k^T``.
    **config
        ``impl``, ``block_m``, ``num_warps``, ``num_stages``: see :func:`_launch_params`.

    Returns
    -------
    o : torch.Tensor
        ``(batch, n_tokens, num_heads, head_dim)``, the inputs' dtype.
    lse : torch.Tensor
        ``(batch, num_heads, n_tokens)`` float32, natural-log log-sum-exp of the scaled scores.
    """
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    B, H, T, D = q.shape
    o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    impl, params = _launch_params(T, D, "fwd", **config)
    kernel = _kernels()[impl, "fwd"]
    wrap_triton(kernel)[(B * H,)](
        q, k, v, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(2), o.stride(1),
        H, T, scale, **params,
    )
    return o, lse


def _backward_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
    scale: float, **config,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch a backward kernel (no device or dtype checks: the interpreter runs it on CPU tensors).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``(batch, num_heads, n_tokens, head_dim)``, any strides.
    o, do : torch.Tensor
        The output and its gradient, ``(batch, n_tokens, num_heads, head_dim)``.
    lse : torch.Tensor
        The forward's contiguous ``(batch, num_heads, n_tokens)`` float32 log-sum-exp.
    scale : float
        The forward's scale.
    **config
        ``impl``, ``block_m``, ``num_warps``, ``num_stages``: see :func:`_launch_params`.

    Returns
    -------
    dq, dk, dv : torch.Tensor
        Contiguous ``(batch, num_heads, n_tokens, head_dim)``, the inputs' dtype.
    """
    q, k, v, o, do = (_unit_stride(x) for x in (q, k, v, o, do))
    B, H, T, D = q.shape
    dq, dk, dv = (torch.empty((B, H, T, D), dtype=q.dtype, device=q.device) for _ in range(3))
    impl, params = _launch_params(T, D, "bwd", **config)
    kernel = _kernels()[impl, "bwd"]
    wrap_triton(kernel)[(B * H,)](
        q, k, v, o, do, lse, dq, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(2), o.stride(1),
        do.stride(0), do.stride(2), do.stride(1),
        H, T, scale, **params,
    )
    return dq, dk, dv


def _int_pair(value) -> list[int]:
    """A knob (int, (forward, backward) pair or None) as two ints, 0 for None."""
    fwd, bwd = (value[0], value[1]) if isinstance(value, (tuple, list)) else (value, value)
    return [int(fwd or 0), int(bwd or 0)]


def _knobs() -> tuple[str, list[int], list[int], list[int]]:
    """The module's knobs :data:`IMPL`, :data:`BLOCK_M`, :data:`NUM_WARPS`, :data:`NUM_STAGES`, as the ops take them.

    :func:`short_attention` reads them at every call and passes them to the ops, so that under
    ``torch.compile`` dynamo guards on them (a change recompiles) and they enter the key of
    AOTAutograd's cache, instead of being frozen into the graph when the op is traced.

    Returns
    -------
    impl : str
        ``"F,B"``: the forward's and the backward's implementation.
    block_m, num_warps, num_stages : list of two ints
        (forward, backward); 0 stands for the default.
    """
    impl = IMPL if isinstance(IMPL, (tuple, list)) else (IMPL, IMPL)
    return f"{impl[0]},{impl[1]}", _int_pair(BLOCK_M), _int_pair(NUM_WARPS), _int_pair(NUM_STAGES)


def _config(impl: str, block_m: Sequence[int], num_warps: Sequence[int], num_stages: Sequence[int]) -> dict:
    """The ops' knob arguments (see :func:`_knobs`) as :func:`_launch_params`'s keyword arguments."""
    return {
        "impl": _parse_impl(impl),
        "block_m": (block_m[0], block_m[1]),
        "num_warps": (num_warps[0], num_warps[1]),
        "num_stages": (num_stages[0], num_stages[1]),
    }


_register_op = torch.library.triton_op if TRITON_OP else torch.library.custom_op


@_register_op("fedeeg::short_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    impl: str, block_m: Sequence[int], num_warps: Sequence[int], num_stages: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, scale, **_config(impl, block_m, num_warps, num_stages))


# triton_op registers the function itself as the fake implementation (wrap_triton launches nothing on
# fake tensors); these shape-only ones replace it: cheaper to trace, and they need no Triton (custom_op,
# or the interpreter's InterpretedFunction, which would run on fake tensors).
@_fwd_op.register_fake
def _(q, k, v, scale, impl, block_m, num_warps, num_stages):
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)), q.new_empty((B, H, T), dtype=torch.float32)


@_register_op("fedeeg::short_attention_bwd", mutates_args=())
def _bwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor, scale: float,
    impl: str, block_m: Sequence[int], num_warps: Sequence[int], num_stages: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_grads(q, k, v, o, lse, do, scale, **_config(impl, block_m, num_warps, num_stages))


@_bwd_op.register_fake
def _(q, k, v, o, lse, do, scale, impl, block_m, num_warps, num_stages):
    B, H, T, D = q.shape
    return tuple(q.new_empty((B, H, T, D)) for _ in range(3))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, *knobs = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.knobs = knobs  # the backward runs with the knobs of its forward call


def _backward(ctx, do: torch.Tensor, dlse: torch.Tensor | None):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(q, k, v, o, lse, do, ctx.scale, *ctx.knobs)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of short sequences in one fused kernel per (window, head).

    Parameters
    ----------
    q, k, v : torch.Tensor
        Shape ``(batch, num_heads, n_tokens, head_dim)``, bf16 or fp16, on
        CUDA, ``n_tokens <= 128``, ``head_dim <= 64`` (see
        :func:`short_attention_supported`); any strides with a unit last stride.
    scale : float
        Multiplies ``q k^T`` before the softmax.

    Returns
    -------
    out : torch.Tensor
        Shape ``(batch, n_tokens, num_heads, head_dim)`` (note: tokens before
        heads), equal to ``scaled_dot_product_attention(q, k, v, scale=scale)
        .transpose(1, 2)``. The kernels are those of :data:`IMPL`.
    """
    return _fwd_op(q, k, v, float(scale), *_knobs())[0]
