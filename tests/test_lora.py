"""LoRA on LaBraM: every adapter is live, parameter counts, FFA freezing, state round trips."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from fedeeg.models import (
    LoraSpec,
    apply_lora,
    build_backbone,
    count_parameters,
    load_trainable_state_dict,
    lora_pairs,
    trainable_state_dict,
)

CH_NAMES = ["FP1", "FP2", "F3", "F4", "C3", "CZ", "C4", "P3", "PZ", "P4", "O1", "O2"]


def _x(batch: int = 2, n_times: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, len(CH_NAMES), n_times, generator=torch.Generator().manual_seed(seed))


def _small_lora(spec: LoraSpec | None = None, *, seed: int = 0, lora_seed: int = 0, freeze_a: bool = False):
    return apply_lora(build_backbone("labram-small", seed=seed), spec or LoraSpec(), freeze_a=freeze_a, seed=lora_seed)


def _randomize_b(model, seed: int = 1, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b in lora_pairs(model).values():
            b.copy_(torch.randn(b.shape, generator=gen) * scale)


def _lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


# --------------------------------------------------------------------------- spec


def test_spec_validation_and_to_dict():
    # Execute / Assert
    assert LoraSpec().to_dict() == {"preset": "paper", "rank": 2, "alpha": 8.0, "dropout": 0.5, "conv_rank": 4, "target_modules": None}
    assert LoraSpec(conv_rank=0).conv_rank is None
    assert LoraSpec(preset="custom", target_modules=["attn.proj"]).target_modules == ("attn.proj",)
    with pytest.raises(ValueError, match=re.escape("'paper', 'attention', 'all-linear', 'qkv', 'mlp', 'convs', 'qkv+convs', 'mlp+convs', 'custom', but got 'everything'")):
        LoraSpec(preset="everything")
    with pytest.raises(ValueError, match="needs 'target_modules'"):
        LoraSpec(preset="custom")
    with pytest.raises(ValueError, match="only used with preset='custom'"):
        LoraSpec(target_modules=("attn.qkv",))
    with pytest.raises(ValueError, match="trained in full"):
        LoraSpec(preset="custom", target_modules=("head",))
    with pytest.raises(ValueError, match="'rank' must be >= 1"):
        LoraSpec(rank=0)
    with pytest.raises(ValueError, match="'dropout' must be < 1"):
        LoraSpec(dropout=1.0)
    with pytest.raises(TypeError, match="'rank' must be int"):
        LoraSpec(rank=2.0)


@pytest.mark.parametrize(
    ("spec", "suffixes"),
    [
        (LoraSpec(), {"attn.qkv", "mlp.fc1", "mlp.fc2", "patch_embed.conv1", "patch_embed.conv2", "patch_embed.conv3"}),
        (LoraSpec(conv_rank=None), {"attn.qkv", "mlp.fc1", "mlp.fc2"}),
        (LoraSpec(preset="attention"), {"attn.qkv", "attn.proj"}),
        (LoraSpec(preset="all-linear"), {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}),
        (LoraSpec(preset="custom", target_modules=("mlp.fc2", "patch_embed.conv1")), {"mlp.fc2", "patch_embed.conv1"}),
        # the seed study's target subsets
        (LoraSpec(preset="qkv"), {"attn.qkv"}),
        (LoraSpec(preset="mlp"), {"mlp.fc1", "mlp.fc2"}),
        (LoraSpec(preset="convs"), {"patch_embed.conv1", "patch_embed.conv2", "patch_embed.conv3"}),
        (LoraSpec(preset="qkv+convs"), {"attn.qkv", "patch_embed.conv1", "patch_embed.conv2", "patch_embed.conv3"}),
        (LoraSpec(preset="mlp+convs"), {"mlp.fc1", "mlp.fc2", "patch_embed.conv1", "patch_embed.conv2",
                                        "patch_embed.conv3"}),
    ],
)
def test_presets_target_the_right_modules(spec, suffixes):
    # Execute
    model = _small_lora(spec)
    names = set(lora_pairs(model))
    # Assert: the named modules of every block, never head/fc_norm
    got = {n.split(".", 2)[2] if n.startswith("blocks.") else n for n in names}
    assert got == suffixes
    per_block = len([s for s in suffixes if not s.startswith("patch_embed")])
    assert len([n for n in names if n.startswith("blocks.")]) == 4 * per_block
    assert not any(n.startswith(("head", "fc_norm")) for n in names)


def test_conv_presets_need_a_conv_rank():
    # Execute / Assert: the error names the preset, the parameter and what to give
    with pytest.raises(ValueError, match=r"preset='convs'.*'conv_rank'.*conv_rank >= 1"):
        LoraSpec(preset="convs", conv_rank=0)


def test_conv_adapters_of_subset_presets_take_conv_rank():
    # Execute
    model = _small_lora(LoraSpec(preset="mlp+convs", rank=2, conv_rank=4))
    # Assert: Linear adapters at rank 2, convolution adapters at conv_rank 4
    ranks = {n: a.shape[0] for n, (a, _) in lora_pairs(model).items()}
    assert {r for n, r in ranks.items() if n.startswith("blocks.")} == {2}
    assert {r for n, r in ranks.items() if n.startswith("patch_embed")} == {4}


def test_custom_target_that_matches_nothing_is_an_error():
    # Execute / Assert
    with pytest.raises(ValueError, match=r"\['attn\.qkvz'\] match no module"):
        _small_lora(LoraSpec(preset="custom", target_modules=("attn.qkv", "attn.qkvz")))


# --------------------------------------------------------------------------- adapters are live


def test_every_adapter_gets_a_gradient():
    # Prepare: B starts at zero, which would make A's gradient zero
    model = _small_lora()
    _randomize_b(model)
    model.train()
    x, y = _x(n_times=400), torch.tensor([0, 1])
    # Execute
    loss = F.cross_entropy(model(x, CH_NAMES), y)
    loss.backward()
    # Assert
    params = _lora_params(model)
    assert len(params) == 2 * (3 + 3 * 4)
    no_grad = [n for n, p in params.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert no_grad == []
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen_with_grad == []


def test_each_adapted_module_changes_the_output():
    # Prepare
    model = _small_lora().eval()
    with torch.no_grad():
        model.base_model.model.head.modules_to_save["default"].weight.normal_()  # sensitive logits
    x = _x()
    base_out = model(x, CH_NAMES)
    gen = torch.Generator().manual_seed(0)
    pairs = lora_pairs(model)
    assert len(pairs) == 15
    for name, (_, b) in pairs.items():
        # Execute: perturb this module's B alone
        with torch.no_grad():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
        out = model(x, CH_NAMES)
        with torch.no_grad():
            b.zero_()
        # Assert
        assert (out - base_out).abs().max() > 1e-4, name
    torch.testing.assert_close(model(x, CH_NAMES), base_out, rtol=0, atol=0)


def test_wrapped_model_starts_equal_to_backbone_and_takes_positional_args():
    # Prepare
    backbone = build_backbone("labram-small", seed=0).eval()
    x = _x()
    want = backbone(x, CH_NAMES)
    # Execute
    model = apply_lora(backbone, LoraSpec()).eval()
    # Assert
    torch.testing.assert_close(model(x, CH_NAMES), want, rtol=0, atol=0)
    torch.testing.assert_close(model(x, ch_names=CH_NAMES), want, rtol=0, atol=0)
    assert model.forward_features(x, CH_NAMES).shape == (2, 100)
    assert model.backbone_name == "labram-small" and model.checkpoint_sha256 is None


def test_lora_pairs_give_peft_delta_weight():
    # Prepare
    model = _small_lora()
    _randomize_b(model)
    base = model.get_base_model()
    # Execute / Assert: scaling * (B @ A) reshaped = peft's delta weight, for Linear and Conv2d
    for name in ("blocks.0.attn.qkv", "blocks.3.mlp.fc2", "patch_embed.conv1", "patch_embed.conv3"):
        a, b = lora_pairs(model)[name]
        module = base.get_submodule(name)
        delta = module.scaling["default"] * (b @ a).reshape(module.base_layer.weight.shape)
        torch.testing.assert_close(delta, module.get_delta_weight("default"))
    assert base.get_submodule("patch_embed.conv1").scaling["default"] == 8.0 / 4
    assert base.get_submodule("blocks.0.attn.qkv").scaling["default"] == 8.0 / 2


# --------------------------------------------------------------------------- counts and freezing


@pytest.mark.parametrize("rank", [2, 4])
def test_paper_preset_parameter_count_on_base(rank):
    # Prepare
    backbone = build_backbone("labram-base")
    n_backbone = sum(p.numel() for p in backbone.parameters())
    # Execute
    model = apply_lora(backbone, LoraSpec(rank=rank))
    # Assert: 33,600·r + 348 (rank-4 convs), i.e. 67,548 at r=2
    n_lora = sum(p.numel() for p in _lora_params(model).values())
    assert n_lora == 33_600 * rank + 348
    if rank == 2:
        assert n_lora == 67_548
    trainable, total = count_parameters(model)
    assert trainable == n_lora + 400 + 402  # + fc_norm (200·2) + head (200·2 + 2)
    assert total == n_backbone + n_lora


def test_freeze_a_trains_only_b_and_head():
    # Execute
    model = _small_lora(freeze_a=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # Assert
    assert not any("lora_A" in n for n in trainable)
    assert all("lora_B" in n or ".modules_to_save." in n for n in trainable)
    assert {n.split(".")[2] for n in trainable if ".modules_to_save." in n} == {"fc_norm", "head"}
    n_b = sum(p.numel() for n, p in model.named_parameters() if "lora_B" in n)
    assert count_parameters(model)[0] == n_b + 200 + 202
    assert len([n for n in trainable if "lora_B" in n]) == 15


def test_same_seeds_give_identical_lora_a_and_global_rng_is_kept():
    # Prepare
    state = torch.random.get_rng_state()
    # Execute
    m1, m2 = _small_lora(seed=0, lora_seed=7), _small_lora(seed=0, lora_seed=7)
    m3 = _small_lora(seed=0, lora_seed=8)
    # Assert
    assert torch.equal(torch.random.get_rng_state(), state)
    a1, a2, a3 = (({n: p for n, p in _lora_params(m).items() if "lora_A" in n}) for m in (m1, m2, m3))
    assert list(a1) == list(a2) and len(a1) == 15
    assert all(torch.equal(a1[n], a2[n]) for n in a1)
    assert all(torch.any(a1[n] != 0) for n in a1)
    assert not any(torch.equal(a1[n], a3[n]) for n in a1)
    assert all(torch.all(p == 0) for n, p in _lora_params(m1).items() if "lora_B" in n)


# --------------------------------------------------------------------------- state round trips


def test_trainable_state_dict_round_trip():
    # Prepare
    src, dst = _small_lora(), _small_lora()
    _randomize_b(src)
    x = _x()
    # Execute
    state = trainable_state_dict(src)
    load_trainable_state_dict(dst, state)
    # Assert: names stable, detached CPU copies, identical outputs
    assert list(state) == list(trainable_state_dict(dst))
    assert list(state) == [n for n, p in src.named_parameters() if p.requires_grad]
    assert all(v.device.type == "cpu" and not v.requires_grad for v in state.values())
    src_b = next(p for n, p in src.named_parameters() if "lora_B" in n)
    state[next(n for n in state if "lora_B" in n)].add_(1.0)
    assert not torch.equal(src_b, state[next(n for n in state if "lora_B" in n)])
    src.eval(), dst.eval()
    torch.testing.assert_close(dst(x, CH_NAMES), src(x, CH_NAMES), rtol=0, atol=0)


def test_load_trainable_state_dict_names_every_mismatch():
    # Prepare
    model = _small_lora(freeze_a=True)
    good = trainable_state_dict(model)
    names = list(good)
    bad = dict(good)
    del bad[names[0]]
    bad[names[1]] = torch.zeros(3, 3)
    bad[names[2]] = good[names[2]].double()
    bad["base_model.model.blocks.0.attn.qkv.lora_A.default.weight"] = torch.zeros(2, 100)  # frozen under FFA
    before = trainable_state_dict(model)
    # Execute
    with pytest.raises(ValueError) as err:
        load_trainable_state_dict(model, bad)
    # Assert
    msg = str(err.value)
    assert f"missing: {names[0]}" in msg
    assert f"{names[1]}: shape [3, 3], expected {list(good[names[1]].shape)}" in msg
    assert f"{names[2]}: dtype torch.float64, expected torch.float32" in msg
    assert "unexpected (not trainable parameters or BatchNorm statistics of this model): base_model.model.blocks.0.attn.qkv.lora_A" in msg
    after = trainable_state_dict(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_save_pretrained_writes_a_clean_adapter(tmp_path):
    # Prepare
    model = _small_lora()
    # Execute
    model.save_pretrained(tmp_path)
    # Assert
    from safetensors.torch import load_file

    assert (tmp_path / "adapter_config.json").is_file()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 8.0 and config["rank_pattern"] == {"patch_embed\\.conv[123]": 4}
    assert config["modules_to_save"] == ["fc_norm", "head"]
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(saved) == 2 * 15 + 4
    assert not any("base_layer" in k or "original_module" in k for k in saved)
