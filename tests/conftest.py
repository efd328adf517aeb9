"""Test set-up. Triton kernels run on CPU through Triton's interpreter: TRITON_INTERPRET must
be set before any kernel module is imported (``@triton.jit`` reads it at decoration time).
With a CUDA device the same tests run the compiled kernels on the GPU instead."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# DeepSpeed JIT-compiles its CPU shared-memory op on a rank's first start (1-2 min on 2 cores).
# One cache in the environment, as `make demo` uses (epsdist/demo.py), so the tests that launch
# ranks and the demo test compile it once between them.
if os.access(sys.prefix, os.W_OK):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE
