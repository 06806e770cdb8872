"""Real deployment on loopback: `fedeeg server start` (TLS, node authentication) and `fedeeg client start` daemons.

Three registered synthetic sites and one unregistered ("rogue") site run as separate daemons for the whole module;
every server run uses the same port, so the daemons reconnect to each new server. Every process started here is
killed by id in the fixtures' finalizers (the SuperLink/SuperNode children end with their daemon).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedeeg.deploy.launcher import free_port

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

FEDEEG = [sys.executable, "-m", "fedeeg.cli"]
SITES = ("site-0", "site-1", "site-2")


class Deployment:
    """The daemons of one test module, in ``root``; every process is killed by id on close."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ)
        self.env.update({
            "FLWR_HOME": str(root / "flwr-home"), "RAY_TMPDIR": str(root / "ray"), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "FEDEEG_CAPTURE_DIR": str(root / "capture"), "FEDEEG_CACHE_DIR": str(root / "cache"),
        })

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*FEDEEG, *args], cwd=self.root, env=self.env, capture_output=True, text=True, timeout=60)

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen([*FEDEEG, *args], cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one daemon's process group and its direct children (its SuperLink/SuperNode), by id."""
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for pid in children:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def diagnose(self, server: str) -> str:
        """Which daemons are still alive, and the end of the server's and each site's log (for failure messages)."""
        lines = [f"{name}: {'running' if p.poll() is None else f'exited with {p.returncode}'}"
                 for name, p in sorted(self.procs.items())]
        for name in (server, *SITES):
            lines.append(f"--- {name}.log (end)\n{self.log(name)[-1500:]}")
        return "\n".join(lines)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)

    def start_site(self, name: str) -> None:
        self.spawn(name, "client", "start", "--config", f"{name}.toml")

    def federation(self, out: str, *, rounds: int = 2, deadline: float = 60.0, min_sites: int = 2) -> Path:
        path = self.root / f"{out}.toml"
        path.write_text(f"""
[federation]
name = "{out}"
out = "{out}"
sites = 3
min_sites = {min_sites}
round_deadline = {deadline}
connect_timeout = 300
[server]
host = "127.0.0.1"
port = {self.port}
certificates = "certs"
registry = "sites.json"
poll_interval = 0.2
[run]
backbone = "labram-small"
strategy = "fedit"
window-seconds = 1.0
rounds = {rounds}
local-epochs = 1
device = "cpu"
sites = 3
""")
        return path

    def serve(self, config: Path, *, timeout: float = 150.0, name: str = "server") -> tuple[int, str]:
        """Run `fedeeg server start` to the end; returns its exit code and output."""
        proc = self.spawn(name, "server", "start", "--config", str(config))
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(name)
            pytest.fail(f"server did not finish within {timeout:.0f} s:\n{self.diagnose(name)}")
        self.procs.pop(name, None)
        return proc.returncode, self.log(name)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    dep = Deployment(root)
    try:
        # Enrolment with our CLI: the CA and server certificate, each site's keys, registration of three of four
        assert dep.cli("certs", "init", "--out", "certs").returncode == 0
        for name in (*SITES, "rogue"):
            res = dep.cli("site", "new", name, "--out", f"keys-{name}")
            assert res.returncode == 0, res.stderr
        for name in SITES:
            res = dep.cli("site", "register", f"keys-{name}/{name}.pub", "--registry", "sites.json")
            assert res.returncode == 0, res.stderr
        for i, name in enumerate((*SITES, "rogue")):
            (root / f"{name}.toml").write_text(f"""
[deployment]
name = "{name}"
server = "127.0.0.1:{dep.port}"
ca = "certs/ca.pem"
key = "keys-{name}/{name}.key"
dataset = "synthetic"
partition = {i % 3}
runtime_port = {free_port()}
poll_interval = 0.25
max_backoff = {60 if name == "rogue" else 4}
state_dir = "state-{name}"
device = "cpu"
""")
            dep.start_site(name)
        yield dep
    finally:
        dep.close()


