"""Microbenchmarks of the fused Triton kernels (EPS loss, CAM post-processing) vs PyTorch.

What it measures. Two kernels (``--kernel``), each with its cases and modes:

``eps_loss`` -- the EPS saliency loss. Cases ``voc_b8_56``, ``coco_b16_41``, ``coco_b64_56``
(realistic CAM-head output sizes, contiguous logits) and ``coco_b64_56_cl`` (the same sizes in
the layout training uses: channels_last; run it with ``--dtype bf16`` for the training
precision); modes ``fwd`` (the loss only, logits without grad) and ``fwd_bwd`` (loss +
``loss.backward()`` into a leaf, both inside the timed region).

``cam_post`` -- pseudo-mask inference's post-processing of one image (8 views = 4 scales
0.5/1/1.5/2 x 2 flips of a stride-8 network output, view maps round(H*s/8) x round(W*s/8),
resized to H x W, summed over views, normalised, thresholded and argmaxed). Cases ``cam_voc``
(375x500 output, 21 channels, 3 labelled classes) and ``cam_coco`` (480x640, 81 channels,
8 labelled); modes ``mask`` (the uint8 mask only) and ``mask_norm`` (also the (L, H, W)
normalised maps). Labels stay on the CPU, as a loader gives them.

Providers, for each (case, mode), the median wall time of:

    triton   the fused kernels: epsdist_kernels.eps_loss.eps_loss_triton (forward: counts and
             loss passes; backward: one pass writing grad_output * d(loss)/d(cam)) /
             epsdist_kernels.cam_post.cam_to_mask_triton (two passes)
    eager    the plain-PyTorch references: eps_loss_ref.eps_loss_reference /
             cam_post_ref.cam_to_mask_reference
    compile  torch.compile(reference), compiled and warmed up before timing

How to run::

    python -m epsdist_kernels.bench                  # or: make bench
    python -m epsdist_kernels.bench --cases voc_b8_56 --modes fwd --providers triton,eager \
        --dtype bf16 --json runs/bench.json
    python -m epsdist_kernels.bench --kernel cam_post          # cam_voc, cam_coco
    python -m epsdist_kernels.bench --cases cam_voc --modes mask --providers triton,eager

``--kernel eps_loss|cam_post|all`` picks the default cases: every case of that kernel on CUDA
(default ``all``); on CPU, where the interpreter is slow, its first case (voc_b8_56 /
cam_voc) and by default only ``eps_loss``. ``--cases`` names cases of either kernel and
overrides ``--kernel``. ``--modes`` (default: every mode) is a list over both kernels; a case
runs the listed modes of its kernel and is skipped, with a note, when none applies.

Columns. ``ms``: median time per call (CUDA: triton.testing.do_bench, 25 ms warm-up, 100 ms of
repetitions; CPU: time.perf_counter over --reps calls). ``GB/s``: ideal bytes / time, where the
ideal bytes are what a perfect kernel must move: eps_loss fwd = cam once + B*h*w saliency
samples (the nearest-resized pixels actually used) + labels; fwd_bwd = fwd + one cam-sized
gradient write; cam_post mask = the labelled channels of every view once + the uint8 mask;
mask_norm = mask + the float32 (L, H, W) maps (the kernels also write and read an (L, H, W)
float32 accumulator: not counted, so 100 % of copy bandwidth is out of reach).
``idealMB`` is that ideal; ``movedMB`` the bytes each provider moves per call, computed, not
measured: triton = the passes' model (``triton_bytes``: logits 2x in fwd, 4x in fwd_bwd, plus
saliency samples and the small per-class buffers), eager = every ATen op of one call reading
its inputs and writing its outputs once (``eager_bytes``, counted by running the call under a
dispatch mode), compile and cam_post = n/a.
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
    "coco_b64_56_cl": (64, 81, 56, 56, 448),     # the training layout (with --dtype bf16)
}
# logits memory format per case (default contiguous): training runs channels_last
CASE_LAYOUT = {"coco_b64_56_cl": "channels_last"}
# name: (H, W, K, L) -- output H x W, K-channel views, L labelled classes
CAM_CASES = {
    "cam_voc": (375, 500, 21, 3),
    "cam_coco": (480, 640, 81, 8),
}
CAM_SCALES = (0.5, 1.0, 1.5, 2.0)        # x 2 flips = 8 views
CAM_STRIDE = 8                           # network output stride
PROVIDERS = ("triton", "eager", "compile")
MODES = ("fwd", "fwd_bwd")
CAM_MODES = ("mask", "mask_norm")
KERNELS = {"eps_loss": (CASES, MODES), "cam_post": (CAM_CASES, CAM_MODES)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEED = 0


def build_inputs(case: str, dtype: torch.dtype, device: torch.device):
    """Seeded (cam, saliency, labels): logits randn*3, saliency U[0,1), labels ~ Bernoulli(0.15)
    with at least one present class per image."""
    B, K, h, w, S = CASES[case]
    g = torch.Generator().manual_seed(SEED)
    cam = (torch.randn(B, K, h, w, generator=g) * 3).to(dtype)
    if CASE_LAYOUT.get(case) == "channels_last":
        cam = cam.contiguous(memory_format=torch.channels_last)
    sal = torch.rand(B, 1, S, S, generator=g)
    labels = (torch.rand(B, K - 1, generator=g) < 0.15).float()
    empty = labels.sum(1) == 0
    labels[empty, torch.randint(K - 1, (B,), generator=g)[empty]] = 1.0
    return cam.to(device), sal.to(device), labels.to(device)   # .to keeps the layout


def ideal_bytes(case: str, dtype: torch.dtype, mode: str) -> int:
    B, K, h, w, _ = CASES[case]
    cam = B * K * h * w * torch.empty((), dtype=dtype).element_size()
    total = cam + B * h * w * 4 + B * (K - 1) * 4          # saliency, labels: float32
    return total + (cam if mode == "fwd_bwd" else 0)


def triton_bytes(case: str, dtype: torch.dtype, mode: str) -> int:
    """Bytes the fused kernels move per call (adaptive strategy), by construction of the passes:
    the logits twice in fwd (counts pass, loss pass) and four times in fwd_bwd (+ the backward's
    read and its gradient write; its second sweep over a program's channel chunks re-reads
    the tile it has just read, from cache: not counted); B*h*w float32 saliency samples per
    pass; labels once; the (B, 2, C) int32 counts zeroed, added to and read; the (B, 3, NK)
    float32 coefficients written and their row a read by the loss pass (and the backward);
    the per-program partial sums written and read. Computed, not measured (caches may serve
    part of the re-reads)."""
    from .eps_loss import coef_row_length, tile_config    # import here: triton only when asked
    B, K, h, w, _ = CASES[case]
    esize = torch.empty((), dtype=dtype).element_size()
    cam = B * K * h * w * esize
    block_k, block_p, _ = tile_config(K, B, h * w, elem_size=esize,
                                      channels_last=CASE_LAYOUT.get(case) == "channels_last")
    nk = coef_row_length(K, block_k)
    bwd = mode == "fwd_bwd"
    small = (B * (K - 1) * 4 + 3 * B * 2 * (K - 1) * 4 + 2 * B * -(-h * w // block_p) * 4
             + B * 3 * nk * 4 + B * nk * 4 * (2 if bwd else 1))
    return cam * (4 if bwd else 2) + B * h * w * 4 * (3 if bwd else 2) + small


def _distinct_bytes(t: torch.Tensor) -> int:
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride != 0 else 1           # expanded dimensions are read once
    return n * t.element_size()


def eager_bytes(fn) -> int:
    """Bytes one call of ``fn`` moves if every ATen op reads its inputs and writes its outputs
    once (views are free): the unfused model of eager PyTorch, counted by running it."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not getattr(func, "is_view", False):
                Counter.total += sum(_distinct_bytes(t) for t in tree_flatten((args, kwargs, out))[0]
                                     if isinstance(t, torch.Tensor))
            return out

    with Counter():
        fn()
    return Counter.total


