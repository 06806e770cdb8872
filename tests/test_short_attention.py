"""Short-sequence attention kernels: configuration knobs (always) and the Triton kernels under
Triton's CPU interpreter (only with ``TRITON_INTERPRET=1`` and Triton importable).

The interpreter runs the real ``@triton.jit`` kernels on CPU tensors, so the kernels' arithmetic,
masking and layouts are checked without a GPU. Its ``tl.dot`` does not support bfloat16 (it
multiplies the raw bit patterns), so these tests use float16 (the kernels' other dtype, same code
path) and float32; tests/test_gpu.py checks bf16 on CUDA. To run them::

    pip install --no-deps --target /tmp/tsite triton   # any Triton with the interpreter
    TRITON_INTERPRET=1 PYTHONPATH=.:/tmp/tsite python -m pytest tests/test_short_attention.py

The tests marked ``gpu`` compile the op with inductor on CUDA (skipped without a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from fedeeg.models import _short_attention as sa

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


def gpu(fn):
    """Mark a test that compiles the registered ops with inductor on CUDA: skipped without a GPU."""
    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn)
    fn = pytest.mark.skipif(
        not sa.TRITON_OP or sa.INTERPRETED, reason="needs torch.library.triton_op and compiled (not interpreted) Triton"
    )(fn)
    return pytest.mark.gpu(fn)


def interpreter(fn):
    """Mark a test that runs the Triton kernels on CPU tensors: skipped unless the interpreter is on."""
    fn = pytest.mark.skipif(not _INTERPRET, reason="runs the Triton kernels on the CPU only with TRITON_INTERPRET=1")(fn)
    fn = pytest.mark.skipif(not _HAS_TRITON, reason="Triton is not importable (CPU builds of torch do not ship it)")(fn)
    return pytest.mark.interpreter(fn)


#: (impl, block_m); None: the default block.
CONFIGS = [("tile", None), ("qblock", 16), ("qblock", 32), ("qblock", 64), ("qblock", None)]
#: (batch, num_heads, n_tokens, head_dim): LaBraM's 77 x 20, short, full 128-token tile, wide and narrow heads.
SHAPES = [(1, 2, 77, 20), (2, 2, 5, 16), (1, 1, 128, 64), (1, 2, 77, 64), (1, 3, 33, 8)]


# --- knobs (no Triton needed) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "want"),
    [(None, None), ("", None), ("32", 32), ("64,16", (64, 16)), (" 16 , 32 ", (16, 32))],
)
def test_block_knob_parses_one_value_or_a_forward_backward_pair(value, want):
    assert sa._parse_pair("X", value, pow2=True) == want


@pytest.mark.parametrize("value", ["24", "8", "0", "a", "16,32,64", "-16"])
def test_block_knob_refuses_what_is_not_a_power_of_two_from_16(value):
    with pytest.raises(ValueError, match="X="):
        sa._parse_pair("X", value, pow2=True)


def test_warps_and_stages_knobs_take_zero_for_the_default():
    assert sa._parse_pair("X", "0,2") == (0, 2)
    assert sa._launch_params(77, 20, "fwd", impl="qblock", num_warps=(0, 2), num_stages=(0, 2))[1]["num_warps"] == 4
    assert "num_stages" not in sa._launch_params(77, 20, "fwd", impl="qblock", num_stages=(0, 2))[1]
    with pytest.raises(ValueError, match="X="):
        sa._parse_pair("X", "-1")


def test_implementation_knob_takes_one_or_a_forward_backward_pair():
    assert sa._parse_impl(None) == "qblock"
    assert sa._parse_impl("QBlock") == "qblock"
    assert sa._parse_impl("tile,qblock") == ("tile", "qblock")
    assert sa._launch_params(77, 20, "bwd", impl=("tile", "qblock"))[0] == "qblock"
    for bad in ("flash", "tile,qblock,tile"):
        with pytest.raises(ValueError, match="FEDEEG_SHORT_ATTENTION_IMPL"):
            sa._parse_impl(bad)
    with pytest.raises(ValueError, match="tile, qblock"):
        sa._launch_params(77, 20, impl="flash")


def test_launch_params_pick_the_pass_and_clamp_the_block(monkeypatch):
    # Prepare: module-level knobs as the environment would set them
    monkeypatch.setattr(sa, "BLOCK_M", (64, 16))
    monkeypatch.setattr(sa, "NUM_WARPS", (8, 2))
    monkeypatch.setattr(sa, "NUM_STAGES", None)
    # Execute
    fwd = sa._launch_params(77, 20, "fwd", impl="qblock")
    bwd = sa._launch_params(77, 20, "bwd", impl="qblock")
    short = sa._launch_params(5, 20, "fwd", impl="qblock")
    tile = sa._launch_params(77, 20, "bwd", impl="tile", num_warps=None)
    staged = sa._launch_params(77, 20, "bwd", impl="qblock", block_m=32, num_warps=4, num_stages=(3, 1))
    # Assert
    assert fwd == ("qblock", {"BLOCK_T": 128, "BLOCK_D": 32, "D": 20, "BLOCK_M": 64, "num_warps": 8})
    assert bwd == ("qblock", {"BLOCK_T": 128, "BLOCK_D": 32, "D": 20, "BLOCK_M": 16, "num_warps": 2})
    assert short[1]["BLOCK_M"] == 16 and short[1]["BLOCK_T"] == 16  # a block never exceeds the padded sequence
    assert tile == ("tile", {"BLOCK_T": 128, "BLOCK_D": 32, "D": 20, "num_warps": 2})
    assert staged[1]["BLOCK_M"] == 32 and staged[1]["num_warps"] == 4 and staged[1]["num_stages"] == 1


def test_defaults_keep_the_tile_kernels_and_their_warps(monkeypatch):
    for name in ("BLOCK_M", "NUM_WARPS", "NUM_STAGES"):
        monkeypatch.setattr(sa, name, None)
    monkeypatch.setattr(sa, "IMPL", "tile")
    assert sa._launch_params(77, 20, "fwd") == ("tile", {"BLOCK_T": 128, "BLOCK_D": 32, "D": 20, "num_warps": 8})
    assert sa._launch_params(33, 20, "bwd") == ("tile", {"BLOCK_T": 64, "BLOCK_D": 32, "D": 20, "num_warps": 4})
    impl, params = sa._launch_params(77, 20, "bwd", impl="qblock")
    assert params["BLOCK_M"] == sa.DEFAULT_BLOCK_M[1] and params["num_warps"] == 4


def test_short_attention_passes_the_module_knobs_to_the_ops(monkeypatch):
    # Prepare: knobs as one value, as (forward, backward) pairs, and unset
    monkeypatch.setattr(sa, "IMPL", ("tile", "qblock"))
    monkeypatch.setattr(sa, "BLOCK_M", (64, 16))
    monkeypatch.setattr(sa, "NUM_WARPS", 8)
    monkeypatch.setattr(sa, "NUM_STAGES", None)
    # Execute
    knobs = sa._knobs()
    config = sa._config(*knobs)
    # Assert: what the ops receive launches exactly what the module's knobs say
    assert knobs == ("tile,qblock", [64, 16], [8, 8], [0, 0])
    for which in ("fwd", "bwd"):
        for T, D in ((77, 20), (5, 16), (128, 64)):
            assert sa._launch_params(T, D, which, **config) == sa._launch_params(T, D, which)


# --- kernels under the interpreter -----------------------------------------------------------


def _inputs(shape, dtype, seed, spread=1.0):
    """q, k, v as strided views of one (B, T, 3, H, D) tensor (LaBraM's layout), and an output gradient."""
    B, H, T, D = shape
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, T, 3, H, D, generator=gen) * spread).to(dtype).permute(2, 0, 3, 1, 4)
    grad = torch.randn(B, T, H, D, generator=gen).to(dtype)
    return (*qkv.unbind(0), grad)


