"""End to end on the synthetic dataset: EPS against the CAM baseline, in minutes.

    python -m epsdist.demo --out runs/demo [--seed S] [--num-gpus N]
        [--num-train N --num-val M] [--json FILE]                      (= make demo)

Runs the same commands a user runs, one after the other, as subprocesses (each is printed
before it runs, with its wall time after it):

  1. data      python -m epsdist.data.synthetic --out OUT/data ...
  2. shards    python -m epsdist.data.shard voc ... --split train / val
  3. train     deepspeed --num_gpus N epsdist/train.py --config configs/synthetic_eps.yaml ...
               and the same with configs/synthetic_cam.yaml (the CAM baseline)
  4. masks     deepspeed ... epsdist/infer.py --cams --panels 8 for both models on the train
               split (pseudo-masks, their mIoU and confusion ratios in OUT/pseudo/*/report.json)
  5. sweep     python -m epsdist.evaluate --cams ... --thresholds ... (the mIoU each model would
               get at every background threshold: a check that the comparison does not hinge
               on the thresholds)
  6. segment   deepspeed ... epsdist/segment.py --config configs/synthetic_seg.yaml on the EPS
               pseudo-masks, evaluated on the val split (OUT/runs/seg_eps/report.json)

then prints one table (pseudo-mask mIoU on train and confusion ratio per context pair for
both models, segmentation mIoU on val for EPS), the TensorBoard and panel directories, the wall
time per stage, and writes a JSON summary (OUT/summary.json, or --json FILE).

With GPUs (``torch.cuda.device_count() > 0``) every distributed stage runs on all of them;
without, on two CPU ranks (gloo). The global batch sizes of the recipes (16 for stage 1, 8 for
the segmentation stage) are kept whatever the rank count. Each model's pseudo-masks use its own
background threshold (``infer.bg_threshold`` on the infer command line: ``--eps-threshold``
0.4, ``--cam-threshold`` 0.55, the best of the sweep on the train split, tuned once as the
paper tunes them); the table names them, and its last column gives each model's best mIoU over
all thresholds, so the comparison does not hinge on the choice.

A run starts from scratch: the demo's own subdirectories of OUT (data, shards, runs, pseudo,
logs) are removed first, but only in a directory an earlier demo made (it leaves a
``.epsdist-demo`` file); elsewhere existing folders of those names are an error. Every
command's full output goes to OUT/logs/; the console shows the main lines (``--verbose``:
everything). A failing command stops the demo with its
command line, exit status and the tail of its output.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import torch

from epsdist.atomic import atomic_path
from epsdist.dist import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"eps": "configs/synthetic_eps.yaml", "cam": "configs/synthetic_cam.yaml",
           "seg": "configs/synthetic_seg.yaml"}
METHODS = (("cam", "CAM baseline"), ("eps", "EPS"))
STAGE1_GLOBAL_BATCH = 16          # synthetic_eps / synthetic_cam: train.global_batch_size
SEG_GLOBAL_BATCH = 8              # synthetic_seg: train.global_batch_size
SUBDIRS = ("data", "shards", "runs", "pseudo", "logs")
MARKER = ".epsdist-demo"          # a directory the demo made, whose SUBDIRS it may replace
SWEEP = "0.05:0.8:0.05"
MIN_GAP = 10.0                    # the effect the demo shows: EPS mIoU >= CAM mIoU + 10 points
# background thresholds of the pseudo-masks (infer.bg_threshold), one per method as in the paper:
# the best of the sweep on the train split for seeds 0, 1 and 2 (EPS: 0.4 for all three; the
# CAM baseline: 0.55, 0.55, 0.6). The sweep column of the table shows each model's own best.
THRESHOLDS = {"eps": 0.4, "cam": 0.55}

# console lines worth showing (the full output is in OUT/logs/)
_SHOW = re.compile(r"^(exported |resumed from |pseudo-mask|val it |wrote |best threshold |"
                   r"stopping at |skipping |error|Error|Traceback|RuntimeError|ValueError|"
                   r"FileNotFoundError|.*ConfigError)")
_PROGRESS = re.compile(r"^it\s+(\d+)/(\d+)")


class StageError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- helpers


def deepspeed_bin() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    found = here if os.path.isfile(here) else shutil.which("deepspeed")
    if not found:
        raise StageError("the `deepspeed` launcher is not installed next to this Python "
                         f"({sys.executable}) nor on PATH: run `make env`")
    return found


def _duration(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{s % 60:04.1f}s"


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _ratio(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise StageError(f"expected {path}, which the last stage should have written")
    with open(path) as f:
        return json.load(f)


class Runner:
    """Runs the stages' commands from the repository root, logs each to OUT/logs/NN_name.log,
    echoes the main lines and keeps the wall time of each."""

    def __init__(self, log_dir: str, verbose: bool, env: dict):
        self.log_dir, self.verbose, self.env = log_dir, verbose, env
        self.times: list[tuple[str, float]] = []
        os.makedirs(log_dir, exist_ok=True)

    def run(self, name: str, cmd: list[str], stage: str | None = None) -> float:
        """Run ``cmd``; ``stage`` groups several commands under one timing line."""
        log_path = os.path.join(self.log_dir, f"{len(self.times) + 1:02d}_{name}.log")
        shown = shlex.join(rel(c) if os.path.isabs(c) else c for c in cmd)
        print(f"\n[{name}] $ {shown}", flush=True)
        t0 = time.perf_counter()
        tail: list[str] = []
        last_progress = -1e9
        with open(log_path, "w", buffering=1) as log:     # line-buffered: tail -f works
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            try:
                for line in proc.stdout:               # text mode: tqdm's \r ends a line too
                    log.write(line)
                    line = line.rstrip()
                    if not line:
                        continue
                    tail = (tail + [line])[-60:]
                    m = _PROGRESS.match(line)
                    if self.verbose:
                        print(f"  {line}", flush=True)
                    elif m:                            # training progress: every ~10 s
                        now = time.perf_counter()
                        if now - last_progress >= 10 or m.group(1) == m.group(2):
                            print(f"  {line}", flush=True)
                            last_progress = now
                    elif _SHOW.match(line) and "%|" not in line:     # not tqdm bars
                        print(f"  {line}", flush=True)
                code = proc.wait()
            except BaseException:                      # Ctrl-C: do not leave ranks behind
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
        seconds = time.perf_counter() - t0
        self.times.append((name, seconds))
        if code != 0:
            tail_text = "\n".join(f"  | {t}" for t in tail[-40:])
            raise StageError(f"[{name}] failed with exit status {code} after "
                             f"{_duration(seconds)}:\n  $ {shown}\n"
                             f"last lines of its output (all of it: {log_path}):\n{tail_text}")
        print(f"[{name}] done in {_duration(seconds)}", flush=True)
        return seconds


# ----------------------------------------------------------------------------- the pipeline


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m epsdist.demo",
                                description="EPS vs the CAM baseline on the synthetic dataset, "
                                            "end to end (data, shards, stage 1, pseudo-masks, "
                                            "segmentation), with one table at the end.")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="dataset and training seed (default 0)")
    p.add_argument("--num-gpus", type=int, default=None,
                   help="ranks per distributed stage (default: the CUDA devices here, or 2 CPU "
                        "ranks without any)")
    p.add_argument("--num-train", type=int, default=400, help="synthetic train images (400)")
    p.add_argument("--num-val", type=int, default=100, help="synthetic val images (100)")
    p.add_argument("--size", type=int, default=112, help="synthetic image side (112)")
    p.add_argument("--iters", type=int, default=None,
                   help="stage-1 iterations of both models (default: the recipes' "
                        "train.max_iters)")
    p.add_argument("--seg-iters", type=int, default=None,
                   help="segmentation iterations (default: synthetic_seg.yaml's)")
    p.add_argument("--eps-threshold", type=float, default=THRESHOLDS["eps"],
                   help=f"EPS pseudo-mask background threshold ({THRESHOLDS['eps']:g})")
    p.add_argument("--cam-threshold", type=float, default=THRESHOLDS["cam"],
                   help=f"CAM-baseline background threshold ({THRESHOLDS['cam']:g})")
    for m, what in (("eps", "EPS"), ("cam", "CAM-baseline"), ("seg", "segmentation")):
        p.add_argument(f"--{m}-config", default=os.path.join(REPO, CONFIGS[m]),
                       help=f"{what} recipe (default {CONFIGS[m]}); the demo sets the shard "
                            f"and run directories, the seed and the options above")
    p.add_argument("--panels", type=int, default=8, help="PNG panels per model (8)")
    p.add_argument("--json", default=None, help="summary file (default OUT/summary.json)")
    p.add_argument("--no-seg", action="store_true", help="stop after the pseudo-masks")
    p.add_argument("--check", action="store_true",
                   help=f"exit with status 3 unless EPS's pseudo-mask mIoU is >= the "
                        f"baseline's + {MIN_GAP:g} and its mean confusion ratio is lower")
    p.add_argument("--verbose", action="store_true", help="echo every line of every command")
    a = p.parse_args(argv)
    for name in ("num_train", "seed", "panels"):
        if getattr(a, name) < (1 if name == "num_train" else 0):
            p.error(f"--{name.replace('_', '-')} is out of range: {getattr(a, name)}")
    if a.num_val < 1 and not a.no_seg:
        p.error("--num-val must be >= 1 (the segmentation stage is evaluated on val)")
    if a.num_gpus is not None and a.num_gpus < 1:
        p.error("--num-gpus must be >= 1")
    for name in ("eps_threshold", "cam_threshold"):
        if not 0 <= getattr(a, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    for name in ("iters", "seg_iters"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def rel(path: str) -> str:
    """``path`` relative to the repository root when it is inside it (shorter commands)."""
    path = os.path.abspath(path)
    r = os.path.relpath(path, REPO)
    return path if r.startswith("..") else r


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    out = os.path.abspath(a.out)
    if os.path.exists(out) and not os.path.isdir(out):
        print(f"error: --out {a.out} exists and is not a directory", file=sys.stderr)
        return 2
    old = [d for d in SUBDIRS if os.path.exists(os.path.join(out, d))]
    if old and not os.path.exists(os.path.join(out, MARKER)):
        print(f"error: --out {a.out} already holds {', '.join(d + '/' for d in old)} that no "
              f"demo made (no {MARKER} file there); the demo replaces those folders, so give it "
              f"a new or empty directory", file=sys.stderr)
        return 2
    if old:
        print(f"removing the previous demo's {', '.join(old)} in {rel(out)}", flush=True)
        for d in old:
            shutil.rmtree(os.path.join(out, d))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, MARKER), "w") as f:
        f.write("written by python -m epsdist.demo: its next run replaces "
                f"{', '.join(SUBDIRS)} here\n")

    gpus = torch.cuda.device_count()
    on_gpu = gpus > 0
    ranks = a.num_gpus or gpus or 2
    print(f"epsdist demo: seed {a.seed}, {a.num_train} train + {a.num_val} val images of "
          f"{a.size}px, {ranks} {'GPU' if on_gpu else 'CPU'} ranks; output {rel(out)}",
          flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)         # the interpreter is for the kernel tests only
    if not on_gpu and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // ranks))
    # On CPU, DeepSpeed JIT-compiles a C++ op (its shared-memory allreduce) when a rank starts,
    # cached in ~/.cache/torch_extensions/<python, cuda>: one directory for every environment of
    # that Python, so with two checkouts (two venvs) on one machine every launch rebuilds it
    # (a minute or more) or waits on the other's build lock. A cache per environment is built
    # once.
    if "TORCH_EXTENSIONS_DIR" not in env and os.access(sys.prefix, os.W_OK):
        env["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    ext = env.get("TORCH_EXTENSIONS_DIR")
    if not on_gpu and ext and not glob.glob(os.path.join(ext, "deepspeed_shm_comm", "*.so")):
        print(f"note: the first DeepSpeed launch in this environment compiles DeepSpeed's "
              f"shared-memory op (once, about 1-2 min on 2 cores; cached in {rel(ext)})",
              flush=True)
    thresholds = {"eps": a.eps_threshold, "cam": a.cam_threshold}
    configs = {m: rel(getattr(a, f"{m}_config")) for m in CONFIGS}
    stage1_batch = ranks * -(-STAGE1_GLOBAL_BATCH // ranks)
    seg_batch = ranks * -(-SEG_GLOBAL_BATCH // ranks)
    try:
        py, ds = sys.executable, deepspeed_bin()
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    runner = Runner(os.path.join(out, "logs"), a.verbose, env)
    d = {k: rel(os.path.join(out, k)) for k in SUBDIRS}

    def launch(script):
        return [ds, "--num_gpus", str(ranks), "--master_port", str(free_port()),
                os.path.join("epsdist", script)]

    try:
        runner.run("data", [py, "-m", "epsdist.data.synthetic", "--out", d["data"],
                            "--num-train", str(a.num_train), "--num-val", str(a.num_val),
                            "--seed", str(a.seed), "--size", str(a.size),
                            "--workers", str(min(4, os.cpu_count() or 1)), "--no-progress"])
        splits = ["train"] + (["val"] if a.num_val > 0 else [])
        for split in splits:
            runner.run(f"shard_{split}", [py, "-m", "epsdist.data.shard", "voc", "--root",
                                          d["data"], "--saliency", f"{d['data']}/saliency",
                                          "--split", split, "--out", f"{d['shards']}/{split}"])
        for m, label in reversed(METHODS):                         # EPS first, then CAM
            over = [f"data.train_shards={d['shards']}/train", f"run.dir={d['runs']}/{m}",
                    f"seed={a.seed}"]
            if stage1_batch != STAGE1_GLOBAL_BATCH:
                over.append(f"train.global_batch_size={stage1_batch}")
            if a.iters is not None:
                over.append(f"train.max_iters={a.iters}")
            runner.run(f"train_{m}", launch("train.py") + ["--config", configs[m], *over])
        for m, label in reversed(METHODS):
            runner.run(f"masks_{m}", launch("infer.py") + [
                "--config", configs[m], "--checkpoint", f"{d['runs']}/{m}/export/model.pt",
                "--shards", f"{d['shards']}/train", "--out", f"{d['pseudo']}/{m}", "--cams",
                "--panels", str(a.panels), f"infer.bg_threshold={thresholds[m]:g}"])
        for m, label in reversed(METHODS):
            runner.run(f"sweep_{m}", [py, "-m", "epsdist.evaluate", "--cams",
                                      f"{d['pseudo']}/{m}/cams", "--gt", f"{d['shards']}/train",
                                      "--thresholds", SWEEP, "--json",
                                      f"{d['pseudo']}/{m}/sweep.json"])
        if not a.no_seg:
            over = [f"data.train_shards={d['pseudo']}/eps/shards",
                    f"data.val_shards={d['shards']}/val", f"run.dir={d['runs']}/seg_eps",
                    f"seed={a.seed}"]
            if seg_batch != SEG_GLOBAL_BATCH:
                over.append(f"train.global_batch_size={seg_batch}")
            if a.seg_iters is not None:
                over.append(f"train.max_iters={a.seg_iters}")
            runner.run("segment_eps", launch("segment.py") + ["--config", configs["seg"], *over])
    except StageError as e:
        print(f"\nerror: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130

    figure = None
    if a.panels > 0:
        figure = compare_panels(os.path.join(REPO, d["pseudo"], "cam", "panels"),
                                os.path.join(REPO, d["pseudo"], "eps", "panels"),
                                os.path.join(out, "cam_vs_eps.png"))
    total = time.perf_counter() - t_start
    summary = summarise(a, out, d, thresholds, ranks, on_gpu, runner.times, total, configs)
    summary["figure"] = rel(figure) if figure else None
    print()
    print(format_table(summary))
    json_path = a.json or os.path.join(out, "summary.json")
    from epsdist.report import write_json
    write_json(json_path, summary)
    print(f"\nsummary: {rel(json_path)}")
    if a.check and not summary["effect"]["reproduced"]:
        return 3
    return 0


# ----------------------------------------------------------------------------- the figure


def compare_panels(cam_dir: str, eps_dir: str, out_path: str, n: int = 3,
                   scale: int = 2) -> str | None:
    """One PNG with the first ``n`` images' panels of both models, the CAM baseline's row
    above EPS's (image | saliency | map per labelled class | pseudo-mask | ground truth).
    Returns the path, or None when there are no panels in common."""
    from PIL import Image, ImageDraw

    keys = sorted(set(os.listdir(cam_dir)) & set(os.listdir(eps_dir)))[:n]
    if not keys:
        return None
    rows = [(label, Image.open(os.path.join(d, k)).convert("RGB"))
            for k in keys for label, d in (("CAM", cam_dir), ("EPS", eps_dir))]
    margin, gap = 34, 6
    width = margin + max(im.width for _, im in rows)
    height = sum(im.height + (gap if i % 2 else 0) for i, (_, im) in enumerate(rows))
    sheet = Image.new("RGB", (width, height), "white")
    draw, y = ImageDraw.Draw(sheet), 0
    for i, (label, im) in enumerate(rows):
        sheet.paste(im, (margin, y))
        draw.text((4, y + im.height // 2 - 5), label, fill="black")
        y += im.height + (gap if i % 2 else 0)
    sheet = sheet.resize((width * scale, height * scale), Image.NEAREST)
    with atomic_path(out_path) as tmp:
        sheet.save(tmp, format="PNG")
    return out_path


# ----------------------------------------------------------------------------- the summary


def summarise(a, out, d, thresholds, ranks, on_gpu, times, total, configs=CONFIGS) -> dict:
    methods = {}
    for m, label in METHODS:
        report = read_json(os.path.join(REPO, d["pseudo"], m, "report.json"))
        sweep = read_json(os.path.join(REPO, d["pseudo"], m, "sweep.json"))["sweep"]
        cr = report.get("confusion_ratio") or {"pairs": [], "mean": None}
        methods[m] = {
            "label": label, "config": configs[m], "bg_threshold": thresholds[m],
            "pseudo_mask_miou": report["mean_iou"],
            "iou": dict(zip(report["class_names"], report["iou"])),
            "confusion_ratio": {p["name"]: p["ratio"] for p in cr["pairs"]},
            "confusion_ratio_mean": cr["mean"],
            "sweep_best_threshold": sweep["best_threshold"],
            "sweep_best_miou": sweep["best_mean_iou"],
            "report": os.path.join(d["pseudo"], m, "report.json"),
            "panels": os.path.join(d["pseudo"], m, "panels"),
            "tensorboard": os.path.join(d["runs"], m, "tb"),
        }
    seg = None
    if not a.no_seg:
        r = read_json(os.path.join(REPO, d["runs"], "seg_eps", "report.json"))
        seg = {"val_miou": r["mean_iou"], "iou": r["iou"],
               "report": os.path.join(d["runs"], "seg_eps", "report.json"),
               "tensorboard": os.path.join(d["runs"], "seg_eps", "tb"),
               "val_pred": os.path.join(d["runs"], "seg_eps", "val_pred")}
        methods["eps"]["segmentation_val_miou"] = r["mean_iou"]
    eps, cam = methods["eps"], methods["cam"]
    gap = 100 * (eps["pseudo_mask_miou"] - cam["pseudo_mask_miou"])
    pairs = [k for k in eps["confusion_ratio"] if k in cam["confusion_ratio"]]

    def lower(x, y):
        return x is not None and y is not None and not math.isnan(x) and (
            math.isnan(y) or x < y)

    lower_pairs = [k for k in pairs if lower(eps["confusion_ratio"][k], cam["confusion_ratio"][k])]
    mean_lower = lower(eps["confusion_ratio_mean"], cam["confusion_ratio_mean"])
    effect = {"miou_gap_points": gap, "min_gap_points": MIN_GAP,
              "sweep_best_gap_points": 100 * (eps["sweep_best_miou"] - cam["sweep_best_miou"]),
              "mean_confusion_ratio_lower": mean_lower,
              "pairs_lower": lower_pairs, "pairs": pairs,
              "reproduced": gap >= MIN_GAP and mean_lower}
    return {"seed": a.seed, "num_train": a.num_train, "num_val": a.num_val, "size": a.size,
            "ranks": ranks, "device": "cuda" if on_gpu else "cpu", "out": rel(out),
            "methods": methods, "segmentation": seg, "effect": effect,
            "stage_seconds": {n: round(s, 2) for n, s in times},
            "total_seconds": round(total, 2), "tensorboard_logdir": d["runs"]}


def format_table(s: dict) -> str:
    eps, cam = s["methods"]["eps"], s["methods"]["cam"]
    pairs = s["effect"]["pairs"]
    lines = [f"EPS vs the CAM baseline on the synthetic dataset (seed {s['seed']}, "
             f"{s['num_train']} train / {s['num_val']} val images, {s['ranks']} "
             f"{s['device'].upper()} ranks)", "",
             "| | bg threshold | pseudo-mask mIoU (train) | confusion ratio per context pair "
             "(mean) | segmentation mIoU (val) | best mIoU over thresholds |",
             "|---|---|---|---|---|---|"]
    for m in (cam, eps):
        ratios = ", ".join(f"{k} {_ratio(m['confusion_ratio'][k])}" for k in pairs)
        seg = _pct(m.get("segmentation_val_miou")) if "segmentation_val_miou" in m else ""
        lines.append(f"| {m['label']} | {m['bg_threshold']:g} | {_pct(m['pseudo_mask_miou'])} "
                     f"| {ratios} ({_ratio(m['confusion_ratio_mean'])}) | {seg} | "
                     f"{_pct(m['sweep_best_miou'])} (at {m['sweep_best_threshold']:g}) |")
    e = s["effect"]
    verdict = ("reproduced" if e["reproduced"] else "NOT reproduced")
    lines += ["", f"EPS - CAM: {e['miou_gap_points']:+.1f} mIoU points (at the best thresholds "
              f"{e['sweep_best_gap_points']:+.1f}); confusion ratio lower for "
              f"{len(e['pairs_lower'])} of {len(pairs)} pairs, mean "
              f"{'lower' if e['mean_confusion_ratio_lower'] else 'NOT lower'} -> the paper's "
              f"effect (>= {e['min_gap_points']:g} points, lower confusion) is {verdict}", ""]
    lines.append(f"TensorBoard:  tensorboard --logdir {s['tensorboard_logdir']}   "
                 f"(runs eps, cam, seg_eps)")
    lines.append(f"panels:       {eps['panels']}/  {cam['panels']}/   (image | saliency | CAM "
                 f"per class | pseudo-mask | ground truth)")
    if s.get("figure"):
        lines.append(f"side by side: {s['figure']}   (CAM baseline above EPS, first 3 images)")
    if s["segmentation"]:
        lines.append(f"segmentation: {s['segmentation']['report']}, val predictions in "
                     f"{s['segmentation']['val_pred']}/")
    lines.append("")
    lines.append("wall time per stage: " + ", ".join(
        f"{n} {_duration(t)}" for n, t in s["stage_seconds"].items()))
    lines.append(f"total: {_duration(s['total_seconds'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
