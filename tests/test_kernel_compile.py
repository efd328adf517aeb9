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
    for kernel in ("_overlap_counts_kernel", "_coef_kernel", "_loss_kernel", "_grad_kernel",
                   "_upsample_accumulate_kernel", "_normalize_argmax_kernel"):
        for arch in ("sm_80", "sm_90"):
            assert f"{arch} {kernel} " in out, f"{arch} {kernel} missing:\n{out[-3000:]}"
    assert " 0 failed" in out
    # the EPS-loss kernels loop over channel chunks: each row reports a loop body and an
    # estimate of the instructions executed per pixel, for every dtype and layout of COCO
    rows = [line.split() for line in out.splitlines()
            if line.startswith("sm_90 _loss_kernel") and " coco_" in line]
    assert {(r[-3], r[-2]) for r in rows} >= {(d, lay) for d in ("fp32", "bf16", "fp16")
                                             for lay in ("contiguous", "channels_last")}
    for r in rows:
        regs, spill, sass, shfl, ldg, loop, execd, per_px = map(int, r[2:10])
        assert spill == 0 and 0 < loop < sass < execd and per_px > 0


def test_compile_check_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "epsdist_kernels.compile_check"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr
