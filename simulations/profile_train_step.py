"""Profile FedEEG's training step (``train_epochs``) kernel by kernel, and measure the GPU's floors.

Trains LaBraM-Base (19 channels x 4 s, LoRA ``paper`` by default) for a few
batches, then profiles one more call of ``train_epochs`` with
``torch.profiler`` and writes, under ``--out``:

* ``<tag>_kernels.txt``: GPU time per step by kind of kernel (GEMMs,
  inductor's pointwise and reduction kernels, attention, optimizer, ...) and
  the ``--rows`` most expensive kernels with their launches per step;
* ``<tag>_trace.json.gz``: the Chrome trace (CPU ops and GPU kernels on one
  time line: where the GPU waits for the host).

``--floors`` first measures a device-to-device copy (bytes read plus written
per second) and bf16 GEMMs of the step's shapes (78,848 token rows at batch
1024), the ceilings the kernels are compared against.

Usage (the profile of ``simulations/results/h100_2026-12-06b``)::

    python simulations/profile_train_step.py --floors --out simulations/results/h100 --tag default
    FEDEEG_LORA_INPUT_KERNEL=1 FEDEEG_QKV_ATTENTION=1 python simulations/profile_train_step.py --tag kernels
"""
import argparse, gzip, json, os, shutil, sys, time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "simulations"))
from bench_train_speed import LR, make_model, make_windows  # noqa: E402

from fedeeg.training import train_epochs  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--batch", type=int, default=1024)
p.add_argument("--backbone", default="labram-base")
p.add_argument("--mode", default="lora")
p.add_argument("--compile", default="1", help="1 (torch.compile), 0 (eager) or a compile mode")
p.add_argument("--out", type=Path, default=ROOT / "simulations" / "results")
p.add_argument("--rows", type=int, default=70)
p.add_argument("--floors", action="store_true")
p.add_argument("--steps", type=int, default=3)
p.add_argument("--tag", default="prof")
a = p.parse_args()
a.out.mkdir(parents=True, exist_ok=True)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.backends.cuda.matmul.allow_tf32 = True
comp = {"1": True, "0": False}.get(a.compile, a.compile)


def bench(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(n):
        e0.record(); fn(); e1.record(); torch.cuda.synchronize(); ts.append(e0.elapsed_time(e1))
    return float(np.median(ts))


if a.floors and dev.type == "cuda":
    x = torch.randn(256 * 2**20, device=dev, dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    print(f"copy 512 MiB: {ms:.3f} ms -> {2 * x.numel() * 2 / ms / 1e6:.0f} GB/s (read + write)")
    M = a.batch * 77
    for (k, n) in [(200, 600), (200, 200), (200, 800), (800, 200), (600, 200), (208, 600), (208, 800), (808, 200)]:
        A = torch.randn(M, k, device=dev, dtype=torch.bfloat16); W = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        ms = bench(lambda: A @ W.t())
        byt = (M * k + M * n + n * k) * 2
        print(f"gemm M={M} K={k} N={n}: {ms:.3f} ms, {2 * M * k * n / ms / 1e9:.0f} TFLOP/s, {byt / ms / 1e6:.0f} GB/s")
    del x, y, A, W

model = make_model(a.backbone, a.mode, seed=0)
windows = make_windows(a.batch * a.steps, 800, seed=0)
t0 = time.time()
train_epochs(model, windows, epochs=1, lr=LR[a.mode], batch_size=a.batch, device=dev, compile=comp)
train_epochs(model, windows, epochs=1, lr=LR[a.mode], batch_size=a.batch, device=dev, compile=comp)
print(f"warm-up (compile) {time.time() - t0:.0f} s", flush=True)
r = train_epochs(model, windows, epochs=1, lr=LR[a.mode], batch_size=a.batch, device=dev, compile=comp)
print(f"unprofiled: {r.windows_per_second:.0f} windows/s over {a.steps} steps")
from torch.profiler import ProfilerActivity, profile

acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
with profile(activities=acts) as prof:
    train_epochs(model, windows, epochs=1, lr=LR[a.mode], batch_size=a.batch, device=dev, compile=comp)
prof.export_chrome_trace(str(a.out / f"{a.tag}_trace.json"))
with open(a.out / f"{a.tag}_trace.json", "rb") as f, gzip.open(a.out / f"{a.tag}_trace.json.gz", "wb") as g:
    shutil.copyfileobj(f, g)
os.remove(a.out / f"{a.tag}_trace.json")
rows = []
for e in prof.key_averages():
    if e.device_type == torch.autograd.DeviceType.CUDA:
        rows.append((e.self_device_time_total / a.steps / 1000.0, e.count // a.steps, e.key))
if not rows:  # older torch: kernels as CPU-side events with device time
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or 0
        if t > 0:
            rows.append((t / a.steps / 1000.0, e.count // a.steps, e.key))
rows.sort(reverse=True)
total = max(sum(r[0] for r in rows), 1e-9)
cats = {}
def cat(name):
    n = name.lower()
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "sm90_", "sm80_", "cublas", "xmma", "splitk")):
        return "gemm"
    if "short_attn" in n or "_attn_" in n or "attention" in n or n.startswith(("qblock_", "tile_", "qkv_")):
        return "attention"
    if "triton_" in n:
        return "inductor-" + ("red" if "_red_" in n or "_per_" in n else "poi")
    if "conv" in n or "cudnn" in n:
        return "conv"
    if "adam" in n or "foreach" in n or "multi_tensor" in n:
        return "optimizer"
    return "other"
for t, c, k in rows:
    cats[cat(k)] = cats.get(cat(k), 0) + t
if dev.type != "cuda":
    print(f"no GPU: only the trace ({a.out / (a.tag + '_trace.json.gz')}) is written")
    sys.exit(0)
lines = [f"GPU time per step: {total:.2f} ms (batch {a.batch}); {a.batch / total * 1000:.0f} windows/s if the GPU were the only cost"]
lines += [f"  {k:15} {v:7.2f} ms  {100 * v / total:5.1f} %" for k, v in sorted(cats.items(), key=lambda kv: -kv[1])]
lines += ["", f"{'ms/step':>8} {'n/step':>6}  kernel"]
lines += [f"{t:8.3f} {c:6d}  {k[:160]}" for t, c, k in rows[: a.rows]]
txt = "\n".join(lines)
print(txt)
(a.out / f"{a.tag}_kernels.txt").write_text(txt + "\n")
