"""Federation: what a client sends, exact FFA aggregation, and a run through Flower's engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedeeg.aggregation import lora_delta, weighted_average
from fedeeg.config import RunConfig
from fedeeg.experiment import build_model, prepare_sites

@pytest.fixture(autouse=True)
def _flower_task_identity(flower_task_identity):
    """Every test here builds Messages outside a running app (see conftest's ``flower_task_identity``)."""


SMALL = dict(backbone="labram-small", sites=2, rounds=1, batch_size=16, window_seconds=2.0, device="cpu")


def _train_message(cfg: RunConfig, rnd: int = 1):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedeeg.federation import records as R
    from fedeeg.models import trainable_state_dict

    model = build_model(cfg, n_outputs=2)
    content = RecordDict({R.ARRAYS: R.state_to_record(trainable_state_dict(model)),
                          R.CONFIG: ConfigRecord({"server-round": rnd})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN), model


def _context(pid: int):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, node_config={"partition-id": pid, "num-partitions": 2}, state=RecordDict(), run_config={})


@pytest.mark.parametrize("strategy", ["ffa", "fedit"])
def test_client_reply_holds_only_adapter_head_arrays_and_scalar_metrics(strategy):
    # Prepare
    from fedeeg.federation.client_app import handle

    cfg = RunConfig(strategy=strategy, **SMALL)
    message, model = _train_message(cfg)
    site = prepare_sites(cfg)[0]
    # Execute: what site 0 actually sends back
    reply = handle(message, _context(0), cfg, "train")
    # Assert
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = reply.content
    assert set(content.array_records) == {"arrays"}
    from fedeeg.federation import records as R

    assert sorted(content.array_records["arrays"]) == ["layout", "packed.float32"]  # packed: one buffer + layout
    unpacked = R.record_to_numpy(content.array_records["arrays"])
    names = list(unpacked)
    assert names and all(("lora_" in n) or ("modules_to_save" in n) for n in names), names
    if strategy == "ffa":
        assert not any("lora_A" in n for n in names), "ffa must not send the frozen A"
    else:
        assert any("lora_A" in n for n in names)
    # No array is shaped like EEG windows, and their total size is the trainable parameters'.
    arrays = unpacked
    n_values = sum(int(np.prod(a.shape)) for a in arrays.values())
    assert n_values == sum(p.numel() for p in model.parameters() if p.requires_grad)
    for a in arrays.values():
        assert tuple(a.shape[-2:]) != (site.train.n_chans, site.train.n_times)
    # Metrics are scalars (and the counts of one confusion matrix), nothing per window.
    metrics = content.metric_records["metrics"]
    assert set(metrics) == {"num-examples", "train-loss", "windows-per-second"}
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics["num-examples"] == site.train.n_windows
    site_rec = content.config_records["site"]
    assert set(site_rec) == {"name", "ch-names", "sfreq"}
    assert not any(s in str(dict(site_rec)) for s in site.train.subjects), "no subject ids leave the site"


def test_client_evaluate_reply_is_aggregate():
    from flwr.app import MessageType

    from fedeeg.federation.client_app import handle

    cfg = RunConfig(**SMALL)
    message, _ = _train_message(cfg)
    message.metadata.message_type = MessageType.EVALUATE
    reply = handle(message, _context(1), cfg, "evaluate")
    assert not reply.has_error()
    assert set(reply.content.array_records) == set()
    m = reply.content.metric_records["metrics"]
    assert set(m) == {"balanced-accuracy", "cohen-kappa", "macro-f1", "auroc", "num-examples", "confusion"}
    assert len(m["confusion"]) == 4 and sum(m["confusion"]) == m["num-examples"]


def test_client_reports_bad_update_as_error_reply_not_crash():
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    from fedeeg.federation.client_app import handle

    cfg = RunConfig(**SMALL)
    bad = RecordDict({"arrays": ArrayRecord({"head.weight": torch.zeros(3, 3)}), "config": ConfigRecord({"server-round": 1})})
    reply = handle(Message(bad, dst_node_id=1, message_type=MessageType.TRAIN), _context(0), cfg, "train")
    assert reply.has_error()
    assert "head.weight" in reply.error.reason


def _train_site(cfg: RunConfig, site_index: int):
    from fedeeg.models import trainable_state_dict
    from fedeeg.training import train_epochs

    site = prepare_sites(cfg)[site_index]
    model = build_model(cfg, n_outputs=2)
    train_epochs(model, site.train, epochs=1, lr=5e-2, batch_size=16, device="cpu", seed=site_index)
    return model, {k: v.numpy() for k, v in trainable_state_dict(model).items()}, site.train.n_windows


def _pairs(model):
    from fedeeg.models import lora_pairs

    return {k: (a.detach().numpy().copy(), b.detach().numpy().copy()) for k, (a, b) in lora_pairs(model).items()}


def test_ffa_average_equals_exact_average_of_BA_products():
    # Prepare: two sites train from the same global model
    from fedeeg.models import load_trainable_state_dict

    cfg = RunConfig(strategy="ffa", **SMALL)
    m0, s0, n0 = _train_site(cfg, 0)
    m1, s1, n1 = _train_site(cfg, 1)
    # Execute: the server's aggregation, loaded into a fresh global model
    agg = weighted_average([(s0, n0), (s1, n1)])
    glob = build_model(cfg, n_outputs=2)
    load_trainable_state_dict(glob, {k: torch.from_numpy(v) for k, v in agg.items()})
    # Assert: for every adapted module, B_glob A_glob == weighted mean of B_i A_i
    w0, w1 = n0 / (n0 + n1), n1 / (n0 + n1)
    p0, p1, pg = _pairs(m0), _pairs(m1), _pairs(glob)
    assert pg, "no LoRA pairs found"
    for name in pg:
        exact = w0 * lora_delta(*p0[name]) + w1 * lora_delta(*p1[name])
        np.testing.assert_allclose(lora_delta(*pg[name]), exact, rtol=1e-5, atol=1e-7)
        assert np.abs(exact).max() > 0, f"{name}: sites did not train B"


def test_fedit_average_is_not_exact():
    # The same check fails for fedit, where A also trains: mean(B) mean(A) != mean(B A).
    from fedeeg.models import load_trainable_state_dict

    cfg = RunConfig(strategy="fedit", **SMALL)
    m0, s0, n0 = _train_site(cfg, 0)
    m1, s1, n1 = _train_site(cfg, 1)
    glob = build_model(cfg, n_outputs=2)
    load_trainable_state_dict(glob, {k: torch.from_numpy(v) for k, v in weighted_average([(s0, n0), (s1, n1)]).items()})
    w0, w1 = n0 / (n0 + n1), n1 / (n0 + n1)
    p0, p1, pg = _pairs(m0), _pairs(m1), _pairs(glob)
    gaps = [np.abs(lora_delta(*pg[k]) - (w0 * lora_delta(*p0[k]) + w1 * lora_delta(*p1[k]))).max() for k in pg]
    assert max(gaps) > 1e-6


@pytest.mark.slow
def test_two_sites_one_round_through_flower_simulation(tmp_path):
    # Prepare
    from fedeeg.federation.simulation import run_federated_simulation
    from fedeeg.outputs import write_outputs

    cfg = RunConfig(strategy="ffa", out=str(tmp_path / "run"), **SMALL)
    # Execute: Flower's simulation engine (Ray), 2 virtual SuperNodes
    result = run_federated_simulation(cfg, n_sites=2)
    out = write_outputs(cfg, result, wall_seconds=1.0)
    # Assert
    assert len(result.history) == 1
    rec = result.history[0]
    assert rec["sites_answered"] == 2 and rec["rejected"] == []
    assert set(rec["per_site"]) == {"site-0", "site-1"}
    assert 0.0 <= rec["test"]["balanced_accuracy"] <= 1.0
    assert result.communication["bytes_up_per_site_per_round"] > 0
    for name in ("summary.json", "metrics.jsonl", "learning_curve.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/fedeeg_manifest.json"):
        assert (out / name).is_file(), name


class _InProcessGrid:
    """A Grid stand-in that delivers messages to ClientApp handlers in this process.

    Lets the ServerApp loop be tested without Ray; ``corrupt`` names a node whose
    training reply is tampered with (NaN in every tensor) on its way back.
    """

    def __init__(self, cfg: RunConfig, n_nodes: int, corrupt: int | None = None, strip_site: int | None = None):
        self.cfg, self.nodes, self.corrupt, self.strip_site = cfg, list(range(1, n_nodes + 1)), corrupt, strip_site

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import ArrayRecord, Message, RecordDict

        from fedeeg.federation.client_app import handle

        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            action = "train" if msg.metadata.message_type == "train" else "evaluate"
            reply = handle(msg, _context(nid - 1), self.cfg, action)
            if action == "train" and nid == self.corrupt and not reply.has_error():
                from fedeeg.federation import records as R

                arrays = R.record_to_state(reply.content.array_records["arrays"])
                bad = {k: torch.full_like(v, float("nan")) for k, v in arrays.items()}
                content = RecordDict({"arrays": ArrayRecord(bad), "metrics": reply.content.metric_records["metrics"],
                                      "site": reply.content.config_records["site"]})
                reply = Message(content, reply_to=msg)
            if nid == self.strip_site and not reply.has_error():  # a reply without its 'site' record
                content = RecordDict({k: v for k, v in reply.content.items() if k != "site"})
                reply = Message(content, reply_to=msg)
            replies.append(reply)
        return replies


def test_server_rejects_tampered_update_and_round_continues(caplog):
    # Prepare: two sites; site 2's update arrives with NaNs
    from fedeeg.federation.server_app import run_federation

    cfg = RunConfig(strategy="ffa", **{**SMALL, "rounds": 2})
    grid = _InProcessGrid(cfg, n_nodes=2, corrupt=2)
    # Execute
    with caplog.at_level("WARNING", logger="fedeeg"):
        result = run_federation(grid, cfg, n_sites=2)
    # Assert: the bad update is refused with site and reason, the good one is merged, both rounds ran
    assert [h["round"] for h in result.history] == [1, 2]
    for rec in result.history:
        assert rec["sites_answered"] == 1
        assert len(rec["rejected"]) == 1 and rec["rejected"][0]["site"] == "site-1"
        assert "non-finite" in rec["rejected"][0]["reason"]
    assert "site 'site-1' rejected" in caplog.text
    from fedeeg.models import trainable_state_dict

    assert all(torch.isfinite(v).all() for v in trainable_state_dict(result.models["global"]).values())
    assert set(result.per_site) == {"site-0", "site-1"}


def test_reply_without_site_record_is_rejected_and_the_run_goes_on(caplog):
    # Prepare: two sites; site 2's replies arrive without their 'site' record
    from fedeeg.federation.server_app import run_federation

    cfg = RunConfig(strategy="ffa", **{**SMALL, "rounds": 1})
    grid = _InProcessGrid(cfg, n_nodes=2, strip_site=2)
    # Execute
    with caplog.at_level("WARNING", logger="fedeeg"):
        result = run_federation(grid, cfg, n_sites=2)
    # Assert: the malformed reply is named and ignored; the round completes with the other site
    rec = result.history[0]
    assert rec["sites_answered"] == 1
    assert "malformed reply" in rec["rejected"][0]["reason"]
    assert set(rec["per_site"]) == {"site-0"}
    assert "malformed" in caplog.text


def test_adapter_record_is_packed_and_round_trips():
    # Prepare: float32 tensors, an int64 buffer and a 0-d tensor, as a LoRA adapter with BatchNorm stats carries
    from fedeeg.federation import records as R

    state = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.zeros(8, 4),
             "bn.num_batches_tracked": torch.tensor([7], dtype=torch.int64), "head.bias": torch.randn(2)}

    # Execute
    record = R.state_to_record(state)
    back = R.record_to_numpy(record)

    # Assert: one buffer per dtype plus the layout (Flower moves each array as its own object), exact round trip
    assert sorted(record) == ["layout", "packed.float32", "packed.int64"]
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.numpy().dtype and back[k].shape == tuple(v.shape)
        np.testing.assert_array_equal(back[k], v.numpy())


