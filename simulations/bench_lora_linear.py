"""One LoRA Linear layer, forward + backward: peft's forward against the fused one (fedeeg.models._fused_lora).

For each variant the layer (peft LoRA on an ``nn.Linear``, frozen weight,
dropout as given) runs ``--steps`` forward+backward passes on ``M x K`` rows
(after ``--warmup``), and the script prints the time per pass, the bytes the
autograd graph saves (distinct storages, parameters excluded) and the largest
difference of output and gradients from peft's.

Variants: ``peft``, and ``fused`` with each ``--forward`` mode, ``--pad-to``
and ``--split-k-rows`` combination asked for.

Examples
--------
CPU (a sanity check of the mechanics, not of GPU speed)::

    OMP_NUM_THREADS=1 python simulations/bench_lora_linear.py --device cpu --rows 8192 --k 200 --n 600

GPU, LaBraM-Base at batch 1024 (78,848 token rows), bf16 autocast, the three Linear shapes::

    for kn in "200 600" "200 800" "800 200"; do set -- $kn
      python simulations/bench_lora_linear.py --device cuda --amp --rows 78848 --k $1 --n $2 \\
          --forward cat addmm --split-k-rows 0 4096 --compile
    done
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedeeg.models import _fused_lora  # noqa: E402


def make_layer(k: int, n: int, r: int, alpha: float, dropout: float, bias: bool, seed: int, dev: torch.device) -> nn.Module:
    """A one-Linear model with a peft LoRA adapter (B random, so that every gradient is non-zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = nn.Sequential()
    base.add_module("fc", nn.Linear(k, n, bias=bias))
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["fc"]))
    with torch.no_grad():
        model.base_model.model.fc.lora_B["default"].weight.normal_(0, 0.05)
    _fused_lora.use_fused_lora_linear(model)
    return model.to(dev).train()


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves while ``fn()`` runs (parameters excluded)."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        if not isinstance(t, nn.Parameter):
            key = (t.untyped_storage().data_ptr(), t.device.type)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=8192, help="M: token rows (batch x tokens)")
    p.add_argument("--k", type=int, default=200, help="in_features")
    p.add_argument("--n", type=int, default=600, help="out_features")
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--bias", action="store_true")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (as fedeeg.training on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the layer")
    p.add_argument("--forward", nargs="+", default=["cat"], choices=_fused_lora.FORWARD_MODES)
    p.add_argument("--pad-to", nargs="+", type=int, default=[8])
    p.add_argument("--split-k-rows", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    model = make_layer(args.k, args.n, args.rank, args.alpha, args.dropout, args.bias, args.seed, dev)
    x = torch.randn(args.rows, args.k, device=dev, generator=torch.Generator(device=dev).manual_seed(args.seed), requires_grad=True)
    dy = torch.randn(args.rows, args.n, device=dev, generator=torch.Generator(device=dev).manual_seed(args.seed + 1))
    params = [q for q in model.parameters() if q.requires_grad]
    amp_dtype = torch.bfloat16 if args.amp else None

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    variants = [("peft", None, None, None)]
    variants += [("fused", f, pt, sk) for f, pt, sk in itertools.product(args.forward, args.pad_to, args.split_k_rows)]
    ref = None
    print(f"M={args.rows} K={args.k} N={args.n} r={args.rank} dropout={args.dropout} bias={args.bias} "
          f"amp={args.amp} compile={args.compile} device={dev} threads={torch.get_num_threads()}")
    for mode, fwd, pad_to, split in variants:
        _fused_lora.LORA_LINEAR = mode
        if mode == "fused":
            _fused_lora.FORWARD, _fused_lora.PAD_TO, _fused_lora.SPLIT_K_ROWS = fwd, pad_to, split
        torch._dynamo.reset()
        f = torch.compile(model) if args.compile else model

        def step():
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                y = f(x)
            y.backward(dy.to(y.dtype))
            return y

        torch.manual_seed(args.seed + 2)
        x.grad = None
        for q in params:
            q.grad = None
        y = step()  # the reference pass: same seed, same dropout mask (eager)
        grads = [x.grad.clone()] + [q.grad.clone() for q in params]
        out = (y.detach().float(), [g.float() for g in grads])
        n_saved = saved_bytes(lambda: f(x) if amp_dtype is None else step())
        for _ in range(args.warmup):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        ms = (time.perf_counter() - t0) / args.steps * 1e3
        if ref is None:
            ref = out
            diff = "(reference)"
        else:
            rel = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip([out[0]] + out[1], [ref[0]] + ref[1])]
            diff = f"max rel diff y {rel[0]:.1e}, grads {max(rel[1:]):.1e}"
        label = mode if mode == "peft" else f"fused forward={fwd} pad_to={pad_to} split_k_rows={split}"
        print(f"{label:55s} {ms:8.3f} ms/pass  saved {n_saved / 2**20:7.2f} MiB  {diff}")


if __name__ == "__main__":
    main()
