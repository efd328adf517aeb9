"""The machine description, the verdict against the goals of BENCHMARKS.md and the markdown
table to paste there."""
from __future__ import annotations

import os
import platform
import subprocess

import torch

# BENCHMARKS.md goals. The training-step goals are stated for an H200.
LOSS_GOALS_MS = {"voc_b8_56": 0.05, "coco_b16_41": 0.05, "coco_b64_56": 0.12}
TRAIN_GOALS_IPS = {"voc": 200.0, "coco": 380.0}
MASK_GOALS_MS = {"voc": 15.0, "coco": 20.0}


def driver_version() -> str:
    """The NVIDIA driver version (nvidia-smi, else /proc/driver/nvidia/version), or 'unknown'."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/driver/nvidia/version") as fh:
            words = fh.readline().split()
        return next((w for w in words if w[:1].isdigit() and "." in w), "unknown")
    except OSError:
        return "unknown"


def environment(device: torch.device) -> dict:
    import triton
    env = dict(python=platform.python_version(), torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda,
               cudnn=(torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                      else None),
               triton_interpret=os.environ.get("TRITON_INTERPRET", "0") == "1")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(card=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), driver=driver_version(),
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    else:
        cpu = platform.processor() or platform.machine()
        env.update(card=f"CPU ({cpu}, {os.cpu_count()} cores)", driver=None)
    return env


def _best(rows, key, field, better, variants=None):
    rows = [r for r in rows if r["size"] == key and r.get(field) is not None
            and (variants is None or r["variant"] in variants)]
    return better(rows, key=lambda r: r[field]) if rows else None


def verdict(result: dict) -> list[dict]:
    """One line per goal: target, measured (the fused fp32 loss row; the fastest training
    variant; the fastest of infer.py's pseudo-mask settings: one image per forward, its
    default ``infer.batch_images`` ('batched'), and that with infer.compile), met (None at
    smoke sizes or when not measured)."""
    smoke = result["smoke"]
    out = []
    loss = {r["case"]: r for r in result["speed"]["loss"]
            if r["provider"] == "triton" and r["dtype"] == "fp32" and r["layout"] == "contiguous"
            and r.get("ms") is not None}
    for case, goal in LOSS_GOALS_MS.items():
        r = loss.get(case)
        out.append(dict(goal=f"EPS loss fwd+bwd {case} (fused, fp32)", target=f"<= {goal} ms",
                        measured=None if r is None else f"{r['ms']:.4g} ms",
                        met=None if (r is None or smoke) else r["ms"] <= goal))
    for key, goal in TRAIN_GOALS_IPS.items():
        r = _best(result["speed"]["train"], key, "img_per_s", max)
        out.append(dict(goal=f"stage-1 step {key.upper()} (best variant)",
                        target=f">= {goal:g} img/s (H200)",
                        measured=(None if r is None
                                  else f"{r['img_per_s']:.1f} img/s ({r['variant']})"),
                        met=None if (r is None or smoke) else r["img_per_s"] >= goal))
    for key, goal in MASK_GOALS_MS.items():
        r = _best(result["speed"]["masks"], key, "ms_per_image", min)
        out.append(dict(goal=f"pseudo-mask step per {key.upper()} image (infer.py, best of "
                             f"batch_images=1 / default / + infer.compile)",
                        target=f"<= {goal:g} ms",
                        measured=(None if r is None
                                  else f"{r['ms_per_image']:.2f} ms ({r['variant']})"),
                        met=None if (r is None or smoke) else r["ms_per_image"] <= goal))
    return out


def _num(v, spec=".3g"):
    return "—" if v is None else format(v, spec)


def _mask_cell(row):
    """ms per image, and the images per forward when several."""
    if not row or row.get("ms_per_image") is None:
        return "—"
    n = row.get("images_per_forward", 1)
    return f"{row['ms_per_image']:.2f}" + (f" ({n}/forward)" if n > 1 else "")


def _met(m):
    return {True: "yes", False: "**no**", None: "n/a"}[m]


def markdown(result: dict) -> str:
    env, spd = result["environment"], result["speed"]
    bw = result.get("copy_bandwidth_gbs")
    smoke = result["smoke"]
    lines = [f"GPU check ({'smoke sizes, NOT performance' if smoke else 'full sizes'}), "
             f"{result['date']}, `python -m epsdist.gpucheck{' --smoke' if smoke else ''}`",
             "",
             "| card | driver | CUDA | cuDNN | torch | triton | copy bandwidth |",
             "|---|---|---|---|---|---|---|",
             f"| {env.get('card')} | {env.get('driver') or '—'} | {env.get('cuda') or '—'} | "
             f"{env.get('cudnn') or '—'} | {env.get('torch')} | {env.get('triton')} | "
             f"{_num(bw, '.0f') + ' GB/s' if bw else '—'} |",
             ""]
    checks = result["correctness"]
    failed = [c for c in checks if not c["ok"]]
    lines += [f"Correctness: **{'PASS' if checks and not failed else 'FAIL'}** "
              f"({len(checks) - len(failed)} of {len(checks)} checks passed"
              + (f"; errors in {len(result['errors'])} sections" if result["errors"] else "")
              + (f"; {len(result['skipped'])} items skipped (time budget)"
                 if result["skipped"] else "") + ")", "",
              "| goal | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {v['goal']} | {v['target']} | {v['measured'] or 'not measured'} | "
              f"{_met(v['met'])} |" for v in result["verdict"]]
    by = {}
    for r in spd["loss"]:
        by.setdefault((r["case"], r["dtype"], r["layout"]), {})[r["provider"]] = r
    if by:
        lines += ["", "EPS loss fwd+bwd, ms (median):", "",
                  "| case | logits | fused | eager | compile | bytes floor | fused / floor |",
                  "|---|---|---|---|---|---|---|"]
        for (case, dt, layout), p in by.items():
            t = p.get("triton", {})
            lines.append(f"| {case} | {dt} {layout} | {_num(t.get('ms'), '.4g')} | "
                         f"{_num(p.get('eager', {}).get('ms'), '.4g')} | "
                         f"{_num(p.get('compile', {}).get('ms'), '.4g')} | "
                         f"{_num(t.get('floor_ms') and 1e3 * t['floor_ms'], '.3g')} µs | "
                         f"{_num(t.get('x_floor'), '.1f')}x |")
    variants = ["fp32", "bf16", "bf16+cl", "bf16+cl+compile"]
    tr = {(r["size"], r["variant"]): r for r in spd["train"]}
    if tr:
        lines += ["", "Stage-1 training step, img/s (fused loss, SGD):", "",
                  "| size | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
        for key, size in result["plan"]["train_sizes"].items():
            lines.append(f"| {key.upper()} B={size['batch']} {size['size']}² | " + " | ".join(
                _num(tr.get((key, v), {}).get("img_per_s"), ".1f") for v in variants) + " |")
    mk = {(r["size"], r["variant"]): r for r in spd["masks"]}
    io = {r["size"]: r for r in spd["cpu_io"]}
    if mk or io:
        lines += ["", "Pseudo-mask step, ms per image (8 views + CAM post-processing; CPU decode "
                  "and encode apart):", "",
                  "| size | 1 image per forward | infer.batch_images (default) | + infer.compile "
                  "| CPU JPEG decode | CPU PNG encode |",
                  "|---|---|---|---|---|---|"]
        for key, size in result["plan"]["mask_sizes"].items():
            lines.append(f"| {key.upper()} {size['height']}x{size['width']} | "
                         f"{_num(mk.get((key, 'eager'), {}).get('ms_per_image'), '.2f')} | "
                         f"{_mask_cell(mk.get((key, 'batched')))} | "
                         f"{_mask_cell(mk.get((key, 'compile')))} | "
                         f"{_num(io.get(key, {}).get('decode_ms'), '.2f')} | "
                         f"{_num(io.get(key, {}).get('encode_ms'), '.2f')} |")
    if failed or result["errors"]:
        lines += ["", "Failures:", ""]
        lines += [f"- {c['check']}: {c['detail']}" for c in failed]
        lines += [f"- error in {e['section']} ({e['what']}): {e['error']}"
                  for e in result["errors"] if e["section"] != "correctness"]
    return "\n".join(lines) + "\n"