def _reference(q, k, v, grad, scale):
    """float64 output (B, T, H, D), log-sum-exp (B, H, T) and gradients of q, k, v."""
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(qr, kr, vr, scale=scale).transpose(1, 2)
    out.backward(grad.double())
    lse = torch.logsumexp(qr.detach() @ kr.detach().transpose(-1, -2) * scale, dim=-1)
    return out.detach(), lse, qr.grad, kr.grad, vr.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


#: Relative-error bounds: float32 products are exact in the interpreter; float16 operands round to 11 bits.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("impl", "block_m"), CONFIGS, ids=lambda c: str(c))
@interpreter
def test_kernels_match_a_float64_reference(impl, block_m, shape, dtype):
    # Prepare
    q, k, v, grad = _inputs(shape, dtype, seed=sum(shape))
    scale = shape[3] ** -0.5
    ref_o, ref_lse, ref_dq, ref_dk, ref_dv = _reference(q, k, v, grad, scale)
    # Execute
    o, lse = sa._forward(q, k, v, scale, impl=impl, block_m=block_m)
    dq, dk, dv = sa._backward_grads(q, k, v, o, lse, grad, scale, impl=impl, block_m=block_m)
    # Assert: shapes and layouts as the custom ops promise, every element written and close
    B, H, T, D = shape
    assert o.shape == (B, T, H, D) and o.dtype == dtype and lse.shape == (B, H, T) and lse.dtype == torch.float32
    assert all(g.shape == (B, H, T, D) and g.is_contiguous() and g.dtype == dtype for g in (dq, dk, dv))
    for got, want in ((o, ref_o), (lse, ref_lse), (dq, ref_dq), (dk, ref_dk), (dv, ref_dv)):
        assert torch.isfinite(got).all()
        assert _rel(got, want) < TOL[dtype]



