"""Secure vs plain aggregation, side by side: per-round time and bytes at 5/10/20/50 sites and adapter sizes of
70 k, 300 k and 1.2 M parameters.

Every cell runs one aggregation round twice in this process, on the same synthetic site updates (fp32 tensors
shaped like a LoRA adapter: several tensors of about 4,096 values), with FedEEG's own code:

- **plain**: each site builds the Flower ArrayRecord of its fp32 tensors; the server reads every ArrayRecord back,
  checks it (names, shapes, dtypes, finite values: ``fedeeg.aggregation.check_update``) and takes the
  example-weighted mean (``fedeeg.aggregation.weighted_average``);
- **secure**: the four stages of ``fedeeg.secagg`` (key advertisement with Ed25519 signatures, Shamir shares
  encrypted site-to-site, masked fixed-point upload, unmasking), with the same Flower records the ServerApp and
  ClientApp exchange (``fedeeg.federation.secure``), the default threshold (0.6 of the share holders) and
  neighbours (all other sites up to 10 sites, then about 3 log2(n)); the server decodes the weighted mean delta
  and applies it to the global tensors.

What is timed: CPU time of this thread (``time.thread_time``; figures on a shared machine are not inflated by
other jobs) of every site's work and of the server's work, stage by stage. *Round time* = the sum over stages
of (slowest site in the stage + the server's work in the stage), since sites work in parallel in a federation;
*CPU total* adds every site's time. Not timed: local training and evaluation (the same in both), the network
transfer (its bytes are reported), Flower's routing of messages, and making the synthetic updates.

Bytes: what one site sends in the round — ArrayRecords as Flower counts them (``count_bytes``), ConfigRecords as
key and value bytes — against the fp32 adapter (4 bytes per parameter).

Usage:
    python simulations/bench_secagg.py [--sites 5 10 20 50] [--sizes 70000 300000 1200000] [--repeats 1]

Writes simulations/results/bench_secagg.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedeeg.aggregation import apply_delta, check_update, flatten_delta, weighted_average
from fedeeg.federation.secure import content_bytes
from fedeeg.secagg import EncodingSpec, SecAggClient, SecAggServer, decode_sum, encode_update, simulation_identity
from fedeeg.secagg import simulation_roster
from fedeeg.secagg.encoding import vector_length

RESULTS = Path(__file__).parent / "results"
TENSOR = 4096


class Clock:
    """Accumulates thread CPU time per (who, stage)."""

    def __init__(self):
        self.t: dict[tuple[str, str], float] = {}

    def run(self, who: str, stage: str, fn, *args):
        t0 = time.thread_time()
        out = fn(*args)
        self.t[(who, stage)] = self.t.get((who, stage), 0.0) + time.thread_time() - t0
        return out

    def round_time(self, stages, sites) -> float:
        return sum(max((self.t.get((s, st), 0.0) for s in sites), default=0.0) + self.t.get(("server", st), 0.0)
                   for st in stages)

    def total(self) -> float:
        return sum(self.t.values())

    def part(self, who: str) -> float:
        return sum(v for (w, _), v in self.t.items() if w == who)


def make_updates(n_sites: int, n_params: int, seed: int):
    rng = np.random.default_rng(seed)  # synthetic data only; the protocol draws nothing from numpy
    sizes = [TENSOR] * (n_params // TENSOR) + ([n_params % TENSOR] if n_params % TENSOR else [])
    glob = {f"base_model.layers.{i}.lora_B.default.weight": rng.normal(0, 0.02, s).astype(np.float32)
            for i, s in enumerate(sizes)}
    updates = []
    for _ in range(n_sites):
        upd = {k: (v + rng.normal(0, 1e-3, v.shape)).astype(np.float32) for k, v in glob.items()}
        updates.append((upd, int(rng.integers(100, 1000))))
    return glob, updates


def plain_round(glob, updates):
    clock = Clock()
    records, up_bytes = [], []
    for i, (upd, n) in enumerate(updates):
        rec = clock.run(f"s{i}", "train", lambda u=upd: ArrayRecord({k: Array(v) for k, v in u.items()}))
        records.append((rec, n))
        up_bytes.append(rec.count_bytes())

    def server():
        got = []
        for rec, n in records:
            arrays = {k: v.numpy() for k, v in rec.items()}
            check_update(arrays, glob)
            got.append((arrays, n))
        return weighted_average(got)

    merged = clock.run("server", "train", server)
    sites = [f"s{i}" for i in range(len(updates))]
    return merged, clock, clock.round_time(["train"], sites), float(np.mean(up_bytes))


def secure_round(glob, updates, seed: int):
    n = len(updates)
    names = sorted(glob)
    d = sum(glob[k].size for k in names)
    roster = simulation_roster(seed, n)
    ids = list(range(1, n + 1))
    clients = {i: SecAggClient(i, simulation_identity(seed, i), roster) for i in ids}
    server = SecAggServer(round_id=1, roster=roster, vector_length=vector_length(d))
    clock = Clock()
    up = dict.fromkeys(ids, 0)
    stages = ["advertise", "share", "input", "unmask"]

    def site_reply(i, stage, fn):
        def work():
            payload = fn()
            rec = ConfigRecord(payload)
            return RecordDict({"secagg": rec}), payload
        content, payload = clock.run(f"s{i}", stage, work)
        up[i] += content_bytes(content)
        return payload

    req = clock.run("server", "advertise", server.advertise_request)
    ads = {i: site_reply(i, "advertise", lambda c=clients[i]: c.advertise(req)) for i in ids}
    share_req = clock.run("server", "advertise", server.receive_advertisements, ads)
    shares = {i: site_reply(i, "share", lambda c=clients[i], r=share_req[i]: c.share_keys(r)) for i in ids}
    input_req = clock.run("server", "share", server.receive_shares, shares)
    spec = EncodingSpec(clip=100.0, n_sites=n)
    masked_records = {}
    for i in ids:
        upd, count = updates[i - 1]

        def work(c=clients[i], r=input_req[i], u=upd, k=count):
            c.receive_shares(r)
            enc, _ = encode_update(flatten_delta(u, glob, names), k, 0.5, spec)
            return ArrayRecord({"masked": Array(c.mask(enc))})

        rec = clock.run(f"s{i}", "input", work)
        up[i] += rec.count_bytes()
        masked_records[i] = rec

    def collect():
        return server.receive_masked_inputs({i: r["masked"].numpy() for i, r in masked_records.items()})

    unmask_req = clock.run("server", "input", collect)
    reveals = {i: site_reply(i, "unmask", lambda c=clients[i], r=unmask_req[i]: c.unmask(r)) for i in ids}

    def finish():
        total = server.receive_unmask(reveals)
        dec = decode_sum(total, spec, n_inputs=n)
        return apply_delta(glob, dec.mean, names), dec

    merged, dec = clock.run("server", "unmask", finish)
    sites = [f"s{i}" for i in ids]
    return merged, clock, clock.round_time(stages, sites), float(np.mean(list(up.values()))), dec, server


def bench_cell(n_sites: int, n_params: int, seed: int) -> dict:
    glob, updates = make_updates(n_sites, n_params, seed)
    plain, pclock, p_round, p_up = plain_round(glob, updates)
    t0 = time.perf_counter()
    secure, sclock, s_round, s_up, dec, server = secure_round(glob, updates, seed)
    s_wall = time.perf_counter() - t0
    err = max(float(np.max(np.abs(secure[k].astype(np.float64) - plain[k]))) for k in glob)
    fp32 = 4 * n_params
    site_names = [f"s{i}" for i in range(1, n_sites + 1)]
    return {
        "sites": n_sites, "params": n_params, "tensors": len(glob),
        "neighbours": min(len(v) for v in server.graph.values()), "threshold": server.threshold,
        "plain_round_s": p_round, "secure_round_s": s_round, "round_ratio": s_round / p_round,
        "plain_server_s": pclock.part("server"), "secure_server_s": sclock.part("server"),
        "plain_site_s": max(pclock.part(f"s{i}") for i in range(n_sites)),
        "secure_site_s": max(sclock.part(s) for s in site_names),
        "plain_cpu_total_s": pclock.total(), "secure_cpu_total_s": sclock.total(), "secure_wall_s": s_wall,
        "fp32_bytes": fp32, "plain_up_bytes": p_up, "secure_up_bytes": s_up,
        "plain_up_ratio": p_up / fp32, "secure_up_ratio": s_up / fp32,
        "max_abs_diff_vs_plain": err, "decode_error_bound": dec.error_bound,
    }


def to_markdown(cells: list[dict], meta: dict) -> str:
    lines = [
        "# Secure vs plain aggregation (simulations/bench_secagg.py)",
        "",
        f"Machine: {meta['machine']}; {meta['date']}. Thread CPU time; round time = sum over stages of (slowest site "
        "+ server). Upload = bytes one site sends per round; fp32 = 4 B x parameters.",
        "",
        "| sites | params | k | t | plain round ms | secure round ms | secure/plain | plain server ms | secure server ms "
        "| plain site ms | secure site ms | plain up / fp32 | secure up / fp32 | secure up B | max abs diff (bound) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        lines.append(
            f"| {c['sites']} | {c['params']:,} | {c['neighbours']} | {c['threshold']} | {1e3 * c['plain_round_s']:.1f} "
            f"| {1e3 * c['secure_round_s']:.1f} | {c['round_ratio']:.2f} | {1e3 * c['plain_server_s']:.1f} "
            f"| {1e3 * c['secure_server_s']:.1f} | {1e3 * c['plain_site_s']:.1f} | {1e3 * c['secure_site_s']:.1f} "
            f"| {c['plain_up_ratio']:.3f} "
            f"| {c['secure_up_ratio']:.3f} | {c['secure_up_bytes']:,.0f} | {c['max_abs_diff_vs_plain']:.1e} "
            f"({c['decode_error_bound']:.1e}) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--sizes", type=int, nargs="+", default=[70_000, 300_000, 1_200_000])
    p.add_argument("--repeats", type=int, default=1, help="Rounds per cell; the fastest is kept.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "bench_secagg"))
    args = p.parse_args()
    cells = []
    for n_params in args.sizes:
        for n_sites in args.sites:
            runs = [bench_cell(n_sites, n_params, args.seed + r) for r in range(args.repeats)]
            best = min(runs, key=lambda c: c["secure_round_s"] + c["plain_round_s"])
            cells.append(best)
            print(f"{n_sites:>3} sites {n_params:>9,} params: plain {1e3 * best['plain_round_s']:7.1f} ms, "
                  f"secure {1e3 * best['secure_round_s']:7.1f} ms ({best['round_ratio']:.2f}x); upload "
                  f"{best['secure_up_ratio']:.3f} x fp32; max |secure - plain| {best['max_abs_diff_vs_plain']:.1e}",
                  flush=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
            "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1))
    md = to_markdown(cells, meta)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
