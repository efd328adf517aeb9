"""Evaluate segmentation masks, the EPS confusion ratio, and a CAM threshold sweep.

Command line::

    python -m epsdist.evaluate --gt GT (--pred DIR | --cams DIR [--thresholds LIST] | both)
        [--num-classes N] [--list FILE] [--ctx DIR] [--pairs C:K,...] [--contexts FILE]
        [--class-names FILE|auto] [--allow-missing] [--json FILE] [--workers N]

    # pseudo-masks of the synthetic val split against its shards
    python -m epsdist.evaluate --pred out/masks --gt shards/synthetic_val --json eval.json
    # VOC val: a folder of PNG masks (train + val), 21 classes, the val ids only
    python -m epsdist.evaluate --pred out/masks --gt VOC2012/SegmentationClassAug
        --num-classes 21 --list VOC2012/ImageSets/Segmentation/val.txt
    # pick the background threshold of the CAMs
    python -m epsdist.evaluate --cams out/cams --gt shards/voc_train --thresholds 0.05:0.6:0.05

Output
    A table on stdout (class, IoU, precision, recall in %; confusion ratios; the sweep);
    warnings on stderr. ``--json FILE`` gets every number, the confusion matrix (and one per
    threshold), and the counts; it is written to a temporary file beside FILE and renamed into
    place. Exit codes: 0 done; 1 an evaluation error (missing prediction, size mismatch, bad
    mask values, unreadable file, malformed shards); 2 a command-line problem (bad options, a
    path that does not exist).
What is read, how it is scored and named: :mod:`epsdist.groundtruth` (inputs, masks, class
names), :mod:`epsdist.metrics` (metrics, confusion ratio), :mod:`epsdist.scoring` (the
threshold sweep, speed), :mod:`epsdist.report` (tables, JSON).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

from epsdist.data import manifest as mf
from epsdist.groundtruth import (CTX_IDS, EvalError, UsageError, auto_contexts, no_gt,
                                 read_contexts, read_key_list, resolve_class_names,
                                 resolve_num_classes)
from epsdist.data.safepath import UnsafeNameError
from epsdist.report import format_report, format_sweep, write_json
from epsdist.scoring import run

DEFAULT_THRESHOLDS = "0.05:0.95:0.05"


def parse_pairs(text: str, class_names: Sequence[str] = (),
                contexts: Optional[dict] = None) -> list[tuple[int, int]]:
    """``"4:4,1:1"`` (or names: ``"boat:water"``) -> [(class, context id), ...]."""
    by_class = {n: i for i, n in enumerate(class_names)}
    by_ctx = {n: i for i, n in (contexts or {}).items()}
    pairs = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        c, sep, k = item.partition(":")
        if not sep:
            raise UsageError(f"--pairs: {item!r} is not CLASS:CONTEXT")
        c, k = c.strip(), k.strip()
        try:
            ci = int(c) if c.lstrip("-").isdigit() else by_class[c]
            ki = int(k) if k.lstrip("-").isdigit() else by_ctx[k]
        except KeyError as e:
            raise UsageError(f"--pairs: unknown name {e.args[0]!r} in {item!r}") from None
        n = len(class_names) or 256
        if not 0 <= ci < n or not 0 < ki < CTX_IDS:
            raise UsageError(f"--pairs: {item!r} out of range (class 0..{n - 1}, context 1..255)")
        pairs.append((ci, ki))
    if not pairs:
        raise UsageError("--pairs: no pair given")
    return pairs


def parse_thresholds(text: str) -> list[float]:
    """``"0.15,0.2"`` or ``"start:stop:step"`` (stop included) -> sorted unique floats."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(n)]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--thresholds {text!r}: expected a comma list of numbers or "
                         f"start:stop:step") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"--thresholds {text!r}: expected finite numbers")
    return sorted(set(values))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m epsdist.evaluate",
        description="mIoU, per-class IoU/precision/recall, the EPS confusion ratio, and a CAM "
                    "threshold sweep against ground-truth masks (shards or a PNG folder).",
        epilog="Exit codes: 0 done, 1 evaluation error (names the key), 2 usage error.")
    p.add_argument("--gt", required=True,
                   help="shard directory (manifest.json) or its URL, or folder of <key>.png masks")
    p.add_argument("--pred", help="folder of <key>.png predicted masks (255 = no prediction)")
    p.add_argument("--cams", help="folder of <key>.npz (cams (L,H,W), classes (L,)) to sweep")
    p.add_argument("--thresholds", help=f"background thresholds for --cams: comma list or "
                                        f"start:stop:step (default {DEFAULT_THRESHOLDS})")
    p.add_argument("--num-classes", type=int,
                   help="classes incl. background (e.g. 21 VOC, 81 COCO); default for shards: "
                        "1 + manifest classes")
    p.add_argument("--list", dest="key_list",
                   help="evaluate only these keys (id list, first column, e.g. VOC val.txt)")
    p.add_argument("--ctx", help="folder of <key>.png context masks (PNG ground truth)")
    p.add_argument("--pairs", help="confusion-ratio pairs CLASS:CONTEXT,... (indices or names; "
                                   "default: v:v for every context id v present)")
    p.add_argument("--contexts", help="contexts.txt (\"context_name class_name\" per line; "
                                      "line i = context id i) for pair names")
    p.add_argument("--class-names", default="auto", help="FILE (one name a line) or auto")
    p.add_argument("--allow-missing", action="store_true",
                   help="leave keys without prediction / CAM file out instead of failing")
    p.add_argument("--json", help="write all numbers here (atomically)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding threads (default min(8, CPUs))")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.pred is None and a.cams is None:
        p.error("give --pred DIR and/or --cams DIR")
    if a.thresholds is not None and a.cams is None:
        p.error("--thresholds needs --cams")
    if a.workers is not None and a.workers < 1:
        p.error("--workers must be >= 1")
    try:
        if no_gt(a.gt):
            raise UsageError(f"--gt {a.gt}: no such directory")
        C = resolve_num_classes(a.gt, a.num_classes)
        names = resolve_class_names(a.class_names, a.gt, C)
        contexts = read_contexts(a.contexts) if a.contexts else auto_contexts(a.gt)
        pairs = parse_pairs(a.pairs, names, contexts) if a.pairs else None
        thresholds = parse_thresholds(a.thresholds or DEFAULT_THRESHOLDS) if a.cams else None
        keys = read_key_list(a.key_list) if a.key_list else None
        evaluation, sweep = run(a.gt, C, pred_dir=a.pred, cams_dir=a.cams,
                                 thresholds=thresholds, ctx_dir=a.ctx, pairs=pairs,
                                 allow_missing=a.allow_missing, class_names=names,
                                 contexts=contexts, workers=a.workers, keys=keys)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (EvalError, mf.ManifestError, UnsafeNameError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = {"gt": a.gt, "num_classes": C, "class_names": names}
    if evaluation is not None:
        if evaluation["missing"]:
            print(f"warning: {evaluation['missing']} keys without prediction left out",
                  file=sys.stderr)
        print(format_report(evaluation))
        out["evaluation"] = evaluation
    if sweep is not None:
        if sweep["missing"]:
            print(f"warning: {sweep['missing']} keys without CAM file left out", file=sys.stderr)
        if evaluation is not None:
            print()
        print(format_sweep(sweep))
        out["sweep"] = sweep
    if a.json:
        write_json(a.json, out)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
