"""Compile every Triton kernel for real GPUs without one: ``python -m epsdist_kernels.compile_check``.

For each target (sm_80 = A100, sm_90 = H100/H200) this builds, on the CPU, the launches the
launchers choose for the benchmark cases (``bench.CASES`` / ``bench.CAM_CASES``; logits
float32 / bfloat16 / float16, contiguous and channels_last; every kernel variant the training,
evaluation and logging paths use), specialises them exactly as ``kernel[grid](...)`` would
(same signature, constexprs and divisibility attributes, the SM count of the target's card),
deduplicates, and compiles each through Triton's compiler down to a cubin with the ptxas in the
triton wheel. ptxas's verbose log gives registers and spill bytes; ``nvdisasm`` (also in the
wheel) gives the SASS instruction and warp-shuffle counts, printed per kernel as a proxy for
the instruction cost. The EPS-loss kernels loop over channel chunks: ``loop`` is the SASS of
their loop bodies, ``exec`` an estimate of the instructions each thread executes (static count
+ loop bodies x (cdiv(K, BLOCK_K) - 1): every loop taken as running over all chunks) and
``i/px`` that times the program's threads over its BLOCK_P pixels: thread instructions per
pixel, comparable across tile shapes. Exit status 1 on a compile error or on any spill.

It must run WITHOUT ``TRITON_INTERPRET=1`` (with it, ``@triton.jit`` gives interpreted
functions, which cannot be compiled): the test suite runs it in a subprocess.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

TARGETS = {80: 108, 90: 132}           # compute capability -> SMs of its card (A100, H100/H200)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = ("contiguous", "channels_last")
PIXEL_KERNELS = ("_overlap_counts_kernel", "_loss_kernel", "_grad_kernel")   # chunk loops


def eps_loss_jobs(n_sm: int):
    """(label, Launch) for every EPS-loss kernel variant of every benchmark case."""
    from . import bench
    from .eps_loss import backward_launch, forward_launches
    jobs = []
    for case, (B, K, h, w, S) in bench.CASES.items():
        for dname, dtype in DTYPES.items():
            for layout in LAYOUTS:
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                cam = torch.empty((B, K, h, w), dtype=dtype).contiguous(memory_format=fmt)
                sal = torch.empty((B, 1, S, S))
                labels = torch.empty((B, K - 1))
                force_bg = torch.zeros(K - 1, dtype=torch.uint8)
                tag = f"{case} {dname} {layout}"
                # training (adaptive) and backward for every dtype and layout; the logging
                # variant (a constexpr branch of the loss kernel) and the naive strategy's
                # coefficient kernel once per case
                variants = [("train", None, False)]
                if dname == "fp32" and layout == "contiguous":
                    variants += [("maps", None, True), ("naive", force_bg, False)]
                for what, fbg, maps in variants:
                    launches, _, _, c, _ = forward_launches(
                        cam, sal, labels, fbg, tau=0.4, lam=0.5, write_maps=maps, n_sm=n_sm)
                    jobs += [(f"{tag} {what}", launch) for launch in launches]
                    if what == "train":
                        gout = torch.ones((), dtype=torch.float32)
                        jobs.append((f"{tag} backward",
                                     backward_launch(cam, sal, c, gout, torch.empty_like(cam),
                                                     lam=0.5, n_sm=n_sm)))
    return jobs


def cam_post_jobs(n_sm: int):
    """(label, Launch) for both CAM post-processing kernels of every benchmark case."""
    from . import bench
    from .cam_post import plan_cam_to_mask
    jobs = []
    for case, (H, W, K, L) in bench.CAM_CASES.items():
        for dname, dtype in DTYPES.items():
            views = [torch.empty((K, h, w), dtype=dtype) for h, w in bench.cam_view_sizes(case)]
            flips = [i % 2 == 1 for i in range(len(views))]
            for norm in (False, True):
                launches = plan_cam_to_mask(views, flips, torch.arange(L), (H, W), 0.2,
                                            return_norm=norm)[0]
                jobs += [(f"{case} {dname} norm={norm}", launch) for launch in launches]
    return jobs


def _specialise(launch, backend):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run computes them."""
    from triton.runtime.jit import create_function_from_signature
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*launch.args, **launch.meta)
    return kernel._pack_args(backend, dict(launch.meta), bound, spec, options)


_JOBS: list = []      # (arch, label, kernel, signature, constexprs, attrs, options, shape)


