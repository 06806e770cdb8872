"""The fused LoRA Linear (fedeeg.models._fused_lora): same outputs and gradients as peft, same names, fallbacks."""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fedeeg.models import (
    BACKBONES,
    LaBraM,
    LoraSpec,
    apply_lora,
    build_backbone,
    load_trainable_state_dict,
    lora_pairs,
    trainable_state_dict,
)
from fedeeg.models import _fused_lora as fl

CH_NAMES = ["FP1", "FP2", "F3", "F4", "C3", "CZ", "C4", "P3", "PZ", "P4", "O1", "O2"]
RTOL = 1e-5


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused autograd Function (so a test knows which path ran)."""
    calls = []
    # (Function, position of the bias among forward's arguments); the Cat Function runs where the LoRA
    # input kernel (fedeeg.models._lora_input) applies: CUDA inputs
    for fn, bias_at in ((fl.FusedLoraLinearFunction, 4), (fl.FusedLoraCatLinearFunction, 3)):

        def counting(ctx, *args, _forward=fn.forward, _bias_at=bias_at):
            calls.append(args[_bias_at] is not None)  # whether the layer has a bias
            return _forward(ctx, *args)

        # forward, not apply: under torch.compile, AOTAutograd traces forward itself (once per layer)
        monkeypatch.setattr(fn, "forward", staticmethod(counting))
    return calls


@pytest.fixture
def mode(monkeypatch):
    """Sets fl.LORA_LINEAR for the test (restored afterwards)."""

    def set_mode(value: str) -> None:
        monkeypatch.setattr(fl, "LORA_LINEAR", value)

    return set_mode


def _randomize_b(model, seed: int = 1, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b in lora_pairs(model).values():
            b.copy_(torch.randn(b.shape, generator=gen) * scale)


def _lora_model(mode, name: str = "labram-small", *, dropout: float = 0.0, depth: int | None = None):
    """A LoRA (paper preset) LaBraM built with FusedLoraLinear layers, B random (every gradient non-zero)."""
    mode("fused")
    if depth is None:
        backbone = build_backbone(name, seed=0)
    else:  # e.g. one labram-base block
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            backbone = LaBraM(dataclasses.replace(BACKBONES[name], depth=depth))
    model = apply_lora(backbone, LoraSpec(dropout=dropout), seed=0)
    _randomize_b(model)
    return model


def _rel_close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> bool:
    """Max |got - want| within rtol of max |want| (elementwise relative tolerance is too strict near zero)."""
    return bool((got - want).abs().max() <= rtol * want.abs().max())


def _step(model, fn, mode, path: str, seed: int, inputs: tuple[torch.Tensor, ...]):
    """Output and gradients (trainable parameters and inputs) of one forward/backward under ``path``."""
    mode(path)
    model.zero_grad(set_to_none=True)
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    torch.manual_seed(seed)  # the dropout masks
    out = fn(*inputs)
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(123)).to(out.device)
    (out * proj).sum().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads.update({f"input{i}": t.grad.clone() for i, t in enumerate(inputs)})
    return out.detach(), grads


def _assert_same(got, want, rtol: float = RTOL) -> None:
    out, grads = got
    out_ref, grads_ref = want
    assert _rel_close(out, out_ref, rtol)
    assert list(grads) == list(grads_ref)
    assert [n for n, g in grads.items() if g is None] == [n for n, g in grads_ref.items() if g is None]
    bad = [n for n, g in grads_ref.items() if g is not None and not _rel_close(grads[n], g, rtol)]
    assert bad == []
    lora_grads = [g for n, g in grads_ref.items() if "lora_" in n and g is not None]
    assert lora_grads and all(bool(torch.any(g != 0)) for g in lora_grads)


# --------------------------------------------------------------------------- same numbers as peft


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_labram_small_outputs_and_gradients_equal_peft(mode, fused_calls, dropout):
    # Prepare
    model = _lora_model(mode, dropout=dropout).train()
    x = torch.randn(2, len(CH_NAMES), 400, generator=torch.Generator().manual_seed(0))
    fn = lambda x: model(x, CH_NAMES)  # noqa: E731
    # Execute
    want = _step(model, fn, mode, "peft", 7, (x,))
    n_peft = len(fused_calls)
    got = _step(model, fn, mode, "fused", 7, (x,))
    # Assert: the fused Function ran for each of the 4 blocks' qkv, fc1, fc2 (fc1/fc2 with bias) and only then
    assert n_peft == 0
    assert fused_calls == [False, True, True] * 4
    _assert_same(got, want)
    if dropout:  # the dropout is live: another seed gives another output
        other = _step(model, fn, mode, "fused", 8, (x,))
        assert not _rel_close(other[0], got[0], 1e-3)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_one_labram_base_block_outputs_and_gradients_equal_peft(mode, fused_calls, dropout):
    # Prepare: LaBraM-Base width (qkv 200->600 without bias, fc1 200->800, fc2 800->200 with bias), one block
    model = _lora_model(mode, "labram-base", dropout=dropout, depth=1).train()
    block = model.base_model.model.blocks[0]
    tokens = torch.randn(2, 13, 200, generator=torch.Generator().manual_seed(0))  # (batch, n_tokens, embed_dim)
    # Execute
    want = _step(model, block, mode, "peft", 3, (tokens,))
    got = _step(model, block, mode, "fused", 3, (tokens,))
    # Assert
    assert fused_calls == [False, True, True]
    _assert_same(got, want)


def test_dropout_masks_are_peft_masks(mode):
    # Prepare: record what each adapter's dropout module returns
    model = _lora_model(mode, dropout=0.5).train()
    x = torch.randn(2, len(CH_NAMES), 200, generator=torch.Generator().manual_seed(0))
    seen: dict[str, list[torch.Tensor]] = {"peft": [], "fused": []}
    path = ["peft"]
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen[path[0]].append(out.detach().clone()))
             for n, m in model.named_modules() if n.endswith("lora_dropout.default") and ".blocks." in n]
    # Execute
    for path[0] in ("peft", "fused"):
        mode(path[0])
        torch.manual_seed(11)
        model(x, CH_NAMES)
    for h in hooks:
        h.remove()
    # Assert: 12 dropped inputs, identical masks in both paths (the values differ in the last bits after the
    # first block: the fused GEMM rounds differently), about half of the entries zeroed
    assert len(seen["peft"]) == len(seen["fused"]) == 12
    assert all(torch.equal(a == 0, b == 0) for a, b in zip(seen["peft"], seen["fused"]))
    assert all(_rel_close(b, a) for a, b in zip(seen["peft"], seen["fused"]))
    zero_fraction = float(torch.cat([t.flatten() for t in seen["fused"]]).eq(0).float().mean())
    assert 0.4 < zero_fraction < 0.6


def test_eval_mode_and_no_grad_equal_peft(mode, fused_calls):
    # Prepare
    model = _lora_model(mode, dropout=0.5).eval()
    x = torch.randn(3, len(CH_NAMES), 200, generator=torch.Generator().manual_seed(0))
    # Execute
    with torch.no_grad():
        mode("peft")
        want = model(x, CH_NAMES)
        mode("fused")
        got = model(x, CH_NAMES)
    # Assert
    assert len(fused_calls) == 12
    assert _rel_close(got, want)


@pytest.mark.parametrize("layer_name", ["attn.qkv", "mlp.fc1", "mlp.fc2"])
@pytest.mark.parametrize("bias_trains", [False, True])
def test_single_layer_equals_peft_with_and_without_a_trained_bias(mode, fused_calls, layer_name, bias_trains):
    # Prepare: one labram-base Linear (qkv has no bias); optionally its bias trains
    model = _lora_model(mode, "labram-base", dropout=0.5, depth=1).train()
    layer = model.base_model.model.blocks[0].get_submodule(layer_name)
    if layer.base_layer.bias is not None:
        layer.base_layer.bias.requires_grad_(bias_trains)
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    # Execute
    want = _step(model, layer, mode, "peft", 5, (x,))
    got = _step(model, layer, mode, "fused", 5, (x,))
    # Assert
    assert len(fused_calls) == 1
    _assert_same(got, want)
    assert got[0].shape == (3, 5, layer.out_features)
    if bias_trains and layer.base_layer.bias is not None:
        assert "base_model.model.blocks.0." + layer_name + ".base_layer.bias" in got[1]


# --------------------------------------------------------------------------- the Function itself


@pytest.mark.parametrize(("forward_mode", "pad_to", "chunk_rows"), [("cat", 8, 0), ("cat", 1, 4), ("addmm", 8, 5), ("addmm", 1, 0)])
def test_function_gradcheck_in_float64(forward_mode, pad_to, chunk_rows):
    # Prepare: M = 11 rows (not a multiple of the chunks), K = 6, N = 5, r = 2, all float64
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    h = torch.randn(11, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, generator=gen, dtype=torch.float64)  # frozen
    b = torch.randn(5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(x, h, b, bias):
        return fl.FusedLoraLinearFunction.apply(x, h, w, b, bias, 4.0, pad_to, chunk_rows, forward_mode)

    # Execute / Assert
    torch.testing.assert_close(fn(x, h, b, bias), x @ w.T + 4.0 * h @ b.T + bias)
    assert torch.autograd.gradcheck(fn, (x, h, b, bias))


@pytest.mark.parametrize("chunk_rows", [0, 1, 5, 7, 23, 100])
def test_rows_t_matmul_equals_a_transposed_b(chunk_rows):
    # Prepare
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(23, 6, generator=gen), torch.randn(23, 8, generator=gen)
    # Execute
    out = fl.rows_t_matmul(a, b, chunk_rows)
    # Assert
    assert out.dtype == torch.float32 and out.shape == (6, 8)
    torch.testing.assert_close(out, a.T @ b)


def test_weight_gradient_is_never_computed_for_a_frozen_weight(mode):
    # Prepare
    model = _lora_model(mode, "labram-base", depth=1)
    layer = model.base_model.model.blocks[0].attn.qkv
    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(0))
    # Execute
    layer(x).sum().backward()
    # Assert
    assert layer.base_layer.weight.grad is None
    assert layer.lora_B["default"].weight.grad is not None


# --------------------------------------------------------------------------- fallbacks to peft's forward


def test_a_base_weight_that_trains_falls_back_to_peft(mode, fused_calls):
    # Prepare: the fused backward gives the frozen base weight no gradient, so a trained one must go to peft
    model = _lora_model(mode, "labram-base", depth=1).train()
    layer = model.base_model.model.blocks[0].mlp.fc1
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(0))
    # Execute
    want = _step(model, layer, mode, "peft", 0, (x,))
    got = _step(model, layer, mode, "fused", 0, (x,))
    # Assert
    assert fused_calls == []
    _assert_same(got, want)
    assert bool(torch.any(got[1]["base_model.model.blocks.0.mlp.fc1.base_layer.weight"] != 0))


def test_merged_and_disabled_adapters_fall_back_to_peft(mode, fused_calls):
    # Prepare
    model = _lora_model(mode).eval()
    x = torch.randn(2, len(CH_NAMES), 200, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(x, CH_NAMES)
        n_unmerged = len(fused_calls)
        # Execute: merged (peft adds B A to the base weight; the fused path would add it twice)
        model.merge_adapter()
        merged = model(x, CH_NAMES)
        n_merged = len(fused_calls)
        model.unmerge_adapter()
        again = model(x, CH_NAMES)
        # Execute: adapters disabled (the backbone alone)
        with model.disable_adapter():
            disabled = model(x, CH_NAMES)
        n_disabled = len(fused_calls)
        mode("peft")
        with model.disable_adapter():
            disabled_peft = model(x, CH_NAMES)
    # Assert
    assert (n_unmerged, n_merged, n_disabled) == (12, 12, 24)
    assert _rel_close(merged, unmerged, 1e-4)
    assert _rel_close(again, unmerged)
    torch.testing.assert_close(disabled, disabled_peft, rtol=0, atol=0)


def _tiny_peft(config_kwargs: dict, *, second_adapter: bool = False):
    """peft on a one-Linear model, switched to FusedLoraLinear."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("fc", nn.Linear(6, 5))
    config = dict(r=2, lora_alpha=8, target_modules=["fc"], **config_kwargs)
    model = get_peft_model(base, LoraConfig(**config))
    if second_adapter:
        model.add_adapter("other", LoraConfig(**config))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    assert fl.use_fused_lora_linear(model) == 1
    return model


