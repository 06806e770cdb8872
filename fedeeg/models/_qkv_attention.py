"""LaBraM's attention from the ``qkv`` projection on, q/k LayerNorms included, in one Triton kernel each way.

LaBraM normalises each head's queries and keys (``q_norm``, ``k_norm``:
LayerNorms over the 20-wide head) between the ``qkv`` projection and the
softmax attention. Compiled by inductor around :mod:`._short_attention`'s
kernel, that takes, per block and training step: kernels computing the norms
and writing contiguous ``q``, ``k`` for the attention kernel, and in the
backward pass LayerNorm-backward kernels and a stack-and-permute copy that
turn ``dq``, ``dk``, ``dv`` back into the ``qkv`` layout. Profiled on an H100
(LaBraM-Base, LoRA, batch 1024), these cost about 0.6 ms per block against
0.6 ms for the attention kernels themselves.

Here one program per (window, head), as :mod:`._short_attention`'s
``qblock`` kernels, reads that head's raw ``q``, ``k``, ``v`` straight from
the ``(batch, n_tokens, 3, num_heads, head_dim)`` projection output:

* forward: ``k = LN_k(k_raw)`` for all keys and ``q = LN_q(q_raw)`` per
  block of query rows, in float32, rounded to the input dtype (as
  ``q_norm(q).type_as(v)`` under autocast), then the attention of
  ``_short_attention`` (base-2 softmax, float32 accumulation); writes ``O``
  in ``(batch, n_tokens, num_heads, head_dim)`` and the log-sum-exp;
* backward: recomputes the normalised ``q``, ``k`` and the softmax from the
  log-sum-exp, forms ``dq``, ``dk``, ``dv`` as ``qblock``, takes ``dq`` and
  ``dk`` back through the LayerNorms in float32, and writes ``d(qkv)`` in
  the projection's layout; the LayerNorm weights' and biases' gradients are
  summed per program in float32 (then over programs), so full fine-tuning
  gets them too.

Registered with :func:`torch.library.triton_op` (inductor launches the
kernels from its generated code; CUDA graphs capture them). Used by
:class:`fedeeg.models.labram.Attention` where :func:`supported` holds and
:data:`ENABLED` is set (``FEDEEG_QKV_ATTENTION=1``; off by default until
measured on a GPU: these kernels have run only in Triton's CPU interpreter);
otherwise the separate norms and :mod:`._short_attention`'s kernel run.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from . import _short_attention as sa

#: Whether LaBraM's attention uses these kernels where they apply. Off by default (FEDEEG_QKV_ATTENTION=1
#: turns them on): they pass their tests in Triton's CPU interpreter but have not yet run on a GPU.
ENABLED = os.environ.get("FEDEEG_QKV_ATTENTION", "0").strip().lower() in ("1", "true", "yes", "on")
#: Run on CPU tensors too when Triton's interpreter is on (``TRITON_INTERPRET=1``); for tests.
ON_CPU_UNDER_INTERPRETER = False


def supported(qkv: torch.Tensor, num_heads: int, q_norm: nn.Module, k_norm: nn.Module) -> bool:
    """Whether :func:`qkv_attention` takes this ``(batch, n_tokens, 3 * embed_dim)`` projection output and these norms.

    CUDA (or Triton's interpreter with :data:`ON_CPU_UNDER_INTERPRETER`),
    bf16/fp16, at most :data:`._short_attention.MAX_TOKENS` tokens and
    :data:`._short_attention.MAX_HEAD_DIM`-wide heads, plain affine
    LayerNorms over one head.
    """
    if not (ENABLED and sa.ENABLED and sa.TRITON_OP) or qkv.ndim != 3 or qkv.dtype not in sa._DTYPES:
        return False
    if not (qkv.is_cuda or (ON_CPU_UNDER_INTERPRETER and os.environ.get("TRITON_INTERPRET", "") == "1")):
        return False
    batch, n_tokens, width = qkv.shape
    if width % (3 * num_heads):
        return False
    head_dim = width // (3 * num_heads)
    if not (0 < n_tokens <= sa.MAX_TOKENS and 0 < head_dim <= sa.MAX_HEAD_DIM):
        return False
    for norm in (q_norm, k_norm):
        if type(norm) is not nn.LayerNorm or tuple(norm.normalized_shape) != (head_dim,):
            return False
        if norm.weight is None or norm.bias is None or norm.weight.device != qkv.device:
            return False
    return q_norm.eps == k_norm.eps


if sa.TRITON_AVAILABLE:
    # Module-level @triton.jit functions (defined only where Triton imports) so that
    # torch.library.triton_op finds them in the ops' source (their code enters the compile cache's key).
    import triton
    import triton.language as tl

    @triton.jit
    def _head_norm(raw, w, b, mask, dm, D: tl.constexpr, eps):
        """LayerNorm of float32 rows over the head (columns >= D are 0): (output, xhat, rstd); masked rows 0."""
        mean = tl.sum(raw, 1) / D
        xc = tl.where(dm[None, :], raw - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
        xhat = xc * rstd[:, None]
        return tl.where(mask, xhat * w[None, :] + b[None, :], 0.0), xhat, rstd

    @triton.jit
    def _head_norm_bwd(dy, xhat, rstd, w, D: tl.constexpr):
        """Gradient of a LayerNorm's input rows from that of its output rows (float32)."""
        dxhat = dy * w[None, :]
        c1 = tl.sum(dxhat * xhat, 1) / D
        c2 = tl.sum(dxhat, 1) / D
        return (dxhat - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]

    @triton.jit
    def _program_setup(QKV, WQ, BQ, WK, BK, s_b, s_t, H, T, eps,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
        """One (window, head): its indices and masks, q's pointer base, the norms' parameters, normalised k, v."""
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        t = tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        tm = t < T
        kv_mask = tm[:, None] & dm[None, :]
        hd = H * D
        base = QKV + b * s_b + h * D  # q of token t at base + t * s_t, k at + hd, v at + 2 * hd
        wq = tl.load(WQ + d, mask=dm, other=0.0).to(tl.float32)
        bq = tl.load(BQ + d, mask=dm, other=0.0).to(tl.float32)
        wk = tl.load(WK + d, mask=dm, other=0.0).to(tl.float32)
        bk = tl.load(BK + d, mask=dm, other=0.0).to(tl.float32)
        k_raw = tl.load(base + hd + t[:, None] * s_t + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(base + 2 * hd + t[:, None] * s_t + d[None, :], mask=kv_mask, other=0.0)
        k, _, _ = _head_norm(k_raw.to(tl.float32), wk, bk, kv_mask, dm, D, eps)
        # k as k_norm(k).type_as(v)
        return pid, b, h, t, d, dm, tm, kv_mask, hd, base, wq, bq, wk, bk, k.to(v.dtype), v

    @triton.jit
    def qkv_fwd(
        QKV, WQ, BQ, WK, BK, O, LSE,
        s_b, s_t, so_b, so_t,
        H, T, scale, eps,
        BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
    ):
        scale = tl.cast(scale, tl.float32)  # inductor may pass Python floats as fp64: keep the arithmetic fp32
        eps = tl.cast(eps, tl.float32)
        pid, b, h, t, d, dm, tm, kv_mask, hd, base, wq, bq, wk, bk, k, v = _program_setup(
            QKV, WQ, BQ, WK, BK, s_b, s_t, H, T, eps, BLOCK_T, BLOCK_D, D)
        key_bias = tl.where(tm, 0.0, float("-inf"))
        qk_scale = scale * 1.4426950408889634  # log2(e)
        o_ptr = O + b * so_b + h * D
        lse_ptr = LSE + pid * T
        for start in range(0, T, BLOCK_M):
            m = start + tl.arange(0, BLOCK_M)
            mm = m < T
            m2 = mm[:, None] & dm[None, :]
            q_raw = tl.load(base + m[:, None] * s_t + d[None, :], mask=m2, other=0.0).to(tl.float32)
            q, xhat_q, rstd_q = _head_norm(q_raw, wq, bq, m2, dm, D, eps)
            q = q.to(v.dtype)
            s = tl.dot(q, tl.trans(k)) * qk_scale + key_bias[None, :]  # (BLOCK_M, BLOCK_T), float32
            mx = tl.max(s, 1)
            p = tl.exp2(s - mx[:, None])
            denom = tl.sum(p, 1)
            o = tl.dot(p.to(v.dtype), v) / denom[:, None]  # (BLOCK_M, BLOCK_D)
            tl.store(o_ptr + m[:, None] * so_t + d[None, :], o.to(O.dtype.element_ty), mask=m2)
            tl.store(lse_ptr + m, (mx + tl.log2(denom)) * 0.6931471805599453, mask=mm)

    @triton.jit
    def qkv_bwd(
        QKV, WQ, BQ, WK, BK, O, DO, LSE, DQKV, DW,
        s_b, s_t, so_b, so_t, sd_b, sd_t,
        H, T, scale, eps,
        BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
    ):
        scale = tl.cast(scale, tl.float32)  # inductor may pass Python floats as fp64: keep the arithmetic fp32
        eps = tl.cast(eps, tl.float32)
        pid, b, h, t, d, dm, tm, kv_mask, hd, base, wq, bq, wk, bk, k, v = _program_setup(
            QKV, WQ, BQ, WK, BK, s_b, s_t, H, T, eps, BLOCK_T, BLOCK_D, D)
        dk = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        dwq = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dbq = tl.zeros((BLOCK_D,), dtype=tl.float32)
        qk_scale = scale * 1.4426950408889634
        o_ptr = O + b * so_b + h * D
        do_ptr = DO + b * sd_b + h * D
        dbase = DQKV + b * s_b + h * D  # d(qkv), same layout as qkv
        lse_ptr = LSE + pid * T
        for start in range(0, T, BLOCK_M):
            m = start + tl.arange(0, BLOCK_M)
            mm = m < T
            m2 = mm[:, None] & dm[None, :]
            q_raw = tl.load(base + m[:, None] * s_t + d[None, :], mask=m2, other=0.0).to(tl.float32)
            q, xhat_q, rstd_q = _head_norm(q_raw, wq, bq, m2, dm, D, eps)
            q = q.to(v.dtype)
            o = tl.load(o_ptr + m[:, None] * so_t + d[None, :], mask=m2, other=0.0)
            do = tl.load(do_ptr + m[:, None] * sd_t + d[None, :], mask=m2, other=0.0)
            lse = tl.load(lse_ptr + m, mask=mm, other=0.0) * 1.4426950408889634
            st = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_T, BLOCK_M), float32, base 2
            pt = tl.exp2(st - lse[None, :])
            pt = tl.where(tm[:, None] & mm[None, :], pt, 0.0)
            dv = tl.dot(pt.to(do.dtype), do, dv)
            dpt = tl.dot(v, tl.trans(do))  # (BLOCK_T, BLOCK_M)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,)
            dst = (pt * (dpt - delta[None, :])).to(q.dtype)
            dk = tl.dot(dst, q, dk)
            dqn = tl.dot(tl.trans(dst), k) * scale  # (BLOCK_M, BLOCK_D): gradient of the normalised q
            dwq += tl.sum(dqn * xhat_q, 0)
            dbq += tl.sum(dqn, 0)
            dq_raw = _head_norm_bwd(dqn, xhat_q, rstd_q, wq, D)
            tl.store(dbase + m[:, None] * s_t + d[None, :], dq_raw.to(DQKV.dtype.element_ty), mask=m2)
        dkn = dk * scale
        # k's LayerNorm again (reloaded: keeping its float32 statistics live through the loop spilled registers)
        k_raw = tl.load(base + hd + t[:, None] * s_t + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        _, xhat_k, rstd_k = _head_norm(k_raw, wk, bk, kv_mask, dm, D, eps)
        dk_raw = _head_norm_bwd(dkn, xhat_k, rstd_k, wk, D)
        tl.store(dbase + hd + t[:, None] * s_t + d[None, :], dk_raw.to(DQKV.dtype.element_ty), mask=kv_mask)
        tl.store(dbase + 2 * hd + t[:, None] * s_t + d[None, :], dv.to(DQKV.dtype.element_ty), mask=kv_mask)
        dw_ptr = DW + pid * 4 * D + d  # this program's (dwq, dbq, dwk, dbk) partial sums
        tl.store(dw_ptr, dwq, mask=dm)
        tl.store(dw_ptr + D, dbq, mask=dm)
        tl.store(dw_ptr + 2 * D, tl.sum(dkn * xhat_k, 0), mask=dm)
        tl.store(dw_ptr + 3 * D, tl.sum(dkn, 0), mask=dm)


def _kernels() -> dict:
    """The forward and backward kernels (needs Triton)."""
    if not sa.TRITON_AVAILABLE:
        raise ImportError("fedeeg's qkv attention kernels need Triton (CPU builds of torch do not ship it)")
    return {"fwd": qkv_fwd, "bwd": qkv_bwd}


def _wrap(kernel):
    """``torch.library.wrap_triton(kernel)``, or the kernel itself under Triton's CPU interpreter."""
    return sa.wrap_triton(kernel)


#: Query rows per block and warps per program, (forward, backward), where ``_short_attention``'s knobs
#: (FEDEEG_SHORT_ATTENTION_BLOCK_M, FEDEEG_SHORT_ATTENTION_WARPS) are unset. Chosen from ptxas's resource report
#: for sm_90a (77 tokens, 20-wide heads), not from timings: forward 171 registers, backward 218 and no spills
#: (the backward with 4 warps and 32-row blocks, the qblock default, spilled 308 bytes).
DEFAULT_BLOCK_M = (64, 16)
DEFAULT_WARPS = (8, 8)


def _params(T: int, D: int, which: str) -> dict:
    """Launch parameters (constexprs, warps, stages), as ``_short_attention``'s ``qblock`` kernels take them.

    Read when the op runs (under ``torch.compile``: when it is traced).
    """
    _, params = sa._launch_params(T, D, which, impl="qblock", block_m=sa.BLOCK_M or DEFAULT_BLOCK_M,
                                  num_warps=sa.NUM_WARPS or DEFAULT_WARPS)
    return params


if sa.TRITON_OP:  # torch >= 2.6 with Triton (registering a triton_op without Triton logs a warning)

    @torch.library.triton_op("fedeeg::qkv_attention_fwd", mutates_args=())
    def _fwd_op(
        qkv: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor, wk: torch.Tensor, bk: torch.Tensor, eps: float, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _, H, D = qkv.shape
        o = torch.empty((B, T, H, D), dtype=qkv.dtype, device=qkv.device)
        lse = torch.empty((B, H, T), dtype=torch.float32, device=qkv.device)
        _wrap(_kernels()["fwd"])[(B * H,)](
            qkv, wq, bq, wk, bk, o, lse,
            qkv.stride(0), qkv.stride(1), o.stride(0), o.stride(1),
            H, T, float(scale), float(eps), **_params(T, D, "fwd"),
        )
        return o, lse

    @torch.library.triton_op("fedeeg::qkv_attention_bwd", mutates_args=())
    def _bwd_op(
        qkv: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor, wk: torch.Tensor, bk: torch.Tensor,
        o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor, eps: float, scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _, H, D = qkv.shape
        dqkv = torch.empty_like(qkv)
        dw = torch.empty((B * H, 4, D), dtype=torch.float32, device=qkv.device)
        _wrap(_kernels()["bwd"])[(B * H,)](
            qkv, wq, bq, wk, bk, o, do, lse, dqkv, dw,
            qkv.stride(0), qkv.stride(1), o.stride(0), o.stride(1), do.stride(0), do.stride(1),
            H, T, float(scale), float(eps), **_params(T, D, "bwd"),
        )
        return dqkv, dw.sum(0)

    def _setup_context(ctx, inputs, output) -> None:
        qkv, wq, bq, wk, bk, eps, scale = inputs
        o, lse = output
        ctx.save_for_backward(qkv, wq, bq, wk, bk, o, lse)
        ctx.eps, ctx.scale = eps, scale

    def _backward(ctx, do: torch.Tensor, dlse: torch.Tensor | None):
        qkv, wq, bq, wk, bk, o, lse = ctx.saved_tensors
        if do.stride(-1) != 1 or not do.is_contiguous():
            do = do.contiguous()
        dqkv, dw = _bwd_op(qkv, wq, bq, wk, bk, o, lse, do, ctx.eps, ctx.scale)
        return dqkv, dw[0].to(wq.dtype), dw[1].to(bq.dtype), dw[2].to(wk.dtype), dw[3].to(bk.dtype), None, None

    _fwd_op.register_autograd(_backward, setup_context=_setup_context)

else:  # pragma: no cover - CPU installs without Triton: supported() is False, nothing calls these
    _fwd_op = _bwd_op = None


def qkv_attention(qkv: torch.Tensor, num_heads: int, q_norm: nn.LayerNorm, k_norm: nn.LayerNorm, scale: float) -> torch.Tensor:
    """Attention of LaBraM's heads from the ``qkv`` projection's output (check :func:`supported` first).

    Parameters
    ----------
    qkv : torch.Tensor
        Shape ``(batch, n_tokens, 3 * embed_dim)``: queries, keys, values,
        each ``(num_heads, head_dim)``, as ``Attention.qkv`` writes them.
    num_heads : int
        Heads.
    q_norm, k_norm : nn.LayerNorm
        The per-head LayerNorms of the queries and keys.
    scale : float
        Multiplies ``q k^T``.

    Returns
    -------
    out : torch.Tensor
        Shape ``(batch, n_tokens, num_heads, head_dim)``, ``qkv``'s dtype.
    """
    batch, n_tokens, width = qkv.shape
    head_dim = width // (3 * num_heads)
    qkv5 = qkv.reshape(batch, n_tokens, 3, num_heads, head_dim)
    if not qkv5.is_contiguous():
        qkv5 = qkv5.contiguous()
    o, _ = _fwd_op(qkv5, q_norm.weight, q_norm.bias, k_norm.weight, k_norm.bias, float(q_norm.eps), float(scale))
    return o


__all__ = ["ENABLED", "supported", "qkv_attention"]
