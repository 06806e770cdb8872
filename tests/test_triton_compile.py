"""Every FedEEG Triton kernel compiles for Hopper (sm_90a) ahead of time, in its launch configuration, without spills.

No GPU is needed: Triton compiles to a cubin with its bundled ptxas, and its bundled
``cuobjdump`` reports registers and stack per thread. This catches what Triton's CPU
interpreter does not check (a loop-carried variable whose shape changes, a layout the
compiler refuses) and register spills (local-memory traffic), before any GPU time is spent.
Skipped where Triton is not importable (CPU builds of torch) or under ``TRITON_INTERPRET=1``
(the kernels are interpreted functions then)::

    pip install --no-deps --target /tmp/tsite triton
    PYTHONPATH=.:/tmp/tsite python -m pytest tests/test_triton_compile.py
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest

from fedeeg.models import _lora_input as li
from fedeeg.models import _qkv_attention as qa
from fedeeg.models import _short_attention as sa

pytestmark = [
    pytest.mark.skipif(not sa.TRITON_AVAILABLE or os.environ.get("TRITON_INTERPRET", "") == "1",
                       reason="compiles the Triton kernels: needs Triton, without TRITON_INTERPRET=1"),
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset"),  # Triton 3.9's notice of a new default
]

T, D = 77, 20  # LaBraM-Base: 1 + 19 channels x 4 patches, 20-wide heads


def _compile(kernel, types: list[str], constexprs: dict, num_warps: int, num_stages: int | None = None):
    """The compiled kernel for sm_90a, and (registers, stack bytes) per thread from cuobjdump."""
    import triton
    import triton.backends.nvidia as nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    assert len(names) == len(types), (names, types)
    signature = {n: ("constexpr" if n in constexprs else t) for n, t in zip(names, types)}
    options = {"num_warps": num_warps} | ({"num_stages": num_stages} if num_stages else {})
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    assert m, usage
    return compiled, int(m.group(1)), int(m.group(2))


def _launch(params: dict) -> tuple[dict, int, int | None]:
    """Split a launch-parameter dict into constexprs, warps and stages."""
    params = dict(params)
    return params, params.pop("num_warps"), params.pop("num_stages", None)


_ATTN_FWD = ["*bf16"] * 4 + ["*fp32"] + ["i32"] * 12 + ["i32", "i32", "fp32"]
_ATTN_BWD = ["*bf16"] * 5 + ["*fp32"] + ["*bf16"] * 3 + ["i32"] * 15 + ["i32", "i32", "fp32"]
_QKV_FWD = ["*bf16"] + ["*fp32"] * 4 + ["*bf16", "*fp32"] + ["i32"] * 6 + ["fp32", "fp32"]
_QKV_BWD = ["*bf16"] + ["*fp32"] * 4 + ["*bf16", "*bf16", "*fp32", "*bf16", "*fp32"] + ["i32"] * 8 + ["fp32", "fp32"]


@pytest.mark.parametrize("impl", ["tile", "qblock"])
@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_short_attention_kernels(impl, which):
    # Prepare: the launch of LaBraM-Base's attention (module defaults)
    _, params = sa._launch_params(T, D, which, impl=impl)
    constexprs, warps, stages = _launch(params)
    types = (_ATTN_FWD if which == "fwd" else _ATTN_BWD) + ["constexpr"] * len(constexprs)
    # Execute
    _, regs, stack = _compile(sa._kernels()[impl, which], types, constexprs, warps, stages)
    # Assert
    assert stack == 0, f"{impl} {which}: {regs} registers, {stack} bytes of stack (spills)"


@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_qkv_attention_kernels(which):
    # Prepare
    constexprs, warps, stages = _launch(qa._params(T, D, which))
    types = (_QKV_FWD if which == "fwd" else _QKV_BWD) + ["constexpr"] * 4
    # Execute
    _, regs, stack = _compile(qa._kernels()[which], types, constexprs, warps, stages)
    # Assert
    assert stack == 0, f"qkv {which}: {regs} registers, {stack} bytes of stack (spills)"


@pytest.mark.parametrize("k,gelu", [(200, False), (800, True), (800, False)])
@pytest.mark.parametrize("drop", [True, False])
def test_lora_input_kernels(k, gelu, drop):
    # Prepare: LaBraM-Base's qkv/fc1 (K = 200) and fc2 (K = 800, the GELU inside), rank 2, padded to 8 columns
    block_m, block_k, warps = li._tile(k)
    fwd = {"R": 2, "R_P2": 2, "TAIL": 8, "TAIL_P2": 8, "BLOCK_M": block_m, "BLOCK_K": block_k, "HAS_DROP": drop, "GELU": gelu}
    bwd = {"R": 2, "R_P2": 2, "BLOCK_M": block_m, "BLOCK_K": block_k, "HAS_DROP": drop, "GELU": gelu}
    kernels = li._kernels()
    # Execute
    _, regs_f, stack_f = _compile(kernels["fwd"], ["*bf16", "*bf16", "*i64", "*bf16"] + ["i32"] * 4 + ["fp32"] * 2
                                  + ["constexpr"] * 8, fwd, warps)
    _, regs_b, stack_b = _compile(kernels["bwd"], ["*bf16", "*bf16", "*bf16", "*i64", "*bf16", "*fp32", "*bf16"]
                                  + ["i32"] * 6 + ["fp32", "fp32", "i32"] + ["constexpr"] * 6, bwd, warps)
    # Assert: no spills, and registers low enough for two programs of 8 warps per SM (65,536 registers)
    assert stack_f == 0 and stack_b == 0
    assert max(regs_f, regs_b) * 32 * warps * 2 <= 65536, (regs_f, regs_b, warps)


def test_keep_mask_kernel():
    block_m, block_k, warps = li._tile(200)
    _, _, stack = _compile(li._kernels()["mask"], ["*i64", "*i8", "i32", "i32", "fp32", "constexpr", "constexpr"],
                           {"BLOCK_M": block_m, "BLOCK_K": block_k}, warps)
    assert stack == 0