@interpreter
@pytest.mark.parametrize(("fwd_impl", "bwd_impl"), [("tile", "qblock"), ("qblock", "tile")])
def test_a_forward_of_one_implementation_pairs_with_the_backward_of_the_other(fwd_impl, bwd_impl):
    # Prepare: the implementation is read at every call, so it may change between forward and backward
    shape = (1, 2, 77, 20)
    q, k, v, grad = _inputs(shape, torch.float16, seed=1)
    scale = 20**-0.5
    _, _, ref_dq, ref_dk, ref_dv = _reference(q, k, v, grad, scale)
    # Execute
    o, lse = sa._forward(q, k, v, scale, impl=fwd_impl, block_m=32)
    grads = sa._backward_grads(q, k, v, o, lse, grad, scale, impl=bwd_impl, block_m=32)
    # Assert
    for got, want in zip(grads, (ref_dq, ref_dk, ref_dv)):
        assert _rel(got, want) < TOL[torch.float16]


@interpreter
@pytest.mark.parametrize("impl", sa.IMPLS)
def test_peaked_softmax_stays_finite_and_exact(impl):
    # Prepare: large scores (softmax close to one-hot, log-sum-exp far from 0) in float32
    shape = (1, 2, 77, 20)
    q, k, v, grad = _inputs(shape, torch.float32, seed=2, spread=4.0)
    scale = 1.0
    ref = _reference(q, k, v, grad, scale)
    # Execute
    o, lse = sa._forward(q, k, v, scale, impl=impl, block_m=16)
    got = (o, lse, *sa._backward_grads(q, k, v, o, lse, grad, scale, impl=impl, block_m=16))
    # Assert
    for g, want in zip(got, ref):
        assert torch.isfinite(g).all() and _rel(g, want) < 1e-4


@interpreter
@pytest.mark.parametrize("impl", sa.IMPLS)
def test_custom_op_autograd_runs_the_chosen_kernels(monkeypatch, impl):
    # Prepare: the public function and its registered autograd (the op takes CPU tensors under the interpreter)
    monkeypatch.setattr(sa, "IMPL", impl)
    monkeypatch.setattr(sa, "BLOCK_M", (32, 16))
    shape = (2, 2, 77, 20)
    q, k, v, grad = _inputs(shape, torch.float16, seed=3)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    ref_o, _, ref_dq, ref_dk, ref_dv = _reference(q, k, v, grad, 20**-0.5)
    # Execute
    out = sa.short_attention(q, k, v, 20**-0.5)
    out.backward(grad)
    # Assert
    assert _rel(out.detach(), ref_o) < TOL[torch.float16]
    for got, want in ((q.grad, ref_dq), (k.grad, ref_dk), (v.grad, ref_dv)):
        assert _rel(got, want) < TOL[torch.float16]


