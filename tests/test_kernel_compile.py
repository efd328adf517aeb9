"""Every Triton kernel compiles for real GPUs (sm_80, sm_90) without spilling, for the
configurations the launchers choose in the benchmark cases -- no GPU or driver needed: Triton's
compiler and the ptxas in its wheel run on the CPU (epsdist_kernels.compile_check).

The check runs in a subprocess without TRITON_INTERPRET (conftest sets it for this process,
and interpreted kernels cannot be compiled)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "epsdist_kernels.compile_check",
                           "--arch", "80,90"], env=env, capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # every kernel was compiled for both targets
    for kernel in ("_overlap_counts_kernel", "_loss_kernel", "_grad_kernel",
                   "_upsample_accumulate_kernel", "_normalize_argmax_kernel"):
        for arch in ("sm_80", "sm_90"):
            assert f"{arch} {kernel} " in out, f"{arch} {kernel} missing:\n{out[-3000:]}"
    assert " 0 failed" in out


def test_compile_check_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "epsdist_kernels.compile_check"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr
