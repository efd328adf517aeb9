"""Microbenchmark of the EPS saliency loss: fused Triton kernel vs the PyTorch reference.

What it measures. For each case (a realistic CAM-head output size) and each mode -- ``fwd``
(the loss only, logits without grad) and ``fwd_bwd`` (loss + ``loss.backward()`` into a leaf,
both inside the timed region) -- the median wall time of three providers:

    triton   epsdist_kernels.eps_loss.eps_loss_triton (two fused passes; the forward writes
             d(loss)/d(cam), the backward only scales it)
    eager    epsdist_kernels.eps_loss_ref.eps_loss_reference (plain PyTorch)
    compile  torch.compile(eps_loss_reference), compiled and warmed up before timing

How to run::

    python -m epsdist_kernels.bench                  # or: make demo
    python -m epsdist_kernels.bench --cases voc_b8_56 --modes fwd --providers triton,eager \
        --dtype bf16 --json runs/bench.json

Columns. ``ms``: median time per call (CUDA: triton.testing.do_bench, 25 ms warm-up, 100 ms of
repetitions; CPU: time.perf_counter over --reps calls). ``GB/s``: ideal bytes / time, where the
ideal bytes are what a perfect kernel must move: fwd = cam once + B*h*w saliency samples (the
nearest-resized pixels actually used) + labels; fwd_bwd = fwd + one cam-sized gradient write.
``%copy``: GB/s as a share of the card's copy bandwidth (dst.copy_(src) on 1 GiB float32, counted
as 2 * bytes / time). ``peakMiB``: CUDA memory allocated by one call above what was allocated
before it (the inputs). ``x eager`` / ``x compile``: how many times faster triton is, per
(case, mode). Without CUDA the Triton kernels run in Triton's CPU interpreter: those numbers
are a smoke test of the code path, not performance.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time

import torch

# name: (B, K, h, w, S) -- logits (B, K, h, w), saliency (B, 1, S, S)
CASES = {
    "voc_b8_56": (8, 21, 56, 56, 448),
    "coco_b16_41": (16, 81, 41, 41, 321),
    "coco_b64_56": (64, 81, 56, 56, 448),
}
PROVIDERS = ("triton", "eager", "compile")
MODES = ("fwd", "fwd_bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEED = 0


def build_inputs(case: str, dtype: torch.dtype, device: torch.device):
    """Seeded (cam, saliency, labels): logits randn*3, saliency U[0,1), labels ~ Bernoulli(0.15)
    with at least one present class per image."""
    B, K, h, w, S = CASES[case]
    g = torch.Generator().manual_seed(SEED)
    cam = (torch.randn(B, K, h, w, generator=g) * 3).to(dtype)
    sal = torch.rand(B, 1, S, S, generator=g)
    labels = (torch.rand(B, K - 1, generator=g) < 0.15).float()
    empty = labels.sum(1) == 0
    labels[empty, torch.randint(K - 1, (B,), generator=g)[empty]] = 1.0
    return cam.to(device), sal.to(device), labels.to(device)


def ideal_bytes(case: str, dtype: torch.dtype, mode: str) -> int:
    B, K, h, w, _ = CASES[case]
    cam = B * K * h * w * torch.empty((), dtype=dtype).element_size()
    total = cam + B * h * w * 4 + B * (K - 1) * 4          # saliency, labels: float32
    return total + (cam if mode == "fwd_bwd" else 0)


def time_fn(fn, *, reps: int, warmup: int, cuda: bool):
    """Median ms of fn() and fn()'s last result. CUDA: one call, then triton's do_bench
    (median); CPU: `warmup` untimed calls, then the median of `reps` perf_counter timings."""
    if cuda:
        from triton.testing import do_bench
        out = fn()
        if "return_mode" in inspect.signature(do_bench).parameters:
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        else:                                              # triton < 2.2
            ms = do_bench(fn, warmup=25, rep=100, quantiles=[0.5])
        return float(ms[0] if isinstance(ms, (list, tuple)) else ms), out
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def measure_copy_bandwidth() -> float | None:
    """GB/s of dst.copy_(src) on 1 GiB float32 tensors (read + write); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms, _ = time_fn(lambda: dst.copy_(src), reps=0, warmup=0, cuda=True)
    nbytes = src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def peak_mib(fn) -> float:
    """CUDA memory one call allocates at its peak, above what was live before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def make_fn(loss_fn, cam, sal, labels, mode):
    if mode == "fwd":
        return lambda: loss_fn(cam, sal, labels).detach()
    leaf = cam.detach().clone().requires_grad_(True)

    def step():
        leaf.grad = None                                   # no accumulation across calls
        loss = loss_fn(leaf, sal, labels)
        loss.backward()
        return loss.detach()
    return step


def run_case(case, providers, modes, dtype, reps, copy_bw, fns, cuda, log):
    """Time every (mode, provider) of one case; check triton's loss against eager's."""
    device = torch.device("cuda" if cuda else "cpu")
    cam, sal, labels = build_inputs(case, dtype, device)
    B, K, h, w, S = CASES[case]
    ref = float(fns["eager"](cam, sal, labels))
    checked, rows = False, []
    for mode in modes:
        for prov in providers:
            fn = make_fn(fns[prov], cam, sal, labels, mode)
            # the CPU interpreter compiles nothing, so a triton warm-up there only costs time
            warmup = 0 if (prov == "triton" and not cuda) else 1
            t0 = time.perf_counter()
            ms, out = time_fn(fn, reps=reps, warmup=warmup, cuda=cuda)
            log(f"  {case:<12} {prov:<8} {mode:<8} {ms:10.2f} ms"
                f"   ({time.perf_counter() - t0:.1f} s)")
            if prov == "triton" and not checked:           # first triton call = the check
                checked, got = True, float(out)
                rel = abs(got - ref) / max(abs(ref), 1e-12)
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                if not rel <= tol:
                    print(f"WARNING: {case}: triton loss {got:.8g} vs eager {ref:.8g} "
                          f"(rel err {rel:.3g} > {tol:g})", flush=True)
            gbs = ideal_bytes(case, dtype, mode) / (ms * 1e-3) / 1e9
            rows.append(dict(case=case, provider=prov, mode=mode, ms=ms, gbs=gbs,
                             frac_of_copy_bw=gbs / copy_bw if copy_bw else None,
                             peak_mib=peak_mib(fn) if cuda else None,
                             B=B, K=K, h=h, w=w, S=S))
    return rows


def speedups(rows):
    ms = {(r["case"], r["mode"], r["provider"]): r["ms"] for r in rows}
    out = []
    for (case, mode, prov), t in ms.items():
        if prov == "triton":
            vs = {f"vs_{o}": ms[(case, mode, o)] / t for o in ("eager", "compile")
                  if (case, mode, o) in ms}
            out.append(dict(case=case, mode=mode, **vs))
    return out


def print_table(rows, spd):
    sp = {(s["case"], s["mode"]): s for s in spd}
    fmt = "{:<12} {:<8} {:<8} {:>10} {:>9} {:>7} {:>9} {:>8} {:>9}"
    print(fmt.format("case", "provider", "mode", "ms", "GB/s", "%copy", "peakMiB",
                     "x eager", "x compile"))
    def num(v, spec):                       # small CPU numbers keep 3 significant digits
        return "n/a" if v is None else format(v, spec if abs(v) >= 100 else ".3g")
    for r in rows:
        s = sp.get((r["case"], r["mode"]), {}) if r["provider"] == "triton" else {}
        frac = r["frac_of_copy_bw"]
        print(fmt.format(r["case"], r["provider"], r["mode"], num(r["ms"], ".3f"),
                         num(r["gbs"], ".1f"), num(frac and 100 * frac, ".1f"),
                         num(r["peak_mib"], ".1f"),
                         *(num(s[k], ".2f") if k in s else "" for k in ("vs_eager", "vs_compile"))))


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _list(arg, allowed, what):
    items = [x.strip() for x in arg.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {bad or arg!r}; choose from {', '.join(allowed)}")
    return items


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m epsdist_kernels.bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=None,
                   help="comma list of " + ", ".join(CASES) + " (default: all on CUDA, "
                        "voc_b8_56 on CPU, where the interpreter needs minutes for the others)")
    p.add_argument("--providers", default=None,
                   help="comma list of triton,eager,compile (CPU default: triton,eager)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of fwd,fwd_bwd")
    p.add_argument("--reps", type=int, default=1,
                   help="CPU only: timed calls per row, median reported (default 1: the "
                        "interpreter needs ~4 min for one pass; CUDA rows use do_bench)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="logits dtype")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.reps < 1:
        raise SystemExit("--reps: expected >= 1")
    cases = _list(args.cases or (",".join(CASES) if cuda else "voc_b8_56"), CASES, "cases")
    modes = _list(args.modes, MODES, "modes")
    providers = _list(args.providers or ",".join(PROVIDERS), PROVIDERS, "providers")
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")     # before the kernel module import
        if args.providers is None:
            providers.remove("compile")
    import triton
    from .eps_loss import eps_loss_triton
    from .eps_loss_ref import eps_loss_reference
    fns = {"triton": eps_loss_triton, "eager": eps_loss_reference,
           "compile": torch.compile(eps_loss_reference, dynamic=False)}
    dtype = DTYPES[args.dtype]

    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({cpu}, {os.cpu_count()} cores)"
    versions = dict(python=platform.python_version(), torch=torch.__version__,
                    triton=triton.__version__, cuda=torch.version.cuda)
    print(f"device  {device}")
    print("versions " + "  ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"dtype   {args.dtype} logits, float32 saliency and labels")
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interp:
        print("NOTE: Triton runs in its CPU interpreter (TRITON_INTERPRET=1): these are smoke "
              "numbers of the code path, NOT performance.")
    if not cuda:
        print(f"NOTE: --reps {args.reps}; cases {','.join(cases)}. One interpreted pass over all "
              "three cases takes ~4-7 min on 2 cores (coco_b64_56 ~3 min of that); ask for them "
              "with --cases " + ",".join(CASES))
        if args.providers is None:
            print("NOTE: 'compile' skipped on CPU (torch.compile costs ~1 min per case here); "
                  "ask for it with --providers triton,eager,compile")
    copy_bw = measure_copy_bandwidth()
    print("copy bandwidth " + (f"{copy_bw:.1f} GB/s" if copy_bw else "n/a (no CUDA)"), flush=True)

    log = lambda msg: print(msg, file=sys.stderr, flush=True)        # noqa: E731
    rows = []
    for case in cases:
        rows += run_case(case, providers, modes, dtype, args.reps, copy_bw, fns, cuda, log)
    spd = speedups(rows)
    print()
    print_table(rows, spd)
    if args.json:
        write_json(args.json, dict(device=device, dtype=args.dtype, interpreter=interp,
                                   versions=versions, copy_bandwidth_gbs=copy_bw, rows=rows,
                                   speedups=spd))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
