"""Backbone registry, run-config checks and build_model for baselines, LoRA effectiveness, and LaBraM's
forward_features against an independent transcription of the official forward pass."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedeeg.config import BACKBONE_NAMES, LORA_BACKBONES, OPTIONAL_BACKBONES, RunConfig
from fedeeg.data.channels import EEGMAT_CHANNELS
from fedeeg.models import BACKBONE_REGISTRY, LaBraM, load_backbone

CH = list(EEGMAT_CHANNELS)
#: The notes' slots of eegmat's 19 channels in LaBraM's position embedding (cls first).
EEGMAT_SLOTS = [0, 1, 3, 18, 22, 16, 24, 89, 91, 40, 44, 90, 92, 62, 66, 81, 83, 20, 42, 64]
HAS_BRAINDECODE = importlib.util.find_spec("braindecode") is not None


def _x(batch: int = 2, n_chans: int = len(CH), n_times: int = 800, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(batch, n_chans, n_times, generator=gen)


# --------------------------------------------------------------------------- registry


def test_registry_names_agree_with_the_config():
    # Execute
    lora = [n for n, e in BACKBONE_REGISTRY.items() if e.supports_lora]
    # Assert
    assert tuple(BACKBONE_REGISTRY) == BACKBONE_NAMES
    assert tuple(lora) == LORA_BACKBONES
    assert {"eegnet", "eeg-inception", "cbramod"} <= set(BACKBONE_REGISTRY)
    assert all(e.fixed_input == (not e.supports_lora) for e in BACKBONE_REGISTRY.values())
    assert {n: e.requires for n, e in BACKBONE_REGISTRY.items() if e.requires} == {n: m for n, (m, _) in OPTIONAL_BACKBONES.items()}


def test_unknown_name_lists_the_allowed_ones():
    # Execute / Assert
    with pytest.raises(ValueError, match=r"'name'.*'labram-small', 'labram-base'.*'eegnet', 'eeg-inception'.*got 'eegnet4'"):
        load_backbone("eegnet4", ch_names=CH, n_times=800)


@pytest.mark.parametrize(("kwargs", "lacking"), [({}, "ch_names and n_times"), ({"ch_names": CH}, "n_times"),
                                                 ({"n_times": 800}, "ch_names")])
def test_baselines_need_channels_and_window(kwargs, lacking):
    # Execute / Assert
    with pytest.raises(ValueError, match=f"'eegnet' is built for one channel list and window length: pass {lacking}"):
        load_backbone("eegnet", **kwargs)


def test_labram_through_the_registry():
    # Prepare / Execute
    model = load_backbone("labram-small", n_outputs=3, seed=2, ch_names=CH, n_times=800)
    # Assert
    assert isinstance(model, LaBraM) and model.head.out_features == 3
    assert model.backbone_name == "labram-small" and model.supports_lora is True and model.checkpoint_sha256 is None
    with pytest.raises(ValueError, match="'XYZ'"):
        load_backbone("labram-small", ch_names=CH[:-1] + ["XYZ"])
    with pytest.raises(ValueError, match="multiple of 200 up to 3200, got 850"):
        load_backbone("labram-small", n_times=850)
    with pytest.raises(ValueError, match="200 Hz.*sfreq=128"):
        load_backbone("labram-small", sfreq=128.0)


@pytest.mark.skipif(HAS_BRAINDECODE, reason="braindecode is installed")
def test_cbramod_without_braindecode_says_how_to_install():
    # Execute / Assert
    with pytest.raises(ImportError, match=r"pip install 'fedeeg\[braindecode\]'.*torchaudio"):
        load_backbone("cbramod", ch_names=CH, n_times=800)
    with pytest.raises(ImportError, match=r"pip install 'fedeeg\[braindecode\]'"):
        RunConfig(backbone="cbramod", strategy="full")


def test_cbramod_with_braindecode():
    # Prepare
    pytest.importorskip("braindecode")
    # Execute
    model = load_backbone("cbramod", ch_names=CH, n_times=400, seed=0).eval()
    logits = model(_x(n_times=400), CH)
    # Assert
    assert logits.shape == (2, 2) and model.supports_lora is False
    assert model.forward_features(_x(n_times=400), CH).shape[1] == model.head.in_features
    with pytest.raises(ValueError, match="another order"):
        model(_x(n_times=400), CH[::-1])


# --------------------------------------------------------------------------- config and build_model


def test_config_refuses_lora_strategies_for_baselines():
    # Execute / Assert
    for strategy in ("ffa", "fedit"):
        with pytest.raises(ValueError, match=rf"'eegnet' is a baseline without LoRA.*strategy='{strategy}'.*use strategy='full'"):
            RunConfig(backbone="eegnet", strategy=strategy)
    with pytest.raises(ValueError, match=r"'backbone'.*'eeg-inception'.*got 'eegnetv4'"):
        RunConfig(backbone="eegnetv4", strategy="full")
    assert RunConfig(backbone="eeg-inception", strategy="full").backbone == "eeg-inception"


def test_build_model_for_baselines():
    # Prepare
    from fedeeg.experiment import build_model, run_input

    cfg = RunConfig(backbone="eegnet", strategy="full", window_seconds=2.0)
    # Execute
    model = build_model(cfg, n_outputs=2)
    explicit = build_model(cfg, n_outputs=2, ch_names=CH[:8], n_times=600)
    # Assert: the dataset's channels and the run's window by default; explicit ones when given
    assert run_input(cfg) == (tuple(CH), 400)
    assert model.ch_names == tuple(CH) and model.n_times == 400
    assert explicit.ch_names == tuple(CH[:8]) and explicit.n_times == 600
    assert all(p.requires_grad for p in model.parameters()) and not hasattr(model, "peft_config")
    # identical at every site (server and clients build from the config alone)
    again = build_model(cfg, n_outputs=2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert model(_x(n_times=400), CH).shape == (2, 2)


def test_build_model_refuses_lora_for_a_baseline_even_past_the_config():
    # Prepare: a config that skipped validation
    from fedeeg.experiment import build_model

    cfg = RunConfig(backbone="eegnet", strategy="full")
    object.__setattr__(cfg, "strategy", "ffa")
    # Execute / Assert
    with pytest.raises(ValueError, match="'eegnet' has no LoRA adapters: use strategy='full'"):
        build_model(cfg, n_outputs=2)


# --------------------------------------------------------------------------- LoRA effectiveness


class _Bypass(nn.Module):
    """A toy that reads ``qkv.weight`` through F.linear (the pitfall) and calls ``proj`` properly."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 16, bias=False)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, ch_names) -> torch.Tensor:
        h = F.linear(x, self.qkv.weight)  # (batch, n_chans, 16): bypasses a LoRA wrapper
        h = self.proj(h)  # (batch, n_chans, 16)
        return self.head(h.mean(1))  # (batch, 2)


