"""Scenarios, site sampling, heterogeneous synthetic sites, lazy site loading and personalisation (issue 7)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from fedeeg.config import RunConfig
from fedeeg.data.synthetic import SiteHeterogeneity, make_synthetic_site, make_synthetic_sites
from fedeeg.scenarios import (
    PROPOSED_FIELDS,
    Scenario,
    dropped_sites,
    list_scenarios,
    load_scenario,
    require_applied,
    resolve,
    sample_sites,
)

SMALL = dict(subjects_per_site=2, windows_per_class=3, window_seconds=1.0)


# ------------------------------------------------------------------ scenario files
def test_shipped_scenarios_load_and_match_the_issue():
    # Execute
    names = list_scenarios()
    s100 = load_scenario("synthetic-100")
    s1000 = load_scenario("synthetic-1000")
    # Assert
    assert {"eegmat-year", "eegmat-subject", "synthetic-10", "synthetic-100", "synthetic-1000"} <= set(names)
    assert s100.settings["sites"] == 100 and s100.settings["sites_per_round"] == 10
    assert s100.settings["backbone"] == "labram-small"
    assert s1000.settings["sites"] == 1000 and s1000.settings["sites_per_round"] == 20
    assert load_scenario("eegmat-subject").settings["site_holdout"] == "time"


def test_explicit_overrides_win_over_the_scenario():
    # Prepare
    sc = Scenario("t", settings={"dataset": "synthetic", "sites": 4, "rounds": 7, "strategy": "ffa"})
    # Execute
    cfg, pending = resolve(sc, {"rounds": 2, "local-epochs": 3})
    # Assert
    assert (cfg.sites, cfg.rounds, cfg.local_epochs, cfg.strategy) == (4, 2, 3, "ffa")
    assert pending == {}


def test_settings_runconfig_lacks_are_pending_and_refused():
    # Prepare
    sc = load_scenario("synthetic-100")
    # Execute
    cfg, pending = resolve(sc)
    # Assert: RunConfig gets what it knows; the rest is returned, never silently dropped
    assert cfg.sites == 100
    if not hasattr(RunConfig(), "sites_per_round"):
        assert pending["sites_per_round"] == 10 and pending["label_alpha"] == 0.5
        with pytest.raises(ValueError, match="sites_per_round=10"):
            require_applied(pending, "Scenario 'synthetic-100'")


@pytest.mark.parametrize("settings, match", [
    ({"sites": 5, "sites_per_round": 6}, "cannot exceed 'sites'"),
    ({"backbone": "eegnet", "strategy": "full", "montage_drop": 0.2}, "different channels"),
    ({"mode": "centralized", "montage_drop": 0.2}, "cannot be pooled"),
    ({"dataset": "eegmat", "data_dir": "x", "label_alpha": 0.5}, "need dataset='synthetic'"),
    ({"personalise": "everything"}, "personalise"),
    ({"dropout": 2.0}, "dropout"),
    ({"bogus": 1}, "Unknown setting"),
    ({"site_sfreqs": "128,abc"}, "site_sfreqs"),
])
def test_bad_settings_are_named(settings, match):
    with pytest.raises((ValueError, TypeError), match=match):
        resolve(Scenario("t"), settings)


def test_scenario_file_errors(tmp_path):
    # Prepare
    bad_table = tmp_path / "a.toml"
    bad_table.write_text("[runn]\nsites = 3\n")
    bad_key = tmp_path / "b.toml"
    bad_key.write_text("[federation]\nper_round = 3\n")
    # Assert
    with pytest.raises(ValueError, match="unknown table"):
        load_scenario(bad_table)
    with pytest.raises(ValueError, match="unknown key 'per_round' in \\[federation\\]"):
        load_scenario(bad_key)
    with pytest.raises(FileNotFoundError, match="Known scenarios"):
        load_scenario("no-such-scenario")


# ------------------------------------------------------------------ participation
def test_sample_sites_is_deterministic_distinct_and_varies_by_round():
    # Execute
    a = sample_sites(3, 100, 10, seed=0)
    b = sample_sites(3, 100, 10, seed=0)
    rounds = [sample_sites(r, 100, 10, seed=0) for r in range(1, 201)]
    # Assert
    assert a == b and a == sorted(a) and len(set(a)) == 10 and all(0 <= i < 100 for i in a)
    assert sample_sites(4, 100, 10, seed=0) != a
    assert sample_sites(3, 100, 10, seed=1) != a
    assert sample_sites(1, 5, 0, seed=0) == [0, 1, 2, 3, 4] == sample_sites(1, 5, 9, seed=0)
    counts = np.bincount(np.concatenate(rounds), minlength=100)
    assert counts.min() > 5 and counts.max() < 40  # each site ~20 times in 200 rounds


def test_dropped_sites_follow_the_rate():
    # Execute
    sampled = list(range(50))
    drops = [dropped_sites(r, sampled, 0.2, seed=0) for r in range(1, 101)]
    # Assert
    assert dropped_sites(1, sampled, 0.0, seed=0) == []
    assert all(set(d) <= set(sampled) for d in drops)
    assert drops[0] == dropped_sites(1, sampled, 0.2, seed=0)
    assert 0.15 < np.mean([len(d) for d in drops]) / 50 < 0.25


# ------------------------------------------------------------------ heterogeneous synthetic sites
def test_one_site_equals_the_same_site_of_all():
    # Execute
    all_sites = make_synthetic_sites(3, seed=4, **SMALL)
    one = make_synthetic_site(2, seed=4, **SMALL)
    # Assert
    np.testing.assert_array_equal(one.windows.X, all_sites[2].windows.X)
    assert one.info == all_sites[2].info and one.name == "site-2"


def test_heterogeneity_off_is_bit_identical():
    # Execute
    plain = make_synthetic_site(1, seed=2, **SMALL)
    off = make_synthetic_site(1, seed=2, heterogeneity=SiteHeterogeneity(), **SMALL)
    # Assert
    np.testing.assert_array_equal(plain.windows.X, off.windows.X)
    assert plain.info == off.info


def test_label_skew_montage_and_size():
    # Prepare
    het = SiteHeterogeneity(label_alpha=0.2, montage_drop=0.5, size_skew=1.0)
    # Execute
    sites = [make_synthetic_site(i, seed=0, subjects_per_site=4, windows_per_class=10, window_seconds=1.0,
                                 heterogeneity=het) for i in range(8)]
    # Assert
    ratios = [s.windows.class_counts().min() / s.windows.class_counts().max() for s in sites]
    assert min(ratios) < 0.3  # at least one strongly skewed site
    assert all((s.windows.class_counts() >= 1).all() for s in sites)
    assert all(s.windows.n_chans == 19 - 10 for s in sites)  # round(0.5 * 19) = 10 channels dropped
    assert len({s.windows.ch_names for s in sites}) > 1  # sites lack different channels
    assert len({len(s.windows.subjects) for s in sites}) > 1
    assert all(len(s.windows.subjects) >= 2 for s in sites)


def test_native_sampling_rate_limits_the_spectrum():
    # Prepare
    het = SiteHeterogeneity(site_sfreqs=(100.0, 200.0))
    # Execute
    low = make_synthetic_site(0, seed=0, heterogeneity=het, **SMALL)
    full = make_synthetic_site(1, seed=0, heterogeneity=het, **SMALL)
    # Assert: both at 200 Hz, 200 samples; the 100-Hz site has no power above its 50-Hz Nyquist
    assert low.windows.X.shape[-1] == full.windows.X.shape[-1] == 200 and low.windows.sfreq == 200.0
    spec = lambda X: np.abs(np.fft.rfft(X, axis=-1)) ** 2  # noqa: E731
    freqs = np.fft.rfftfreq(200, 1 / 200)
    high = lambda X: spec(X)[..., freqs > 60].sum() / spec(X).sum()  # noqa: E731
    assert high(low.windows.X) < 0.01 < high(full.windows.X)
    assert low.info["native_sfreq"] == 100.0


def test_knobs_draw_independently():
    # Execute: turning on the amplitude shift must not change the label skew's draw
    a = make_synthetic_site(3, seed=1, heterogeneity=SiteHeterogeneity(label_alpha=0.5), **SMALL)
    b = make_synthetic_site(3, seed=1, heterogeneity=SiteHeterogeneity(label_alpha=0.5, amplitude_shift=0.5), **SMALL)
    # Assert
    assert a.info["class_proportions"] == b.info["class_proportions"]
    np.testing.assert_array_equal(a.windows.y, b.windows.y)
    assert b.info["gain"] != a.info["gain"]


def test_bad_heterogeneity_is_named():
    with pytest.raises(ValueError, match="montage_drop"):
        SiteHeterogeneity(montage_drop=0.95)
    with pytest.raises(TypeError, match="heterogeneity"):
        make_synthetic_site(0, heterogeneity={"label_alpha": 1.0})


# ------------------------------------------------------------------ lazy per-site loading
def test_prepare_site_equals_prepare_sites_and_builds_only_its_site(monkeypatch):
    # Prepare
    import fedeeg.data.synthetic as syn
    from fedeeg.experiment import _prepare_site_cached, prepare_site, prepare_sites

    cfg = RunConfig(sites=4, window_seconds=1.0, seed=3)
    _prepare_site_cached.cache_clear()
    built = []
    real = syn.make_synthetic_site
    monkeypatch.setattr(syn, "make_synthetic_site", lambda i, **kw: built.append(i) or real(i, **kw))
    # Execute
    one = prepare_site(cfg, 2)
    monkeypatch.undo()
    every = prepare_sites(cfg)
    # Assert
    assert built == [2]
    np.testing.assert_array_equal(one.train.X, every[2].train.X)
    np.testing.assert_array_equal(one.test.X, every[2].test.X)
    assert one.name == every[2].name and one.describe() == every[2].describe()
    with pytest.raises(ValueError, match=r"Site index must be an int in \[0, 4\)"):
        prepare_site(cfg, 4)


def test_lazy_sites_memory_does_not_grow_with_sites():
    # Prepare
    from fedeeg.experiment import _prepare_site_cached, prepare_site

    cfg = RunConfig(sites=1000, window_seconds=1.0)
    _prepare_site_cached.cache_clear()
    site_bytes = prepare_site(cfg, 0).train.X.nbytes + prepare_site(cfg, 0).test.X.nbytes
    _prepare_site_cached.cache_clear()
    # Execute: visit 25 of 1000 sites, as a client serving a round's sample would
    tracemalloc.start()
    for i in range(0, 1000, 40):
        prepare_site(cfg, i)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    _prepare_site_cached.cache_clear()
    # Assert: at most the two memoised sites plus one being built (and generation scratch), not 25
    assert peak < 8 * site_bytes


def test_split_in_time_holds_out_the_last_windows():
    # Prepare
    from fedeeg.experiment import split_in_time

    w = make_synthetic_site(0, subjects_per_site=1, windows_per_class=9, window_seconds=1.0).windows
    # Execute
    train, test = split_in_time(w, 1 / 3)
    # Assert
    assert test.class_counts().tolist() == [3, 3] and train.class_counts().tolist() == [6, 6]
    assert train.subjects == test.subjects  # one subject on both sides
    last = w.X[(w.y == 0)][-3:]
    np.testing.assert_array_equal(test.X[test.y == 0], last)


# ------------------------------------------------------------------ personalisation
@pytest.fixture(scope="module")
def lora_model():
    from fedeeg.experiment import build_model

    return build_model(RunConfig(strategy="ffa", window_seconds=1.0), n_outputs=2)


def test_local_names_head_and_norm(lora_model):
    # Prepare
    import copy

    from fedeeg.models import trainable_state_dict
    from fedeeg.personalisation import enable_local_training, local_parameter_names

    model = copy.deepcopy(lora_model)
    # Execute
    head = local_parameter_names(model, "head")
    switched = enable_local_training(model, "norm+head")
    both = local_parameter_names(model, "norm+head")
    # Assert
    assert head == ["base_model.model.head.modules_to_save.default.bias", "base_model.model.head.modules_to_save.default.weight"]
    assert any(".blocks.0.norm1." in n for n in switched)
    assert set(head) < set(both) <= set(trainable_state_dict(model))
    assert any("patch_embed.norm1" in n for n in both) and any("fc_norm" in n for n in both)
    assert not any("lora_" in n for n in both) and not any("original_module" in n for n in both)
    assert local_parameter_names(model, "none") == []


def test_local_names_fedbn_on_a_batchnorm_baseline():
    # Prepare
    from fedeeg.experiment import build_model
    from fedeeg.personalisation import local_parameter_names

    model = build_model(RunConfig(backbone="eegnet", strategy="full", window_seconds=1.0), n_outputs=2)
    # Execute
    names = local_parameter_names(model, "norm")
    # Assert: affine parameters and running statistics of the BatchNorms stay local
    assert {"bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"} <= set(names)
    assert "head.weight" not in names


def test_split_merge_and_store_round_trip(tmp_path):
    # Prepare
    from fedeeg.personalisation import LocalStateStore, merge_state, split_state

    state = {"a": np.ones(3, np.float32), "head.w": np.arange(4, dtype=np.float32)}
    store = LocalStateStore(tmp_path / "local")
    # Execute
    shared, local = split_state(state, ["head.w"])
    store.save("site-7", local)
    back = merge_state(shared, store.load("site-7"))
    # Assert
    assert set(shared) == {"a"} and set(local) == {"head.w"}
    np.testing.assert_array_equal(back["head.w"], state["head.w"])
    assert store.sites() == ["site-7"]
    assert store.load("site-8", default=local)["head.w"] is not local["head.w"]
    with pytest.raises(ValueError, match="both shared and local"):
        merge_state(state, local)
    with pytest.raises(ValueError, match="cannot name a file"):
        store.save("../x", local)


def test_finetune_and_evaluate_leaves_the_global_model(lora_model):
    # Prepare
    import torch

    from fedeeg.experiment import prepare_site
    from fedeeg.models import trainable_state_dict
    from fedeeg.personalisation import finetune_and_evaluate

    site = prepare_site(RunConfig(sites=1, window_seconds=1.0), 0)
    before = {k: v.clone() for k, v in trainable_state_dict(lora_model).items()}
    # Execute
    metrics = finetune_and_evaluate(lora_model, site, epochs=1, lr=1e-2, device="cpu")
    # Assert
    after = trainable_state_dict(lora_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert metrics["finetune_epochs"] == 1 and 0.0 <= metrics["balanced_accuracy"] <= 1.0
    assert metrics["n_windows"] == site.test.n_windows


def test_finetune_sites_pools_every_site(lora_model):
    # Prepare
    from fedeeg.personalisation import finetune_sites

    cfg = RunConfig(sites=2, window_seconds=1.0, device="cpu", strategy="ffa")
    # Execute
    out = finetune_sites(cfg, lora_model, epochs=1)
    # Assert
    assert list(out["per_site"]) == ["site-0", "site-1"] and out["finetune_epochs"] == 1
    assert out["test"]["n_windows"] == sum(m["n_windows"] for m in out["per_site"].values())


def test_proposed_fields_have_defaults_that_mean_off():
    # The integration adds these as RunConfig fields; their defaults must keep today's behaviour.
    assert PROPOSED_FIELDS["sites_per_round"][0] == 0 and PROPOSED_FIELDS["dropout"][0] == 0.0
    assert PROPOSED_FIELDS["personalise"][0] == "none" and PROPOSED_FIELDS["site_holdout"][0] == "subjects"
    assert (PROPOSED_FIELDS["synth_subjects"][0], PROPOSED_FIELDS["synth_windows_per_class"][0]) == (6, 20)
    from fedeeg import personalisation, scenarios

    assert scenarios.PERSONALISE_MODES == personalisation.PERSONALISE_MODES  # scenarios stays torch-free


@pytest.mark.slow
@pytest.mark.realdata
def test_eegmat_lazy_site_matches_and_one_subject_sites(eegmat_dir):
    # Prepare
    import dataclasses

    from fedeeg.experiment import _prepare_site_cached, _prepare_sites_cached, prepare_site, prepare_sites

    year = RunConfig(dataset="eegmat", data_dir=str(eegmat_dir), split="year", window_seconds=4.0)
    fields = [("site_holdout", str, "time")] if not hasattr(year, "site_holdout") else []
    Cfg = dataclasses.make_dataclass("HoldoutConfig", fields, bases=(RunConfig,), frozen=True)  # before integration
    per_subject = Cfg(dataset="eegmat", data_dir=str(eegmat_dir), split="subject", sites=24, site_holdout="time")
    _prepare_site_cached.cache_clear()
    _prepare_sites_cached.cache_clear()
    # Execute
    lazy = prepare_site(year, 1)
    every = prepare_sites(year)
    one = prepare_site(per_subject, 5)
    # Assert
    assert lazy.name == every[1].name == "year-2011"
    np.testing.assert_array_equal(lazy.train.X, every[1].train.X)
    np.testing.assert_array_equal(lazy.test.X, every[1].test.X)
    assert len(one.train.subjects) == 1 and one.train.subjects == one.test.subjects
    assert one.test.n_windows == pytest.approx(0.34 * (one.train.n_windows + one.test.n_windows), abs=2)