@pytest.mark.parametrize("tamper, match", [
    (lambda a: {**a, "packed.float32": a["packed.float32"][:-1]}, "too short|uses"),
    (lambda a: {**a, "packed.float32": np.concatenate([a["packed.float32"], [1.0]]).astype(np.float32)}, "layout uses"),
    (lambda a: {**a, "layout": np.frombuffer(b"not json", dtype=np.uint8).copy()}, "not a list"),
    (lambda a: {**a, "extra": np.zeros(1, np.float32)}, "unexpected arrays"),
    (lambda a: {k: v for k, v in a.items() if k != "packed.float32"}, "no 'packed.float32'"),
])
def test_tampered_packed_record_is_rejected_by_name(tamper, match):
    # Prepare
    from flwr.app import Array, ArrayRecord

    from fedeeg.federation import records as R

    good = R.state_to_record({"x.lora_A.weight": torch.ones(2, 3), "head.bias": torch.ones(2)})
    arrays = {k: v.numpy() for k, v in good.items()}

    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        R.record_to_numpy(ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tamper(arrays).items()}))


def test_site_refuses_a_backbone_checkpoint_other_than_the_coordinators(tmp_path):
    # Prepare: the coordinator's checkpoint and a site's copy that differs by one byte
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedeeg.federation import records as R
    from fedeeg.federation.client_app import handle

    theirs, ours = tmp_path / "coordinator.safetensors", tmp_path / "site.safetensors"
    theirs.write_bytes(b"backbone weights" * 100)
    ours.write_bytes(b"backbone weights" * 99 + b"Backbone weights")
    config = R.round_config(1, str(theirs))
    message = Message(RecordDict({"config": config}), dst_node_id=1, message_type="train")

    # Execute
    reply = handle(message, _context(0), RunConfig(**{**SMALL, "checkpoint": str(ours)}), "train")

    # Assert: an error reply that names both hashes and what to do; the matching copy passes the check
    assert config[R.CHECKPOINT_SHA] == R.round_config(2, str(theirs))[R.CHECKPOINT_SHA] and len(config[R.CHECKPOINT_SHA]) == 64
    assert reply.has_error() and "sha256" in reply.error.reason and "[deployment] checkpoint" in reply.error.reason
    R.check_backbone(config, str(theirs))
    with pytest.raises(ValueError, match="has none"):
        R.check_backbone(config, "")
    R.check_backbone(R.round_config(1, ""), "")  # no checkpoint on either side: nothing to check


