"""Benchmark of LaBraM's attention kernels: SDPA, the one-tile Triton kernel and query-block configs.

Times, per configuration, the forward pass, the backward kernel alone and forward + backward
through autograd (median of ``--reps`` after ``--warmup``, CUDA events) for LaBraM-Base's
attention shape (batch 1024 x 10 heads x 77 tokens x 20-wide heads, bf16), and checks each
against a float32 reference computed from the same inputs: the error is the largest of
``max|got - ref| / max|ref|`` over the output and the three gradients. Configurations:

* ``sdpa``: ``F.scaled_dot_product_attention`` and the transpose-reshape LaBraM follows it with;
* ``tile``: the one-tile kernels (``FEDEEG_SHORT_ATTENTION_IMPL=tile``), for each ``--tile-warps``;
* ``qblock``: the query-block kernels for every ``--block-m`` x ``--warps`` (x ``--stages``).

A configuration that fails (a Triton compile error, too little shared memory) is recorded with its
error and the script goes on. The best forward and the best backward are picked separately and
printed as the environment variables of :mod:`fedeeg.models._short_attention` that select them.

Usage::

    python simulations/bench_short_attention.py                        # CUDA, about a minute
    python simulations/bench_short_attention.py --block-m 32 --warps 4 --stages 1 2 3
    TRITON_INTERPRET=1 PYTHONPATH=.:/tmp/tsite python simulations/bench_short_attention.py \\
        --batch 2 --no-save                                            # CPU smoke test (Triton's interpreter)

Writes ``simulations/results/bench_short_attention-<device>.json`` (or ``--out``) unless ``--no-save``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedeeg.models import _short_attention as sa  # noqa: E402


def make_inputs(batch: int, heads: int, tokens: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """LaBraM's attention inputs: q, k contiguous (outputs of the q/k LayerNorms), v a view of qkv.

    Parameters
    ----------
    batch, heads, tokens, dim : int
        The shape ``(batch, heads, tokens, dim)`` of q, k and v.
    dtype : torch.dtype
        Their dtype.
    device : torch.device
        Where they live.
    seed : int
        Seed of the random values.

    Returns
    -------
    q, k, v, grad : torch.Tensor
        Leaf tensors that require grad, and an output gradient ``(batch, tokens, heads, dim)``.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3, heads, dim, device=device, generator=gen).to(dtype).permute(2, 0, 3, 1, 4)
    q, k = (t.contiguous().requires_grad_() for t in qkv[:2])
    v = qkv[2].detach().requires_grad_()  # strided, as LaBraM's v
    grad = torch.randn(batch, tokens, heads, dim, device=device, generator=gen).to(dtype)
    return q, k, v, grad


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """LaBraM's fallback path: SDPA, then tokens before heads (a copy)."""
    B, H, T, D = q.shape
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(B, T, H, D)


def time_ms(fn, reps: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in ms: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events)


def errors(got, want) -> dict:
    """Per tensor (out, dq, dk, dv): ``max|got - want| / max|want|`` and ``||got - want|| / ||want||``."""
    out = {}
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        d = g.float() - w
        out[name] = {"max_rel": float(d.abs().max() / w.abs().max()), "norm_rel": float(d.norm() / w.norm())}
    return out


