"""The LoRA input kernels (fedeeg.models._lora_input): dropout, h = A drop(x) and [x, h, 0] in one pass.

The kernels are Triton. On a machine without a GPU they run in Triton's CPU
interpreter (``TRITON_INTERPRET=1`` and Triton importable; skipped otherwise)::

    pip install --no-deps --target /tmp/tsite triton
    TRITON_INTERPRET=1 PYTHONPATH=.:/tmp/tsite python -m pytest tests/test_lora_input.py

The GPU tests (marker ``gpu``) run the same checks on CUDA in bf16 and the
compiled LaBraM step with the kernels against peft's layers.
"""

from __future__ import annotations

import pytest
import torch

from fedeeg.models import LoraSpec, _fused_lora as fl, _lora_input as li, apply_lora, build_backbone

from _triton_marks import gpu, interpreter


CH_NAMES = ["FP1", "FP2", "F3", "F4", "C3", "CZ", "C4", "P3", "PZ", "P4", "O1", "O2"]


def _reference(x, a, keep, p, pad, g):
    """float64 x_cat, dx and dA for the given keep mask and upstream gradient g of x_cat."""
    k, r = x.shape[1], a.shape[0]
    scale = 1.0 / (1.0 - p)
    xd = x.double() * keep * scale
    x_cat = torch.cat([x.double(), xd @ a.double().t(), torch.zeros(x.shape[0], pad, dtype=torch.float64, device=x.device)], 1)
    gd = g.double()
    dh = gd[:, k : k + r]
    dx = gd[:, :k] + (dh @ a.double()) * keep * scale
    return x_cat, dx, dh.t() @ xd


def _rel(got, want) -> float:
    return float((got.detach().double() - want).norm() / want.norm())


def _check_op(device, m, k, r, pad, p, dtype, tol):
    # Prepare: fresh random inputs, a seed, the mask that seed gives
    gen = torch.Generator().manual_seed(m * 1000 + k + r)
    x = torch.randn(m, k, generator=gen).to(device, dtype).requires_grad_(True)
    a = (torch.randn(r, k, generator=gen) * 0.1).to(device, dtype).requires_grad_(True)
    g = torch.randn(m, k + r + pad, generator=gen).to(device, dtype)
    seed = torch.tensor([4321 + m], dtype=torch.int64, device=device)
    keep = li.keep_mask(seed, m, k, p) if p > 0 else torch.ones(m, k, dtype=torch.bool, device=device)
    # Execute
    x_cat = li.lora_input(x, a, p, pad, seed=seed)
    x_cat.backward(g)
    # Assert: x_cat, dx, dA as float64 math with that mask; x copied exactly, padding zero
    want_cat, want_dx, want_da = _reference(x.detach(), a.detach(), keep, p, pad, g)
    assert x_cat.shape == (m, k + r + pad) and x_cat.dtype == dtype
    assert torch.equal(x_cat[:, :k], x.detach())
    assert torch.all(x_cat[:, k + r :] == 0)
    assert _rel(x_cat[:, k : k + r], want_cat[:, k : k + r]) < tol
    assert _rel(x.grad, want_dx) < tol
    assert _rel(a.grad, want_da) < tol
    assert x.grad.dtype == dtype and a.grad.dtype == dtype
    return keep


CASES = [  # m, k, r, pad, p
    (70, 200, 2, 6, 0.5),
    (33, 800, 2, 6, 0.5),
    (50, 24, 4, 4, 0.0),
    (300, 100, 3, 5, 0.3),  # more rows than one backward program takes
]


@interpreter
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("m,k,r,pad,p", CASES)
def test_kernels_match_float64_math_with_their_mask(m, k, r, pad, p, dtype, tol):
    _check_op("cpu", m, k, r, pad, p, dtype, tol)