def test_train_epochs_names_the_compile_modes_on_a_bad_one():
    # Prepare
    from fedeeg.training import _compiled

    # Execute / Assert
    with pytest.raises(ValueError, match="'compile'.*reduce-overhead.*got 'fast'"):
        _compiled(torch.nn.Linear(2, 2), "fast")
    assert _compiled(torch.nn.Linear(2, 2), False).__class__ is torch.nn.Linear


def test_head_strategy_sends_and_trains_only_the_head():
    # Prepare
    from fedeeg.federation import records as R
    from fedeeg.federation.client_app import handle

    cfg = RunConfig(strategy="head", **SMALL)
    message, model = _train_message(cfg)
    frozen_before = {k: v.detach().clone() for k, v in model.named_parameters() if not k.startswith(("fc_norm.", "head."))}
    # Execute: what a site sends back, and a local training of the same model
    reply = handle(message, _context(0), cfg, "train")
    from fedeeg.training import train_epochs

    train_epochs(model, prepare_sites(cfg)[0].train, epochs=1, lr=cfg.learning_rate, seed=0)
    # Assert: only fc_norm and head travel; the backbone does not move
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    names = sorted(R.record_to_numpy(reply.content.array_records[R.ARRAYS]))
    assert names == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert all(torch.equal(v, dict(model.named_parameters())[k].detach()) for k, v in frozen_before.items())
    assert not cfg.uses_lora


