"""Training throughput of FedEEG's client step against a bare PyTorch loop, side by side.

For each mode (LoRA ``paper`` preset, full fine-tuning) and batch size, the same
backbone (same seed, same data, same batch) is trained

* by ``fedeeg.training.train_epochs`` -- what a site's ClientApp runs every
  round (class-balanced loss, gradient clipping, bf16 autocast on CUDA, data on
  the device ahead of the steps), and
* by a bare loop: forward, cross-entropy, ``zero_grad``, ``backward``,
  ``AdamW.step`` under the same autocast, nothing else,

and the windows/s of both, their ratio and the peak GPU memory are printed and
saved to ``simulations/results/bench_train_speed_<device>.json`` and ``.md``.
Warm-up steps (kernel selection, compilation) are excluded from both timings,
and so is the copy of the windows to the device: both loops train on windows
already on the device, as a site does after its first round (``train_epochs``
keeps a site's windows on the GPU between calls).

Input: LaBraM-Base by default, 19 channels x 4 s at 200 Hz (random data of the
model's scale; throughput does not depend on the values).

Examples
--------
GPU (the acceptance run)::

    python simulations/bench_train_speed.py --device cuda --batch-sizes 64 256 1024

The opt-in kernels not yet measured on a GPU (LoRA input kernel, q/k norms fused into the attention), against the
defaults, one after the other on the same machine::

    python simulations/bench_train_speed.py --device cuda --batch-sizes 1024 --compile --modes lora --loops ours --tag default
    FEDEEG_LORA_INPUT_KERNEL=1 FEDEEG_QKV_ATTENTION=1 python simulations/bench_train_speed.py --device cuda \
        --batch-sizes 1024 --compile --modes lora --loops ours --tag kernels

peft's LoRA Linear layers against the fused ones (fedeeg.models._fused_lora), side by side::

    python simulations/bench_train_speed.py --device cuda --batch-sizes 1024 --compile \
        --modes lora lora-fused --loops ours --lora-forward cat --lora-split-k-rows 0

CPU (fewer steps; a 2-core machine manages a few windows/s with LaBraM-Base)::

    python simulations/bench_train_speed.py --device cpu --batch-sizes 64 256 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedeeg.data.base import WindowSet  # noqa: E402
from fedeeg.data.channels import EEGMAT_CHANNELS, to_vocab  # noqa: E402
from fedeeg.models import (  # noqa: E402
    LoraSpec, _fused_lora, _lora_input, _patch_gemm, _qkv_attention, _short_attention, apply_lora, build_backbone,
)
from fedeeg.training import _autocast, _windows_on_device, train_epochs  # noqa: E402

LR = {"lora": 5e-3, "lora-nodrop": 5e-3, "lora-fused": 5e-3, "lora-nodrop-fused": 5e-3, "full": 5e-4}


def make_model(backbone: str, mode: str, seed: int) -> nn.Module:
    model = build_backbone(backbone, n_outputs=2, seed=seed)
    if mode == "full":
        return model
    # 'lora-nodrop': the paper preset without its LoRA dropout, to measure what the dropout costs.
    # '*-fused': the LoRA Linear layers use fedeeg.models._fused_lora (main() sets LORA_LINEAR per mode).
    dropout = 0.0 if mode.startswith("lora-nodrop") else 0.5
    model = apply_lora(model, LoraSpec(preset="paper", rank=2, alpha=8, dropout=dropout, conv_rank=4), freeze_a=False, seed=seed)
    _fused_lora.use_fused_lora_linear(model)  # follows _fused_lora.LORA_LINEAR at each call
    return model


def make_windows(n: int, n_times: int, seed: int) -> WindowSet:
    ch_names = to_vocab(EEGMAT_CHANNELS)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, len(ch_names), n_times), dtype=np.float32) * 0.2  # ~20 µV in 0.1 mV units
    y = np.arange(n) % 2
    return WindowSet(X, y, np.zeros(n, dtype=int), ch_names, 200.0, ("a", "b"))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bare_loop(model: nn.Module, windows: WindowSet, batch: int, steps: int, warmup: int, lr: float, dev: torch.device, compile_: bool) -> float:
    """Windows/s of the plainest training loop on the same data."""
    model.to(dev).train()
    fwd = (torch.compile(model, mode=None if compile_ is True else compile_) if compile_ else model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ch_names = list(windows.ch_names)
    crit = nn.CrossEntropyLoss()

    # The data are on the device before the timed steps, as in train_epochs (which keeps a site's windows there).
    X_all = torch.from_numpy(windows.X[: max(steps, warmup) * batch]).to(dev)
    y_all = torch.from_numpy(windows.y[: max(steps, warmup) * batch]).to(dev)

    def run(n_steps: int) -> None:
        X, y = X_all[: n_steps * batch], y_all[: n_steps * batch]
        order = torch.randperm(n_steps * batch, device=dev)
        for i in range(n_steps):
            idx = order[i * batch : (i + 1) * batch]
            with _autocast(dev, True):
                loss = crit(fwd(X[idx], ch_names).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    run(warmup)
    sync(dev)
    t0 = time.perf_counter()
    run(steps)
    sync(dev)
    return batch * steps / (time.perf_counter() - t0)


def ours(model: nn.Module, windows: WindowSet, batch: int, steps: int, warmup: int, lr: float, dev: torch.device, compile_: bool) -> float:
    """Windows/s of fedeeg.training.train_epochs (one epoch of ``steps`` batches after a warm-up call)."""
    warm = windows.subset(np.arange(batch * warmup))
    train_epochs(model, warm, epochs=1, lr=lr, batch_size=batch, device=dev, seed=1, compile=compile_)
    timed = windows.subset(np.arange(batch * steps))
    _windows_on_device(timed, dev)  # as in a later round: the site's windows are already on the device
    res = train_epochs(model, timed, epochs=1, lr=lr, batch_size=batch, device=dev, seed=2, compile=compile_)
    return res.windows_per_second


def profile(args, windows: WindowSet, dev: torch.device) -> None:
    """Print the operators that take the most device time in a few steps of train_epochs."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    mode, batch = args.modes[0], max(args.batch_sizes)
    _fused_lora.LORA_LINEAR = "fused" if mode.endswith("-fused") else args.lora_linear
    model = make_model(args.backbone, mode, seed=0)
    sub = windows.subset(np.arange(batch * 3))
    train_epochs(model, sub, epochs=1, lr=LR[mode], batch_size=batch, device=dev, compile=args.compile)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        train_epochs(model, sub, epochs=1, lr=LR[mode], batch_size=batch, device=dev, compile=args.compile)
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(f"profile: {mode}, batch {batch}, 3 steps")
    table = prof.key_averages().table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=90)
    print(table)
    if args.profile_out is not None:
        args.profile_out.parent.mkdir(parents=True, exist_ok=True)
        args.profile_out.write_text(f"profile: {mode}, batch {batch}, 3 steps\n{table}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="labram-base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=list(LR),
                   help="'lora-fused', 'lora-nodrop-fused': LoRA with the fused Linear layers (fedeeg.models._fused_lora); "
                        "'lora', 'lora-nodrop' follow --lora-linear")
    p.add_argument("--lora-linear", choices=_fused_lora.LORA_LINEAR_MODES, default=_fused_lora.LORA_LINEAR,
                   help="LoRA Linear layers of the 'lora' and 'lora-nodrop' modes (default: FEDEEG_LORA_LINEAR, else peft)")
    p.add_argument("--lora-forward", choices=_fused_lora.FORWARD_MODES, default=_fused_lora.FORWARD,
                   help="forward of the fused LoRA Linear: one GEMM on [x, h] ('cat'), or addmm onto s*h@B^T ('addmm'), or per layer ('auto')")
    p.add_argument("--lora-split-k-rows", type=int, default=_fused_lora.SPLIT_K_ROWS,
                   help="rows per chunk of the fused LoRA's dB reduction (0: one GEMM)")
    p.add_argument("--lora-pad-to", type=int, default=_fused_lora.PAD_TO, help="fused LoRA: pad K + r to a multiple of this")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement")
    p.add_argument("--seconds", type=float, default=4.0, help="window length in seconds")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in both loops")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode (implies --compile)")
    p.add_argument("--attention", choices=["fused", "sdpa"], default="fused",
                   help="LaBraM attention on CUDA: FedEEG's fused short-sequence kernel (default) or F.scaled_dot_product_attention")
    p.add_argument("--attn-warps", type=int, default=None, help="warps per program of the fused attention kernel")
    p.add_argument("--profile-rows", type=int, default=30, help="rows of the --profile table")
    p.add_argument("--profile-out", type=Path, default=None, help="also write the --profile table to this file")
    p.add_argument("--loops", choices=["both", "ours"], default="both",
                   help="'ours' skips the bare loop (for trying variants; ratios need 'both')")
    p.add_argument("--order", choices=["bare-first", "ours-first"], default="bare-first")
    p.add_argument("--out", type=Path, default=ROOT / "simulations" / "results")
    p.add_argument("--tag", default=None, help="suffix of the output files (default: the device type)")
    p.add_argument("--profile", action="store_true", help="also print the top kernels of FedEEG's step (first mode, largest batch)")
    args = p.parse_args()

    dev = torch.device(args.device)
    from fedeeg.models import _short_attention

    _short_attention.ENABLED = args.attention == "fused"
    _fused_lora.FORWARD, _fused_lora.SPLIT_K_ROWS, _fused_lora.PAD_TO = args.lora_forward, args.lora_split_k_rows, args.lora_pad_to
    _short_attention.NUM_WARPS = args.attn_warps
    if args.compile_mode:
        args.compile = True if args.compile_mode == "default" else args.compile_mode
    # Every measurement compiles a fresh model: lift dynamo's per-function recompile limit (default 8).
    torch._dynamo.config.cache_size_limit = 64
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    n_times = int(args.seconds * 200)
    n_max = max(args.batch_sizes) * max(args.steps, args.warmup)
    windows = make_windows(n_max, n_times, seed=0)
    rows = []
    print(f"{args.backbone} on {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"torch {torch.__version__}, {len(windows.ch_names)} ch x {n_times} samples, compile={args.compile}", flush=True)
    print(f"{'mode':17} {'batch':>6} {'bare w/s':>10} {'ours w/s':>10} {'ours/bare':>9} {'peak GiB bare':>13} {'peak GiB ours':>13}", flush=True)
    for mode in args.modes:
        _fused_lora.LORA_LINEAR = "fused" if mode.endswith("-fused") else args.lora_linear
        for batch in args.batch_sizes:
            rec = {"mode": mode, "batch": batch}
            runs = [("bare", bare_loop), ("ours", ours)] if args.loops == "both" else [("ours", ours)]
            if args.order == "ours-first":
                runs.reverse()
            for name, fn in runs:
                model = make_model(args.backbone, mode, seed=0)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(dev)
                rec[f"{name}_wps"] = fn(model, windows, batch, args.steps, args.warmup, LR[mode], dev, args.compile)
                rec[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
                del model
            rec.setdefault("bare_wps", None)
            rec.setdefault("bare_peak_gib", None)
            rec["ratio"] = rec["ours_wps"] / rec["bare_wps"] if rec["bare_wps"] else None
            rows.append(rec)
            fmt = lambda v, w=13: f"{v:{w}.2f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
            print(f"{mode:17} {batch:6d} {fmt(rec['bare_wps'], 10)} {rec['ours_wps']:10.1f} {fmt(rec['ratio'], 9)} {fmt(rec['bare_peak_gib'])} {fmt(rec['ours_peak_gib'])}", flush=True)

    if args.profile:
        profile(args, windows, dev)

    tag = args.tag or dev.type
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "backbone": args.backbone,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "n_chans": len(windows.ch_names),
        "n_times": n_times,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": args.compile,
        "attention": args.attention,
        "lora_linear": args.lora_linear,
        "lora_fused": {"forward": args.lora_forward, "split_k_rows": args.lora_split_k_rows, "pad_to": args.lora_pad_to},
        "patch_embed": _patch_gemm.MODE,
        "short_attention_impl": _short_attention.IMPL,
        "lora_input_kernel": _lora_input.ENABLED,
        "qkv_attention": _qkv_attention.ENABLED,
        "fedeeg_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FEDEEG_")},
        "command": " ".join(["python", "simulations/bench_train_speed.py", *sys.argv[1:]]),
    }
    (args.out / f"bench_train_speed_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Training throughput: FedEEG client step vs bare PyTorch loop ({meta['device']})",
        "",
        f"{args.backbone}, {meta['n_chans']} channels x {n_times} samples (4 s at 200 Hz), bf16 autocast on CUDA, "
        f"torch {meta['torch']}, compile={args.compile}; {args.steps} timed steps after {args.warmup} warm-up steps.",
        f"Command: `{meta['command']}`",
        "",
        "| mode | batch | bare loop (windows/s) | FedEEG (windows/s) | FedEEG / bare | peak GiB bare | peak GiB FedEEG |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pk = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        num = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        lines.append(f"| {r['mode']} | {r['batch']} | {num(r['bare_wps'], '.0f')} | {r['ours_wps']:.0f} | {num(r['ratio'], '.2f')} | {pk(r['bare_peak_gib'])} | {pk(r['ours_peak_gib'])} |")
    (args.out / f"bench_train_speed_{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"saved {args.out / f'bench_train_speed_{tag}.json'}")


if __name__ == "__main__":
    main()
