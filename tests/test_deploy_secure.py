"""Secure aggregation in a deployment: each site's own identity key and the roster it trusts (no Flower processes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedeeg.config import RunConfig
from fedeeg.deploy.keys import new_site_keys
from fedeeg.deploy.registry import SiteRegistry
from fedeeg.deploy.roster import (
    RosterError,
    identity_fingerprint,
    load_site_keys,
    read_roster,
    registry_public_keys,
    write_roster,
)
from fedeeg.secagg.keys import generate_identity, load_identity, public_bytes, save_identity
from _fakes import fake_evaluate, fake_train_local

SMALL = dict(backbone="labram-small", rounds=1, batch_size=16, window_seconds=2.0, device="cpu")
#: Key names of the three sites, by partition id: their roster order (a, b, c) differs from the partition order.
KEY_NAMES = ["hosp-c", "hosp-a", "hosp-b"]


@pytest.fixture(autouse=True)
def _flower_task_identity(flower_task_identity):
    """Every test here builds Messages outside a running app (see conftest's ``flower_task_identity``)."""


def _enrol(tmp_path, names, *, without_identity=()):
    """Sites make their keys; the coordinator registers their public keys."""
    registry = SiteRegistry(tmp_path / "sites.json")
    keys = {}
    for name in names:
        keys[name] = new_site_keys(name, tmp_path / name)
        if name in without_identity:
            keys[name].identity_pub.unlink()
        registry.register(keys[name].node_pub)
    return registry, keys


# ------------------------------------------------------------------ (a) the roster file
def test_roster_round_trip_is_sorted_and_gives_protocol_ids_by_position(tmp_path):
    # Prepare
    registry, keys = _enrol(tmp_path, ["zeta", "alpha", "mid"])
    registry.revoke("mid")
    # Execute
    path = write_roster(registry.path, tmp_path / "roster.json")
    roster = read_roster(path)
    raw = json.loads(path.read_text())
    # Assert: active sites only, sorted by name, fingerprints of the raw keys, ids = 1-based positions
    assert [s["name"] for s in raw["sites"]] == ["alpha", "zeta"]
    assert set(raw["sites"][0]) == {"name", "identity_key", "fingerprint"}
    assert roster.site_id("alpha") == 1 and roster.site_id("zeta") == 2
    alpha = load_identity(keys["alpha"].identity_key)
    assert raw["sites"][0]["fingerprint"] == identity_fingerprint(alpha) == identity_fingerprint(public_bytes(alpha))
    assert roster.public_keys() == {1: public_bytes(alpha), 2: public_bytes(load_identity(keys["zeta"].identity_key))}
    assert registry_public_keys(registry.path) == roster.public_keys()  # the server computes the same
    with pytest.raises(RosterError, match="'mid' is not in .*alpha, zeta.*fedeeg site register"):
        roster.site_id("mid")


def test_roster_refuses_an_active_site_without_identity_key(tmp_path):
    # Prepare
    registry, _ = _enrol(tmp_path, ["alpha", "beta"], without_identity=("beta",))
    # Execute / Assert: the error names the registry, the site and what to do
    with pytest.raises(RosterError, match=r"\['beta'\].*sites.json.*identity key.*fedeeg site register"):
        write_roster(registry.path, tmp_path / "roster.json")
    assert not (tmp_path / "roster.json").exists()


def test_site_roster_command_writes_the_file_and_names_missing_keys(tmp_path):
    from typer.testing import CliRunner

    from fedeeg.cli import app

    # Prepare
    _enrol(tmp_path, ["beta", "alpha"])
    runner = CliRunner()
    # Execute
    ok = runner.invoke(app, ["site", "roster", "--registry", str(tmp_path / "sites.json"), "--out",
                             str(tmp_path / "roster.json")])
    _enrol(tmp_path / "other", ["gamma"], without_identity=("gamma",))
    bad = runner.invoke(app, ["site", "roster", "--registry", str(tmp_path / "other" / "sites.json"), "--out",
                              str(tmp_path / "other.json")])
    # Assert
    assert ok.exit_code == 0, ok.output
    assert read_roster(tmp_path / "roster.json").names == ["alpha", "beta"]
    assert bad.exit_code == 2 and "gamma" in bad.output and "fedeeg site register" in bad.output


@pytest.mark.parametrize("tamper, match", [
    (lambda s: s.update(identity_key=s["identity_key"].replace("MCowBQYDK2Vw", "MCowBQYDK2Vx")),
     "not a PEM public key"),
    (lambda s: s.update(identity_key="-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n"),
     "not a PEM public key"),
    (lambda s: s.update(fingerprint="00" * 32), "says fingerprint .*altered"),
    (lambda s: s.pop("identity_key"), "not a FedEEG roster"),
])
def test_tampered_roster_file_is_refused_naming_the_file(tmp_path, tamper, match):
    # Prepare
    registry, _ = _enrol(tmp_path, ["alpha", "beta"])
    path = write_roster(registry.path, tmp_path / "roster.json")
    raw = json.loads(path.read_text())
    tamper(raw["sites"][1])
    path.write_text(json.dumps(raw))
    # Execute / Assert
    with pytest.raises(RosterError, match=match) as err:
        read_roster(path)
    assert "roster.json" in str(err.value)


def test_roster_with_a_key_listed_twice_is_refused(tmp_path):
    # Prepare: beta's entry carries alpha's key
    registry, _ = _enrol(tmp_path, ["alpha", "beta"])
    path = write_roster(registry.path, tmp_path / "roster.json")
    raw = json.loads(path.read_text())
    raw["sites"][1].update(identity_key=raw["sites"][0]["identity_key"], fingerprint=raw["sites"][0]["fingerprint"])
    path.write_text(json.dumps(raw))
    # Execute / Assert
    with pytest.raises(RosterError, match="'alpha' and 'beta' have the same identity key"):
        read_roster(path)


# ------------------------------------------------------------------ (b) the site's own key against its entry
def test_site_whose_identity_key_does_not_match_its_roster_entry_gets_a_clear_error(tmp_path):
    # Prepare: the roster holds alpha's registered key; alpha's key file was replaced since
    registry, keys = _enrol(tmp_path, ["alpha", "beta"])
    roster = write_roster(registry.path, tmp_path / "roster.json")
    registered = identity_fingerprint(load_identity(keys["alpha"].identity_key))
    key, ids, sid = load_site_keys("alpha", keys["alpha"].identity_key, roster)
    save_identity(generate_identity(), keys["alpha"].identity_key)
    mine = identity_fingerprint(load_identity(keys["alpha"].identity_key))
    # Execute / Assert
    assert sid == 1 and ids[1] == public_bytes(key)  # before: it matched
    with pytest.raises(RosterError, match=f"does not match the roster's entry for alpha \\(fingerprint {mine} vs "
                                          f"{registered}\\); ask the coordinator"):
        load_site_keys("alpha", keys["alpha"].identity_key, roster)


def test_site_config_reads_roster_and_defaults_identity_key_beside_key(tmp_path):
    from fedeeg.deploy.roster import NODE_IDENTITY, NODE_NAME, NODE_ROSTER
    from fedeeg.deploy.site_config import load_client_config

    # Prepare
    (tmp_path / "site.toml").write_text('[deployment]\nname = "hosp-a"\nserver = "h:1"\ndataset = "synthetic"\n'
                                        'ca = "keys/ca.pem"\nkey = "keys/hosp-a.key"\nroster = "keys/roster.json"\n')
    # Execute
    site = load_client_config(tmp_path / "site.toml")
    node = site.secagg_node_config()
    # Assert: paths relative to the site file; identity key = NAME.identity.pem beside key
    assert site.roster == (tmp_path / "keys" / "roster.json").resolve()
    assert node == {NODE_NAME: "hosp-a", NODE_IDENTITY: str((tmp_path / "keys" / "hosp-a.identity.pem").resolve()),
                    NODE_ROSTER: str(site.roster)}


# ------------------------------------------------------------------ (c) a secure round with the sites' own keys
@pytest.fixture
def deployed(monkeypatch, tmp_path):
    """Three sites with keys from `fedeeg site new`, a registry, the distributed roster; no seed-derived key allowed."""
    import fedeeg.federation.client_app as client_app
    import fedeeg.federation.secure as secure
    import fedeeg.secagg
    import fedeeg.secagg.keys
    import fedeeg.training

    monkeypatch.setattr(client_app, "train_local", fake_train_local)
    monkeypatch.setattr(fedeeg.training, "evaluate", fake_evaluate)

    def forbidden(*args, **kwargs):
        raise AssertionError("a seed-derived identity was used in the deployment path")

    for mod in (secure, fedeeg.secagg, fedeeg.secagg.keys):  # (d) nothing may derive keys from the seed
        for fn in ("simulation_identity", "simulation_roster"):
            if hasattr(mod, fn):
                monkeypatch.setattr(mod, fn, forbidden)
    registry, keys = _enrol(tmp_path, KEY_NAMES)
    roster = write_roster(registry.path, tmp_path / "roster.json")
    return registry, keys, roster


class Grid:
    """A Grid stand-in delivering messages to ClientApp handlers in this process, one Context per node.

    Each node's ``node_config`` carries what :class:`fedeeg.federation.deployment.ClientWorker` puts there.
    """

    def __init__(self, cfg: RunConfig, node_configs: list[dict], after=None):
        from flwr.app import Context, RecordDict

        self.cfg, self.after = cfg, after
        self.nodes = list(range(1, len(node_configs) + 1))
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config=dict(nc), state=RecordDict(), run_config={})
                         for nid, nc in zip(self.nodes, node_configs)}
        self.sent: list[str] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        from fedeeg.federation.client_app import handle

        replies = []
        for msg in messages:
            mtype = msg.metadata.message_type
            action = mtype.split(".", 1)[1] if "." in mtype else mtype
            self.sent.append(action)
            reply = handle(msg, self.contexts[msg.metadata.dst_node_id], self.cfg, action)
            replies.append(self.after(msg, reply) if self.after else reply)
        return replies