def test_head_strategy_needs_a_labram_backbone():
    # Execute / Assert
    with pytest.raises(ValueError, match="strategy='head' does not apply"):
        RunConfig(strategy="head", backbone="eegnet")


def _recording_broadcast(cfg: RunConfig, sent: list):
    """A ``broadcast`` for :func:`run_federation` whose two sites answer in this process; logs what was sent."""
    from flwr.app import Message

    from fedeeg.federation.client_app import handle

    def broadcast(grid, nodes, content, message_type, rnd):
        sent.append((rnd, message_type, dict(content.config_records["config"])))
        replies = []
        for pid, nid in enumerate(nodes):
            msg = Message(content, dst_node_id=nid, message_type=message_type, group_id=str(rnd))
            replies.append(handle(msg, _context(pid), cfg, message_type.split(".")[0]))
        return replies

    return broadcast


class _TwoNodes:
    def get_node_ids(self):
        return [11, 12]


def test_evaluate_every_skips_the_evaluate_exchange_between_evaluated_rounds():
    # Prepare: 3 rounds, evaluation after every 2nd round and the last, each in an evaluate message of its own
    from fedeeg.federation.server_app import run_federation

    cfg = RunConfig(strategy="ffa", **{**SMALL, "rounds": 3}, evaluate_every=2, evaluate_in="separate")
    sent = []
    # Execute
    result = run_federation(_TwoNodes(), cfg, n_sites=2, broadcast=_recording_broadcast(cfg, sent), node_timeout=1.0)
    # Assert: round 1 trains only; rounds 2 and 3 also evaluate; records say so
    assert [t for r, t, _ in sent] == ["train", "train", "evaluate", "train", "evaluate"]
    first, second, last = result.history
    assert first["test"] == {} and first["per_site"] == {} and np.isfinite(first["train_loss"])
    assert 0.0 <= second["test"]["balanced_accuracy"] <= 1.0 and set(last["per_site"]) == set(result.per_site)
    with pytest.raises(ValueError, match="evaluate_every"):
        RunConfig(evaluate_every=0)
    with pytest.raises(ValueError, match="'evaluate_in'.*'next-train', 'separate'.*got 'later'"):
        RunConfig(evaluate_in="later")


