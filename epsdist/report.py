"""The evaluation's output: the stdout tables of an evaluation and of a threshold sweep, and
JSON files (``write_json``: atomic, NaN as null, matrix rows on one line) for every report the
project writes.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from epsdist.atomic import atomic_write_bytes


def _pct(x) -> str:
    return "     -" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:6.2f}"


def format_report(r: dict) -> str:
    """The stdout table of an :func:`evaluate` result."""
    names = r["class_names"]
    w = max(12, max(len(n) for n in names) + 2)
    lines = [f"predictions {r['pred']} vs ground truth {r['gt']}: {r['images']} images, "
             f"{r['pixels']} pixels ({r['ignored_pixels']} ignored, {r['unpredicted_pixels']} "
             f"unpredicted)"]
    if r["missing"]:
        lines.append(f"missing predictions: {r['missing']} (left out; first: "
                     f"{', '.join(r['missing_keys'][:5])})")
    lines.append(f"{'class':<{w}}{'IoU':>8}{'prec':>8}{'recall':>8}")
    for i, name in enumerate(names):
        lines.append(f"{name:<{w}}  {_pct(r['iou'][i])}  {_pct(r['precision'][i])}  "
                     f"{_pct(r['recall'][i])}")
    lines.append(f"{'mIoU':<{w}}  {_pct(r['mean_iou'])}")
    lines.append(f"pixel accuracy {_pct(r['pixel_accuracy']).strip()}  mean accuracy "
                 f"{_pct(r['mean_accuracy']).strip()}  (%; '-': undefined, left out of means)")
    cr = r.get("confusion_ratio")
    if cr:
        lines.append(f"confusion ratio m(k,c) = FP(k->c) / TP(c)   ({cr['images_with_ctx']} "
                     f"images with context masks)")
        cw = max([w] + [len(p["name"]) + 2 for p in cr["pairs"]])
        for p in cr["pairs"]:
            ratio = "     -" if math.isnan(p["ratio"]) else f"{p['ratio']:6.3f}"
            lines.append(f"{p['name']:<{cw}}  {ratio}   (FP {p['fp']} / TP {p['tp']})")
        mean = "-" if math.isnan(cr["mean"]) else f"{cr['mean']:.3f}"
        lines.append(f"{'mean':<{cw}}  {mean:>6}")
    return "\n".join(lines)


def format_sweep(s: dict) -> str:
    """The stdout table of a :func:`sweep_thresholds` result."""
    lines = [f"CAM threshold sweep {s['cams']} vs {s['gt']}: {s['images']} images, "
             f"{s['pixels']} pixels"]
    if s["missing"]:
        lines.append(f"missing CAM files: {s['missing']} (left out; first: "
                     f"{', '.join(s['missing_keys'][:5])})")
    lines.append(f"{'threshold':>10}{'mIoU':>9}")
    for t, m in zip(s["thresholds"], s["mean_iou"]):
        star = "  *" if s["best_threshold"] is not None and t == s["best_threshold"] else ""
        lines.append(f"{t:>10g}   {_pct(m)}{star}")
    if s["best_threshold"] is not None:
        lines.append(f"best threshold {s['best_threshold']:g}: mIoU "
                     f"{_pct(s['best_mean_iou']).strip()}")
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


def _dumps(x, depth: int = 0) -> str:
    """JSON with one key per line, but every list of scalars (a matrix row) on one line."""
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(x, dict) and x:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, depth + 1)}" for k, v in x.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(x, list) and x and any(isinstance(v, (list, dict)) for v in x):
        return "[\n" + ",\n".join(inner + _dumps(v, depth + 1) for v in x) + f"\n{pad}]"
    return json.dumps(x, allow_nan=False)


def write_json(path: str, obj) -> None:
    """Atomic (epsdist.atomic: temporary file beside ``path``, umask mode). NaN -> null."""
    data = (_dumps(_jsonable(obj)) + "\n").encode()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, data)
