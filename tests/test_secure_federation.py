"""Secure aggregation through the ServerApp/ClientApp (in-process grid, no Ray), rolora, DP, update checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedeeg.aggregation import coordinate_median, lora_delta, travelling_names, trimmed_mean
from fedeeg.config import RunConfig
from _fakes import fake_evaluate, fake_train_local


@pytest.fixture(autouse=True)
def _flower_task_identity(flower_task_identity):
    """Every test here builds Messages outside a running app (see conftest's ``flower_task_identity``)."""


SMALL = dict(backbone="labram-small", rounds=1, batch_size=16, window_seconds=2.0, device="cpu")


@pytest.fixture
def fast_sites(monkeypatch):
    """Sites 'train' and 'evaluate' instantly: these tests are about what travels and how it is merged."""
    import fedeeg.federation.client_app as client_app
    import fedeeg.training

    monkeypatch.setattr(client_app, "train_local", fake_train_local)
    monkeypatch.setattr(fedeeg.training, "evaluate", fake_evaluate)


class Grid:
    """A Grid stand-in delivering messages to ClientApp handlers in this process, one persistent Context per node.

    ``before(message)`` may alter a request on its way to a site, ``after(message, reply)`` a reply on its way back
    (a man in the middle, or a dropout).
    """

    def __init__(self, cfg: RunConfig, n_nodes: int, before=None, after=None):
        from flwr.app import Context, RecordDict

        self.cfg, self.nodes = cfg, list(range(1, n_nodes + 1))
        self.before, self.after = before, after
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={"partition-id": nid - 1, "num-partitions": n_nodes},
                                      state=RecordDict(), run_config={}) for nid in self.nodes}
        self.sent: list[str] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        from fedeeg.federation.client_app import handle

        replies = []
        for msg in messages:
            if self.before:
                msg = self.before(msg)
            mtype = msg.metadata.message_type
            action = mtype.split(".", 1)[1] if "." in mtype else mtype
            self.sent.append(action)
            reply = handle(msg, self.contexts[msg.metadata.dst_node_id], self.cfg, action)
            if self.after:
                reply = self.after(msg, reply)
            replies.append(reply)
        return replies


def _global(result) -> dict[str, np.ndarray]:
    from fedeeg.models import trainable_state_dict

    return {k: v.numpy() for k, v in trainable_state_dict(result.models["global"]).items()}


def _initial(cfg) -> dict[str, np.ndarray]:
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
    out = {}
    total = sum(sites[p].train.n_windows for p in pids)
    for p in pids:
        _, trained, res = fake_train_local(cfg, msg, p, sites[p])
        for k, v in trained.items():
            out[k] = out.get(k, 0.0) + v.astype(np.float64) * res.n_examples / total
    return {**glob, **{k: v.astype(glob[k].dtype) for k, v in out.items()}}


def _error_reply(msg, reason):
    from flwr.app import Error, Message

    return Message(Error(code=1001, reason=reason), reply_to=msg)


def _run(cfg, n, **grid_kwargs):
    from fedeeg.federation.server_app import run_federation

    grid = Grid(cfg, n, **grid_kwargs)
    return run_federation(grid, cfg, n_sites=n), grid


# ------------------------------------------------------- secure == plain
@pytest.mark.parametrize("strategy", ["ffa", "rolora"])
def test_secure_adapter_equals_plain_aggregate_within_quantisation_bound(fast_sites, strategy):
    # Prepare: the same sites and updates, plain then secure, 2 rounds (rolora: B then A)
    plain_cfg = RunConfig(strategy=strategy, sites=3, **{**SMALL, "rounds": 2})
    secure_cfg = plain_cfg.replace(secure=True)
    # Execute
    plain, _ = _run(plain_cfg, 3)
    secure, grid = _run(secure_cfg, 3)
    # Assert: every stage went over the Message API, every round completed
    assert {"secagg_advertise", "secagg_share", "secagg_input", "secagg_unmask"} <= set(grid.sent)
    assert "train" not in grid.sent
    bound = max(h["secure"]["decode_error_bound"] for h in secure.history)
    assert 0 < bound < 1e-5
    p, s = _global(plain), _global(secure)
    assert set(p) == set(s)
    for k in p:
        ulp = np.abs(np.spacing(p[k].astype(np.float32)))
        np.testing.assert_array_less(np.abs(s[k].astype(np.float64) - p[k]), 2 * bound + 2 * ulp + 1e-12)
    assert secure.history[-1]["train_loss"] == pytest.approx(plain.history[-1]["train_loss"], abs=1e-4)
    assert secure.extra["secure_aggregation"]["rounds_completed"] == 2