@pytest.mark.parametrize("case", ["dora", "two active adapters", "fan_in_fan_out", "adapter_names"])
def test_unsupported_layers_fall_back_to_peft(mode, fused_calls, case):
    # Prepare
    model = _tiny_peft({"use_dora": True} if case == "dora" else {}, second_adapter=case == "two active adapters")
    layer = model.base_model.model.fc
    if case == "two active adapters":
        model.base_model.set_adapter(["default", "other"])
    if case == "fan_in_fan_out":
        layer.fan_in_fan_out = True
    kwargs = {"adapter_names": ["default"] * 3} if case == "adapter_names" else {}
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    # Execute
    mode("peft")
    want = layer(x, **kwargs)
    mode("fused")
    got = layer(x, **kwargs)
    # Assert
    assert fused_calls == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_plain_tiny_peft_layer_does_use_the_fused_path(mode, fused_calls):
    # Prepare: the control of the fallback cases
    model = _tiny_peft({})
    layer = model.base_model.model.fc
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    # Execute
    mode("peft")
    want = layer(x)
    mode("fused")
    got = layer(x)
    # Assert
    assert fused_calls == [True]
    assert _rel_close(got, want)


# --------------------------------------------------------------------------- selection, names, state


def test_apply_lora_switches_classes_unless_in_peft_mode(mode):
    # Prepare
    from peft.tuners.lora.layer import Linear as LoraLinear

    # Execute
    mode("peft")
    peft_model = apply_lora(build_backbone("labram-small", seed=0), LoraSpec())
    mode("auto")
    auto_model = apply_lora(build_backbone("labram-small", seed=0), LoraSpec())
    mode("fused")
    fused_model = apply_lora(build_backbone("labram-small", seed=0), LoraSpec())
    # Assert: 12 Linear layers switched; the conv adapters are peft's
    kinds = lambda m: sorted({type(mod).__name__ for n, mod in m.named_modules() if hasattr(mod, "lora_A")})  # noqa: E731
    assert kinds(peft_model) == ["Conv2d", "Linear"]
    assert kinds(auto_model) == ["Conv2d", "FusedLoraLinear"]
    assert kinds(fused_model) == ["Conv2d", "FusedLoraLinear"]
    assert sum(isinstance(mod, LoraLinear) for mod in fused_model.modules()) == 12
    assert fl.use_fused_lora_linear(fused_model, enabled=False) == 12
    assert kinds(fused_model) == ["Conv2d", "Linear"]