@pytest.fixture(scope="module")
def uninterrupted(deployment):
    """A 2-round run with the three sites, start to end."""
    code, out = deployment.serve(deployment.federation("run-full", min_sites=3, deadline=120.0), timeout=300.0)
    assert code == 0, out[-3000:]
    return deployment.root / "run-full"


def _adapter(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def _audit(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "audit.jsonl").read_text().splitlines()]


def test_tls_node_auth_three_sites_two_rounds(deployment, uninterrupted):
    # Prepare / Execute: the `uninterrupted` fixture ran the federation

    # Assert: two rounds, three sites each, outputs written, the audit chain intact
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["rounds"] == 2 and sorted(summary["per_site"]) == ["site-0", "site-1", "site-2"]
    history = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2]  # round 1's metrics came with round 2's training replies
    assert all(sorted(h["per_site"]) == ["site-0", "site-1", "site-2"] and h["test"] for h in history)
    verify = deployment.cli("audit", "verify", str(uninterrupted))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    trains = [e["data"] for e in _audit(uninterrupted) if e["event"] == "round-train"]
    assert [sorted(t["answered"]) for t in trains] == [list(SITES)] * 2
    assert all(sorted(t["asked"]) == list(SITES) for t in trains)  # the rogue site was never asked
    # The unregistered site was refused by the SuperLink's node authentication
    assert "Exit Code: 305" in (deployment.root / "state-rogue" / "logs" / "supernode.log").read_text(errors="replace")
    assert "refused site rogue" in deployment.log("rogue")


def test_site_traffic_holds_only_adapter_and_aggregates(deployment, uninterrupted):
    # Prepare: every reply a site sent, as captured by its daemon before sending ($FEDEEG_CAPTURE_DIR)
    lines = (deployment.root / "capture" / "site-0.jsonl").read_text().splitlines()
    replies = [json.loads(line) for line in lines]

    # Assert
    assert len(replies) >= 3  # two rounds: two training replies (the second with round 1's evaluation), one evaluation
    text = "\n".join(lines)
    for forbidden in ("rest", "arithmetic", "sub0", "site0-", ".edf", "partition"):
        assert forbidden not in text  # no label list, subject id or file name
    for reply in replies:
        assert set(reply) == {"arrays", "metrics", "configs"}
        assert set(reply["configs"]) == {"site"} and set(reply["configs"]["site"]) == {"name", "ch-names", "sfreq"}
        for name, spec in reply["arrays"].get("arrays", {}).items():
            assert "lora_" in name or ".modules_to_save." in name, name  # adapter and trained head copies only
            assert 200 not in spec["shape"] and len(spec["shape"]) <= 4  # nothing window-shaped
        # a training reply may also carry its evaluation of the global model it received ('evaluation')
        assert set(reply["metrics"]) <= {"metrics", "evaluation"} and "metrics" in reply["metrics"]
        for record in reply["metrics"].values():
            assert set(record) <= {"num-examples", "train-loss", "windows-per-second", "balanced-accuracy",
                                   "cohen-kappa", "macro-f1", "auroc", "confusion", "seconds"}
    assert any("evaluation" in reply["metrics"] for reply in replies)  # round 1's evaluation rode on round 2