def test_secure_upload_is_about_the_fp32_adapter_size(fast_sites):
    cfg = RunConfig(strategy="ffa", sites=3, secure=True, **SMALL)
    result, _ = _run(cfg, 3)
    n_values = sum(v.size for v in _initial(cfg).values())
    up = result.history[0]["bytes_up_per_site"]
    assert 4 * n_values < up <= 1.1 * 4 * n_values


@pytest.mark.slow
def test_secure_equals_plain_with_real_local_training(monkeypatch):
    # Prepare: record the sites' real training in a plain round, replay it in a secure round
    import fedeeg.federation.client_app as client_app
    import fedeeg.training

    monkeypatch.setattr(fedeeg.training, "evaluate", fake_evaluate)
    real, recorded = client_app.train_local, {}

    def record(cfg, message, pid, site, **kwargs):  # kwargs: the plain run's evaluation of the previous round
        recorded[pid] = real(cfg, message, pid, site, **kwargs)
        return recorded[pid]

    cfg = RunConfig(strategy="ffa", sites=3, **SMALL)
    monkeypatch.setattr(client_app, "train_local", record)
    plain, _ = _run(cfg, 3)
    monkeypatch.setattr(client_app, "train_local", lambda cfg, message, pid, site, **kwargs: recorded[pid])
    # Execute
    secure, _ = _run(cfg.replace(secure=True), 3)
    # Assert
    bound = secure.history[0]["secure"]["decode_error_bound"]
    p, s = _global(plain), _global(secure)
    for k in p:
        ulp = np.abs(np.spacing(p[k].astype(np.float32)))
        np.testing.assert_array_less(np.abs(s[k].astype(np.float64) - p[k]), 2 * bound + 2 * ulp + 1e-12)
    assert max(np.abs(p[k] - _initial(cfg)[k]).max() for k in p) > 1e-4, "the sites did train"


# -------------------------------------------------------------- dropouts
def test_one_of_five_fails_at_upload_round_merges_the_other_four(fast_sites):
    # Prepare: site-0 trains but its masked upload is lost, every round; t = 3
    cfg = RunConfig(strategy="ffa", sites=5, secure=True, secagg_threshold=3, fail_sites=1, fail_at="upload", **SMALL)
    # Execute
    result, _ = _run(cfg, 5)
    # Assert
    rec = result.history[0]
    assert "failed" not in rec and rec["secure"]["survivors"] == 4 and rec["secure"]["threshold"] == 3
    assert rec["secure"]["dropped_after_sharing"] == ["site-0"]
    assert [r["site"] for r in rec["rejected"]] == ["site-0"] and "fails at 'upload'" in rec["rejected"][0]["reason"]
    expected = _expected_mean(cfg, _initial(cfg), 1, [1, 2, 3, 4])
    got = _global(result)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], atol=2 * rec["secure"]["decode_error_bound"] + 1e-6)


def test_one_of_five_fails_after_upload_its_update_is_still_merged(fast_sites):
    cfg = RunConfig(strategy="ffa", sites=5, secure=True, secagg_threshold=3, fail_sites=1, fail_at="unmask", **SMALL)
    result, _ = _run(cfg, 5)
    rec = result.history[0]
    assert rec["secure"]["survivors"] == 5 and rec["rejected"][0]["stage"] == "secagg_unmask"
    expected = _expected_mean(cfg, _initial(cfg), 1, [0, 1, 2, 3, 4])
    got = _global(result)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], atol=2 * rec["secure"]["decode_error_bound"] + 1e-6)