@interpreter
def test_compiled_calls_read_the_knobs_at_every_call(monkeypatch):
    # Prepare: dynamo only (the interpreter's kernels run eagerly); it guards on the knobs short_attention passes
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    monkeypatch.setattr(sa, "IMPL", "qblock")
    monkeypatch.setattr(sa, "BLOCK_M", None)
    shape = (2, 2, 77, 20)
    q, k, v, grad = _inputs(shape, torch.float16, seed=4)
    ref_o, _, ref_dq, ref_dk, ref_dv = _reference(q, k, v, grad, 20**-0.5)
    counter = CompileCounter()
    attend = torch.compile(lambda q, k, v: sa.short_attention(q, k, v, 20**-0.5), backend=counter, fullgraph=True)

    def run():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves)
        return (out.detach(), *torch.autograd.grad(out, leaves, grad))

    # Execute
    first, again = run(), run()
    monkeypatch.setattr(sa, "IMPL", "tile")
    tile = run()
    monkeypatch.setattr(sa, "BLOCK_M", (64, 32))
    monkeypatch.setattr(sa, "IMPL", ("qblock", "tile"))
    pair = run()
    frames = counter.frame_count
    torch._dynamo.reset()
    # Assert: one graph per knob setting, each right
    assert frames == 3
    for got in (first, again, tile, pair):
        for g, want in zip(got, (ref_o, ref_dq, ref_dk, ref_dv)):
            assert _rel(g, want) < TOL[torch.float16]


# --- inductor on CUDA --------------------------------------------------------------------------


def _cuda_attention(impl):
    """A tiny compiled-or-eager function around short_attention, bf16 LaBraM-shaped CUDA inputs, an output gradient."""
    B, H, T, D = 8, 10, 77, 20
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkvs = [torch.randn(B, T, 3, H, D, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3)]
    grads = [torch.randn(B, T, H * D, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(3)]

    def attend(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as LaBraM's
        return sa.short_attention(q, k, v, D**-0.5).flatten(2) * 2.0

    return attend, qkvs, grads


def _fwd_bwd(fn, qkv, grad):
    qkv = qkv.detach().requires_grad_()
    out = fn(qkv)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    return out.detach().clone(), dqkv.clone()


@gpu
@pytest.mark.parametrize("impl", sa.IMPLS)
def test_inductor_launches_the_kernels_itself_and_matches_eager(monkeypatch, impl):
    # Prepare
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    monkeypatch.setattr(sa, "IMPL", impl)
    attend, (qkv, *_), (grad, *_) = _cuda_attention(impl)
    want = _fwd_bwd(attend, qkv, grad)
    compiled = torch.compile(attend, fullgraph=True)
    # Execute
    got, codes = run_and_get_code(_fwd_bwd, compiled, qkv, grad)
    code = "\n".join(codes)
    torch._dynamo.reset()
    # Assert: the Triton kernels are in inductor's own code, the opaque op is not called; same results
    assert f"{impl}_fwd" in code and f"{impl}_bwd" in code
    assert "torch.ops.fedeeg.short_attention" not in code
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert float((g.float() - w.float()).norm() / w.float().norm()) < 1e-2


@gpu
def test_reduce_overhead_replays_forward_and_backward_in_cuda_graphs(monkeypatch):
    # Prepare
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(sa, "IMPL", "qblock")
    attend, qkvs, grads = _cuda_attention("qblock")
    want = [_fwd_bwd(attend, qkv, grad) for qkv, grad in zip(qkvs, grads)]
    compiled = torch.compile(attend, mode="reduce-overhead", fullgraph=True)
    # Execute: warm-up, recording, replay; each call's outputs cloned before the next
    got = []
    for qkv, grad in zip(qkvs, grads):
        torch.compiler.cudagraph_mark_step_begin()
        got.append(_fwd_bwd(compiled, qkv, grad))
    skips = dict(counters["inductor"])
    torch._dynamo.reset()
    # Assert: no graph skipped CUDA graphs, every call right
    assert not any(k.startswith("cudagraph_skips") and v for k, v in skips.items()), skips
    for g_call, w_call in zip(got, want):
        for g, w in zip(g_call, w_call):
            assert float((g.float() - w.float()).norm() / w.float().norm()) < 1e-2
