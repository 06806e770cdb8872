"""LaBraM patch embedding as GEMMs (FEDEEG_PATCH_EMBED=gemm): equal to the convolution path, LoRA included."""

from __future__ import annotations

import pytest
import torch

from fedeeg.models import LoraSpec, apply_lora, build_backbone, lora_pairs
from fedeeg.models import _patch_gemm as pg

CH_NAMES = ["FP1", "FP2", "F3", "F4", "C3", "CZ", "C4", "P3", "PZ", "P4", "O1", "O2"]


def _x(batch: int = 2, n_times: int = 400, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, len(CH_NAMES), n_times, generator=torch.Generator().manual_seed(seed))


def _perturb(model, seed: int = 1) -> None:
    """Random LoRA B (so every adapter and A matters), GroupNorm affines and a sensitive head."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if hasattr(model, "peft_config"):
            for _, b in lora_pairs(model).values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
        for name, p in model.named_parameters():
            if ".norm" in name and "patch_embed" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
            if name.endswith("head.weight") or name.endswith("head.modules_to_save.default.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _model(backbone: str, spec: LoraSpec | None):
    model = build_backbone(backbone, seed=0)
    if spec is not None:
        model = apply_lora(model, spec, seed=0)
    _perturb(model)
    return model


def _patch_embed(model):
    return model.base_model.model.patch_embed if hasattr(model, "peft_config") else model.patch_embed


def _run(model, mode: str, x: torch.Tensor, monkeypatch, seed: int = 0):
    """Logits, patch-embedding output and gradients of every trainable parameter, in one mode."""
    monkeypatch.setattr(pg, "MODE", mode)
    model.zero_grad(set_to_none=True)
    captured = {}
    hook = _patch_embed(model).register_forward_hook(lambda _m, _i, out: captured.setdefault("tokens", out))
    try:
        torch.manual_seed(seed)
        logits = model(x, CH_NAMES)
    finally:
        hook.remove()
    proj = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    (logits * proj).sum().backward()
    # LaBraM's `norm` is not applied (mean pooling): it alone has no gradient
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return logits.detach(), captured["tokens"].detach(), grads


def _assert_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str, scale: float = 0.0) -> None:
    scale = max(scale, float(want.abs().max()))
    err = float((got - want).abs().max())
    assert err <= rel * scale + 1e-12, f"{what}: max |diff| {err:.3g} vs max |ref| {scale:.3g}"


CASES = {
    # name: (LoRA spec, train mode)
    "full": (None, True),
    "lora": (LoraSpec(dropout=0.0), True),
    "lora-dropout": (LoraSpec(dropout=0.5), True),
    "eval": (LoraSpec(dropout=0.5), False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backbone", ["labram-small", "labram-base"])
def test_gemm_path_equals_conv_path_with_gradients(monkeypatch, backbone, case):
    # Prepare
    spec, train = CASES[case]
    model = _model(backbone, spec).train(train)
    x = _x()
    # Execute: the same seed before each forward (the LoRA dropout draws its masks)
    conv_logits, conv_tokens, conv_grads = _run(model, "conv", x, monkeypatch)
    gemm_logits, gemm_tokens, gemm_grads = _run(model, "gemm", x, monkeypatch)
    # Assert
    assert pg.stage_plans(_patch_embed(model)) is not None  # the gemm path ran, no fallback
    assert gemm_tokens.shape == conv_tokens.shape == (2, len(CH_NAMES) * 2, model.embed_dim)
    _assert_close(gemm_tokens, conv_tokens, 1e-5, "patch-embedding tokens")
    _assert_close(gemm_logits, conv_logits, 1e-5, "logits")
    assert gemm_grads.keys() == conv_grads.keys()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable - conv_grads.keys() <= {"norm.weight", "norm.bias"}  # the unused final norm (full fine-tuning)
    n_conv_lora = sum(".patch_embed.conv" in n and "lora_" in n for n in conv_grads)
    assert n_conv_lora == (6 if spec is not None else 0)
    assert any("patch_embed.conv1" in n for n in conv_grads)
    for name, want in conv_grads.items():
        # Some biases have a gradient of zero up to rounding (a conv bias right before a GroupNorm of one
        # map per group, as in labram-small; attn.k_norm.bias, as softmax ignores a shift of every key):
        # errors of a bias are measured against its weight's gradient too.
        sibling = conv_grads.get(name[: -len("bias")] + "weight") if name.endswith("bias") else None
        scale = float(sibling.abs().max()) if sibling is not None else 0.0
        assert max(scale, float(want.abs().max())) > 0, name
        _assert_close(gemm_grads[name], want, 2e-5, f"gradient of {name}", scale)


def test_dropout_masks_are_drawn_and_matched(monkeypatch):
    # Prepare: LoRA on the convolutions only, so that the dropout acts in the patch embedding alone
    model = _model("labram-small", LoraSpec(preset="convs", conv_rank=4, dropout=0.5)).train()
    x = _x()
    # Execute
    conv_a, _, _ = _run(model, "conv", x, monkeypatch, seed=0)
    conv_b, _, _ = _run(model, "conv", x, monkeypatch, seed=1)
    gemm_a, _, _ = _run(model, "gemm", x, monkeypatch, seed=0)
    gemm_b, _, _ = _run(model, "gemm", x, monkeypatch, seed=1)
    monkeypatch.setattr(pg, "EXACT_DROPOUT", False)
    loose, _, _ = _run(model, "gemm", x, monkeypatch, seed=0)
    # Assert: the seed changes the output (dropout is live); the same seed gives the same one in both paths
    assert float((conv_a - conv_b).abs().max()) > 1e-3 * float(conv_a.abs().max())
    _assert_close(gemm_a, conv_a, 1e-5, "seed 0")
    _assert_close(gemm_b, conv_b, 1e-5, "seed 1")
    # without EXACT_DROPOUT the stage 2/3 masks differ (same distribution)
    assert float((loose - conv_a).abs().max()) > 1e-3 * float(conv_a.abs().max())


def test_bf16_autocast_on_cpu_matches_conv_path(monkeypatch):
    # Prepare
    model = _model("labram-small", LoraSpec(dropout=0.0)).eval()
    pe = _patch_embed(model)
    patches = _x().reshape(2, -1, 200)
    # Execute
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(pg, "MODE", "conv")
        want = pe(patches)
        monkeypatch.setattr(pg, "MODE", "gemm")
        got = pe(patches)
    with torch.no_grad():
        exact = pe(patches)
    # Assert: the same dtype as the convolution path, and bf16-sized errors only
    assert got.dtype == want.dtype
    assert float((got.float() - exact).abs().max()) <= 2 * float((want.float() - exact).abs().max()) + 1e-2


def _dora_model():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=r"patch_embed\.conv[123]", use_dora=True, lora_dropout=0.0)
    return get_peft_model(build_backbone("labram-small", seed=0), config)


@pytest.mark.parametrize("state", ["dora", "merged", "disabled", "two-adapters"])
def test_unsupported_adapters_fall_back_and_others_match(monkeypatch, state):
    # Prepare
    model = _dora_model() if state == "dora" else _model("labram-small", LoraSpec(dropout=0.0))
    _perturb(model)
    model.eval()
    x = _x(n_times=200)
    monkeypatch.setattr(pg, "MODE", "conv")
    with torch.no_grad():
        unmerged = model(x, CH_NAMES)
    if state == "merged":
        model.merge_adapter()
    if state == "two-adapters":
        from peft import LoraConfig

        model.add_adapter("second", LoraConfig(r=2, target_modules=r"patch_embed\.conv[123]"))
        model.base_model.set_adapter(["default", "second"])
    # Execute
    with torch.no_grad():
        if state == "disabled":
            with model.disable_adapter():
                monkeypatch.setattr(pg, "MODE", "conv")
                want = model(x, CH_NAMES)
                monkeypatch.setattr(pg, "MODE", "gemm")
                got = model(x, CH_NAMES)
                plans = pg.stage_plans(_patch_embed(model))
        else:
            monkeypatch.setattr(pg, "MODE", "conv")
            want = model(x, CH_NAMES)
            monkeypatch.setattr(pg, "MODE", "gemm")
            got = model(x, CH_NAMES)
            plans = pg.stage_plans(_patch_embed(model))
    # Assert
    if state == "disabled":  # computed by the gemm path: the base convolutions alone
        assert plans is not None and all(adapter is None for _, adapter in plans)
        _assert_close(got, want, 1e-5, "disabled adapters")
        assert float((want - unmerged).abs().max()) > 1e-4  # the adapters did matter
    else:  # the convolution path runs
        assert plans is None
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if state == "merged":
        _assert_close(got, unmerged, 1e-5, "merged vs unmerged")


def test_mode_from_environment_and_bad_modes(monkeypatch):
    # Prepare
    model = build_backbone("labram-small", seed=0)
    # Execute / Assert
    monkeypatch.setenv("FEDEEG_PATCH_EMBED", " GEMM ")
    assert pg._mode_from_env() == "gemm"
    monkeypatch.delenv("FEDEEG_PATCH_EMBED")
    assert pg._mode_from_env() == "auto"
    monkeypatch.setenv("FEDEEG_PATCH_EMBED", "toeplitz")
    with pytest.raises(ValueError, match="FEDEEG_PATCH_EMBED.*'auto', 'conv', 'gemm'.*'toeplitz'"):
        pg._mode_from_env()
    monkeypatch.setattr(pg, "MODE", "fft")
    with pytest.raises(ValueError, match="FEDEEG_PATCH_EMBED"):
        model(_x(n_times=200), CH_NAMES)


class _CudaLike:
    """Stands for a CUDA tensor in the mode decision (only ``is_cuda`` is read)."""

    is_cuda = True


def test_auto_mode_is_gemm_only_for_cuda_inputs_inside_torch_compile(monkeypatch):
    # Prepare
    cpu = torch.zeros(1)
    monkeypatch.setattr(pg, "MODE", "auto")
    # Execute / Assert: eager, then "compiling"
    assert pg.resolve_mode(cpu) == "conv" and pg.resolve_mode(_CudaLike()) == "conv"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert pg.resolve_mode(_CudaLike()) == "gemm" and pg.resolve_mode(cpu) == "conv"
    for fixed in ("conv", "gemm"):
        monkeypatch.setattr(pg, "MODE", fixed)
        assert pg.resolve_mode(cpu) == pg.resolve_mode(_CudaLike()) == fixed
