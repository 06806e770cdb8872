"""Marks of tests that run FedEEG's Triton kernels: in Triton's CPU interpreter, or on a CUDA GPU."""

from __future__ import annotations

import os

import pytest
import torch

from fedeeg.models import _short_attention

#: Triton imports and torch can register its kernels as ``triton_op``s.
TRITON = _short_attention.TRITON_OP
#: Triton's CPU interpreter is on (``TRITON_INTERPRET=1``) and Triton imports.
INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1" and _short_attention.TRITON_AVAILABLE


def interpreter(fn):
    """A test that runs the kernels on CPU tensors: skipped unless Triton's interpreter is on."""
    fn = pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels on the CPU only with TRITON_INTERPRET=1")(fn)
    return pytest.mark.interpreter(fn)


def gpu(fn):
    """A test of the kernels on a CUDA GPU (marker ``gpu``): skipped without CUDA or Triton."""
    fn = pytest.mark.skipif(not (torch.cuda.is_available() and TRITON), reason="needs a CUDA GPU and Triton")(fn)
    return pytest.mark.gpu(fn)