def _node_configs(keys, roster, tmp_path):
    from fedeeg.deploy.site_config import ClientConfig

    out = []
    for pid, name in enumerate(KEY_NAMES):
        site = ClientConfig(name=name, server="h:1", state_dir=tmp_path / "state", ca=tmp_path / "ca.pem",
                            key=keys[name].node_key, roster=roster, dataset="synthetic", partition=pid)
        out.append({"partition-id": pid, **site.secagg_node_config()})
    return out


def _initial(cfg):
    from fedeeg.experiment import build_model
    from fedeeg.models import trainable_state_dict

    return {k: v.numpy() for k, v in trainable_state_dict(build_model(cfg, n_outputs=2)).items()}


def _expected_mean(cfg, glob, rnd, pids):
    """The example-weighted mean of the fake sites' tensors (what plain FedAvg gives)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedeeg.experiment import prepare_sites
    from fedeeg.federation import records as R

    sites = prepare_sites(cfg)
    msg = Message(RecordDict({R.ARRAYS: R.state_to_record(R.numpy_to_state(glob)),
                              R.CONFIG: ConfigRecord({"server-round": rnd})}), dst_node_id=1, message_type="train")
    out, total = {}, sum(sites[p].train.n_windows for p in pids)
    for p in pids:
        _, trained, res = fake_train_local(cfg, msg, p, sites[p])
        for k, v in trained.items():
            out[k] = out.get(k, 0.0) + v.astype(np.float64) * res.n_examples / total
    return {**glob, **{k: v.astype(glob[k].dtype) for k, v in out.items()}}


def _global(result):
    from fedeeg.models import trainable_state_dict

    return {k: v.numpy() for k, v in trainable_state_dict(result.models["global"]).items()}


def _assert_close(result, expected):
    bound = result.history[0]["secure"]["decode_error_bound"]
    assert 0 < bound < 1e-5
    got = _global(result)
    assert set(got) == set(expected)
    for k, v in got.items():
        ulp = np.abs(np.spacing(np.asarray(expected[k], dtype=np.float32)))
        np.testing.assert_array_less(np.abs(v.astype(np.float64) - expected[k]), 2 * bound + 2 * ulp + 1e-12)


CFG = RunConfig(strategy="ffa", sites=3, secure=True, **SMALL)


def test_secure_round_with_the_sites_own_keys_equals_the_plain_aggregate(deployed, tmp_path):
    import fedeeg.federation.secure as secure
    from fedeeg.federation.server_app import run_federation

    # Prepare
    registry, keys, roster = deployed
    grid = Grid(CFG, _node_configs(keys, roster, tmp_path))
    # Execute: the server's roster comes from its registry, the sites' from their roster.json
    result = run_federation(grid, CFG, n_sites=3, roster=registry_public_keys(registry.path))
    # Assert: all three took part under the roster's ids (hosp-a=1, hosp-b=2, hosp-c=3), none was rejected,
    # although any seed-derived key would have failed its site (the fixture makes them raise)
    with pytest.raises(AssertionError, match="seed-derived"):
        secure.site_identity(CFG, 1)
    rec = result.history[0]
    assert {"secagg_advertise", "secagg_share", "secagg_input", "secagg_unmask"} <= set(grid.sent)
    assert rec["rejected"] == [] and rec["secure"]["survivors"] == 3
    assert {c["secagg-name"]: read_roster(roster).site_id(c["secagg-name"]) for c in grid_configs(grid)} == {
        "hosp-a": 1, "hosp-b": 2, "hosp-c": 3}
    _assert_close(result, _expected_mean(CFG, _initial(CFG), 1, [0, 1, 2]))


def grid_configs(grid):
    return [grid.contexts[n].node_config for n in grid.nodes]


def test_a_key_substituted_by_the_coordinator_is_rejected_by_name(deployed, tmp_path):
    from fedeeg.federation.server_app import run_federation

    # Prepare: the coordinator's roster holds a key it made itself for hosp-b (partition 2, "site-2")
    registry, keys, roster = deployed
    server_roster = registry_public_keys(registry.path)
    server_roster[read_roster(roster).site_id("hosp-b")] = public_bytes(generate_identity())
    grid = Grid(CFG, _node_configs(keys, roster, tmp_path))
    # Execute
    result = run_federation(grid, CFG, n_sites=3, roster=server_roster)
    # Assert: hosp-b's genuine advertisement does not verify; the round goes on with the other two
    rec = result.history[0]
    (rej,) = rec["rejected"]
    assert rej["site"] == "site-2" and rej["stage"] == "advertise"
    assert "SignatureError" in rej["reason"] and "does not verify" in rej["reason"]
    assert "roster differs from the coordinator's" in rej["reason"] and "fedeeg site roster" in rej["reason"]
    assert rec["secure"]["sites_advertised"] == 2 and rec["secure"]["survivors"] == 2
    _assert_close(result, _expected_mean(CFG, _initial(CFG), 1, [0, 1]))


def test_a_site_with_a_wrong_key_or_no_roster_is_refused_with_what_to_do(deployed, tmp_path):
    from fedeeg.federation.server_app import run_federation

    # Prepare: hosp-a (partition 1) now has another identity key; hosp-c (partition 0) has no roster configured
    registry, keys, roster = deployed
    save_identity(generate_identity(), keys["hosp-a"].identity_key)
    configs = _node_configs(keys, roster, tmp_path)
    configs[0]["secagg-roster"] = ""
    grid = Grid(CFG, configs)
    # Execute: two of three refuse, below the minimum of two sites
    result = run_federation(grid, CFG, n_sites=3, roster=registry_public_keys(registry.path))
    # Assert: the round fails cleanly; each refusal says what to do
    rec = result.history[0]
    reasons = {r["site"]: r["reason"] for r in rec["rejected"]}
    assert "does not match the roster's entry for hosp-a" in reasons["node 2"]
    assert "ask the coordinator" in reasons["node 2"]
    assert "[deployment] roster" in reasons["node 1"] and "fedeeg site roster" in reasons["node 1"]
    assert rec["failed"].startswith("Round 1: 1 valid key advertisement")
    assert rec["secure"]["failed"] is True


def test_deployment_run_needs_every_active_sites_identity_key(tmp_path):
    from fedeeg.deploy.federation_config import FederationConfig
    from fedeeg.federation.deployment import run_deployment

    # Prepare: a secure run whose registry has a site registered without its identity key
    _enrol(tmp_path, ["alpha", "beta"], without_identity=("beta",))
    fed = FederationConfig(run=CFG, out=tmp_path / "out", registry=tmp_path / "sites.json")
    # Execute / Assert: refused at start, naming the site and the command; nothing was asked of the grid
    with pytest.raises(ValueError, match=r"identity key.*\['beta'\].*fedeeg site register"):
        run_deployment(object(), fed)


def test_secure_deployment_stages_wait_at_most_the_round_deadline(tmp_path, monkeypatch):
    # Prepare: a secure run with no reply_timeout of its own; run_federation replaced by a spy
    import fedeeg.federation.deployment as dep
    import fedeeg.federation.server_app as server_app
    from fedeeg.deploy.federation_config import FederationConfig

    _enrol(tmp_path, ["alpha", "beta", "gamma"])
    fed = FederationConfig(run=CFG.replace(reply_timeout=0.0), out=tmp_path / "out", registry=tmp_path / "sites.json",
                           sites=3, min_sites=2, round_deadline=42.0)
    seen = {}

    class Stop(Exception):
        pass

    def spy(grid, cfg, **kw):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(server_app, "run_federation", spy)
    monkeypatch.setattr(dep, "wait_for_sites", lambda grid, fed, names: [1, 2, 3])

    # Execute
    with pytest.raises(Stop):
        dep.run_deployment(object(), fed)

    # Assert: each secure stage waits at most the deadline (0 = forever would hang on a dead site)
    assert CFG.secure and seen["cfg"].reply_timeout == 42.0
