"""Test set-up. Triton kernels run on CPU through Triton's interpreter: TRITON_INTERPRET must
be set before any kernel module is imported (``@triton.jit`` reads it at decoration time).
With a CUDA device the same tests run the compiled kernels on the GPU instead."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE
