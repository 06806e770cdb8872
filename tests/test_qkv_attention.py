"""LaBraM's attention from the qkv projection on, q/k norms included (fedeeg.models._qkv_attention).

The kernels are Triton: on a machine without a GPU they run in Triton's CPU
interpreter (``TRITON_INTERPRET=1``, Triton importable; skipped otherwise)::

    TRITON_INTERPRET=1 PYTHONPATH=.:/tmp/tsite python -m pytest tests/test_qkv_attention.py

The GPU tests (marker ``gpu``) compare LaBraM-Base's attention with and
without the kernels in bf16, eager and compiled.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedeeg.models import _qkv_attention as qa
from fedeeg.models.labram import Attention

from _triton_marks import gpu, interpreter


def _norms(d: int, gen: torch.Generator, device="cpu"):
    q_norm, k_norm = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
    with torch.no_grad():
        for norm in (q_norm, k_norm):
            norm.weight.copy_(1 + 0.3 * torch.randn(d, generator=gen))
            norm.bias.copy_(0.2 * torch.randn(d, generator=gen))
    return q_norm.to(device), k_norm.to(device)


def _reference(qkv, heads, q_norm, k_norm, scale, dtype):
    """The separate path in float64: norms, then softmax attention; q, k rounded to ``dtype`` as under autocast."""
    b, t, w = qkv.shape
    d = w // (3 * heads)
    q, k, v = qkv.reshape(b, t, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # (b, heads, t, d)
    q = F.layer_norm(q, (d,), q_norm.weight.double(), q_norm.bias.double(), q_norm.eps)
    k = F.layer_norm(k, (d,), k_norm.weight.double(), k_norm.bias.double(), k_norm.eps)
    q, k = q.to(dtype).double(), k.to(dtype).double()
    att = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    return (att @ v).transpose(1, 2)  # (b, t, heads, d)


def _rel(got, want) -> float:
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm())


def _check(device, b, t, heads, d, dtype, tol):
    # Prepare: fresh inputs, LayerNorms with non-trivial weights, a random upstream gradient
    gen = torch.Generator().manual_seed(b * 100 + t + heads)
    qkv = torch.randn(b, t, 3 * heads * d, generator=gen).to(device, dtype).requires_grad_(True)
    q_norm, k_norm = _norms(d, gen, device)
    scale = d**-0.5
    g = torch.randn(b, t, heads, d, generator=gen).to(device, dtype)
    ref_norms = [nn.LayerNorm(d, eps=1e-6).to(device).double() for _ in range(2)]
    with torch.no_grad():
        for r, n in zip(ref_norms, (q_norm, k_norm)):
            r.weight.copy_(n.weight)
            r.bias.copy_(n.bias)
    qkv64 = qkv.detach().double().requires_grad_(True)
    want = _reference(qkv64, heads, *ref_norms, scale, dtype)
    (want * g.double()).sum().backward()
    # Execute
    got = qa.qkv_attention(qkv, heads, q_norm, k_norm, scale)
    (got.float() * g.float()).sum().backward()
    # Assert: output, d(qkv) and the four LayerNorm parameter gradients
    assert got.shape == (b, t, heads, d) and got.dtype == dtype
    assert _rel(got, want) < tol
    assert _rel(qkv.grad, qkv64.grad) < tol
    for mine, ref in zip((q_norm, k_norm), ref_norms):
        assert _rel(mine.weight.grad, ref.weight.grad) < tol
    assert _rel(q_norm.bias.grad, ref_norms[0].bias.grad) < tol
    # a bias shared by all keys shifts each row of scores by a constant: the softmax ignores it, its gradient is 0
    assert float(k_norm.bias.grad.abs().max()) < tol * float(k_norm.weight.grad.abs().max())


@interpreter
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("b,t,heads,d", [(2, 13, 2, 20), (2, 77, 3, 20), (1, 40, 2, 16)])
def test_kernels_match_float64_math(b, t, heads, d, dtype, tol):
    _check("cpu", b, t, heads, d, dtype, tol)


@interpreter
def test_labram_attention_uses_the_kernels_where_supported(monkeypatch):
    # Prepare: a LaBraM attention layer in fp16 on the CPU (interpreter)
    monkeypatch.setattr(qa, "ON_CPU_UNDER_INTERPRETER", True)
    monkeypatch.setattr(qa, "ENABLED", True)
    torch.manual_seed(0)
    layer = Attention(40, 2, 1e-6).half()
    x = torch.randn(2, 11, 40).half()
    calls = []
    fwd = qa.qkv_attention
    monkeypatch.setattr(qa, "qkv_attention", lambda *a: calls.append(1) or fwd(*a))
    # Execute
    got = layer(x)
    monkeypatch.setattr(qa, "ENABLED", False)
    want = layer.float()(x.float())
    # Assert: the kernels ran; the output agrees with the separate path (float32) to fp16 rounding
    assert calls == [1]
    assert _rel(got, want.double()) < 5e-3


def test_not_supported_on_the_cpu_without_the_interpreter(monkeypatch):
    # Prepare
    monkeypatch.setattr(qa, "ENABLED", True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    qkv = torch.zeros(2, 5, 60, dtype=torch.bfloat16)
    # Execute / Assert: CPU tensors take the separate norms and attention
    assert not qa.supported(qkv, 2, nn.LayerNorm(10), nn.LayerNorm(10))


@interpreter
def test_supported_only_for_plain_layer_norms_over_one_head(monkeypatch):
    # Prepare
    monkeypatch.setattr(qa, "ENABLED", True)
    monkeypatch.setattr(qa, "ON_CPU_UNDER_INTERPRETER", True)
    qkv = torch.zeros(2, 5, 60, dtype=torch.bfloat16)
    ln = nn.LayerNorm(10)
    # Execute / Assert
    assert qa.supported(qkv, 2, ln, nn.LayerNorm(10))
    assert not qa.supported(qkv, 2, nn.Identity(), ln)
    assert not qa.supported(qkv, 2, nn.LayerNorm(10, eps=1e-3), ln)  # different eps
    assert not qa.supported(qkv, 2, nn.LayerNorm(10, bias=False), ln)
    assert not qa.supported(qkv, 3, ln, ln)  # 60 is not 3 x 3 heads x 10
    assert not qa.supported(qkv.float(), 2, ln, ln)  # float32: the separate path
    monkeypatch.setattr(qa, "ENABLED", False)
    assert not qa.supported(qkv, 2, ln, ln)


@gpu
@pytest.mark.parametrize("b,t,heads,d", [(64, 77, 10, 20), (3, 128, 4, 32), (5, 9, 2, 20)])
def test_kernels_on_cuda_bf16(b, t, heads, d):
    _check("cuda", b, t, heads, d, torch.bfloat16, 1.5e-2)


@gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_labram_base_attention_with_and_without_the_kernels(compiled, monkeypatch):
    # Prepare: LaBraM-Base's attention layer, bf16 autocast as in training, every parameter trains
    torch.manual_seed(0)
    layer = Attention(200, 10, 1e-6).cuda()
    x = torch.randn(32, 77, 200, device="cuda")

    def run(enabled: bool):
        monkeypatch.setattr(qa, "ENABLED", enabled)
        torch._dynamo.reset()
        fn = torch.compile(layer) if compiled else layer
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(xi)
        (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").reshape(out.shape)).sum().backward()
        return out.float(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}

    # Execute
    want = run(False)
    got = run(True)
    torch._dynamo.reset()
    # Assert
    assert _rel(got[0], want[0].double()) < 2e-2
    assert _rel(got[1], want[1].double()) < 3e-2
    for n, g in want[2].items():
        assert _rel(got[2][n], g.double()) < 3e-2, n