def _compile_one(i: int) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    arch, label, kernel, sig, constexprs, attrs, options, shape = _JOBS[i]
    out = dict(arch=arch, kernel=kernel.__name__, label=label, error=None, exec=None, ipx=None)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(triton.compiler.ASTSource(kernel, sig, constexprs, attrs),
                                      target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:                                       # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
        return out
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    out.update(regs=int(regs.group(1)) if regs else None,
               spill_bytes=(int(spill.group(1)) + int(spill.group(2))) if spill else None,
               stack_bytes=int(stack.group(1)) if stack else None,
               ptxas_log_found=bool(regs and spill))
    out.update(_sass_counts(compiled.asm["cubin"]))
    if shape:                                   # (chunks, pixels per program)
        chunks, block_p = shape
        out["exec"] = out["sass"] + out["loop"] * (chunks - 1)
        out["ipx"] = out["exec"] * 32 * options["num_warps"] / block_p
    return out


def _sass_counts(cubin: bytes) -> dict:
    from triton import knobs
    nvdisasm = knobs.nvidia.nvdisasm.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        sass = subprocess.run([nvdisasm, "-c", fh.name], capture_output=True, text=True,
                              check=True).stdout
    ops, labels, loop = [], {}, 0
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        op = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if op:
            ops.append(op.group(1))
            target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
            # a backward branch closes a loop (a branch to itself is the trap after EXIT)
            if target and labels.get(target.group(1), len(ops)) < len(ops) - 1:
                loop += len(ops) - labels[target.group(1)]
    return dict(sass=len(ops), shfl=sum(op.startswith("SHFL") for op in ops),
                ldg=sum(op.startswith("LDG") for op in ops), loop=loop)


def build_jobs(archs) -> list:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    jobs, seen = [], set()
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        n_sm = TARGETS[arch]
        for label, launch in eps_loss_jobs(n_sm) + cam_post_jobs(n_sm):
            options, sig, constexprs, attrs = _specialise(launch, backend)
            shape = None
            if launch.kernel.__name__ in PIXEL_KERNELS:
                K, block_k = launch.args[0].shape[1], launch.meta["BLOCK_K"]
                shape = (-(-K // block_k), launch.meta["BLOCK_P"])
            key = (arch, launch.kernel.__name__, repr(sorted(sig.items())),
                   repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
                   repr(sorted(options.__dict__.items())))
            if key not in seen:
                seen.add(key)
                jobs.append((arch, label, launch.kernel, sig, constexprs, attrs,
                             options.__dict__, shape))
    return jobs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="80,90", help="compute capabilities (default 80,90)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("compile_check: unset TRITON_INTERPRET (the kernels must be compiled)")
    archs = [int(a) for a in args.arch.split(",")]
    bad = [a for a in archs if a not in TARGETS]
    if bad:
        raise SystemExit(f"--arch: unknown {bad}; choose from {sorted(TARGETS)}")
    # a private cache: a cache hit would skip ptxas and with it the register/spill log
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        _JOBS[:] = build_jobs(archs)
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(max(1, args.jobs)) as pool:
            results = pool.map(_compile_one, range(len(_JOBS)))
    failed = 0
    print(f"{'arch':<5} {'kernel':<28} {'regs':>4} {'spill':>5} {'sass':>5} {'shfl':>4} "
          f"{'ldg':>4} {'loop':>5} {'exec':>5} {'i/px':>5}  first configuration using it")
    for r in sorted(results, key=lambda r: (r["kernel"], r["arch"], r["label"])):
        if r["error"]:
            failed += 1
            print(f"sm_{r['arch']} {r['kernel']:<28} COMPILE ERROR ({r['label']}): {r['error']}")
            continue
        bad = not r["ptxas_log_found"] or r["spill_bytes"] != 0
        failed += bad
        print(f"sm_{r['arch']} {r['kernel']:<28} {r['regs']:>4} {r['spill_bytes']!s:>5} "
              f"{r['sass']:>5} {r['shfl']:>4} {r['ldg']:>4} {r['loop']:>5} "
              f"{r['exec'] if r['exec'] is not None else '-':>5} "
              f"{format(r['ipx'], '.0f') if r['ipx'] is not None else '-':>5}  {r['label']}"
              + ("   <-- SPILLS (or no ptxas log)" if bad else ""))
    print(f"{len(results)} distinct compilations, {failed} failed, "
          f"{time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
