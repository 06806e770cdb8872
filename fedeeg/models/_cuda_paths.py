"""Where the ``'auto'`` modes of FedEEG's CUDA paths switch them on.

The GEMM patch embedding (:mod:`fedeeg.models._patch_gemm`) and the fused LoRA
Linear (:mod:`fedeeg.models._fused_lora`) were measured faster for CUDA inputs
inside ``torch.compile`` (H100, LaBraM-Base, LoRA ``paper``, batch 1024, bf16:
``simulations/RESULTS.md``) and nowhere else, so that is where ``'auto'`` uses
them.
"""

from __future__ import annotations

import torch


def compiled_on_cuda(x: torch.Tensor) -> bool:
    """Whether ``x`` is a CUDA tensor seen inside ``torch.compile`` (a constant in a compiled graph)."""
    return x.is_cuda and torch.compiler.is_compiling()