def test_bad_mode_is_an_error_naming_the_variable(mode):
    # Prepare
    mode("fast")
    # Execute / Assert
    with pytest.raises(ValueError, match="FEDEEG_LORA_LINEAR.*'auto', 'peft', 'fused'"):
        apply_lora(build_backbone("labram-small", seed=0), LoraSpec())


def test_environment_variable_sets_the_mode_at_import():
    # Prepare
    env = dict(os.environ, FEDEEG_LORA_LINEAR=" Fused ", FEDEEG_LORA_SPLIT_K_ROWS="4096", FEDEEG_LORA_FUSED_FORWARD="auto")
    code = "from fedeeg.models import _fused_lora as f; print(f.LORA_LINEAR, f.SPLIT_K_ROWS, f.FORWARD, f.PAD_TO)"
    # Execute
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    # Assert
    assert out.split() == ["fused", "4096", "auto", "8"]
    unset = {k: v for k, v in os.environ.items() if not k.startswith("FEDEEG_LORA_")}
    out = subprocess.run([sys.executable, "-c", code], env=unset, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["auto", "0", "auto", "8"]  # the defaults


class _CudaLike:
    """Stands for a CUDA tensor in the mode decision (only ``is_cuda`` is read)."""

    is_cuda = True


def test_auto_mode_fuses_only_cuda_inputs_inside_torch_compile(mode, monkeypatch):
    # Prepare
    cpu = torch.zeros(1)
    mode("auto")
    # Execute / Assert: eager, then "compiling"
    assert not fl.fused_wanted(cpu) and not fl.fused_wanted(_CudaLike())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fl.fused_wanted(_CudaLike()) and not fl.fused_wanted(cpu)
    mode("peft")
    assert not fl.fused_wanted(_CudaLike())
    mode("fused")
    assert fl.fused_wanted(cpu)


def test_auto_mode_runs_peft_s_forward_on_the_cpu(mode, fused_calls):
    # Prepare: the same random-B model in auto and peft mode
    x = torch.randn(2, len(CH_NAMES), 200, generator=torch.Generator().manual_seed(0))
    auto_model = _lora_model(mode)  # built with FusedLoraLinear layers
    mode("peft")
    peft_model = apply_lora(build_backbone("labram-small", seed=0), LoraSpec(dropout=0.0), seed=0)
    _randomize_b(peft_model)
    # Execute
    got = _step(auto_model, lambda x: auto_model(x, CH_NAMES), mode, "auto", 0, (x,))
    want = _step(peft_model, lambda x: peft_model(x, CH_NAMES), mode, "peft", 0, (x,))
    # Assert: no fused call, and bit for bit peft's numbers
    assert fused_calls == []
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(got[1][n], g) for n, g in want[1].items() if g is not None)