def test_server_killed_after_round_one_resumes_identically(deployment, uninterrupted):
    # Prepare
    # every site in every round (min_sites = 3, retried if one is briefly unreachable after the restart), as in
    # the uninterrupted run, so that the two adapters can be compared bit for bit
    config = deployment.federation("run-resume", min_sites=3, deadline=120.0)
    out = deployment.root / "run-resume"
    proc = deployment.spawn("server-1", "server", "start", "--config", str(config))

    # Execute: kill the server (and its SuperLink) as soon as round 1 is checkpointed, then start it again
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "round-0001" / "manifest.json").exists():
        assert proc.poll() is None, deployment.log("server-1")[-3000:]
        assert time.monotonic() < deadline, "round 1 never finished:\n" + deployment.diagnose("server-1")
        time.sleep(0.2)
    deployment.kill("server-1")
    code, log = deployment.serve(config, name="server-2", timeout=300.0)

    # Assert: resumed at round 2 and finished with the adapter of the uninterrupted run, bit for bit
    assert code == 0, log[-3000:]
    assert "Resuming after round 1 of 2" in log
    starts = [e["data"] for e in _audit(out) if e["event"] == "run-start"]
    assert [s["resumed_after"] for s in starts] == [0, 1]
    # (a round asked again after a transient failure logs one round-train entry per attempt)
    assert sorted({e["data"]["round"] for e in _audit(out) if e["event"] == "round-train"}) == [1, 2]
    assert deployment.cli("audit", "verify", str(out)).returncode == 0
    # round 1 was checkpointed before its evaluation (due with round 2's training): the resumed run asked for it
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2] and all(h["test"] for h in history)
    want, got = _adapter(uninterrupted), _adapter(out)
    assert sorted(want) == sorted(got)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_killed_site_round_closes_at_deadline(deployment):
    # Prepare: a short deadline; everything waits for all three sites unless one misses it
    config = deployment.federation("run-fault", rounds=3, deadline=20.0)
    out = deployment.root / "run-fault"
    proc = deployment.spawn("server-f", "server", "start", "--config", str(config))

    # Execute: kill site-2's daemon (and its SuperNode) while round 1 is under way
    deadline = time.monotonic() + 420  # the daemons reconnect with backoff after the previous server went away
    while "3 sites connected;" not in deployment.log("server-f"):
        assert proc.poll() is None, deployment.log("server-f")[-3000:]
        assert time.monotonic() < deadline, "the sites never connected:\n" + deployment.diagnose("server-f")
        time.sleep(0.2)
    deployment.kill("site-2")
    try:
        proc.wait(300)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung after a site died:\n" + deployment.log("server-f")[-3000:])

    # Assert: round 1 closed at the deadline with the two others; the run completed
    assert proc.returncode == 0, deployment.log("server-f")[-3000:]
    first = next(e["data"] for e in _audit(out) if e["event"] == "round-train")
    assert first["stragglers"] == ["site-2"] and sorted(first["answered"]) == ["site-0", "site-1"]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 3
    assert "did not answer in time (deadline 20 s)" in deployment.log("server-f")


def test_corrupt_last_checkpoint_falls_back_and_reruns_the_round(deployment, uninterrupted):
    # Prepare: damage the last checkpoint (round 2 of 2) of the finished run; bring back site-2 (killed above)
    deployment.start_site("site-2")
    victim = uninterrupted / "checkpoints" / "round-0002" / "arrays.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    want = _adapter(uninterrupted)

    # Execute: start the server again with the run's unchanged federation.toml
    code, log = deployment.serve(deployment.root / "run-full.toml", name="server-c", timeout=300.0)

    # Assert: warned, fell back to round 1 (never to round 1 of a fresh run), reran round 2, same adapter
    assert code == 0, deployment.diagnose("server-c")
    assert "damaged" in log and "Resuming after round 1 of 2" in log
    starts = [e["data"]["resumed_after"] for e in _audit(uninterrupted) if e["event"] == "run-start"]
    assert starts == [0, 1]
    assert deployment.cli("audit", "verify", str(uninterrupted)).returncode == 0
    got = _adapter(uninterrupted)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_tampered_audit_entry_is_named_by_verify(deployment, uninterrupted):
    # Prepare: alter one entry's content (still valid JSON) in the finished run's audit log
    path = uninterrupted / "audit.jsonl"
    lines = path.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["data"]["answered"] = ["site-0"]
    lines[2] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")

    # Execute
    res = deployment.cli("audit", "verify", str(uninterrupted))

    # Assert: verification fails and names the entry
    assert res.returncode != 0
    assert "seq 2 (line 3" in res.stdout + res.stderr and "altered" in res.stdout + res.stderr
