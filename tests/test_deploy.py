"""Deployment pieces without processes: certificates, site keys, registry, audit log, checkpoints, configs, round closing."""

from __future__ import annotations

import json
import logging
import ssl
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from fedeeg.deploy import check_private, check_site_name
from fedeeg.deploy.audit import AuditError, AuditLog, verify_audit_log
from fedeeg.deploy.certs import certificate_hosts, init_certs
from fedeeg.deploy.federation_config import FederationConfigError, load_federation_config
from fedeeg.deploy.keys import fingerprint, load_node_private_key, new_site_keys, read_node_public_key
from fedeeg.deploy.registry import SiteRegistry
from fedeeg.deploy.site_config import ClientConfigError, load_client_config
from fedeeg.deploy.state import CheckpointError, RoundStateStore

FEDERATION_TOML = """
[federation]
name = "test"
out = "out"
sites = 3
min_sites = 2
round_deadline = 30
[server]
port = 9092
[run]
backbone = "labram-small"
rounds = 3
local-epochs = 1
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- certificates and keys
def test_certs_ca_signs_server_for_hosts(tmp_path):
    # Prepare / Execute
    paths = init_certs(tmp_path / "certs", hosts=["coordinator.example.org", "10.0.0.5", "127.0.0.1"])

    # Assert: private keys 0600, SANs as asked, and the chain verifies with the CA as trust root
    assert _mode(paths.ca_key) == 0o600 and _mode(paths.server_key) == 0o600
    assert set(certificate_hosts(paths.server_cert)) == {"coordinator.example.org", "10.0.0.5", "127.0.0.1"}
    ctx = ssl.create_default_context(cafile=str(paths.ca_cert))
    ctx.load_cert_chain(str(paths.server_cert), str(paths.server_key))  # key matches the certificate
    with pytest.raises(FileExistsError, match="--force"):
        init_certs(tmp_path / "certs", hosts=["x"])


def test_site_keys_openssh_p384_private_0600(tmp_path):
    # Prepare / Execute
    keys = new_site_keys("hospital-a", tmp_path / "keys")

    # Assert
    assert _mode(keys.node_key) == 0o600 and _mode(keys.identity_key) == 0o600
    key, comment = read_node_public_key(keys.node_pub)
    assert key.startswith("ecdsa-sha2-nistp384 ") and comment == "fedeeg-site:hospital-a"
    assert load_node_private_key(keys.node_key).curve.name == "secp384r1"
    assert fingerprint(key).startswith("SHA256:")
    with pytest.raises(ValueError, match="PRIVATE"):
        read_node_public_key(keys.node_key)
    keys.node_key.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        check_private(keys.node_key)


@pytest.mark.parametrize("name", ["Hospital A", "", "-x", "a/b", "x" * 64])
def test_bad_site_names_refused(name):
    with pytest.raises(ValueError, match="site name"):
        check_site_name(name)


def test_registry_register_revoke_and_duplicate_keys(tmp_path):
    # Prepare
    a = new_site_keys("site-a", tmp_path / "a")
    b = new_site_keys("site-b", tmp_path / "b")
    reg = SiteRegistry(tmp_path / "sites.json")

    # Execute
    reg.register(a.node_pub)
    reg.register(b.node_pub)
    reg.revoke("site-b", reason="left the consortium")
    reloaded = SiteRegistry(tmp_path / "sites.json")

    # Assert
    assert [e.name for e in reloaded.active()] == ["site-a"]
    assert reloaded.get("site-b").status == "revoked" and reloaded.get("site-b").reason == "left the consortium"
    assert reloaded.get("site-a").identity_key.startswith("-----BEGIN PUBLIC KEY-----")
    assert reloaded.is_allowed(read_node_public_key(a.node_pub)[0])
    assert not reloaded.is_allowed(read_node_public_key(b.node_pub)[0])
    with pytest.raises(ValueError, match="already registered for site 'site-a'"):
        reloaded.register(a.node_pub, name="site-c")
    with pytest.raises(KeyError, match="No site named 'nobody'"):
        reloaded.revoke("nobody")


# ---------------------------------------------------------------- audit log
def test_audit_chain_verifies_and_reopens(tmp_path):
    # Prepare / Execute
    log = AuditLog(tmp_path)
    log.append("run-start", config_hash="abc")
    log.append("round-train", round=1, asked=["a", "b"], answered=["a"])
    again = AuditLog(tmp_path)  # a restarted server continues the chain
    again.append("round-end", round=1)

    # Assert
    assert verify_audit_log(tmp_path) == 3
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert json.loads(lines[2])["prev"] == json.loads(lines[1])["hash"]


@pytest.mark.parametrize("how", ["edit", "delete", "swap"])
def test_audit_tampering_names_the_entry(tmp_path, how):
    # Prepare
    log = AuditLog(tmp_path)
    for rnd in range(1, 5):
        log.append("round-train", round=rnd, answered=["a", "b"])
    path = tmp_path / "audit.jsonl"
    lines = path.read_text().splitlines()

    # Execute
    if how == "edit":
        entry = json.loads(lines[2])
        entry["data"]["answered"] = ["a"]
        lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    elif how == "delete":
        del lines[2]
    else:
        lines[1], lines[2] = lines[2], lines[1]
    path.write_text("\n".join(lines) + "\n")

    # Assert: the first bad entry is named (seq 2 for an edit or a removal, seq 2 at line 2 for a swap)
    with pytest.raises(AuditError) as info:
        verify_audit_log(path)
    assert info.value.line == (3 if how != "swap" else 2)
    assert "seq 2" in str(info.value) or "expected 2" in str(info.value) or "expected 1" in str(info.value)
    with pytest.raises(AuditError):  # a server never extends a tampered chain
        AuditLog(tmp_path)


def test_audit_verify_cli_exit_codes(tmp_path):
    # Prepare
    from fedeeg.cli import app

    log = AuditLog(tmp_path)
    log.append("a", x=1)
    log.append("b", x=2)
    runner = CliRunner()

    # Execute / Assert
    ok = runner.invoke(app, ["audit", "verify", str(tmp_path)])
    assert ok.exit_code == 0 and "2 entries" in ok.output
    path = tmp_path / "audit.jsonl"
    path.write_text(path.read_text().replace('"x":2', '"x":3'))
    bad = runner.invoke(app, ["audit", "verify", str(tmp_path)])
    assert bad.exit_code == 1 and "entry seq 1" in bad.output and "altered" in bad.output


# ---------------------------------------------------------------- checkpoints
def _arrays(value: float) -> dict[str, np.ndarray]:
    return {"lora_A": np.full((2, 3), value, np.float32), "head.weight": np.arange(4, dtype=np.float32) * value}


def test_checkpoint_roundtrip_and_keep(tmp_path):
    # Prepare
    store = RoundStateStore(tmp_path, keep=2)

    # Execute
    for rnd in (1, 2, 3):
        store.save(rnd, _arrays(rnd), {"history": [{"round": r} for r in range(1, rnd + 1)]})
    latest = store.load_latest()

    # Assert
    assert store.rounds() == [3, 2]  # the oldest was dropped
    assert latest.round == 3 and len(latest.state["history"]) == 3
    np.testing.assert_array_equal(latest.arrays["head.weight"], _arrays(3)["head.weight"])
    assert not list((tmp_path / "checkpoints").glob(".round-*"))  # no temporary folder left


def test_corrupt_last_checkpoint_falls_back_with_warning(tmp_path, caplog):
    # Prepare
    store = RoundStateStore(tmp_path)
    store.save(1, _arrays(1), {})
    store.save(2, _arrays(2), {})
    with open(store.path(2) / "arrays.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\xff\x00\xff")

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedeeg.deploy.state"):
        latest = store.load_latest()

    # Assert
    assert latest.round == 1
    assert "round 2 is damaged" in caplog.text and "instead of round 2" in caplog.text


def test_all_checkpoints_corrupt_is_an_error_not_round_one(tmp_path):
    # Prepare
    store = RoundStateStore(tmp_path)
    store.save(1, _arrays(1), {})
    (store.path(1) / "state.json").write_text("{}")

    # Execute / Assert
    with pytest.raises(CheckpointError, match="Every checkpoint"):
        store.load_latest()
    assert RoundStateStore(tmp_path / "fresh").load_latest() is None


# ---------------------------------------------------------------- configs
def test_federation_config_paths_and_run(tmp_path):
    # Prepare
    (tmp_path / "federation.toml").write_text(FEDERATION_TOML)

    # Execute
    fed = load_federation_config(tmp_path / "federation.toml")

    # Assert
    assert fed.out == (tmp_path / "out").resolve() and fed.certificates == (tmp_path / "certs").resolve()
    assert fed.run.rounds == 3 and fed.run.out == str(fed.out) and fed.round_deadline == 30.0


@pytest.mark.parametrize("edit, match", [
    (("min_sites = 2", "min_sites = 4"), "cannot exceed 'sites'"),
    (("[server]", "[server]\ncolour = 1"), r"unknown key\(s\) \['colour'\] in \[server\]"),
    (("rounds = 3", "rounds = 3\nmode = \"local\""), "mode must be 'federated'"),
    (("round_deadline = 30", "round_deadline = 30\non_too_few = \"wait\""), "on_too_few"),
    (("local-epochs = 1", "local-epochs = 1\nstrategy = \"fedsgd\""), "strategy"),
])
def test_federation_config_errors_name_the_problem(tmp_path, edit, match):
    (tmp_path / "federation.toml").write_text(FEDERATION_TOML.replace(*edit))
    with pytest.raises((FederationConfigError, ValueError), match=match):
        load_federation_config(tmp_path / "federation.toml")


def test_client_config_with_data_tables_writes_site_file(tmp_path):
    # Prepare
    (tmp_path / "rec").mkdir()
    (tmp_path / "site.toml").write_text("""
[deployment]
server = "coord.example.org:9092"
ca = "keys/ca.pem"
key = "keys/hospital-a.key"
[site]
name = "hospital-a"
[data]
root = "rec"
format = "edf"
[labels]
source = "annotations"
mapping = { T1 = "left", "T 2" = "right" }
[channels]
rename = { "EEG Fpz-Cz" = "Fpz" }
""")

    # Execute
    site = load_client_config(tmp_path / "site.toml")
    data_file = site.data_site_file()

    # Assert: the data layer reads the derived file; paths resolved against the site file
    from fedeeg.data.site import load_site_config

    data = load_site_config(data_file)
    assert site.name == "hospital-a" and site.key == (tmp_path / "keys" / "hospital-a.key").resolve()
    assert data.data.root == (tmp_path / "rec").resolve() and dict(data.labels.mapping)["T 2"] == "right"


def test_client_config_needs_keys_unless_insecure(tmp_path):
    (tmp_path / "site.toml").write_text('[deployment]\nname = "s"\nserver = "h:1"\ndataset = "synthetic"\n')
    with pytest.raises(ClientConfigError, match="needs \\['ca', 'key'\\]"):
        load_client_config(tmp_path / "site.toml")
    (tmp_path / "site.toml").write_text('[deployment]\nname = "s"\nserver = "h:1"\ndataset = "synthetic"\ninsecure = true\n')
    assert load_client_config(tmp_path / "site.toml").insecure


def test_server_start_without_certificates_points_to_insecure(tmp_path):
    # Prepare
    from fedeeg.cli import app

    (tmp_path / "federation.toml").write_text(FEDERATION_TOML)

    # Execute
    res = CliRunner().invoke(app, ["server", "start", "--config", str(tmp_path / "federation.toml")])

    # Assert: no plain transport without --insecure; nothing was started
    assert res.exit_code == 2
    assert "TLS files missing" in res.output and "--insecure" in res.output


def test_enrolment_cli(tmp_path):
    # Prepare
    from fedeeg.cli import app

    runner = CliRunner()

    # Execute
    r1 = runner.invoke(app, ["certs", "init", "--out", str(tmp_path / "certs"), "--host", "coord.example.org"])
    r2 = runner.invoke(app, ["site", "new", "hospital-a", "--out", str(tmp_path / "keys")])
    r3 = runner.invoke(app, ["site", "register", str(tmp_path / "keys" / "hospital-a.pub"),
                             "--registry", str(tmp_path / "sites.json")])
    r4 = runner.invoke(app, ["site", "revoke", "hospital-a", "--registry", str(tmp_path / "sites.json")])
    r5 = runner.invoke(app, ["site", "register", str(tmp_path / "keys" / "hospital-a.key"),
                             "--registry", str(tmp_path / "sites.json")])

    # Assert
    assert [r.exit_code for r in (r1, r2, r3, r4)] == [0, 0, 0, 0], [r.output for r in (r1, r2, r3, r4)]
    assert "coord.example.org" in certificate_hosts(tmp_path / "certs" / "server.pem")
    assert SiteRegistry(tmp_path / "sites.json").active() == []
    assert r5.exit_code == 2 and "PRIVATE key" in r5.output


# ---------------------------------------------------------------- app version check
def test_app_mismatch_refuses_other_apps_and_versions():
    from fedeeg import __version__
    from fedeeg.federation.deployment import app_mismatch

    assert app_mismatch("fedeeg/fedeeg", __version__) is None
    assert "version '9.9.9'" in app_mismatch("fedeeg/fedeeg", "9.9.9")
    assert "'evil/app'" in app_mismatch("evil/app", __version__)


# ---------------------------------------------------------------- rounds that always end
class _Reply:
    def __init__(self, src, reply_to, error=None, code=1, site=True):
        self.metadata = SimpleNamespace(src_node_id=src, reply_to_message_id=reply_to)
        self.error = SimpleNamespace(reason=error, code=code) if error else None
        self.content = SimpleNamespace(array_records={}, config_records={"site": {"name": f"n{src}"}} if site else {},
                                       metric_records={})

    def has_error(self):
        return self.error is not None


class _FakeGrid:
    """Nodes answer after ``delays[node]`` polls (None: never); ``errors`` answer with an error."""

    def __init__(self, delays, errors=(), unavailable_once=(), siteless=()):
        self.delays, self.errors, self.pushed, self.polls = delays, set(errors), [], 0
        self.siteless = set(siteless)
        self.unavailable_once = set(unavailable_once)
        self._pending = {}

    def get_node_ids(self):
        return list(self.delays)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{len(self.pushed)}"
            self.pushed.append(m.metadata.dst_node_id)
            self._pending[mid] = (m.metadata.dst_node_id, self.polls)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        self.polls += 1
        out = []
        for mid in list(ids):
            node, at = self._pending[mid]
            delay = self.delays[node]
            if delay is not None and self.polls - at >= delay:
                if node in self.unavailable_once:  # Flower's "Node Unavailable" (code 5), then the node is back
                    self.unavailable_once.discard(node)
                    out.append(_Reply(node, mid, "Node Unavailable", code=5))
                else:
                    out.append(_Reply(node, mid, "boom" if node in self.errors else None, site=node not in self.siteless))
                del self._pending[mid]
        return out


@pytest.fixture
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _closer(tmp_path, **kw):
    from fedeeg.deploy.federation_config import FederationConfig
    from fedeeg.federation.deployment import RoundCloser
    from fedeeg.config import RunConfig

    clock = {"t": 0.0}
    fed = FederationConfig(out=tmp_path, run=RunConfig(), **{"sites": 3, "min_sites": 2, "round_deadline": 5.0,
                                                             "poll_interval": 1.0, **kw})
    closer = RoundCloser(fed, node_names={1: "a", 2: "b", 3: "c"}, audit=AuditLog(tmp_path),
                         sleep=lambda s: clock.__setitem__("t", clock["t"] + s))
    return closer, clock


def test_round_closes_at_deadline_without_the_straggler(tmp_path, _task_identity, monkeypatch):
    # Prepare: node 3 never answers; time advances only through the closer's sleeps
    from flwr.app import MessageType, RecordDict

    import fedeeg.federation.deployment as dep

    closer, clock = _closer(tmp_path)
    monkeypatch.setattr(dep.time, "monotonic", lambda: clock["t"])
    grid = _FakeGrid({1: 1, 2: 2, 3: None})

    # Execute
    replies = closer(grid, [1, 2, 3], RecordDict(), MessageType.TRAIN, 1)

    # Assert: closed at the deadline with the two answers, the straggler logged and audited
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    assert clock["t"] >= 5.0 and closer.suspects == {3}
    entry = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert entry["data"]["stragglers"] == ["c"] and entry["data"]["answered"] == ["a", "b"]
    # Next round: the straggler is still asked but no longer waited for
    clock["t"] = 0.0
    replies = closer(grid, [1, 2, 3], RecordDict(), MessageType.TRAIN, 2)
    assert len(replies) == 2 and clock["t"] < 5.0


def test_quorum_closes_early(tmp_path, _task_identity, monkeypatch):
    from flwr.app import MessageType, RecordDict

    import fedeeg.federation.deployment as dep

    closer, clock = _closer(tmp_path, quorum=2)
    monkeypatch.setattr(dep.time, "monotonic", lambda: clock["t"])
    replies = closer(_FakeGrid({1: 1, 2: 1, 3: 4}), [1, 2, 3], RecordDict(), MessageType.TRAIN, 1)
    assert len(replies) == 2 and clock["t"] < 5.0


def test_reply_without_site_record_does_not_count_towards_min_sites(tmp_path, _task_identity, monkeypatch):
    # Prepare: node 2 answers at once but without its site record (as a task made stale by a SuperNode restart
    # could); node 3 answers properly a little later. quorum = min_sites = 2.
    from flwr.app import MessageType, RecordDict

    import fedeeg.federation.deployment as dep

    closer, clock = _closer(tmp_path, quorum=2)
    monkeypatch.setattr(dep.time, "monotonic", lambda: clock["t"])
    grid = _FakeGrid({1: 1, 2: 1, 3: 3}, siteless={2})

    # Execute
    replies = closer(grid, [1, 2, 3], RecordDict(), MessageType.TRAIN, 1)

    # Assert: the round waited for node 3 instead of closing on the malformed reply; the audit names it as failed
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    entry = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert entry["data"]["answered"] == ["a", "c"]
    assert entry["data"]["failed"] == [{"site": "b", "reason": "malformed reply: no site record"}]


def test_site_revoked_during_the_run_is_not_asked_from_the_next_round(tmp_path, _task_identity, monkeypatch):
    # Prepare: three registered sites a, b, c answering at once; a closer that re-reads the registry
    from flwr.app import MessageType, RecordDict

    import fedeeg.federation.deployment as dep
    from fedeeg.deploy.keys import new_site_keys
    from fedeeg.deploy.registry import SiteRegistry

    registry = SiteRegistry(tmp_path / "sites.json")
    for name in ("a", "b", "c"):
        registry.register(new_site_keys(name, tmp_path / f"keys-{name}").node_pub)
    closer, clock = _closer(tmp_path)
    closer.registry = tmp_path / "sites.json"
    monkeypatch.setattr(dep.time, "monotonic", lambda: clock["t"])
    grid = _FakeGrid({1: 1, 2: 1, 3: 1})
    first = closer(grid, [1, 2, 3], RecordDict(), MessageType.TRAIN, 1)

    # Execute: the coordinator revokes b between rounds 1 and 2
    SiteRegistry(tmp_path / "sites.json").revoke("b", reason="left the consortium")
    grid.pushed.clear()
    second = closer(grid, [1, 2, 3], RecordDict(), MessageType.TRAIN, 2)

    # Assert: b answered round 1 but is neither asked nor counted in round 2; the revocation is audited
    assert sorted(r.metadata.src_node_id for r in first) == [1, 2, 3]
    assert sorted(grid.pushed) == [1, 3] and sorted(r.metadata.src_node_id for r in second) == [1, 3]
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["data"]["site"] for e in events if e["event"] == "site-revoked"] == ["b"]
    assert events[-1]["data"]["asked"] == ["a", "c"]


def test_site_runtime_client_raises_on_401_instead_of_signalling():
    # Prepare: a call that fails with 401 Unauthorized, as a task token does once the SuperNode restarted
    import httpx

    from fedeeg.federation.deployment import _bounded_retry_invoker, _task_heartbeat

    request = httpx.Request("POST", "http://127.0.0.1:1/v1/runtime/push-task-output")
    calls = []

    def unauthorized():
        calls.append(1)
        raise httpx.HTTPStatusError("401", request=request, response=httpx.Response(401, request=request))

    # Execute / Assert: the error reaches the caller after one try (Flower's own invoker sends SIGINT to the process)
    with pytest.raises(httpx.HTTPStatusError):
        _bounded_retry_invoker(5.0).invoke(unauthorized)
    assert calls == [1]
    # the worker's heartbeat reports failure instead of raising or signalling
    assert _task_heartbeat(SimpleNamespace(SendTaskHeartbeat=lambda req: unauthorized()))() is False
    assert _task_heartbeat(SimpleNamespace(SendTaskHeartbeat=lambda req: SimpleNamespace(success=True)))() is True


@pytest.mark.parametrize("policy", ["retry", "skip", "abort"])
def test_too_few_sites_retry_skip_abort(tmp_path, _task_identity, monkeypatch, policy):
    # Prepare: two of three sites fail, so min_sites = 2 is never reached
    from flwr.app import MessageType, RecordDict

    import fedeeg.federation.deployment as dep

    closer, clock = _closer(tmp_path, on_too_few=policy, max_retries=2)
    monkeypatch.setattr(dep.time, "monotonic", lambda: clock["t"])
    grid = _FakeGrid({1: 1, 2: 1, 3: 1}, errors={2, 3})

    # Execute / Assert: never a hang; retry asks again, then skips (no update: the model stays)
    if policy == "abort":
        with pytest.raises(RuntimeError, match="on_too_few = 'abort'"):
            closer(grid, [1, 2, 3], RecordDict(), MessageType.TRAIN, 1)
        return
    replies = closer(grid, [1, 2, 3], RecordDict(), MessageType.TRAIN, 1)
    assert replies == []
    assert len(grid.pushed) == (9 if policy == "retry" else 3)
    assert json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])["event"] == "round-skipped"


def test_example_configs_are_valid():
    # Prepare
    root = Path(__file__).parents[1]

    # Execute
    fed = load_federation_config(root / "server" / "federation.example.toml")
    site = load_client_config(root / "client" / "site.example.toml")

    # Assert
    assert fed.run.dataset == "folder" and fed.run.label_names == ("rest", "arithmetic") and fed.metrics_port == 9100
    assert site.name == "hospital-a" and site.server == "coordinator.example.org:9092"
    assert set(site.data_tables) == {"site", "data", "labels", "channels"}


def test_prometheus_endpoint_serves_round_metrics():
    # Prepare
    pytest.importorskip("prometheus_client")
    import urllib.request

    from fedeeg.deploy.launcher import free_port
    from fedeeg.deploy.metrics import ServerMetrics

    port = free_port()
    metrics = ServerMetrics(port, addr="127.0.0.1")
    try:
        # Execute
        metrics.set("round", 3)
        metrics.inc("bytes_up", 1234)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.close()

    # Assert
    assert "fedeeg_round 3.0" in body and "fedeeg_bytes_up_total 1234.0" in body


def test_site_run_config_uses_local_data_and_paths(tmp_path):
    # Prepare: the coordinator's run names its own paths, which mean nothing at a site
    from fedeeg.config import RunConfig
    from fedeeg.deploy.site_config import ClientConfig
    from fedeeg.federation.deployment import _action, site_run_config

    run = RunConfig(sites=3, checkpoint="/coordinator/labram.pth", out="/coordinator/run", device="cuda")
    synthetic = ClientConfig(name="s", server="h:1", state_dir=tmp_path, insecure=True, dataset="synthetic",
                             partition=2, device="cpu", checkpoint="/site/labram.pth")
    folder = ClientConfig(name="h", server="h:1", state_dir=tmp_path, insecure=True, checkpoint="/site/labram.pth",
                          data_tables={"site": {"name": "h"}})

    # Execute
    cfg_s, pid_s = site_run_config(run, synthetic, None)
    cfg_f, pid_f = site_run_config(run, folder, tmp_path / "site-data.toml")

    # Assert
    assert (cfg_s.dataset, pid_s, cfg_s.device, cfg_s.checkpoint, cfg_s.out) == ("synthetic", 2, "cpu", "/site/labram.pth", "")
    assert (cfg_f.dataset, pid_f, cfg_f.site_list, cfg_f.label_names) == (
        "folder", 0, (str(tmp_path / "site-data.toml"),), ("rest", "arithmetic"))
    with pytest.raises(ValueError, match=r"\[deployment\] checkpoint"):
        site_run_config(run, ClientConfig(name="s", server="h:1", state_dir=tmp_path, insecure=True,
                                          dataset="synthetic"), None)
    assert [_action(t) for t in ("train", "evaluate", "train.share-keys", "query")] == [
        "train", "evaluate", "share-keys", None]


def test_unreachable_site_is_asked_again_within_the_deadline(tmp_path, _task_identity, monkeypatch):
    # Prepare: site c's connection drops once (Flower answers "Node Unavailable"), then it is back
    from flwr.app import MessageType, RecordDict

    import fedeeg.federation.deployment as dep

    closer, clock = _closer(tmp_path, round_deadline=60.0)
    monkeypatch.setattr(dep.time, "monotonic", lambda: clock["t"])
    grid = _FakeGrid({1: 1, 2: 1, 3: 1}, unavailable_once={3})

    # Execute
    replies = closer(grid, [1, 2, 3], RecordDict(), MessageType.TRAIN, 1)

    # Assert: three good answers; c was asked twice
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3] and not any(r.has_error() for r in replies)
    assert grid.pushed.count(3) == 2


def test_replies_are_recorded_under_the_registered_site_name(tmp_path, _task_identity, monkeypatch, caplog):
    # Prepare: the fake sites call themselves n1, n2, n3; their keys are registered as a, b, c
    from flwr.app import MessageType, RecordDict

    import fedeeg.federation.deployment as dep

    closer, clock = _closer(tmp_path)
    monkeypatch.setattr(dep.time, "monotonic", lambda: clock["t"])
    # Execute: two rounds
    with caplog.at_level("WARNING"):
        replies = closer(_FakeGrid({1: 1, 2: 1, 3: 1}), [1, 2, 3], RecordDict(), MessageType.TRAIN, 1)
        closer(_FakeGrid({1: 1, 2: 1, 3: 1}), [1, 2, 3], RecordDict(), MessageType.TRAIN, 2)
    # Assert: the registered names stand; one warning per site, naming both names
    assert sorted(r.content.config_records["site"]["name"] for r in replies) == ["a", "b", "c"]
    warnings = [r.getMessage() for r in caplog.records if "calls itself" in r.getMessage()]
    assert len(warnings) == 3 and any("Site a (registered key) calls itself 'n1'" in w for w in warnings)


def test_object_pull_backoff_is_shortened_in_this_process(monkeypatch):
    # Prepare: Flower's defaults (1 s first wait, 10 s cap) restored afterwards
    from flwr.supercore.inflatable import inflatable_utils as utils

    from fedeeg.deploy._flower import shorter_object_pull_backoff

    for f in (utils.pull_objects, utils.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(f, "__kwdefaults__", dict(f.__kwdefaults__))
    # Execute
    changed = shorter_object_pull_backoff(0.02, cap=0.1, patience=600.0)
    unchanged = shorter_object_pull_backoff(0)
    # Assert: both pull paths ask again after 0.02 s, at most every 0.1 s, for 10 minutes; 0 leaves Flower's waits
    assert changed and not unchanged
    for f in (utils.pull_objects, utils.pull_and_inflate_object_from_tree):
        assert f.__kwdefaults__["initial_backoff"] == 0.02 and f.__kwdefaults__["backoff_cap"] == 0.1
        assert f.__kwdefaults__["max_tries_per_object"] == 6000
        assert f.__kwdefaults__["max_time"] == 7200  # Flower's overall limit stays


def test_supernode_polls_often_during_a_run_and_seldom_when_idle(monkeypatch, tmp_path):
    # Prepare: the SuperNode's waits as Flower calls them (0.5 s while a message is handled, 3 s when none came)
    from flwr.supernode import start_client_internal as sci

    from fedeeg.deploy import _flower
    from fedeeg.deploy.site_config import ClientConfig

    clock = [1000.0]
    slept = []
    monkeypatch.setattr(_flower._time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(_flower._time, "sleep", slept.append)
    monkeypatch.setattr(sci, "time", sci.time)
    polls = _flower.ActivePoll(idle=0.25, active=0.05, window=60.0)
    assert _flower._shorter_supernode_poll(polls)
    # Execute: idle; a message handled; 30 s later; 61 s later
    sci.time.sleep(3)
    sci.time.sleep(0.5)
    clock[0] += 30
    sci.time.sleep(3)
    clock[0] += 31
    sci.time.sleep(3)
    # Assert: idle polls at 0.25 s, during the run at 0.05 s, and back to 0.25 s a minute after the last message
    assert slept == [0.25, 0.05, 0.05, 0.25]
    with pytest.raises(ValueError, match="active_poll_interval"):
        ClientConfig(name="s", server="h:1", state_dir=tmp_path, insecure=True, dataset="synthetic",
                     poll_interval=0.25, active_poll_interval=0.5)


def test_supernode_wakes_the_idle_clientapp_through_the_wake_file(monkeypatch, tmp_path):
    # Prepare: the SuperNode's side touches the wake file when it handles a message; the ClientApp's side waits
    # idle (2 s between polls of its SuperNode) in slices of 0.02 s, looking at that file's time in between
    import threading
    import time

    from flwr.supernode import start_client_internal as sci

    from fedeeg.deploy import _flower

    wake = tmp_path / "supernode-active"
    monkeypatch.setattr(sci, "time", sci.time)
    supernode = _flower.ActivePoll(idle=0.25, active=0.05, wake_file=wake, touch=True)
    assert _flower._shorter_supernode_poll(supernode)
    worker = _flower.ActivePoll(idle=2.0, active=0.02, wake_file=wake)
    stop = threading.Event()
    # Execute: idle (no message): the full interval; then the SuperNode takes a message while the worker waits
    t0 = time.monotonic()
    _flower.wait_for_work(worker, stop)
    idle_wait = time.monotonic() - t0
    timer = threading.Timer(0.3, lambda: sci.time.sleep(0.5))  # Flower's wait for the reply: "a message is here"
    t0 = time.monotonic()
    timer.start()
    _flower.wait_for_work(worker, stop)
    woken_after = time.monotonic() - t0
    timer.join()
    # Assert: the idle wait lasts its 2 s; the signalled one ends soon after the touch (0.3 s), long before 2 s,
    # and the worker then polls at its active interval; only the SuperNode's side writes the file
    assert idle_wait >= 1.9
    assert wake.exists()
    assert 0.25 <= woken_after < 1.0
    assert worker.interval == 0.02
    worker.busy()
    mtime = wake.stat().st_mtime_ns
    time.sleep(0.01)
    worker.busy()
    assert wake.stat().st_mtime_ns == mtime


def test_clientapp_wait_without_wake_file_is_the_poll_interval():
    # Prepare
    import threading
    import time

    from fedeeg.deploy import _flower

    polls = _flower.ActivePoll(idle=0.3, active=0.05)
    stop = threading.Event()
    # Execute
    t0 = time.monotonic()
    _flower.wait_for_work(polls, stop)
    waited = time.monotonic() - t0
    stop.set()
    t0 = time.monotonic()
    _flower.wait_for_work(polls, stop)
    stopped = time.monotonic() - t0
    # Assert: no wake file: a plain wait of the idle interval; a set stop event ends it at once
    assert 0.29 <= waited < 1.0
    assert stopped < 0.05
