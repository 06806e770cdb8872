"""Per-round overhead of a real deployment on loopback: FedEEG's long-lived ClientApp vs Flower's default.

Three synthetic sites run as `fedeeg client start` daemons against `fedeeg server start` (TLS, node
authentication) on this machine, first with FedEEG's ``--isolation process`` client (one long-lived ClientApp
process per site, short SuperNode polls), then with Flower's default ``--isolation subprocess`` (a new
``flwr-clientapp`` process per message, which imports torch and peft each time, and Flower's own waits).

Overhead of a round = the round's wall time (train and evaluate phases, as the server measures it) minus the
slowest site's local training time (its training windows / windows per second, as the site reports); it is also
reported beyond the slowest site's local work (training plus the evaluation it did in the same message). The first
round also pays the model build and is reported separately. By default (``evaluate-in = "next-train"``) the sites
evaluate a round's global model with the next round's training message, so every round is one message exchange
whose overhead includes the sites' evaluation; the last round's evaluation is an exchange of its own.
``+separate`` evaluates every round in an evaluate message of its own (two exchanges per round, as before);
``+eval-last`` runs with ``evaluate-every = rounds`` (the rounds before the last only train).

    python simulations/bench_deploy_overhead.py --rounds 4 --out simulations/results/bench_deploy_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEDEEG = [sys.executable, "-m", "fedeeg.cli"]


def _free_port() -> int:
    from fedeeg.deploy.launcher import free_port

    return free_port()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(10)
            break
        except subprocess.TimeoutExpired:
            continue
    for pid in children:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_variant(root: Path, variant: str, rounds: int, poll: float, local_epochs: int) -> dict:
    isolation, _, eval_rule = variant.partition("+")
    if eval_rule not in ("", "eval-last", "separate"):
        raise ValueError(f"variant {variant!r}: the part after '+' must be 'eval-last' or 'separate', got {eval_rule!r}.")
    evaluate_every = rounds if eval_rule == "eval-last" else 1
    evaluate_in = "separate" if eval_rule == "separate" else "next-train"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", FLWR_HOME=str(root / "flwr"), RAY_TMPDIR=str(root / "ray"),
               FEDEEG_CACHE_DIR=str(root / "cache"))
    root.mkdir(parents=True)

    def cli(*args):
        subprocess.run([*FEDEEG, *args], cwd=root, env=env, check=True, capture_output=True)

    cli("certs", "init", "--out", "certs")
    port = _free_port()
    procs = []
    try:
        for i in range(3):
            name = f"site-{i}"
            cli("site", "new", name, "--out", f"keys-{name}")
            cli("site", "register", f"keys-{name}/{name}.pub", "--registry", "sites.json")
            (root / f"{name}.toml").write_text(
                f'[deployment]\nname = "{name}"\nserver = "127.0.0.1:{port}"\nca = "certs/ca.pem"\n'
                f'key = "keys-{name}/{name}.key"\ndataset = "synthetic"\npartition = {i}\nruntime_port = {_free_port()}\n'
                f'poll_interval = {poll}\nmax_backoff = 4\nstate_dir = "state-{name}"\ndevice = "cpu"\n')
            log = (root / f"{name}.log").open("wb")
            procs.append(subprocess.Popen([*FEDEEG, "client", "start", "--config", f"{name}.toml", "--isolation", isolation],
                                          cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        (root / "federation.toml").write_text(
            f'[federation]\nname = "bench"\nout = "out"\nsites = 3\nmin_sites = 3\nround_deadline = 600\n'
            f'connect_timeout = 300\n[server]\nhost = "127.0.0.1"\nport = {port}\npoll_interval = {poll}\n'
            f'[run]\nbackbone = "labram-small"\nstrategy = "fedit"\nwindow-seconds = 1.0\nrounds = {rounds}\n'
            f'local-epochs = {local_epochs}\ndevice = "cpu"\nsites = 3\nevaluate-every = {evaluate_every}\n'
            f'evaluate-in = "{evaluate_in}"\n')
        log = (root / "server.log").open("wb")
        t0 = time.perf_counter()
        server = subprocess.Popen([*FEDEEG, "server", "start", "--config", "federation.toml"], cwd=root, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(server)
        server.wait(3600)
        wall = time.perf_counter() - t0
        if server.returncode != 0:
            raise RuntimeError(f"server failed ({server.returncode}): {(root / 'server.log').read_text()[-2000:]}")
    finally:
        for proc in procs:
            _kill(proc)
    history = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    audit = [json.loads(line) for line in (root / "out" / "audit.jsonl").read_text().splitlines()]
    trains = {e["data"]["round"]: e["data"] for e in audit if e["event"] == "round-train"}
    rows = []
    for rec in history:
        ups = trains[rec["round"]]["updates"]
        slowest = max(u["num_examples"] * local_epochs / u["windows_per_second"] for u in ups)
        # with evaluate-in = next-train a site also evaluates the previous round's model in the same message
        slowest_work = max(u["num_examples"] * local_epochs / u["windows_per_second"] + (u.get("evaluate_seconds") or 0)
                           for u in ups)
        rows.append({"round": rec["round"], "round_seconds": rec["seconds"], "slowest_training_seconds": round(slowest, 3),
                     "overhead_seconds": round(rec["seconds"] - slowest, 3),
                     "overhead_beyond_local_work_seconds": round(rec["seconds"] - slowest_work, 3),
                     "evaluated": bool(rec["test"]),
                     # whether the round's wall time includes an evaluate exchange of its own
                     "evaluate_exchange": bool(rec["test"]) and (evaluate_in == "separate" or rec["round"] == rounds)})
    later = [r["overhead_seconds"] for r in rows[1:]] or [rows[0]["overhead_seconds"]]
    train_only = [r["overhead_seconds"] for r in rows[1:] if not r["evaluate_exchange"]]
    beyond = [r["overhead_beyond_local_work_seconds"] for r in rows[1:] if not r["evaluate_exchange"]]
    return {"variant": variant, "isolation": isolation, "evaluate_every": evaluate_every, "evaluate_in": evaluate_in,
            "rounds": rows,
            "wall_seconds": round(wall, 1), "first_round_overhead_seconds": rows[0]["overhead_seconds"],
            "median_overhead_seconds_after_round_1": round(statistics.median(later), 3),
            "median_overhead_seconds_one_exchange_rounds": round(statistics.median(train_only), 3) if train_only else None,
            "median_overhead_beyond_local_work_one_exchange_rounds": round(statistics.median(beyond), 3) if beyond else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--poll", type=float, default=0.25, help="Polling interval of FedEEG's daemons (s).")
    parser.add_argument("--variants", default="process,subprocess",
                        help="Comma-separated: an isolation ('process' = FedEEG's long-lived ClientApp, 'subprocess' = "
                             "Flower's default), optionally '+separate' (evaluate-in = separate: an evaluate message "
                             "after every round) or '+eval-last' (the sites evaluate only after the last round: "
                             "evaluate-every = rounds).")
    parser.add_argument("--out", default="")
    parser.add_argument("--keep", default="", help="Keep the deployments' folders (logs) here instead of a temp dir.")
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedeeg-bench-deploy-") as tmp:
        if args.keep:
            tmp = args.keep
        for variant in args.variants.split(","):
            res = run_variant(Path(tmp) / variant, variant, args.rounds, args.poll, args.local_epochs)
            results.append(res)
            print(f"{variant:>10}: first round overhead {res['first_round_overhead_seconds']:.2f} s, later rounds "
                  f"median {res['median_overhead_seconds_after_round_1']:.2f} s (per round: "
                  f"{[r['overhead_seconds'] for r in res['rounds']]}), one-exchange rounds median "
                  f"{res['median_overhead_seconds_one_exchange_rounds']} s (beyond the sites' training and evaluation: "
                  f"{res['median_overhead_beyond_local_work_one_exchange_rounds']} s), wall {res['wall_seconds']:.0f} s",
                  flush=True)
    report = {"sites": 3, "backbone": "labram-small", "strategy": "fedit", "window_seconds": 1.0,
              "local_epochs": args.local_epochs, "poll_seconds": args.poll, "cpu_count": os.cpu_count(),
              "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(), "results": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