def test_names_state_dicts_and_adapter_files_are_peft_s(mode, tmp_path):
    # Prepare: the same model built both ways
    mode("peft")
    peft_model = apply_lora(build_backbone("labram-small", seed=0), LoraSpec())
    fused_model = _lora_model(mode, dropout=0.5)
    _randomize_b(peft_model)
    # Execute
    peft_model.save_pretrained(tmp_path / "peft")
    fused_model.save_pretrained(tmp_path / "fused")
    # Assert
    from safetensors.torch import load_file

    assert [n for n, _ in fused_model.named_parameters()] == [n for n, _ in peft_model.named_parameters()]
    assert list(fused_model.state_dict()) == list(peft_model.state_dict())
    assert list(trainable_state_dict(fused_model)) == list(trainable_state_dict(peft_model))
    assert list(lora_pairs(fused_model)) == list(lora_pairs(peft_model))
    a, b = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), load_file(str(tmp_path / "fused" / "adapter_model.safetensors"))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# torch.save of a whole module walks torch.jit's pickling hooks, which warn that torch.jit is deprecated.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_state_round_trip_copy_pickle_and_merge_and_unload(mode, fused_calls):
    # Prepare
    src = _lora_model(mode, dropout=0.5).eval()
    dst = _lora_model(mode, dropout=0.5).eval()
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    x = torch.randn(2, len(CH_NAMES), 200, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = src(x, CH_NAMES)
        # Execute
        load_trainable_state_dict(dst, trainable_state_dict(src))
        dst.load_state_dict(src.state_dict())
        copied = copy.deepcopy(src)
        buf = io.BytesIO()
        torch.save(src, buf)
        buf.seek(0)
        unpickled = torch.load(buf, weights_only=False)
        fused_calls.clear()
        outs = [m(x, CH_NAMES) for m in (dst, copied, unpickled)]
        n_calls = len(fused_calls)
        merged = copy.deepcopy(src).merge_and_unload()
        merged_out = merged(x, CH_NAMES)
    # Assert
    assert n_calls == 3 * 12
    assert type(copied.base_model.model.blocks[0].attn.qkv).__name__ == "FusedLoraLinear"
    assert type(unpickled.base_model.model.blocks[0].mlp.fc2) is fl.FusedLoraLinear
    assert all(_rel_close(o, want) for o in outs)
    assert type(merged.blocks[0].attn.qkv) is nn.Linear
    assert _rel_close(merged_out, want, 1e-4)


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
# inductor in torch 2.13 still goes through torch.jit's script_method, which warns that torch.jit is deprecated.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_fused_model_equals_eager_peft(mode, fused_calls):
    # Prepare (about 30 s on a 2-core CPU: inductor compiles the forward and backward graphs)
    pytest.importorskip("torch._inductor")
    model = _lora_model(mode, dropout=0.0).train()
    x = torch.randn(2, len(CH_NAMES), 200, generator=torch.Generator().manual_seed(0))
    inner = model.base_model.model
    torch._dynamo.reset()
    compiled = torch.compile(inner, fullgraph=True)  # fullgraph: the Function must trace without graph breaks
    # Execute
    want = _step(model, lambda x: inner(x, CH_NAMES), mode, "peft", 0, (x,))
    fused_calls.clear()
    got = _step(model, lambda x: compiled(x, CH_NAMES), mode, "fused", 0, (x,))
    # Assert: traced once per layer (12), then run as compiled code; numbers as eager peft's
    assert len(fused_calls) == 12
    _assert_same(got, want, rtol=1e-4)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_default_auto_mode_fuses_a_compiled_cuda_model(mode, fused_calls, monkeypatch):
    # Prepare: the default modes of the LoRA Linear and of the patch embedding
    from fedeeg.models import _patch_gemm as pg

    gemm_calls = []
    gemm = pg.temporal_conv_gemm
    monkeypatch.setattr(pg, "temporal_conv_gemm", lambda *a: gemm_calls.append(1) or gemm(*a))
    monkeypatch.setattr(pg, "MODE", "auto")
    model = _lora_model(mode).cuda().train()
    inner = model.base_model.model
    x = torch.randn(4, len(CH_NAMES), 200, generator=torch.Generator().manual_seed(0)).cuda()
    want = _step(model, lambda x: inner(x, CH_NAMES), mode, "peft", 0, (x,))  # eager: peft's layers, conv
    assert fused_calls == [] and gemm_calls == []
    torch._dynamo.reset()
    compiled = torch.compile(inner)
    # Execute
    got = _step(model, lambda x: compiled(x, CH_NAMES), mode, "auto", 0, (x,))
    # Assert: traced with the fused Function in each of the 12 Linear layers and the GEMM patch embedding
    assert len(fused_calls) == 12 and len(gemm_calls) == 1
    _assert_same(got, want, rtol=1e-3)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- bf16 autocast


def _autocast_step(model, fn, mode, path, seed, inputs, device_type):
    with torch.autocast(device_type, dtype=torch.bfloat16):
        return _step(model, lambda *a: fn(*a).float(), mode, path, seed, inputs)


def _assert_no_less_accurate(got, peft, exact, factor: float = 2.0) -> None:
    """Relative errors (max-norm) of ``got`` against ``exact`` at most ``factor`` times peft's, per tensor."""
    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    pairs = [(got[0], peft[0], exact[0])] + [(got[1][n], peft[1][n], g) for n, g in exact[1].items() if g is not None]
    worse = [(i, rel(a, c), rel(b, c)) for i, (a, b, c) in enumerate(pairs) if rel(a, c) > factor * rel(b, c) + 1e-6]
    assert worse == []


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_bf16_autocast_on_cpu_is_as_accurate_as_peft(mode, fused_calls, dropout):
    # Prepare: one labram-base block; under autocast the GEMMs run in bf16, as on a GPU in fedeeg.training
    model = _lora_model(mode, "labram-base", dropout=dropout, depth=1).train()
    block = model.base_model.model.blocks[0]
    tokens = torch.randn(2, 77, 200, generator=torch.Generator().manual_seed(0))
    exact = _step(model, block, mode, "peft", 3, (tokens,))  # float32
    # Execute
    peft = _autocast_step(model, block, mode, "peft", 3, (tokens,), "cpu")
    got = _autocast_step(model, block, mode, "fused", 3, (tokens,), "cpu")
    # Assert: the fused path ran in bf16 (one GEMM instead of two plus an add: other rounding, same accuracy)
    assert fused_calls == [False, True, True]
    assert not _rel_close(got[0], exact[0], 1e-6)
    _assert_no_less_accurate(got, peft, exact)
    assert got[1]["input0"].dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_autocast_on_cuda_is_as_accurate_as_peft(mode, fused_calls, compiled):
    # Prepare: one labram-base block at 64 windows x 77 tokens
    model = _lora_model(mode, "labram-base", dropout=0.0, depth=1).cuda().train()
    block = model.base_model.model.blocks[0]
    tokens = torch.randn(64, 77, 200, generator=torch.Generator().manual_seed(0)).cuda()
    exact = _step(model, block, mode, "peft", 3, (tokens,))  # float32
    torch._dynamo.reset()
    fn = torch.compile(block) if compiled else block
    # Execute
    peft = _autocast_step(model, block, mode, "peft", 3, (tokens,), "cuda")
    got = _autocast_step(model, fn, mode, "fused", 3, (tokens,), "cuda")
    # Assert
    assert len(fused_calls) == 3
    _assert_no_less_accurate(got, peft, exact, factor=3.0)
    torch._dynamo.reset()
