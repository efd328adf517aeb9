"""``python -m epsdist.gpucheck``: run the sections in order under one time budget, each item
in its own try/except (an error is recorded and the run goes on), then print the verdict and
the markdown table and write the JSON."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
import traceback

import torch

SECTIONS = ("correctness", "loss", "train", "masks", "compile")


class Runner:
    """Runs named items under a global time budget; collects results, errors and skips."""

    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.errors, self.skipped = [], []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def run(self, section: str, what: str, fn, sink: list, min_left: float = 0.0):
        """``fn()``'s result appended to ``sink`` (a list result: extended); None when skipped
        (less than ``min_left`` seconds of the budget left) or failed (recorded)."""
        left = self.budget_s - self.elapsed()
        if left < min_left:
            self.skipped.append(dict(section=section, what=what, reason=f"time budget: "
                                     f"{left:.0f} s left, needs ~{min_left:.0f} s"))
            self.log(f"[{self.elapsed():6.1f}s] SKIP {section}: {what} (time budget)")
            return None
        self.log(f"[{self.elapsed():6.1f}s] {section}: {what}")
        try:
            out = fn()
        except Exception as e:                                  # noqa: BLE001 -- recorded
            err = f"{type(e).__name__}: {e}".strip()
            self.errors.append(dict(section=section, what=what, error=err[:2000]))
            self.log(f"  ERROR in {section} ({what}): {err[:500]}")
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            if section == "correctness":
                sink.append(dict(check=what, ok=False, detail=f"raised {err[:300]}"))
            from .workload import free_memory
            try:
                free_memory()
            except Exception:                                   # noqa: BLE001
                pass
            return None
        if isinstance(out, list):
            sink.extend(out)
        else:
            sink.append(out)
        return out


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m epsdist.gpucheck",
        description="Prove the GPU path (kernels vs references, fused vs reference training "
                    "run) and measure every speed goal of BENCHMARKS.md on one GPU; prints a "
                    "verdict and a markdown table for BENCHMARKS.md.")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (tiny backbone, small inputs): the same code path in well "
                        "under a minute on a CPU (Triton's interpreter); not performance")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the results here")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma list of " + ",".join(SECTIONS) + " (default: all; 'compile' "
                        "is the torch.compile rows -- the loss reference (with 'loss'), "
                        "train.compile, infer.compile -- run last)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps of the fused-vs-reference training runs (default 20; smoke 2)")
    p.add_argument("--timed-steps", type=int, default=None,
                   help="timed training steps per speed row (default 10; smoke 1)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="time budget of the whole run in seconds; items that would start past "
                        "it are skipped and listed (default 300; smoke 600)")
    p.add_argument("--backbone", choices=("resnet38", "resnet50", "resnet101", "tiny"),
                   default=None, help="stage-1 backbone (default resnet38; smoke: tiny)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when available (and TRITON_INTERPRET is not 1), else CPU")
    args = p.parse_args(argv)
    for name in ("steps", "timed_steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {v}")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error(f"--budget-s: expected > 0, got {args.budget_s}")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        p.error(f"--sections: unknown {bad or args.sections!r}; choose from {', '.join(SECTIONS)}")
    args.sections = sections
    return args


def pick_device(choice: str) -> torch.device:
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available() and not interp):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible to torch")
        if interp:
            raise SystemExit("--device cuda with TRITON_INTERPRET=1: unset TRITON_INTERPRET to "
                             "run the compiled kernels")
        return torch.device("cuda")
    # the interpreter must be on before the kernel modules are imported
    os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu")


def correctness_section(run, plan, device, out):
    """Never skipped for time: correctness is the point of the run."""
    from . import correctness as C
    always = float("-inf")
    for name, shape in plan.loss_cases.items():
        for dt in plan.dtypes:
            for layout in ("contiguous", "channels_last"):
                run.run("correctness", f"eps_loss {name} {dt} {layout}",
                        lambda n=name, s=shape, d=dt, lo=layout:
                        C.eps_kernel_check(n, s, d, lo, device), out, min_left=always)
    for name, size in plan.cam_cases.items():
        for dt in plan.dtypes:
            for layout in ("contiguous", "channels_last"):
                run.run("correctness", f"cam_post {name} {dt} {layout}",
                        lambda n=name, s=size, d=dt, lo=layout:
                        C.cam_kernel_check(n, s, d, lo, device), out, min_left=always)
    for precision in ("fp32", "bf16"):
        run.run("correctness", f"stage-1 run voc {precision}",
                lambda p=precision: C.training_run_check(plan, "voc", p, device, run.log), out,
                min_left=always)
    for c in out:
        if not c["ok"]:
            run.log(f"  FAIL {c['check']}: {c['detail']}")


def loss_cases(plan):
    cases = [(n, s, "fp32", "contiguous") for n, s in plan.loss_cases.items()]
    return cases + [(n, plan.loss_cases[c], "bf16", "channels_last")
                    for n, c in plan.train_layout_cases.items()]


def loss_section(run, plan, device, copy_bw, out, compiled: bool):
    """The loss rows of one provider set: fused + eager, or (in 'compile') torch.compile."""
    from . import speed as S
    section = "compile" if compiled else "loss"
    got = []
    run.run(section, "loss providers", lambda: S.loss_providers(plan, compiled), got)
    for name, shape, dt, layout in (loss_cases(plan) if got else []):
        rows = run.run(section, f"loss {name} {dt} {layout}",
                       lambda n=name, s=shape, d=dt, lo=layout:
                       S.loss_rows(plan, n, s, d, lo, got[0], copy_bw, device, run.log),
                       out, min_left=30 if compiled and not plan.smoke else 10)
        run.errors += [dict(section=section, what=f"{r['case']} {r['provider']}",
                            error=r["error"]) for r in rows or [] if r.get("error")]


def speed_sections(run, plan, device, copy_bw, want, results):
    """loss, train, masks; then the compile rows (slowest to warm up) last."""
    from . import speed as S
    if "loss" in want:
        loss_section(run, plan, device, copy_bw, results["loss"], compiled=False)
    if "train" in want:
        for key in plan.train_sizes:
            for variant in ("fp32", "bf16", "bf16+cl"):
                run.run("train", f"{key} {variant}",
                        lambda k=key, v=variant: S.train_row(plan, k, v, device, run.log),
                        results["train"], min_left=15)
    if "masks" in want:
        for key in plan.mask_sizes:
            for variant in ("eager", "batched"):
                run.run("masks", f"{key} {variant}",
                        lambda k=key, v=variant: S.mask_row(plan, k, v, device, run.log),
                        results["masks"], min_left=10)
            run.run("masks", f"{key} CPU decode/encode",
                    lambda k=key: S.cpu_io_row(plan, k, run.log), results["cpu_io"])
    if "compile" in want:                     # the config switches first, then the loss
        need = 0 if plan.smoke else 90           # inductor compiles of ResNet-38: ~1 min each
        for key in plan.train_sizes:
            run.run("compile", f"train {key} bf16+cl+compile",
                    lambda k=key: S.train_row(plan, k, "bf16+cl+compile", device, run.log),
                    results["train"], min_left=need)
        for key in plan.mask_sizes:
            run.run("compile", f"masks {key} infer.compile",
                    lambda k=key: S.mask_row(plan, k, "compile", device, run.log),
                    results["masks"], min_left=need)
        if "loss" in want:
            loss_section(run, plan, device, copy_bw, results["loss"], compiled=True)
    S.add_rel_to_eager(results["loss"])


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    from . import report as R
    from .workload import Plan
    if not args.smoke and device.type != "cuda":
        print("gpucheck: no CUDA device (or --device cpu): the full sizes need a GPU; run "
              "`python -m epsdist.gpucheck --smoke` for the same code path at tiny sizes",
              file=sys.stderr)
        return 2
    plan = Plan.smoke_plan() if args.smoke else Plan.full()
    for arg, attr in (("steps", "run_steps"), ("timed_steps", "timed_steps"),
                      ("budget_s", "budget_s"), ("backbone", "backbone")):
        if getattr(args, arg):
            setattr(plan, attr, getattr(args, arg))
    run = Runner(plan.budget_s)
    want = set(args.sections)
    results = dict(correctness=[], loss=[], train=[], masks=[], cpu_io=[])
    try:
        env = R.environment(device)
    except Exception as e:                                      # noqa: BLE001 -- recorded
        env = dict(card=str(device), driver=None, cuda=torch.version.cuda, torch=torch.__version__,
                   triton=None, error=f"{type(e).__name__}: {e}")
    run.log(f"gpucheck: {env['card']} | driver {env.get('driver') or '—'} | CUDA {env['cuda']} "
            f"| torch {env['torch']} | triton {env['triton']} | {plan.backbone} | budget "
            f"{plan.budget_s:.0f} s")
    if device.type != "cuda":
        run.log("NOTE: no CUDA: kernels run in Triton's interpreter, torch.compile uses the "
                "'eager' backend; these numbers only show that the path runs (smoke sizes)")
    from epsdist_kernels.bench import measure_copy_bandwidth, write_json
    bw = []
    run.run("setup", "copy bandwidth", measure_copy_bandwidth, bw)
    copy_bw = bw[0] if bw else None
    if copy_bw:
        run.log(f"  copy bandwidth {copy_bw:.0f} GB/s")
    if "correctness" in want:
        correctness_section(run, plan, device, results["correctness"])
    speed_sections(run, plan, device, copy_bw, want, results)

    result = dict(
        smoke=plan.smoke, device=str(device), date=datetime.date.today().isoformat(),
        environment=env, copy_bandwidth_gbs=copy_bw, sections=sorted(want, key=SECTIONS.index),
        plan=dataclasses.asdict(plan), correctness=results["correctness"],
        speed=dict(loss=results["loss"], train=results["train"], masks=results["masks"],
                   cpu_io=results["cpu_io"]),
        errors=run.errors, skipped=run.skipped)
    failed = [c for c in result["correctness"] if not c["ok"]]
    result["correctness_ok"] = not failed and ("correctness" not in want
                                               or bool(result["correctness"]))
    report = []
    run.run("report", "verdict and table",
            lambda: (R.verdict(result), R.markdown({**result, "verdict": R.verdict(result)})),
            report)
    result["verdict"], result["markdown"] = report[0] if report else ([], "")
    status = 0 if result["correctness_ok"] and not run.errors else 1
    result["exit_status"] = status
    result["elapsed_s"] = run.elapsed()
    print()
    print(result["markdown"], end="", flush=True)
    if args.json:
        try:
            write_json(args.json, result)
            run.log(f"wrote {args.json}")
        except OSError as e:
            run.log(f"ERROR: could not write --json {args.json}: {e}")
            status = 1
    run.log(f"gpucheck: {'OK' if status == 0 else 'FAILED'} in {run.elapsed():.0f} s (exit "
            f"status {status}: non-zero when a correctness check fails or a step raises; speed "
            f"goals missed are reported, not failures)")
    return status
