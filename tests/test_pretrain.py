"""Masked-patch pretraining: token path, masking, loss, checkpoint, data, federation and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedeeg.data import EEGMAT_CHANNELS, WindowSet
from fedeeg.pretrain import (
    PRETRAIN_BACKBONES,
    PretrainConfig,
    build_pretrainer,
    count_trainable,
    masked_mse,
    pretrain_central,
    pretrain_windows,
    random_mask,
    write_pretrain_outputs,
)

#: Tiny synthetic runs: 2 sites, 2-s windows (19 channels x 2 patches = 38 tokens), labram-small, CPU.
SMALL = dict(backbone="labram-small", dataset="synthetic", sites=2, window_seconds=2.0, device="cpu",
             batch_size=32, epochs=1, rounds=1, local_epochs=1)


@pytest.fixture(autouse=True)
def _flower_task_identity(flower_task_identity):
    """Every test here builds Messages outside a running app (see conftest's ``flower_task_identity``)."""


def _batch(n: int = 3, seconds: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.2 * torch.randn(n, len(EEGMAT_CHANNELS), 200 * seconds, generator=gen)  # (n, n_chans, n_times)


def _tiny_windows(n: int = 8, subject: str = "s0", seed: int = 0) -> WindowSet:
    x = _batch(n, seed=seed).numpy()
    return WindowSet(x, np.zeros(n, dtype=np.int64), np.full(n, subject), EEGMAT_CHANNELS, 200.0, ("rest", "arithmetic"))


# ---------------------------------------------------------------------------------------------- config
def test_pretrain_backbones_are_the_labram_sizes():
    from fedeeg.models import BACKBONES

    assert PRETRAIN_BACKBONES == tuple(BACKBONES)


@pytest.mark.parametrize("bad, match", [
    (dict(target="tokens"), "target"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(backbone="eegnet"), "backbone"),
    (dict(window_seconds=2.5), "window_seconds"),
    (dict(dataset="eegmat"), "data_dir"),
    (dict(dataset="folder"), "dataset"),
    (dict(federated="yes"), "federated"),
])
def test_config_rejects_bad_values_naming_the_parameter(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PretrainConfig(**bad)


def test_config_round_trips_through_flower_run_config():
    cfg = PretrainConfig(**SMALL, federated=True, lr=1e-3)
    assert PretrainConfig.from_mapping(cfg.to_flower()) == cfg
    with pytest.raises(ValueError, match="strategy"):
        PretrainConfig.from_mapping({"strategy": "ffa"})


# ----------------------------------------------------------------------------------------------- model
def test_token_path_equals_forward_features_without_mask():
    # Prepare: capture what forward_features feeds to the first block
    model = build_pretrainer(PretrainConfig(**SMALL))
    bb = model.backbone
    x = _batch()
    seen = []
    hook = bb.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    # Execute
    with torch.no_grad():
        bb.forward_features(x, EEGMAT_CHANNELS)
        hook.remove()
        tokens = model.embed(x, EEGMAT_CHANNELS)
        all_false = model.embed(x, EEGMAT_CHANNELS, torch.zeros(3, 38, dtype=torch.bool))
    # Assert
    assert tokens.shape == (3, 1 + 19 * 2, 100)
    torch.testing.assert_close(tokens, seen[0], rtol=0, atol=0)
    torch.testing.assert_close(all_false, seen[0], rtol=0, atol=0)


def test_mask_token_replaces_exactly_the_masked_patches():
    model = build_pretrainer(PretrainConfig(**SMALL))
    x = _batch(2)
    mask = random_mask(2, 38, 0.5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model.embed(x, EEGMAT_CHANNELS)
        masked = model.embed(x, EEGMAT_CHANNELS, mask)
        # The same masked sequence for other EEG: masked tokens do not depend on their patch.
        other = model.embed(_batch(2, seed=5), EEGMAT_CHANNELS, mask)
    changed = (masked[:, 1:] != plain[:, 1:]).any(dim=-1)  # (batch, n_tokens)
    assert torch.equal(changed, mask)
    torch.testing.assert_close(masked[:, 1:][mask], other[:, 1:][mask], rtol=0, atol=0)
    assert torch.equal(masked[:, 0], plain[:, 0])


@pytest.mark.parametrize("ratio, n_tokens, expected", [(0.5, 38, 19), (0.3, 76, 23), (0.05, 10, 1), (0.95, 10, 9)])
def test_random_mask_masks_the_ratio_of_every_window(ratio, n_tokens, expected):
    mask = random_mask(16, n_tokens, ratio, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (16, n_tokens)
    assert mask.sum(dim=1).tolist() == [expected] * 16
    assert len({tuple(row.tolist()) for row in mask}) > 1, "windows must get different masks"
    again = random_mask(16, n_tokens, ratio, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again), "a seeded generator must give the same masks"


def test_only_masked_tokens_contribute_to_the_loss():
    # Prepare
    model = build_pretrainer(PretrainConfig(**SMALL))
    x = _batch(2)
    mask = random_mask(2, 38, 0.5, torch.Generator().manual_seed(3))
    target = model.targets(x)
    # Execute: change every unmasked token's target, then one masked token's
    visible_changed = target.clone()
    visible_changed[~mask] = torch.randn_like(visible_changed[~mask]) * 10
    masked_changed = target.clone()
    b, t = map(int, mask.nonzero()[0])
    masked_changed[b, t] += 1.0
    with torch.no_grad():
        loss = model(x, EEGMAT_CHANNELS, mask, target)
        loss_visible = model(x, EEGMAT_CHANNELS, mask, visible_changed)
        loss_masked = model(x, EEGMAT_CHANNELS, mask, masked_changed)
    # Assert
    assert torch.equal(loss, loss_visible)
    assert loss_masked != loss
    # and masked_mse itself: a hand-computed mean over masked tokens
    pred = torch.zeros_like(target)
    manual = target[mask].pow(2).mean()
    torch.testing.assert_close(masked_mse(pred, target, mask), manual)


@pytest.mark.parametrize("target", ["spectrum", "raw"])
def test_targets_are_z_scored_per_patch(target):
    model = build_pretrainer(PretrainConfig(**SMALL, target=target))
    x = _batch(2)
    t = model.targets(x)
    assert t.shape == (2, 38, 202 if target == "spectrum" else 200)
    halves = t.split(101, dim=-1) if target == "spectrum" else (t,)
    for h in halves:
        torch.testing.assert_close(h.mean(-1), torch.zeros(2, 38), atol=1e-4, rtol=0)
        torch.testing.assert_close(h.std(-1, unbiased=False), torch.ones(2, 38), atol=1e-3, rtol=0)
    # scale-free: the same EEG 100 times larger has the same targets
    torch.testing.assert_close(model.targets(100 * x), t, atol=1e-4, rtol=1e-4)


def test_loss_decreases_on_a_tiny_fixed_batch():
    # Prepare: one fixed batch and mask
    model = build_pretrainer(PretrainConfig(**SMALL))
    x = _batch(4)
    mask = random_mask(4, 38, 0.5, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    # Execute
    losses = []
    for _ in range(15):
        loss = model(x, EEGMAT_CHANNELS, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # Assert
    assert losses[-1] < 0.8 * losses[0], losses


def test_fine_tuning_only_parameters_are_frozen_and_not_exchanged():
    model = build_pretrainer(PretrainConfig(**SMALL))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.fc_norm.weight", "backbone.fc_norm.bias", "backbone.head.weight", "backbone.head.bias"}
    exchanged = model.exchange_state_dict()
    assert "mask_token" in exchanged and "decoder.weight" in exchanged
    assert not any(k.startswith(("backbone.head.", "backbone.fc_norm.")) for k in exchanged)
    assert sum(v.numel() for v in exchanged.values()) == count_trainable(model)


# ------------------------------------------------------------------------------------------------ data
def test_pretraining_sees_only_training_subjects(monkeypatch):
    # Prepare
    import fedeeg.pretrain as P
    from fedeeg.experiment import prepare_sites

    cfg = PretrainConfig(**SMALL)
    sites = prepare_sites(cfg.run_config())
    fed: list = []

    def capture(model, windows, **kw):  # records what pretraining is fed, skips the training itself
        fed.extend(windows)
        n = sum(w.n_windows for w in windows)
        return P.PretrainStepsResult(1.0, (1.0,), n, 1, 1, 1.0, float(n))

    monkeypatch.setattr(P, "train_pretrainer", capture)
    # Execute
    windows = pretrain_windows(cfg)
    pretrain_central(cfg, windows)
    # Assert: every window fed to pretraining is a training subject's; no held-out subject at all
    seen = set(np.concatenate([w.subject for w in fed]).tolist())
    held_out = {s for site in sites for s in site.test.subjects}
    train = {s for site in sites for s in site.train.subjects}
    assert held_out and seen == train
    assert not seen & held_out
    assert sum(w.n_windows for w in fed) == sum(site.train.n_windows for site in sites)


# ------------------------------------------------------------------------------------------ checkpoint
def test_written_checkpoint_loads_strictly_with_identical_weights(tmp_path):
    # Prepare
    from fedeeg.checkpoint import sha256_file
    from fedeeg.models import build_backbone
    from safetensors.torch import load_file

    cfg = PretrainConfig(**{**SMALL, "epochs": 2}, out=str(tmp_path / "pt"))
    windows = {"a": _tiny_windows(8, "a"), "b": _tiny_windows(6, "b", seed=1)}
    result = pretrain_central(cfg, windows)
    # Execute
    out = write_pretrain_outputs(cfg, result, wall_seconds=1.0)
    loaded = build_backbone("labram-small", checkpoint=out / "backbone.safetensors", seed=123, n_outputs=5)
    # Assert: the file holds exactly LaBraM's keys without the fine-tuning head, and they load strictly
    trained = result.pretrainer.backbone.state_dict()
    keys = set(load_file(str(out / "backbone.safetensors")))
    assert keys == {k for k in trained if not k.startswith(("fc_norm.", "head."))}
    for k in keys:
        torch.testing.assert_close(loaded.state_dict()[k], trained[k], rtol=0, atol=0)
    assert not torch.equal(loaded.state_dict()["blocks.0.attn.qkv.weight"],
                           build_backbone("labram-small", seed=0).state_dict()["blocks.0.attn.qkv.weight"]), "weights did not train"
    manifest = json.loads((out / "pretrain_manifest.json").read_text())
    assert manifest["weights"]["sha256"] == sha256_file(out / "backbone.safetensors") == loaded.checkpoint_sha256
    assert len(manifest["losses"]) == 2 and manifest["n_windows"] == 14 and manifest["sites"] == {"a": 8, "b": 6}
    assert manifest["backbone"] == "labram-small" and manifest["config"]["mask_ratio"] == 0.5
    assert {"fedeeg_version", "held_out", "target"} <= set(manifest)
    assert (out / "loss_curve.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------ federation
def _context(pid: int, n: int = 2):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, node_config={"partition-id": pid, "num-partitions": n}, state=RecordDict(), run_config={})


def _train_message(cfg: PretrainConfig, rnd: int = 1):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedeeg.federation import records as R

    model = build_pretrainer(cfg)
    content = RecordDict({R.ARRAYS: R.state_to_record(model.exchange_state_dict()),
                          R.CONFIG: ConfigRecord({"server-round": rnd})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN), model


def test_client_reply_holds_only_weights_and_scalar_metrics():
    # Prepare
    from fedeeg.federation.pretrain import REPLY_METRICS, handle_pretrain

    cfg = PretrainConfig(**SMALL, federated=True)
    message, model = _train_message(cfg)
    site = pretrain_windows(cfg)["site-0"]
    # Execute: what site 0 actually sends back
    reply = handle_pretrain(message, _context(0), cfg)
    # Assert
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = reply.content
    assert set(content.array_records) == {"arrays"}
    from fedeeg.federation import records as R

    arrays = R.record_to_numpy(content.array_records["arrays"])
    assert set(arrays.keys()) == set(model.exchange_state_dict())
    assert sum(int(np.prod(a.shape)) for a in arrays.values()) == count_trainable(model)
    for a in arrays.values():  # nothing shaped like EEG windows or patches
        assert tuple(a.shape[-2:]) != (site.n_chans, site.n_times) and site.n_windows not in a.shape[:1]
    metrics = content.metric_records["metrics"]
    assert set(metrics) == set(REPLY_METRICS)
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics["num-examples"] == site.n_windows and np.isfinite(metrics["train-loss"])
    assert set(content.config_records) == {"site"} and set(content.config_records["site"]) == {"name", "ch-names", "sfreq"}
    assert not any(s in str(dict(content.config_records["site"])) for s in site.subjects), "no subject ids leave the site"
    trained = R.numpy_to_state(arrays)
    assert not torch.equal(trained["decoder.weight"], model.exchange_state_dict()["decoder.weight"])


def test_client_reports_mismatched_weights_as_error_reply():
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    from fedeeg.federation.pretrain import handle_pretrain

    cfg = PretrainConfig(**SMALL, federated=True)
    bad = RecordDict({"arrays": ArrayRecord({"mask_token": torch.zeros(1, 1, 7)}), "config": ConfigRecord({"server-round": 1})})
    reply = handle_pretrain(Message(bad, dst_node_id=1, message_type=MessageType.TRAIN), _context(0), cfg)
    assert reply.has_error()
    assert "mask_token" in reply.error.reason


class _InProcessGrid:
    """Delivers messages to the pretraining ClientApp handler in this process; ``corrupt`` tampers a node's reply."""

    def __init__(self, cfg: PretrainConfig, n_nodes: int, corrupt: int | None = None):
        self.cfg, self.nodes, self.corrupt = cfg, list(range(1, n_nodes + 1)), corrupt

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import ArrayRecord, Message, RecordDict

        from fedeeg.federation.pretrain import handle_pretrain

        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            reply = handle_pretrain(msg, _context(nid - 1, len(self.nodes)), self.cfg)
            if nid == self.corrupt and not reply.has_error():
                from fedeeg.federation import records as R

                arrays = R.record_to_state(reply.content.array_records["arrays"])
                bad = {k: torch.full_like(v, float("nan")) for k, v in arrays.items()}
                content = RecordDict({"arrays": ArrayRecord(bad), "metrics": reply.content.metric_records["metrics"],
                                      "site": reply.content.config_records["site"]})
                reply = Message(content, reply_to=msg)
            replies.append(reply)
        return replies


def test_server_rejects_tampered_update_and_rounds_continue(monkeypatch, caplog):
    # Prepare: two sites with a few training windows each; site 2's update arrives with NaNs
    import fedeeg.federation.pretrain as FP
    from fedeeg.federation.pretrain import run_pretrain_federation

    cfg = PretrainConfig(**{**SMALL, "rounds": 2}, federated=True)
    tiny = {"site-0": _tiny_windows(6, "a"), "site-1": _tiny_windows(4, "b", seed=1)}
    monkeypatch.setattr(FP, "pretrain_windows", lambda c: tiny)
    init = build_pretrainer(cfg).exchange_state_dict()
    grid = _InProcessGrid(cfg, n_nodes=2, corrupt=2)
    # Execute
    with caplog.at_level("WARNING", logger="fedeeg"):
        result = run_pretrain_federation(grid, cfg, n_sites=2)
    # Assert: the bad update is refused with site and reason, the good one is merged, both rounds ran
    assert [h["round"] for h in result.history] == [1, 2]
    for rec in result.history:
        assert rec["sites_answered"] == 1 and np.isfinite(rec["loss"])
        assert len(rec["rejected"]) == 1 and rec["rejected"][0]["site"] == "site-1"
        assert "non-finite" in rec["rejected"][0]["reason"]
    assert "site 'site-1' rejected" in caplog.text
    final = result.pretrainer.exchange_state_dict()
    assert all(torch.isfinite(v).all() for v in final.values())
    assert not torch.equal(final["decoder.weight"], init["decoder.weight"])
    assert result.sites == {"site-0": 6} and result.mode == "federated"


@pytest.mark.slow
def test_two_sites_one_round_through_flower_simulation_writes_loadable_checkpoint(tmp_path):
    # Prepare
    from fedeeg.federation.pretrain import run_pretrain_simulation
    from fedeeg.models import build_backbone

    cfg = PretrainConfig(**{**SMALL, "batch_size": 64}, federated=True, out=str(tmp_path / "fed"))
    # Execute: Flower's simulation engine (Ray), 2 virtual SuperNodes
    result = run_pretrain_simulation(cfg, n_sites=2)
    out = write_pretrain_outputs(cfg, result, wall_seconds=1.0)
    # Assert
    assert len(result.history) == 1
    rec = result.history[0]
    assert rec["sites_answered"] == 2 and rec["rejected"] == [] and np.isfinite(rec["loss"])
    assert set(result.sites) == {"site-0", "site-1"} and rec["bytes_up_per_site"] > 0
    loaded = build_backbone("labram-small", checkpoint=out / "backbone.safetensors")
    torch.testing.assert_close(loaded.state_dict()["blocks.0.attn.qkv.weight"],
                               result.pretrainer.backbone.state_dict()["blocks.0.attn.qkv.weight"], rtol=0, atol=0)
    assert json.loads((out / "pretrain_manifest.json").read_text())["mode"] == "federated"


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_pretrain_rejects_bad_option_clearly():
    from typer.testing import CliRunner

    from fedeeg.cli import app

    res = CliRunner().invoke(app, ["pretrain", "--target", "tokens"])
    assert res.exit_code == 2
    assert "target" in res.output and "'spectrum'" in res.output


@pytest.mark.slow
def test_cli_pretrain_central_writes_checkpoint_and_prints_fine_tune_command(tmp_path):
    # Prepare
    from typer.testing import CliRunner

    from fedeeg.cli import app
    from fedeeg.models import build_backbone

    out = tmp_path / "pt"
    # Execute
    res = CliRunner().invoke(app, ["pretrain", "--dataset", "synthetic", "--sites", "2", "--epochs", "1",
                                   "--window-seconds", "2", "--batch-size", "64", "--device", "cpu", "--seed", "1",
                                   "--out", str(out)])
    # Assert
    assert res.exit_code == 0, res.output
    assert "trainable parameters" in res.output and "windows/s" in res.output
    assert f"--checkpoint {out / 'backbone.safetensors'}" in res.output and "--seed 1" in res.output
    build_backbone("labram-small", checkpoint=out / "backbone.safetensors")
    assert (out / "pretrain_manifest.json").is_file() and (out / "loss_curve.png").is_file()