def test_below_threshold_round_fails_cleanly_and_the_next_round_proceeds(fast_sites, caplog):
    # Prepare: in round 1 three of five sites drop out after sharing keys (t = 3); round 2 is normal
    from fedeeg.federation.secure import INPUT

    def after(msg, reply):
        if msg.metadata.message_type == f"train.{INPUT}" and msg.metadata.group_id == "1" and msg.metadata.dst_node_id <= 3:
            return _error_reply(msg, "connection lost")
        return reply

    cfg = RunConfig(strategy="ffa", sites=5, secure=True, secagg_threshold=3, **{**SMALL, "rounds": 2})
    # Execute
    with caplog.at_level("ERROR", logger="fedeeg"):
        result, _ = _run(cfg, 5, after=after)
    # Assert: round 1 failed with a reason, the model stayed; round 2 merged all five
    r1, r2 = result.history
    assert "below the secure-aggregation threshold t=3" in r1["failed"] and r1["sites_answered"] == 0
    assert len(r1["rejected"]) == 3 and all(r["reason"] == "connection lost" for r in r1["rejected"])
    assert "failed" not in r2 and r2["secure"]["survivors"] == 5
    assert "the next round proceeds" in caplog.text
    assert result.extra["secure_aggregation"]["rounds_failed"] == [1]
    # The round-2 aggregate starts from the unchanged initial adapter
    expected = _expected_mean(cfg, _initial(cfg), 2, [0, 1, 2, 3, 4])
    got = _global(result)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], atol=2 * r2["secure"]["decode_error_bound"] + 1e-6)


# ------------------------------------------------- tampering on the wire
def test_tampered_share_on_the_wire_is_rejected_by_name_and_round_completes(fast_sites):
    # Prepare: the ciphertext site-1 (id 2) sent to site-0 (id 1) gets a bit flipped on the way
    from flwr.app import ConfigRecord

    from fedeeg.federation.secure import INPUT, SECAGG

    def before(msg):
        if msg.metadata.message_type == f"train.{INPUT}" and msg.metadata.dst_node_id == 1:
            payload = dict(msg.content.config_records[SECAGG])
            k = list(payload["from"]).index(2)
            ct = [bytes(c) for c in payload["ct"]]
            ct[k] = ct[k][:-1] + bytes([ct[k][-1] ^ 1])
            payload["ct"] = ct
            msg.content.config_records[SECAGG] = ConfigRecord(payload)
        return msg

    cfg = RunConfig(strategy="ffa", sites=5, secure=True, secagg_threshold=3, **SMALL)
    # Execute
    result, _ = _run(cfg, 5, before=before)
    # Assert: site-0 refuses the round, naming the sender; the other four are merged
    rec = result.history[0]
    (rej,) = rec["rejected"]
    assert rej["site"] == "site-0" and rej["stage"] == INPUT
    assert "DecryptionError" in rej["reason"] and "from site 2 to site 1" in rej["reason"]
    assert rec["secure"]["survivors"] == 4
    expected = _expected_mean(cfg, _initial(cfg), 1, [1, 2, 3, 4])
    for k, v in _global(result).items():
        np.testing.assert_allclose(v, expected[k], atol=2 * rec["secure"]["decode_error_bound"] + 1e-6)


def test_forged_key_advertisement_on_the_wire_is_rejected_by_name(fast_sites):
    # Prepare: site-1's advertised encryption key is swapped on its way to the server
    from flwr.app import ConfigRecord

    from fedeeg.federation.secure import ADVERTISE, SECAGG
    from fedeeg.secagg.keys import x25519_keypair

    def after(msg, reply):
        if msg.metadata.message_type == f"train.{ADVERTISE}" and msg.metadata.dst_node_id == 2:
            ad = dict(reply.content.config_records[SECAGG])
            ad["c-pk"] = x25519_keypair()[1]
            reply.content.config_records[SECAGG] = ConfigRecord(ad)
        return reply

    cfg = RunConfig(strategy="ffa", sites=4, secure=True, **SMALL)
    # Execute
    result, _ = _run(cfg, 4, after=after)
    # Assert
    rec = result.history[0]
    (rej,) = rec["rejected"]
    assert rej["site"] == "site-1" and "SignatureError" in rej["reason"]
    assert "Key advertisement of site-1" in rej["reason"] and "does not verify" in rej["reason"]
    assert rec["secure"]["sites_advertised"] == 3 and rec["secure"]["survivors"] == 3
    expected = _expected_mean(cfg, _initial(cfg), 1, [0, 2, 3])
    for k, v in _global(result).items():
        np.testing.assert_allclose(v, expected[k], atol=2 * rec["secure"]["decode_error_bound"] + 1e-6)