def _check_gelu_op(device, m, k, r, pad, p, dtype, tol):
    # Prepare: a pre-activation f; the operand is gelu(f)
    gen = torch.Generator().manual_seed(m + k)
    f = (torch.randn(m, k, generator=gen) * 2).to(device, dtype).requires_grad_(True)
    a = (torch.randn(r, k, generator=gen) * 0.1).to(device, dtype).requires_grad_(True)
    g = torch.randn(m, k + r + pad, generator=gen).to(device, dtype)
    seed = torch.tensor([99], dtype=torch.int64, device=device)
    keep = li.keep_mask(seed, m, k, p) if p > 0 else torch.ones(m, k, dtype=torch.bool, device=device)
    # Execute
    x_cat = li.lora_input(f, a, p, pad, seed=seed, activation="gelu")
    x_cat.backward(g)
    # Assert: x = gelu(f) as F.gelu gives it in f's dtype; df = dx * gelu'(f)
    x = torch.nn.functional.gelu(f.detach())
    want_cat, want_dx, want_da = _reference(x, a.detach(), keep, p, pad, g)
    fd = f.detach().double()
    gelu_grad = 0.5 * (1 + torch.erf(fd / 2**0.5)) + fd * torch.exp(-0.5 * fd * fd) / (2 * torch.pi) ** 0.5
    assert _rel(x_cat[:, :k], x.double()) < tol
    assert _rel(x_cat[:, k : k + r], want_cat[:, k : k + r]) < tol
    assert _rel(f.grad, want_dx * gelu_grad) < tol
    assert _rel(a.grad, want_da) < tol


@interpreter
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_gelu_kernels_match_float64_math(p, dtype, tol):
    _check_gelu_op("cpu", 40, 800, 2, 6, p, dtype, tol)


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="Invalid activation 'relu'"):
        li.lora_input(torch.zeros(2, 4), torch.zeros(1, 4), 0.0, activation="relu")


@interpreter
def test_mask_keeps_one_minus_p_and_follows_the_seed():
    # Prepare
    m, k, p = 256, 200, 0.5
    seeds = [torch.tensor([s], dtype=torch.int64) for s in (1, 1, 2)]
    # Execute
    masks = [li.keep_mask(s, m, k, p) for s in seeds]
    # Assert: about half kept (51,200 draws: 5 sigma is 1.1 %), same seed same mask, another seed another
    assert abs(float(masks[0].float().mean()) - (1 - p)) < 0.011
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])
    assert abs(float((masks[0] == masks[2]).float().mean()) - 0.5) < 0.011  # independent draws


@interpreter
def test_a_drawn_seed_gives_a_new_mask_per_call():
    # Prepare
    x = torch.randn(64, 200)
    a = torch.randn(2, 200)
    # Execute
    h1 = li.lora_input(x, a, 0.5)[:, 200:]
    h2 = li.lora_input(x, a, 0.5)[:, 200:]
    # Assert
    assert not torch.allclose(h1, h2)


def test_bad_dropout_probability_is_named():
    with pytest.raises(ValueError, match="dropout probability p=1.0"):
        li.lora_input(torch.zeros(2, 4), torch.zeros(1, 4), 1.0)


def test_not_supported_on_the_cpu_without_the_interpreter(monkeypatch):
    # Prepare
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(li, "ENABLED", True)
    # Execute / Assert: CPU tensors take peft's dropout and lora_A (the fused LoRA Linear's other path)
    assert not li.supported(torch.zeros(8, 200), 2)


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """The fused LoRA Linear in 'fused' mode, with the input kernels on CPU tensors (interpreter)."""
    monkeypatch.setattr(li, "ON_CPU_UNDER_INTERPRETER", True)
    monkeypatch.setattr(li, "ENABLED", True)
    monkeypatch.setattr(fl, "LORA_LINEAR", "fused")
    calls = []
    op = li._fwd_op
    monkeypatch.setattr(li, "_fwd_op", lambda *args: calls.append((args[3], args[5])) or op(*args))  # (p, gelu)
    return calls


def _lora_labram(dropout):
    model = apply_lora(build_backbone("labram-small", seed=0), LoraSpec(dropout=dropout), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.copy_(torch.randn(prm.shape, generator=gen) * 0.05)
    return model


def _grads(model, x, train: bool, path: str):
    fl.LORA_LINEAR = path
    model.train(train)
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x, CH_NAMES)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads, x.grad


@interpreter
@pytest.mark.parametrize("train", [False, True])
def test_labram_without_live_dropout_equals_peft(kernel_on_cpu, train):
    # Prepare: dropout 0.5 in eval mode (inactive), or no dropout while training
    model = _lora_labram(0.5 if not train else 0.0)
    x = torch.randn(2, len(CH_NAMES), 400, generator=torch.Generator().manual_seed(0))
    # Execute
    want = _grads(model, x, train, "peft")
    got = _grads(model, x, train, "fused")
    # Assert: the kernels ran in each of the 12 LoRA Linear layers, p = 0, fc2's with the GELU; peft's numbers
    assert kernel_on_cpu == [(0.0, False), (0.0, False), (0.0, True)] * 4
    assert torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(got[2], want[2], rtol=1e-4, atol=1e-7)
    for n, g in want[1].items():
        assert torch.allclose(got[1][n], g, rtol=1e-4, atol=1e-7), n


@interpreter
def test_labram_with_live_dropout_trains_every_adapter(kernel_on_cpu):
    # Prepare
    model = _lora_labram(0.5)
    x = torch.randn(2, len(CH_NAMES), 400, generator=torch.Generator().manual_seed(0))
    # Execute
    torch.manual_seed(0)
    first = _grads(model, x, True, "fused")
    second = _grads(model, x, True, "fused")
    # Assert: p = 0.5 in each layer, fresh masks per call, every LoRA gradient finite and non-zero
    assert kernel_on_cpu == [(0.5, False), (0.5, False), (0.5, True)] * 8
    assert not torch.allclose(first[0], second[0])
    lora = {n: g for n, g in first[1].items() if "lora_" in n}
    assert len(lora) == 4 * 3 * 2 + 3 * 2  # qkv/fc1/fc2 A and B in each of 4 blocks, the 3 patch-embedding convs' A and B
    assert all(torch.isfinite(g).all() and torch.any(g != 0) for g in lora.values())


# --------------------------------------------------------------------------- GPU


@gpu
@pytest.mark.parametrize("m,k,r,pad,p", [(4096, 200, 2, 6, 0.5), (3077, 800, 2, 6, 0.5), (1000, 200, 8, 0, 0.1)])
def test_kernels_on_cuda_bf16(m, k, r, pad, p):
    _check_op("cuda", m, k, r, pad, p, torch.bfloat16, 1e-2)
    _check_gelu_op("cuda", m, k, r, pad, p, torch.bfloat16, 1e-2)


@gpu
def test_compiled_labram_base_step_with_the_kernels_equals_eager_peft_without_dropout(monkeypatch):
    # Prepare: LaBraM-Base with the paper preset's dropout inactive (eval mode); autocast bf16 as in training
    monkeypatch.setattr(fl, "LORA_LINEAR", "auto")
    monkeypatch.setattr(li, "ENABLED", True)
    model = _lora_labram(0.5).cuda()
    calls = []
    op = li._fwd_op
    monkeypatch.setattr(li, "_fwd_op", lambda *args: calls.append((args[3], args[5])) or op(*args))
    x = torch.randn(8, len(CH_NAMES), 800, generator=torch.Generator().manual_seed(0)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = _grads(model, x, False, "peft")
    torch._dynamo.reset()
    compiled = torch.compile(model)
    # Execute
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fl.LORA_LINEAR = "auto"
        model.eval()
        model.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        out = compiled(xg, CH_NAMES)
        (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").reshape(out.shape)).sum().backward()
    # Assert: traced through the kernels (12 layers), bf16-close to peft's eager numbers
    assert calls == [(0.0, False), (0.0, False), (0.0, True)] * 4
    assert _rel(out.float(), want[0].double()) < 2e-2
    for n, prm in model.named_parameters():
        if prm.requires_grad and "lora_" in n:
            assert _rel(prm.grad, want[1][n].double()) < 5e-2, n
    torch._dynamo.reset()