def bench_config(name: str, cfg: dict | None, inputs, scale: float, ref, args, device) -> dict:
    """Check and time one configuration; a failure is recorded, not raised.

    Parameters
    ----------
    name : str
        Its label.
    cfg : dict or None
        ``impl``, ``block_m``, ``num_warps``, ``num_stages`` of the Triton kernels; None: SDPA.
    inputs : tuple of torch.Tensor
        q, k, v (leaves requiring grad) and the output gradient.
    scale : float
        Attention scale.
    ref : tuple of torch.Tensor
        float32 reference output ``(B, T, H, D)`` and gradients of q, k, v.
    args : argparse.Namespace
        ``reps``, ``warmup``.
    device : torch.device
        Where the inputs live.

    Returns
    -------
    dict
        ``name``, the configuration, ``fwd_ms``, ``bwd_ms`` (the backward kernel alone; SDPA:
        fwd+bwd minus fwd), ``fwd_bwd_ms``, ``errors`` (per tensor), their largest ``max_rel_err``
        and ``norm_rel_err``; or ``error``.
    """
    q, k, v, grad = inputs
    row = {"name": name, **(cfg or {"impl": "sdpa"})}
    try:
        if cfg is None:
            def fwd():
                return sdpa(q, k, v, scale)
        else:
            def fwd():
                return sa._forward(q, k, v, scale, **cfg)[0]
        if cfg is None:
            out = sdpa(q, k, v, scale)
            got = (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))
        else:
            o, lse = sa._forward(q.detach(), k.detach(), v.detach(), scale, **cfg)

            def bwd():
                return sa._backward_grads(q.detach(), k.detach(), v.detach(), o, lse, grad, scale, **cfg)

            got = (o, *bwd())
        row["errors"] = errors(got, ref)
        row["max_rel_err"] = max(e["max_rel"] for e in row["errors"].values())
        row["norm_rel_err"] = max(e["norm_rel"] for e in row["errors"].values())

        def fwd_bwd():
            attn = sdpa if cfg is None else sa.short_attention  # the custom op and its registered backward
            return torch.autograd.grad(attn(q, k, v, scale), (q, k, v), grad)

        if cfg is not None:  # the custom op reads the module's knobs: set them for the timing
            saved = (sa.IMPL, sa.BLOCK_M, sa.NUM_WARPS, sa.NUM_STAGES)
            sa.IMPL, sa.BLOCK_M = cfg["impl"], cfg.get("block_m")
            sa.NUM_WARPS, sa.NUM_STAGES = cfg.get("num_warps"), cfg.get("num_stages")
        try:
            with torch.no_grad():
                row["fwd_ms"] = time_ms(fwd, args.reps, args.warmup, device)
            row["fwd_bwd_ms"] = time_ms(fwd_bwd, args.reps, args.warmup, device)
            if cfg is not None:
                row["bwd_ms"] = time_ms(bwd, args.reps, args.warmup, device)
            else:
                row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
        finally:
            if cfg is not None:
                sa.IMPL, sa.BLOCK_M, sa.NUM_WARPS, sa.NUM_STAGES = saved
    except Exception as exc:  # noqa: BLE001 - one config's failure must not end the sweep
        lines = str(exc).strip().splitlines()
        row["error"] = f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
    return row


def configs(args) -> list[tuple[str, dict | None]]:
    """SDPA, the tile kernel for each ``--tile-warps``, and the qblock grid."""
    out: list[tuple[str, dict | None]] = [("sdpa", None)]
    for w in args.tile_warps:
        out.append((f"tile w{w}", {"impl": "tile", "num_warps": w}))
    for bm in args.block_m:
        for w in args.warps:
            for st in args.stages:
                cfg = {"impl": "qblock", "block_m": bm, "num_warps": w}
                label = f"qblock m{bm} w{w}"
                if st:
                    cfg["num_stages"] = st
                    label += f" s{st}"
                out.append((label, cfg))
    return out