# ------------------------------------------------------------------ rolora
@pytest.mark.parametrize("secure", [False, True])
def test_rolora_alternates_b_then_a_and_each_round_is_exact(fast_sites, secure):
    # Prepare
    from fedeeg.federation import records as R

    cfg = RunConfig(strategy="rolora", sites=3, secure=secure, **{**SMALL, "rounds": 2})
    init = _initial(cfg)
    sent = {}

    def before(msg):  # the global tensors each round's training starts from
        if msg.metadata.message_type in ("train", "train.secagg_input"):
            sent[int(msg.metadata.group_id)] = R.record_to_numpy(msg.content.array_records[R.ARRAYS])
        return msg

    # Execute: round 1 (B and head), then round 2 (A and head)
    result, _ = _run(cfg, 3, before=before)
    g1, g2 = sent[2], _global(result)
    # Assert: which tensors moved
    a_names = [k for k in init if ".lora_A." in k]
    b_names = [k for k in init if ".lora_B." in k]
    assert a_names and b_names
    assert all(np.array_equal(g1[k], init[k]) for k in a_names)
    assert all(not np.array_equal(g1[k], init[k]) for k in b_names)
    assert all(np.array_equal(g2[k], g1[k]) for k in b_names)
    assert all(not np.array_equal(g2[k], g1[k]) for k in a_names)
    # Exactness: the merged B A equals the weighted mean of the sites' B_i A_i, in both rounds
    tol = 1e-5 if secure else 1e-6
    for rnd, start, merged in ((1, init, g1), (2, g1, g2)):
        sites = _sites_tensors(cfg, start, rnd)
        for a in a_names:
            b = a.replace(".lora_A.", ".lora_B.")
            exact = sum(w * lora_delta(t.get(a, start[a]), t.get(b, start[b])) for t, w in sites)
            np.testing.assert_allclose(lora_delta(merged[a], merged[b]), exact, atol=tol)


def _sites_tensors(cfg, glob, rnd):
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedeeg.experiment import prepare_sites
    from fedeeg.federation import records as R

    sites = prepare_sites(cfg)
    msg = Message(RecordDict({R.ARRAYS: R.state_to_record(R.numpy_to_state(glob)),
                              R.CONFIG: ConfigRecord({"server-round": rnd})}), dst_node_id=1, message_type="train")
    out = [fake_train_local(cfg, msg, p, s)[1:] for p, s in enumerate(sites)]
    total = sum(r.n_examples for _, r in out)
    return [(t, r.n_examples / total) for t, r in out]


def test_rolora_phase_trains_only_this_rounds_half_and_restores_the_model():
    # Prepare
    from fedeeg.experiment import build_model
    from fedeeg.federation.client_app import _rolora_phase
    from fedeeg.models import trainable_state_dict

    cfg = RunConfig(strategy="rolora", sites=3, **SMALL)
    model = build_model(cfg, n_outputs=2)
    every = list(trainable_state_dict(model))
    for rnd, frozen in ((1, ".lora_A."), (2, ".lora_B."), (3, ".lora_A.")):
        # Execute: what the site trains (and sends) in this round
        with _rolora_phase(model, cfg, rnd):
            names = list(trainable_state_dict(model))
        # Assert
        assert names == travelling_names(every, "rolora", rnd)
        assert names and not any(frozen in n for n in names) and any("head" in n for n in names)
    assert list(trainable_state_dict(model)) == every


# ---------------------------------------------------------------------- DP
def test_dp_run_reports_epsilon_per_round(fast_sites):
    cfg = RunConfig(strategy="ffa", sites=3, secure=True, clip=1.0, dp_sigma=1.0, **{**SMALL, "rounds": 2})
    result, _ = _run(cfg, 3)
    e1, e2 = (h["secure"]["dp"]["epsilon"] for h in result.history)
    assert 0 < e1 < e2
    assert result.history[0]["secure"]["dp"]["noise_multiplier"] == pytest.approx(1.0)
    assert result.extra["secure_aggregation"]["epsilon"] == pytest.approx(e2)
    # The noise is there: the aggregate differs from the plain mean by about sigma * clip / total weight
    assert result.history[0]["secure"]["mean_update_norm"] > 1.0


# ----------------------------------------------------------- update checks
def test_plain_norm_bound_rejects_an_oversized_update(fast_sites):
    # Prepare: site-2's reply is blown up 100x on its way back; honest sites clip to the bound themselves
    from flwr.app import ArrayRecord

    from fedeeg.federation import records as R

    cfg = RunConfig(strategy="ffa", sites=3, clip=0.5, **SMALL)
    init = _initial(cfg)

    def after(msg, reply):
        if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == 3:
            arrays = R.record_to_numpy(reply.content.array_records[R.ARRAYS])
            big = {k: (init[k] + 100 * (v - init[k])).astype(v.dtype) for k, v in arrays.items()}
            reply.content.array_records[R.ARRAYS] = ArrayRecord(R.numpy_to_state(big))
        return reply

    # Execute
    result, _ = _run(cfg, 3, after=after)
    # Assert
    rec = result.history[0]
    (rej,) = rec["rejected"]
    assert rej["site"] == "site-2" and "above the bound clip=0.5" in rej["reason"]
    assert rec["sites_answered"] == 2


def test_median_aggregation_resists_a_corrupt_site(fast_sites):
    from flwr.app import ArrayRecord

    from fedeeg.federation import records as R

    def after(msg, reply):
        if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == 1:
            arrays = R.record_to_numpy(reply.content.array_records[R.ARRAYS])
            reply.content.array_records[R.ARRAYS] = ArrayRecord(R.numpy_to_state({k: np.full_like(v, 1e6) for k, v in arrays.items()}))
        return reply

    cfg = RunConfig(strategy="ffa", sites=3, aggregation="median", **SMALL)
    result, _ = _run(cfg, 3, after=after)
    init = _initial(cfg)
    assert max(np.abs(v - init[k]).max() for k, v in _global(result).items()) < 0.1


def test_robust_rules():
    us = [{"w": np.array([1.0, 2.0], np.float32)}, {"w": np.array([2.0, 3.0], np.float32)},
          {"w": np.array([100.0, -50.0], np.float32)}, {"w": np.array([3.0, 4.0], np.float32)},
          {"w": np.array([2.5, 3.5], np.float32)}]
    np.testing.assert_allclose(coordinate_median(us)["w"], [2.5, 3.0])
    # 20 % of 5 = 1 value dropped at each end of each coordinate: mean(2, 2.5, 3), mean(2, 3, 3.5)
    np.testing.assert_allclose(trimmed_mean(us, 0.2)["w"], [2.5, 8.5 / 3], rtol=1e-6)
    assert coordinate_median(us)["w"].dtype == np.float32


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("kwargs, match", [
    (dict(secure=True, aggregation="median"), r"needs every update in the clear"),
    (dict(dp_sigma=1.0), r"needs secure=True \(--secure\)"),
    (dict(fail_sites=1, fail_at="unmask"), r"fail_at='unmask' is a stage of secure aggregation"),
    (dict(secure=True, sites=50, clip=10.0, quant_scale=1e8), r"'quant_scale' .* too large for 50 sites with clip 10"),
    (dict(secure=True, mode="centralized"), r"apply to mode='federated'"),
    (dict(secagg_threshold=0.5), r"fraction in \(0.5, 1\) or a whole count"),
    (dict(fail_sites=4, sites=3), r"'fail_sites' must be <= 3"),
    (dict(aggregation="krum"), r"'aggregation'.*'mean', 'median', 'trimmed-mean'"),
])
def test_secure_settings_are_validated_with_named_parameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RunConfig(**kwargs)


def test_secure_site_refuses_plain_training_messages(fast_sites):
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from fedeeg.federation import records as R
    from fedeeg.federation.client_app import handle

    cfg = RunConfig(strategy="ffa", sites=2, secure=True, **SMALL)
    content = RecordDict({R.ARRAYS: R.state_to_record(R.numpy_to_state(_initial(cfg))),
                          R.CONFIG: ConfigRecord({"server-round": 1})})
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    reply = handle(Message(content, dst_node_id=1, message_type=MessageType.TRAIN), ctx, cfg, "train")
    assert reply.has_error() and "never plain updates" in reply.error.reason


# --------------------------------------------------------------- Ray (slow)
@pytest.mark.slow
def test_secure_round_through_flower_simulation_with_a_dropout():
    # Prepare: 3 virtual SuperNodes in Ray; site-0 goes silent at unmasking (t = 2 of 3)
    from fedeeg.federation.simulation import run_federated_simulation

    cfg = RunConfig(strategy="ffa", sites=3, secure=True, fail_sites=1, fail_at="unmask", **SMALL)
    # Execute
    result = run_federated_simulation(cfg, n_sites=3)
    # Assert: the protocol state survived between messages (Context.state), the round completed
    rec = result.history[0]
    assert "failed" not in rec, rec.get("failed")
    assert rec["secure"]["survivors"] == 3 and rec["rejected"][0]["site"] == "site-0"
    assert set(rec["per_site"]) == {"site-0", "site-1", "site-2"}
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in _global(result).values())