def test_check_lora_effective_flags_a_bypassed_module():
    # Prepare
    from peft import LoraConfig, get_peft_model

    from fedeeg.models import check_lora_effective

    torch.manual_seed(0)
    model = get_peft_model(_Bypass(), LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "proj"]))
    x = _x(n_chans=3, n_times=16)
    # Execute / Assert
    with pytest.raises(RuntimeError, match=r"1 of 2 LoRA adapters have no effect.*qkv \(lora_A gets no gradient; "
                                           r"lora_B gets no gradient; perturbing lora_B leaves the output unchanged\)"):
        check_lora_effective(model, x, ["a", "b", "c"])
    report = check_lora_effective(model, x, ["a", "b", "c"], raise_error=False)
    assert list(report) == ["qkv"]


@pytest.mark.parametrize("freeze_a", [False, True])
def test_check_lora_effective_passes_labram_paper_preset_and_restores_the_model(freeze_a):
    # Prepare
    from fedeeg.models import LoraSpec, apply_lora, build_backbone, check_lora_effective

    model = apply_lora(build_backbone("labram-small", seed=0), LoraSpec(), freeze_a=freeze_a, seed=0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = _x(n_chans=4, n_times=400)
    # Execute
    report = check_lora_effective(model, x, CH[:4])
    # Assert: 4 blocks x (qkv, fc1, fc2) + 3 temporal convs, all effective; the model is as it was
    assert report == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert model.training and all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- LaBraM vs the official forward


def _official_forward_features(sd: dict, x: torch.Tensor, slots: list[int], num_heads: int) -> torch.Tensor:
    """LaBraM's fine-tuning forward as the checkpoint notes describe it, from the raw tensors only.

    x: (B, N, T) with T = A * 200. Patch embed → cls + position/time embeddings → pre-norm blocks
    (q/k LayerNorm, layer scale) → mean of the patch tokens → fc_norm.
    """
    B, N, T = x.shape
    A = T // 200
    dim = sd["cls_token"].shape[-1]
    hd = dim // num_heads
    h = x.reshape(B, N * A, 200).unsqueeze(1)  # [B, 1, N*A, 200]
    for i, (stride, pad) in enumerate([(8, 7), (1, 1), (1, 1)], start=1):
        h = F.conv2d(h, sd[f"patch_embed.conv{i}.weight"], sd[f"patch_embed.conv{i}.bias"], stride=(1, stride), padding=(0, pad))
        h = F.gelu(F.group_norm(h, 4, sd[f"patch_embed.norm{i}.weight"], sd[f"patch_embed.norm{i}.bias"]))
    h = h.permute(0, 2, 3, 1).reshape(B, N * A, dim)  # per patch, (step, map) order
    pos = sd["pos_embed"][:, slots]  # [1, 1+N, dim]
    patch_pos = pos[:, 1:].repeat_interleave(A, dim=1)  # channel-major: all patches of channel 1 first
    time = sd["time_embed"][:, :A].repeat(1, N, 1)
    h = torch.cat([sd["cls_token"].expand(B, -1, -1) + pos[:, :1], h + patch_pos + time], dim=1)
    L = h.shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for n in range(depth):
        p = f"blocks.{n}."
        y = F.layer_norm(h, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = (y @ sd[p + "attn.qkv.weight"].T).reshape(B, L, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
        q = F.layer_norm(qkv[0], (hd,), sd[p + "attn.q_norm.weight"], sd[p + "attn.q_norm.bias"], eps=1e-6)
        k = F.layer_norm(qkv[1], (hd,), sd[p + "attn.k_norm.weight"], sd[p + "attn.k_norm.bias"], eps=1e-6)
        attn = torch.softmax((q * hd**-0.5) @ k.transpose(-2, -1), dim=-1)
        o = (attn @ qkv[2]).transpose(1, 2).reshape(B, L, dim)
        h = h + sd[p + "gamma_1"] * (o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"])
        y = F.layer_norm(h, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        h = h + sd[p + "gamma_2"] * y
    return F.layer_norm(h[:, 1:].mean(1), (dim,), sd["fc_norm.weight"], sd["fc_norm.bias"], eps=1e-6)


@pytest.mark.parametrize(("name", "num_heads"), [("labram-small", 5), ("labram-base", 10)])
def test_forward_features_equals_the_official_forward(name, num_heads):
    # Prepare: random weights everywhere (not LaBraM's small init), the same in both implementations
    model = load_backbone(name, seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    sd = {}
    for k, v in model.state_dict().items():
        noise = torch.randn(v.shape, generator=gen)
        sd[k] = 1.0 + 0.1 * noise if k.endswith(("norm1.weight", "norm2.weight", "norm3.weight", "norm.weight")) else 0.1 * noise
    model.load_state_dict(sd)
    x = _x(batch=2, n_times=800)  # 19 channels x 4 s
    # Execute
    with torch.no_grad():
        got = model.forward_features(x, CH)
        want = _official_forward_features(sd, x, EEGMAT_SLOTS, num_heads)
    # Assert
    assert got.shape == (2, model.embed_dim)
    assert float(want.std()) > 0.1  # features are far from trivial
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
