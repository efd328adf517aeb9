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


def _synthetic_train_shards(root) -> None:
    """160 synthetic 96 px training images under ``root/data``, written as shards of 40 into
    ``root/shards`` by the shard writer: the small data set the two-rank training tests use."""
    from epsdist.data import shard, synthetic
    synthetic.generate(str(root / "data"), 160, 0, seed=0, size=96, workers=1, progress=False)
    summary = shard.shard_voc(str(root / "data"), str(root / "data" / "saliency"),
                              str(root / "shards"), split="train", shard_size=40,
                              log=lambda *a: None)
    assert summary["exit_code"] == 0


@pytest.fixture(scope="session")
def make_train_shards():
    """``make_train_shards(root)``: see ``_synthetic_train_shards``."""
    return _synthetic_train_shards