def test_next_train_evaluation_gives_the_separate_evaluations_in_one_exchange_per_round():
    # Prepare: the same run twice, evaluating in the next round's training message and in messages of their own
    from fedeeg.federation.server_app import run_federation
    from fedeeg.models import trainable_state_dict

    cfg = RunConfig(strategy="ffa", **{**SMALL, "rounds": 3})
    seen, sent, checkpoints = [], [], []
    # Execute
    folded = run_federation(_TwoNodes(), cfg, n_sites=2, broadcast=_recording_broadcast(cfg, sent), node_timeout=1.0,
                            on_round=lambda rec: seen.append(rec["round"]),
                            on_checkpoint=lambda rnd, arrays, history: checkpoints.append(
                                [(h["round"], bool(h.get("evaluation_pending"))) for h in history]))
    separate = run_federation(_TwoNodes(), cfg.replace(evaluate_in="separate"), n_sites=2,
                              broadcast=_recording_broadcast(cfg, []), node_timeout=1.0)
    # Assert: one exchange per round (plus the last round's evaluation); rounds 2 and 3 ask for the previous
    # round's evaluation; every record complete at the end, in round order, and equal to the separate run's
    assert [t for _, t, _ in sent] == ["train", "train", "train", "evaluate"]
    assert [bool(c.get("evaluate-first")) for _, _, c in sent] == [False, True, True, False]
    assert seen == [1, 2, 3]
    assert checkpoints == [[(1, True)], [(1, False), (2, True)], [(1, False), (2, False), (3, False)]]
    for a, b in zip(folded.history, separate.history):
        assert a["round"] == b["round"] and a["test"] == b["test"] and a["per_site"] == b["per_site"]
        assert "evaluation_pending" not in a
    a, b = (trainable_state_dict(r.models["global"]) for r in (folded, separate))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not cfg.replace(evaluate_in="next-train", sites_per_round=1).evaluates_with_next_train


def test_inprocess_engine_runs_the_federation_without_ray(monkeypatch):
    # Prepare
    from fedeeg.federation.simulation import run_federated_simulation

    cfg = RunConfig(strategy="ffa", **{**SMALL, "rounds": 2})
    monkeypatch.setenv("FEDEEG_ENGINE", "inprocess")
    # Execute
    result = run_federated_simulation(cfg, n_sites=2)
    # Assert: two rounds, both sites trained and evaluated every round
    assert [h["round"] for h in result.history] == [1, 2]
    assert all(h["sites_answered"] == 2 and len(h["per_site"]) == 2 for h in result.history)
    assert 0.0 <= result.test["balanced_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="'engine'.*'ray', 'inprocess'.*got 'threads'"):
        run_federated_simulation(cfg, n_sites=2, engine="threads")


@pytest.mark.slow
def test_inprocess_engine_gives_the_ray_engines_result_bit_for_bit():
    # Prepare
    from fedeeg.federation.simulation import run_federated_simulation
    from fedeeg.models import trainable_state_dict

    cfg = RunConfig(strategy="ffa", **{**SMALL, "rounds": 2})
    # Execute
    ray_run = run_federated_simulation(cfg, n_sites=2, engine="ray")
    local_run = run_federated_simulation(cfg, n_sites=2, engine="inprocess")
    # Assert: same messages, same handler, same seeds -> the same adapter and metrics
    a, b = (trainable_state_dict(r.models["global"]) for r in (ray_run, local_run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in ray_run.history] == [h["train_loss"] for h in local_run.history]
    assert ray_run.test == local_run.test


def test_a_sites_first_error_is_logged_under_its_known_name():
    # Prepare: node 12 fails its training; its name is known from the start (deployment: the registry)
    from flwr.app import Error, Message

    from fedeeg.federation.client_app import handle
    from fedeeg.federation.server_app import run_federation

    cfg = RunConfig(strategy="ffa", **SMALL)

    class _Grid:
        def get_node_ids(self):
            return [11, 12]

    def broadcast(grid, nodes, content, message_type, rnd):
        replies = []
        for pid, nid in enumerate(nodes):
            msg = Message(content, dst_node_id=nid, message_type=message_type, group_id=str(rnd))
            if nid == 12 and message_type == "train":
                replies.append(Message(Error(code=1001, reason="disk full"), reply_to=msg))
            else:
                replies.append(handle(msg, _context(pid), cfg, message_type))
        return replies

    # Execute
    result = run_federation(_Grid(), cfg, n_sites=2, broadcast=broadcast, node_timeout=1.0,
                            site_names={11: "hospital-a", 12: "hospital-b"})
    # Assert
    assert result.history[0]["rejected"] == [{"site": "hospital-b", "reason": "disk full"}]


def test_next_train_evaluation_waits_through_a_skipped_round():
    # Prepare: 3 rounds; round 2's training is skipped (no site answers in time: the deployment closer returns none)
    from fedeeg.federation.server_app import run_federation

    cfg = RunConfig(strategy="ffa", **{**SMALL, "rounds": 3})
    sent = []
    answer = _recording_broadcast(cfg, sent)

    def broadcast(grid, nodes, content, message_type, rnd):
        replies = answer(grid, nodes, content, message_type, rnd)
        return [] if (rnd, message_type) == (2, "train") else replies

    # Execute
    result = run_federation(_TwoNodes(), cfg, n_sites=2, broadcast=broadcast, node_timeout=1.0)
    # Assert: round 1's evaluation is asked for again with round 3 and, the global model being unchanged by the
    # skipped round 2, serves rounds 1 and 2 alike; nothing is left pending and the run ends normally
    first, second, third = result.history
    assert [bool(c.get("evaluate-first")) for _, t, c in sent if t == "train"] == [False, True, True]
    assert second["sites_answered"] == 0 and first["test"] and first["test"] == second["test"]
    assert third["test"] and not any("evaluation_pending" in h for h in result.history)


def test_site_training_gets_the_runs_compile_setting(monkeypatch):
    # Prepare: compile on in the run config; a CPU site (record what train_epochs is asked, train as asked)
    import fedeeg.training as training
    from fedeeg.federation.client_app import handle

    seen, asked = [], []
    train = training.train_epochs
    monkeypatch.setattr(training, "train_epochs", lambda *a, **kw: seen.append(kw["compile"]) or train(*a, **kw))
    monkeypatch.setattr(RunConfig, "compile_for", lambda self, device: asked.append((self.compile, str(device))) or False)
    cfg = RunConfig(compile="on", **SMALL)  # SMALL trains on the CPU
    message, _ = _train_message(cfg)
    # Execute
    reply = handle(message, _context(0), cfg, "train")
    # Assert: the site asked the run config for the device it trains on, and trained as told
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert asked == [("on", "cpu")]
    assert seen == [False]