def env_line(fwd_row: dict, bwd_row: dict) -> str:
    """The environment that selects the best forward and the best backward kernels."""
    impls = (fwd_row["impl"], bwd_row["impl"])
    parts = [f"FEDEEG_SHORT_ATTENTION_IMPL={impls[0] if impls[0] == impls[1] else ','.join(impls)}"]

    def pair(key):
        f, b = fwd_row.get(key), bwd_row.get(key)
        if f is None and b is None:
            return None
        if f == b:
            return str(f)
        if key == "block_m" and (f is None or b is None):  # tile has no BLOCK_M: the qblock pass's value
            return str(f if f is not None else b)
        return f"{f or 0},{b or 0}"  # 0: the default

    for key, var in (("block_m", "BLOCK_M"), ("num_warps", "WARPS"), ("num_stages", "STAGES")):
        val = pair(key)
        if val is not None:
            parts.append(f"FEDEEG_SHORT_ATTENTION_{var}={val}")
    return " ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--dim", type=int, default=20)
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float16 on the CPU (Triton's interpreter has no bf16 tl.dot)")
    p.add_argument("--block-m", type=int, nargs="+", default=[16, 32, 64], help="qblock query rows per block")
    p.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8], help="qblock warps per program")
    p.add_argument("--stages", type=int, nargs="+", default=[0], help="qblock num_stages (0: Triton's default)")
    p.add_argument("--tile-warps", type=int, nargs="*", default=[8, 4], help="tile kernel warps (none: skip tile)")
    p.add_argument("--max-err", type=float, default=2e-2,
                   help="largest max-rel error of a config that may be picked as best (bf16 rounding: about 4e-3)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 50 on CUDA, 2 on the CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10 on CUDA, 1 on the CPU)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default simulations/results/bench_short_attention-<device>.json)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device: run with TRITON_INTERPRET=1 (Triton's CPU interpreter) and a tiny --batch", file=sys.stderr)
        return 2
    if not sa.TRITON_AVAILABLE:
        print("Triton is not importable", file=sys.stderr)
        return 2
    args.reps = args.reps or (50 if device.type == "cuda" else 2)
    args.warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 1)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float16"))
    import triton

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-interpreter ({platform.processor() or 'cpu'})"
    shape = (args.batch, args.heads, args.tokens, args.dim)
    print(f"{dev_name}, torch {torch.__version__}, triton {triton.__version__}, q/k/v {shape} {dtype}, "
          f"median of {args.reps} after {args.warmup}", flush=True)
    inputs = make_inputs(*shape, dtype=dtype, device=device)
    q, k, v, grad = inputs
    scale = args.dim**-0.5
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out = F.scaled_dot_product_attention(qr, kr, vr, scale=scale).transpose(1, 2)
    ref = (ref_out.detach(), *torch.autograd.grad(ref_out, (qr, kr, vr), grad.float()))

    t_start = time.perf_counter()
    rows = []
    print(f"{'config':22} {'fwd ms':>8} {'bwd ms':>8} {'fwd+bwd ms':>10} {'max rel err':>11} {'norm rel err':>12}", flush=True)
    for name, cfg in configs(args):
        row = bench_config(name, cfg, inputs, scale, ref, args, device)
        rows.append(row)
        if "error" in row:
            print(f"{name:22} failed: {row['error']}", flush=True)
        else:
            row["exact"] = row["max_rel_err"] <= args.max_err
            flag = "" if row["exact"] else f"  > --max-err {args.max_err:g}: not picked"
            print(f"{name:22} {row['fwd_ms']:8.3f} {row['bwd_ms']:8.3f} {row['fwd_bwd_ms']:10.3f} {row['max_rel_err']:11.2e} "
                  f"{row['norm_rel_err']:12.2e}{flag}", flush=True)
    ok = [r for r in rows if "error" not in r and r["impl"] != "sdpa" and r["exact"]]
    best = {}
    if ok:
        best_fwd = min(ok, key=lambda r: r["fwd_ms"])
        best_bwd = min(ok, key=lambda r: r["bwd_ms"])
        best = {"fwd": best_fwd["name"], "bwd": best_bwd["name"], "env": env_line(best_fwd, best_bwd),
                "fwd_plus_bwd_ms": best_fwd["fwd_ms"] + best_bwd["bwd_ms"]}
        print(f"best forward: {best['fwd']} ({best_fwd['fwd_ms']:.3f} ms); best backward: {best['bwd']} "
              f"({best_bwd['bwd_ms']:.3f} ms)\n  -> {best['env']}", flush=True)
    elapsed = time.perf_counter() - t_start
    print(f"{len(rows)} configs in {elapsed:.1f} s ({sum('error' in r for r in rows)} failed)", flush=True)
    if not args.no_save:
        tag = re.sub(r"[^a-z0-9]+", "-", dev_name.lower()).strip("-") if device.type == "cuda" else "cpu-interpreter"
        out = args.out or ROOT / "simulations" / "results" / f"bench_short_attention-{tag}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "device": dev_name, "torch": torch.__version__, "triton": triton.__version__,
            "shape": {"batch": args.batch, "heads": args.heads, "tokens": args.tokens, "dim": args.dim},
            "dtype": str(dtype).removeprefix("torch."), "reps": args.reps, "warmup": args.warmup,
            "error_metric": "max_rel_err: max over (out, dq, dk, dv) of max|got - ref| / max|ref|; norm_rel_err: of "
                            "||got - ref|| / ||ref||; float32 SDPA reference on the same inputs",
            "bwd_ms_note": "Triton: the backward kernel alone; sdpa: fwd+bwd minus fwd",
            "rows": rows, "best": best, "seconds": round(elapsed, 1),
        }
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