def kernel_of(case: str) -> str:
    return "cam_post" if case in CAM_CASES else "eps_loss"


def cam_view_sizes(case: str) -> list[tuple[int, int]]:
    """(h, w) of the 8 views: round(H*s/8) x round(W*s/8) per scale, twice (plain, flipped)."""
    H, W, _, _ = CAM_CASES[case]
    return [(round(H * s / CAM_STRIDE), round(W * s / CAM_STRIDE))
            for s in CAM_SCALES for _ in range(2)]


def build_cam_inputs(case: str, dtype: torch.dtype, device: torch.device):
    """Seeded (views, flips, labels, out_size): each view softmax(randn*3 + per-class bias) over
    K (the EPS head's output), flips alternating; L distinct labelled classes (CPU labels)."""
    H, W, K, L = CAM_CASES[case]
    g = torch.Generator().manual_seed(SEED)
    views, flips = [], []
    for i, (h, w) in enumerate(cam_view_sizes(case)):
        logits = torch.randn(K, h, w, generator=g) * 3 + torch.randn(K, 1, 1, generator=g) * 2
        views.append(torch.softmax(logits, dim=0).to(dtype).to(device))
        flips.append(i % 2 == 1)
    labels = torch.zeros(K - 1)
    labels[torch.randperm(K - 1, generator=g)[:L]] = 1.0
    return views, flips, labels, (H, W)


def cam_ideal_bytes(case: str, dtype: torch.dtype, mode: str) -> int:
    H, W, K, L = CAM_CASES[case]
    esize = torch.empty((), dtype=dtype).element_size()
    views = sum(L * h * w * esize for h, w in cam_view_sizes(case))
    return views + H * W + (L * H * W * 4 if mode == "mask_norm" else 0)


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
    src = dst = None                      # free before emptying the cache
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
    leaf = cam.detach().clone().requires_grad_(True)          # clone keeps the layout

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
            moved = (triton_bytes(case, dtype, mode) if prov == "triton" else
                     eager_bytes(fn) if prov == "eager" else None)
            rows.append(dict(kernel="eps_loss", case=case, provider=prov, mode=mode, ms=ms,
                             gbs=gbs, ideal_bytes=ideal_bytes(case, dtype, mode),
                             bytes_moved=moved, layout=CASE_LAYOUT.get(case, "contiguous"),
                             frac_of_copy_bw=gbs / copy_bw if copy_bw else None,
                             peak_mib=peak_mib(fn) if cuda else None,
                             B=B, K=K, h=h, w=w, S=S))
    return rows


def run_cam_case(case, providers, modes, dtype, reps, copy_bw, fns, cuda, log):
    """Time every (mode, provider) of one cam_post case; check triton's mask against eager's."""
    device = torch.device("cuda" if cuda else "cpu")
    views, flips, labels, out_size = build_cam_inputs(case, dtype, device)
    H, W, K, L = CAM_CASES[case]
    ref = fns["eager"](views, flips, labels, out_size, return_norm=True)
    rows = []
    for mode in modes:
        want_norm = mode == "mask_norm"
        for prov in providers:
            fn = (lambda f=fns[prov], n=want_norm:
                  f(views, flips, labels, out_size, return_norm=n))
            warmup = 0 if (prov == "triton" and not cuda) else 1
            t0 = time.perf_counter()
            ms, out = time_fn(fn, reps=reps, warmup=warmup, cuda=cuda)
            log(f"  {case:<12} {prov:<8} {mode:<9} {ms:10.2f} ms"
                f"   ({time.perf_counter() - t0:.1f} s)")
            if prov == "triton":
                # near-ties may flip under float32 rounding; more than 1e-4 of the pixels won't
                bad = int((out.mask != ref.mask).sum())
                if bad > 1e-4 * H * W:
                    print(f"WARNING: {case} {mode}: triton mask differs from eager at {bad} "
                          f"pixels", flush=True)
                if want_norm:
                    err = (out.norm.float() - ref.norm.float()).abs().max().item()
                    if not err <= 1e-4:
                        print(f"WARNING: {case}: triton norm vs eager max error {err:.3g}",
                              flush=True)
            gbs = cam_ideal_bytes(case, dtype, mode) / (ms * 1e-3) / 1e9
            rows.append(dict(kernel="cam_post", case=case, provider=prov, mode=mode, ms=ms,
                             gbs=gbs, ideal_bytes=cam_ideal_bytes(case, dtype, mode),
                             bytes_moved=None, frac_of_copy_bw=gbs / copy_bw if copy_bw else None,
                             peak_mib=peak_mib(fn) if cuda else None,
                             H=H, W=W, K=K, L=L, V=len(views)))
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
    fmt = "{:<15} {:<8} {:<9} {:>10} {:>9} {:>7} {:>9} {:>8} {:>9} {:>9} {:>8}"
    print(fmt.format("case", "provider", "mode", "ms", "GB/s", "%copy", "peakMiB",
                     "x eager", "x compile", "idealMB", "movedMB"))
    def num(v, spec):                       # small CPU numbers keep 3 significant digits
        return "n/a" if v is None else format(v, spec if abs(v) >= 100 else ".3g")
    for r in rows:
        s = sp.get((r["case"], r["mode"]), {}) if r["provider"] == "triton" else {}
        frac = r["frac_of_copy_bw"]
        print(fmt.format(r["case"], r["provider"], r["mode"], num(r["ms"], ".3f"),
                         num(r["gbs"], ".1f"), num(frac and 100 * frac, ".1f"),
                         num(r["peak_mib"], ".1f"),
                         *(num(s[k], ".2f") if k in s else "" for k in ("vs_eager", "vs_compile")),
                         *(num(r[k] and r[k] / 1e6, ".1f") if r.get(k) is not None else "n/a"
                           for k in ("ideal_bytes", "bytes_moved"))))


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


def resolve_cases(args, cuda: bool) -> list[str]:
    """--cases if given (any kernel's), else the --kernel default (see the module docstring)."""
    all_cases = {**CASES, **CAM_CASES}
    if args.cases:
        return _list(args.cases, all_cases, "cases")
    kernel = args.kernel or ("all" if cuda else "eps_loss")
    kernels = list(KERNELS) if kernel == "all" else [kernel]
    cases = []
    for k in kernels:
        names = list(KERNELS[k][0])
        cases += names if cuda else names[:1]
    return cases


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m epsdist_kernels.bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", choices=(*KERNELS, "all"), default=None,
                   help="whose cases run by default: all of them on CUDA, the first on CPU "
                        "(default: all on CUDA, eps_loss on CPU); --cases overrides")
    p.add_argument("--cases", default=None,
                   help="comma list of " + ", ".join([*CASES, *CAM_CASES]) + " (default: see "
                        "--kernel; on CPU voc_b8_56, where the interpreter needs minutes for "
                        "the others)")
    p.add_argument("--providers", default=None,
                   help="comma list of triton,eager,compile (CPU default: triton,eager)")
    p.add_argument("--modes", default=None,
                   help="comma list of fwd,fwd_bwd (eps_loss) and/or mask,mask_norm (cam_post); "
                        "default: every mode of each case's kernel")
    p.add_argument("--reps", type=int, default=1,
                   help="CPU only: timed calls per row, median reported (default 1: the "
                        "interpreter needs ~4 min for one pass; CUDA rows use do_bench)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="logits (eps_loss) / view maps (cam_post) dtype")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.reps < 1:
        raise SystemExit("--reps: expected >= 1")
    cases = resolve_cases(args, cuda)
    modes = _list(args.modes, MODES + CAM_MODES, "modes") if args.modes else None
    case_modes = {}
    for case in cases:
        kmodes = KERNELS[kernel_of(case)][1]
        case_modes[case] = [m for m in modes if m in kmodes] if modes else list(kmodes)
    skipped = [c for c in cases if not case_modes[c]]
    cases = [c for c in cases if case_modes[c]]
    if not cases:
        raise SystemExit(f"--modes: none of {args.modes!r} applies to the selected cases")
    providers = _list(args.providers or ",".join(PROVIDERS), PROVIDERS, "providers")
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")     # before the kernel module import
        if args.providers is None:
            providers.remove("compile")
    import triton
    from .cam_post import cam_to_mask_triton
    from .cam_post_ref import cam_to_mask_reference
    from .eps_loss import eps_loss_triton
    from .eps_loss_ref import eps_loss_reference
    fns = {"triton": eps_loss_triton, "eager": eps_loss_reference,
           "compile": torch.compile(eps_loss_reference, dynamic=False)}
    cam_fns = {"triton": cam_to_mask_triton, "eager": cam_to_mask_reference,
               "compile": torch.compile(cam_to_mask_reference, dynamic=False)}
    dtype = DTYPES[args.dtype]

    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({cpu}, {os.cpu_count()} cores)"
    versions = dict(python=platform.python_version(), torch=torch.__version__,
                    triton=triton.__version__, cuda=torch.version.cuda)
    print(f"device  {device}")
    print("versions " + "  ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"dtype   {args.dtype} logits / view maps, float32 saliency and labels")
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interp:
        print("NOTE: Triton runs in its CPU interpreter (TRITON_INTERPRET=1): these are smoke "
              "numbers of the code path, NOT performance.")
    if not cuda:
        print(f"NOTE: --reps {args.reps}; cases {','.join(cases)}. One interpreted pass over all "
              "four eps_loss cases takes ~7-10 min on 2 cores (coco_b64_56 ~3 min each); ask "
              "for them with --cases " + ",".join(CASES) + ". cam_post cases only when asked "
              "(--kernel cam_post or --cases cam_voc,cam_coco): one interpreted call takes "
              "~1.5 min (cam_voc) / ~3 min (cam_coco)")
        if args.providers is None:
            print("NOTE: 'compile' skipped on CPU (torch.compile costs ~1 min per case here); "
                  "ask for it with --providers triton,eager,compile")
    for c in skipped:
        print(f"NOTE: case {c} skipped: none of --modes {args.modes} is one of its modes "
              f"({','.join(KERNELS[kernel_of(c)][1])})")
    copy_bw = measure_copy_bandwidth()
    print("copy bandwidth " + (f"{copy_bw:.1f} GB/s" if copy_bw else "n/a (no CUDA)"), flush=True)

    log = lambda msg: print(msg, file=sys.stderr, flush=True)        # noqa: E731
    rows = []
    for case in cases:
        if kernel_of(case) == "cam_post":
            rows += run_cam_case(case, providers, case_modes[case], dtype, args.reps, copy_bw,
                                 cam_fns, cuda, log)
        else:
            rows += run_case(case, providers, case_modes[case], dtype, args.reps, copy_bw,
                             fns, cuda, log)
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
