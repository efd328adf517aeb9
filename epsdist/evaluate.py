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

Inputs
    ``--gt`` is either a shard directory (``manifest.json`` + ``*.tar``, see
    :mod:`epsdist.data.manifest`: the ``seg.png`` and, when present, ``ctx.png`` of every
    sample are read with ``tarfile``; a sample without ``seg.png`` is an error) or a folder of
    ``<key>.png`` masks (every ``*.png`` in it; ``--ctx DIR`` adds context masks
    ``DIR/<key>.png``, an image without one simply has none). Every key of the ground truth is
    evaluated, or only those of ``--list FILE`` (an id list like VOC's ``val.txt``: first
    column, basename stem; a listed key without ground truth is an error). ``--pred DIR``
    holds ``<key>.png``; ``--cams DIR`` holds ``<key>.npz``. A key without a prediction (or
    CAM file) is an error naming it (exit 1) unless ``--allow-missing``: then the key is left
    out of every metric (not counted as wrong), and the number and the first keys are
    reported. Predictions for keys the ground truth does not have are ignored and counted
    (``extra_predictions``).
Masks
    PNG, palette (``P``, the palette indices are read, never the colours) or 8-bit gray
    (``L``); other modes are an error. Ground truth: 0 = background, 1..N-1 = classes,
    255 = ignore (those pixels are left out of everything). Predictions: 0..N-1, and 255 =
    "no prediction": the pixel stays in the evaluation, its ground-truth class gets a false
    negative, it counts as wrong in the pixel accuracy, and no class gets a false positive
    (``unpredicted_pixels``). Any other value (in either) is an error naming the key and the
    values. A prediction (or CAM, or context mask) whose size differs from the ground truth's
    is an error naming the key and both sizes; nothing is ever cropped or resized.
Metrics
    One confusion matrix over all pixels with ground truth != 255: N x N int64, rows = ground
    truth, columns = prediction (pixels predicted 255 are kept beside it, per ground-truth
    class, as ``unpredicted``). Per class: TP = diagonal, FP = column sum - TP, FN = row sum
    + unpredicted - TP; IoU = TP / (TP + FP + FN), precision = TP / (TP + FP),
    recall = TP / (TP + FN). A ratio whose denominator is 0 is NaN: a class absent from both
    the ground truth and the predictions has IoU NaN and is left out of the mean IoU (a class
    predicted but absent from the ground truth has IoU 0 and counts). mIoU = mean of the
    non-NaN IoUs over all N classes, background included (the VOC convention); mean accuracy
    = mean of the non-NaN recalls; pixel accuracy = sum TP / evaluated pixels. In the JSON
    file NaN is written as ``null``.
Confusion ratio (EPS paper, Sec. 5)
    m(k, c) = FP(k -> c) / TP(c): FP(k -> c) = pixels of context region k (context mask value
    k) predicted as class c whose ground truth is neither c nor 255; TP(c) = pixels of class c
    predicted as c. Both are summed over the images that have a context mask, then divided
    (NaN when TP(c) = 0). ``--pairs c:k,...`` names the pairs (c: class index as in the
    masks, k: context id; names from ``--class-names`` / ``--contexts`` work too, e.g.
    ``boat:water``). Default, when context masks exist: (v, v) for every context id v found
    (0 < v < N; the synthetic convention: context v belongs to class v). ``--contexts FILE``
    (``context_name class_name`` lines; line i names context id i) labels the pairs like
    ``water->boat``; without it a ``contexts.txt`` in the ground-truth folder or its parent is
    used, and for shards whose classes are the synthetic set's, the synthetic context names.
Threshold sweep (``--cams DIR``)
    ``<key>.npz`` with ``cams`` (L, H, W) float16/32 CAMs of the image's labelled classes,
    normalised to [0, 1], and ``classes`` (L,) 0-based class indices (foreground class c is
    mask value c + 1). For a threshold t the pseudo-mask is argmax over [t, cams[0], ...,
    cams[L-1]] with ties to the first: background (0) where max(cams) <= t (background wins
    a tie at exactly t), else classes[i] + 1 for the first i reaching the maximum. Values are
    compared in float32 (float64 for float64 CAMs) with t rounded to that type. One pass over
    the files accumulates, per pixel, (ground truth, argmax class, number of thresholds below
    the maximum) in one histogram, from which the confusion matrix of every threshold follows
    exactly. Reported: mIoU (and all metrics) per threshold and the best threshold (the
    smallest one on a tie). ``--thresholds`` is a comma list (``0.15,0.2,0.25``) or
    ``start:stop:step`` (stop included); default 0.05:0.95:0.05.
Class names (``--class-names``)
    ``auto`` (default): ``["background"] + manifest classes`` for shards; else a
    ``classes.txt`` in the ground-truth folder or its parent (the synthetic layout); else the
    VOC names when N = 21; else ``class1, class2, ...``. A FILE has one name a line: N lines,
    or N - 1 (then ``background`` is prepended). ``--num-classes`` may be left out for shards
    (then 1 + the manifest's classes); given, it must agree with the manifest.
Output
    A table on stdout (class, IoU, precision, recall in %; confusion ratios; the sweep);
    warnings on stderr. ``--json FILE`` gets every number, the confusion matrix (and one per
    threshold), and the counts; it is written to a temporary file beside FILE and renamed into
    place. Exit codes: 0 done; 1 an evaluation error (missing prediction, size mismatch, bad
    mask values, unreadable file, malformed shards); 2 a command-line problem (bad options, a
    path that does not exist).
Speed
    Files are decoded by ``--workers`` threads (default min(8, CPUs)); results are summed in
    key order, so the numbers (and the first error reported) do not depend on it.

Python API: :func:`confusion_matrix`, :func:`metrics`, :func:`confusion_ratio`,
:func:`evaluate`, :func:`sweep_thresholds`, :func:`iter_ground_truth`, :func:`main`.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image

from epsdist.atomic import atomic_write_bytes
from epsdist.data import manifest as mf

__all__ = ["EvalError", "UsageError", "IGNORE", "confusion_matrix", "metrics", "confusion_ratio",
           "evaluate", "sweep_thresholds", "iter_ground_truth", "resolve_class_names",
           "read_contexts", "read_key_list", "parse_pairs", "parse_thresholds", "format_report",
           "format_sweep", "write_json", "main"]

IGNORE = mf.IGNORE_INDEX          # 255: ignore in the ground truth, "no prediction" in a mask
DEFAULT_THRESHOLDS = "0.05:0.95:0.05"
_SHOW_KEYS = 20                   # missing keys listed in the report / JSON
_CTX_IDS = 256                    # context ids are uint8 values


class EvalError(ValueError):
    """A problem in the data being evaluated (exit code 1); the message names the key."""


class UsageError(ValueError):
    """A command-line problem: a bad option value or a path that does not exist (exit code 2)."""


# ----------------------------------------------------------------------------- reading


def _read_mask(src: Union[str, bytes], what: str) -> np.ndarray:
    """Raw indices of a palette or 8-bit gray PNG given as a path or bytes."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as im:
            if im.mode not in ("P", "L"):
                raise EvalError(f"{what}: mode {im.mode}, expected palette (P) or 8-bit gray "
                                f"(L) class indices")
            return np.asarray(im)                 # P: the palette indices themselves
    except EvalError:
        raise
    except Exception as e:  # noqa: BLE001
        raise EvalError(f"{what}: unreadable ({e})") from None


def _bad_from_counts(counts: np.ndarray, num_classes: int) -> list[int]:
    counts = counts.copy()
    counts[:num_classes] = 0
    counts[IGNORE] = 0
    return [int(v) for v in np.flatnonzero(counts)[:10]]


def _bad_values(arr: np.ndarray, num_classes: int) -> list[int]:
    """Values other than 0..num_classes-1 and 255 (at most 10)."""
    if arr.dtype == np.uint8:
        return _bad_from_counts(np.bincount(arr.ravel(), minlength=256), num_classes)
    arr = np.asarray(arr)
    bad = (arr < 0) | ((arr >= num_classes) & (arr != IGNORE))
    return [int(v) for v in np.unique(arr[bad])[:10]] if bad.any() else []


def _size(a: np.ndarray) -> str:
    return f"{a.shape[1]}x{a.shape[0]}"


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's split of a member name: key = path + basename up to its first dot."""
    directory, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), field


def _is_shards(gt: str) -> bool:
    return os.path.isfile(os.path.join(gt, mf.MANIFEST))


def _png_keys(directory: str) -> list[str]:
    return sorted(e.name[:-4] for e in os.scandir(directory)
                  if e.name.endswith(".png") and not e.name.startswith(".") and e.is_file())


def _shard_samples(gt: str) -> Iterator[tuple[str, Optional[bytes], Optional[bytes], str]]:
    """(key, seg.png bytes or None, ctx.png bytes or None, shard name) of every sample."""
    manifest = mf.read_manifest(gt)
    for entry, path in zip(manifest["shards"], mf.shard_paths(gt, manifest)):
        name = entry["name"]
        if not os.path.isfile(path):
            raise EvalError(f"{gt}: shard {name} listed in manifest.json is missing")
        count = 0
        try:
            with tarfile.open(path, "r:") as tar:
                key, fields = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    k, field = _split_member(member.name)
                    if k != key:
                        if key is not None:
                            count += 1
                            yield key, fields.get(mf.SEG_FIELD), fields.get(mf.CTX_FIELD), name
                        key, fields = k, {}
                    if field in (mf.SEG_FIELD, mf.CTX_FIELD):
                        fields[field] = tar.extractfile(member).read()
                if key is not None:
                    count += 1
                    yield key, fields.get(mf.SEG_FIELD), fields.get(mf.CTX_FIELD), name
        except (tarfile.TarError, EOFError, OSError) as e:
            raise EvalError(f"{gt}: shard {name} unreadable or truncated after {count} samples "
                            f"({e})") from None
        if count != entry["count"]:
            raise EvalError(f"{gt}: shard {name} holds {count} samples, manifest.json says "
                            f"{entry['count']}")


def read_key_list(path: str) -> list[str]:
    """Keys from a VOC/SBD id list: first column, basename stem (``/JPEGImages/x.jpg`` -> x)."""
    keys = []
    for line in _read_lines(path):
        if not line.startswith("#"):
            keys.append(os.path.splitext(os.path.basename(line.split()[0]))[0])
    return keys


def _gt_sources(gt: str, ctx_dir: Optional[str] = None, keys: Optional[Sequence[str]] = None):
    """(key, seg source, ctx source or None, where) per ground-truth image; sources are paths
    or bytes. Duplicate keys and samples without a mask are errors. ``keys``: only these (every
    one must exist in the ground truth)."""
    wanted = None if keys is None else set(keys)
    if wanted is not None and not wanted:
        raise UsageError("the key list is empty")
    if not os.path.isdir(gt):
        raise UsageError(f"--gt {gt}: no such directory")
    if ctx_dir is not None and not os.path.isdir(ctx_dir):
        raise UsageError(f"--ctx {ctx_dir}: no such directory")
    ctx_keys = set(_png_keys(ctx_dir)) if ctx_dir is not None else set()

    def ctx_of(key):
        return os.path.join(ctx_dir, key + ".png") if key in ctx_keys else None

    if _is_shards(gt):
        seen = {}
        for key, seg, ctx, shard in _shard_samples(gt):
            if key in seen:
                raise EvalError(f"{gt}: key {key} appears twice (shards {seen[key]} and {shard})")
            seen[key] = shard
            if wanted is not None and key not in wanted:
                continue
            if seg is None:
                raise EvalError(f"{gt}: {shard}: sample {key} has no {mf.SEG_FIELD} (no ground "
                                f"truth for it)")
            if ctx_dir is not None:
                ctx = ctx_of(key)
            yield key, seg, ctx, f"{shard}:{key}.{mf.SEG_FIELD}"
        absent = [] if wanted is None else sorted(wanted - set(seen))
    else:
        present = _png_keys(gt)
        if not present:
            raise EvalError(f"--gt {gt}: no manifest.json and no *.png masks")
        absent = [] if wanted is None else sorted(wanted - set(present))
        if absent:            # before any work: a PNG folder's keys are known up front
            raise EvalError(f"{len(absent)} listed keys have no ground truth in {gt}: "
                            f"{', '.join(absent[:5])}")
        for key in present:
            if wanted is None or key in wanted:
                path = os.path.join(gt, key + ".png")
                yield key, path, ctx_of(key), path
    if absent:
        raise EvalError(f"{len(absent)} listed keys have no ground truth in {gt}: "
                        f"{', '.join(absent[:5])}")


def iter_ground_truth(gt: str, ctx_dir: Optional[str] = None,
                      keys: Optional[Sequence[str]] = None
                      ) -> Iterator[tuple[str, np.ndarray, Optional[np.ndarray]]]:
    """Yield ``(key, seg, ctx)`` for every ground-truth image of ``gt`` (a shard directory or a
    folder of ``<key>.png``), in shard order / sorted key order. ``seg`` and ``ctx`` are the raw
    uint8 indices; ``ctx`` is None when the image has no context mask (``ctx_dir`` replaces
    the shards' ``ctx.png``). ``keys``: only these keys (each must exist)."""
    for key, seg_src, ctx_src, where in _gt_sources(gt, ctx_dir, keys):
        seg = _read_mask(seg_src, f"{key}: ground truth {where}")
        ctx = None if ctx_src is None else _read_mask(ctx_src, f"{key}: context mask")
        yield key, seg, ctx


# ----------------------------------------------------------------------------- metrics


def _joint_index(pred: np.ndarray, gt: np.ndarray, num_classes: int):
    """Flat (gt, pred) bin indices over pixels with gt != 255; pred 255 -> column N."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
    valid = gt != IGNORE
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    p[p == IGNORE] = num_classes
    return valid, g, p


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, *,
                     return_unpredicted: bool = False):
    """N x N int64 confusion matrix (rows = ground truth, columns = prediction) over the pixels
    with ``gt != 255``, by ``np.bincount``. Values must be in 0..N-1 or 255 (ValueError
    otherwise). Pixels predicted 255 ("no prediction") are not in the matrix; with
    ``return_unpredicted=True`` returns ``(conf, unpredicted)``, ``unpredicted[c]`` = pixels of
    ground-truth class c predicted 255 (pass it to :func:`metrics`)."""
    for name, arr in (("pred", pred), ("gt", gt)):
        bad = _bad_values(np.asarray(arr), num_classes)
        if bad:
            raise ValueError(f"{name} has values {bad} outside 0..{num_classes - 1} and 255")
    _, g, p = _joint_index(pred, gt, num_classes)
    n1 = num_classes + 1
    ext = np.bincount(g * n1 + p, minlength=num_classes * n1).reshape(num_classes, n1)
    conf = np.ascontiguousarray(ext[:, :num_classes])
    return (conf, ext[:, num_classes].copy()) if return_unpredicted else conf


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else math.nan


def metrics(conf: np.ndarray, unpredicted: Optional[np.ndarray] = None) -> dict:
    """Metrics of an N x N confusion matrix (rows = ground truth) and, optionally, the per-class
    counts of pixels predicted 255 (false negatives of their class, no false positive).

    Returns numpy arrays (length N) ``iou``, ``precision``, ``recall``, ``tp``, ``fp``,
    ``fn``, ``gt_pixels``, ``pred_pixels``, ``present`` (in ground truth or prediction), and
    floats ``mean_iou``, ``pixel_accuracy``, ``mean_accuracy`` and int ``pixels``. A ratio with
    denominator 0 is NaN; NaN entries are left out of the means."""
    conf = np.asarray(conf, np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"conf must be square, got shape {conf.shape}")
    n = conf.shape[0]
    unpredicted = (np.zeros(n, np.int64) if unpredicted is None
                   else np.asarray(unpredicted, np.int64).reshape(n))
    tp = np.diag(conf).copy()
    gt_pixels = conf.sum(1) + unpredicted
    pred_pixels = conf.sum(0)
    fp = pred_pixels - tp
    fn = gt_pixels - tp
    iou = _ratio(tp, tp + fp + fn)
    recall = _ratio(tp, gt_pixels)
    pixels = int(gt_pixels.sum())
    return dict(iou=iou, precision=_ratio(tp, pred_pixels), recall=recall, tp=tp, fp=fp, fn=fn,
                gt_pixels=gt_pixels, pred_pixels=pred_pixels, present=(tp + fp + fn) > 0,
                mean_iou=_nanmean(iou), mean_accuracy=_nanmean(recall),
                pixel_accuracy=float(tp.sum() / pixels) if pixels else math.nan, pixels=pixels)


def confusion_ratio(pred: np.ndarray, gt: np.ndarray, ctx: np.ndarray,
                    pairs: Sequence[tuple[int, int]]) -> dict:
    """Counts of the EPS confusion ratio for one image and ``pairs`` of (class c, context k):
    ``{"fp": int64 array, "tp": int64 array}`` (one entry per pair), fp = pixels with
    ``ctx == k`` and ``pred == c`` whose ground truth is neither c nor 255, tp = pixels with
    ``gt == c`` and ``pred == c``. Sum the counts over images, then m(k, c) = fp / tp."""
    pred, gt, ctx = np.asarray(pred), np.asarray(gt), np.asarray(ctx)
    if not pred.shape == gt.shape == ctx.shape:
        raise ValueError(f"shapes differ: pred {pred.shape}, gt {gt.shape}, ctx {ctx.shape}")
    fp = np.zeros(len(pairs), np.int64)
    tp = np.zeros(len(pairs), np.int64)
    scored = (gt != IGNORE)
    for i, (c, k) in enumerate(pairs):
        hit = pred == c
        fp[i] = np.count_nonzero(hit & (ctx == k) & (gt != c) & scored)
        tp[i] = np.count_nonzero(hit & (gt == c))
    return {"fp": fp, "tp": tp}


# ----------------------------------------------------------------------------- names, options


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None


def resolve_class_names(spec: Optional[str], gt: str, num_classes: int) -> list[str]:
    """Class names (length N, index = mask value): see "Class names" in the module docstring."""
    if spec not in (None, "auto"):
        names = _read_lines(spec)
        if len(names) == num_classes - 1:
            names = ["background"] + names
        if len(names) != num_classes:
            raise UsageError(f"--class-names {spec}: {len(names)} names, expected {num_classes} "
                             f"(or {num_classes - 1} without background)")
        return names
    if _is_shards(gt):
        names = ["background"] + list(mf.read_manifest(gt)["classes"])
        if len(names) == num_classes:
            return names
    for d in (gt, os.path.dirname(os.path.abspath(gt))):
        path = os.path.join(d, "classes.txt")
        if os.path.isfile(path):
            names = _read_lines(path)
            names = ["background"] + names if len(names) == num_classes - 1 else names
            if len(names) == num_classes:
                return names
    if num_classes == 21:
        from epsdist.data.shard import VOC_CLASSES
        return ["background"] + list(VOC_CLASSES)
    return ["background"] + [f"class{i}" for i in range(1, num_classes)]


def read_contexts(path: str) -> dict[int, str]:
    """``contexts.txt`` ("context_name class_name" lines) -> {context id (line number, from 1):
    context name}."""
    out = {}
    for i, line in enumerate(_read_lines(path), 1):
        out[i] = line.split()[0]
    return out


def _auto_contexts(gt: str) -> dict[int, str]:
    for d in (gt, os.path.dirname(os.path.abspath(gt))):
        path = os.path.join(d, "contexts.txt")
        if os.path.isfile(path):
            return read_contexts(path)
    if _is_shards(gt):
        from epsdist.data import synthetic
        if list(mf.read_manifest(gt)["classes"]) == list(synthetic.CLASSES):
            return {i: name for i, name in enumerate(synthetic.CONTEXTS, 1)}
    return {}


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
        if not 0 <= ci < n or not 0 < ki < _CTX_IDS:
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


# ----------------------------------------------------------------------------- one image


@dataclass
class _Job:
    key: str
    seg: Union[str, bytes]
    ctx: Union[str, bytes, None]
    where: str
    pred: Optional[str]         # path, or None when evaluating no predictions
    cam: Optional[str]
    pred_missing: bool = False
    cam_missing: bool = False


class _Setup:
    """Per-run constants: lookup tables from mask values to histogram offsets."""

    def __init__(self, num_classes: int, thresholds: Optional[np.ndarray]):
        C = num_classes
        self.num_classes = C
        self.thresholds = thresholds                          # sorted float64, or None
        v = np.arange(256)
        self.gt_lut = np.where(v < C, v, C).astype(np.int32) * (C + 1)   # 255 -> dump row C
        self.pred_lut = np.where(v < C, v, C).astype(np.int32)          # 255 -> column C
        if thresholds is not None:
            T = thresholds.size
            dtype = np.int32 if (C + 1) * C * (T + 1) < 2 ** 31 else np.int64
            self.sweep_gt_lut = np.where(v < C, v, C).astype(dtype) * (C * (T + 1))


def _check_same_size(key: str, what: str, a: np.ndarray, gt: np.ndarray) -> None:
    if a.shape[-2:] != gt.shape:
        raise EvalError(f"{key}: {what} is {a.shape[-1]}x{a.shape[-2]} (WxH) but the ground "
                        f"truth is {_size(gt)}")


def _load_cams(path: str, key: str, num_classes: int):
    try:
        with np.load(path, allow_pickle=False) as z:
            cams, classes = z["cams"], z["classes"]
    except KeyError as e:
        raise EvalError(f"{key}: {path} has no array {e.args[0]!r} (needs 'cams' and "
                        f"'classes')") from None
    except Exception as e:  # noqa: BLE001
        raise EvalError(f"{key}: {path} unreadable ({e})") from None
    if cams.ndim != 3 or not np.issubdtype(cams.dtype, np.floating):
        raise EvalError(f"{key}: {path}: cams must be a float (L, H, W) array, got "
                        f"{cams.dtype} {cams.shape}")
    if classes.shape != (cams.shape[0],) or (classes.size and
                                             not np.issubdtype(classes.dtype, np.integer)):
        raise EvalError(f"{key}: {path}: classes must be L = {cams.shape[0]} ints, got "
                        f"{classes.dtype} {classes.shape}")
    if classes.size and (classes.min() < 0 or classes.max() > num_classes - 2):
        raise EvalError(f"{key}: {path}: classes {classes.tolist()} outside 0..{num_classes - 2}")
    return cams, classes.astype(np.int64)


def _process(job: _Job, setup: _Setup) -> dict:
    """Per-image counts (int64 arrays), in a worker thread. Ground-truth 255 pixels are sent
    to an extra "dump" row of every histogram, which is dropped, so no boolean selection of
    the valid pixels is needed."""
    C = setup.num_classes
    out = {"key": job.key, "pred_missing": job.pred_missing, "cam_missing": job.cam_missing}
    seg = _read_mask(job.seg, f"{job.key}: ground truth {job.where}")
    counts = np.bincount(seg.ravel(), minlength=256)
    bad = _bad_from_counts(counts, C)
    if bad:
        raise EvalError(f"{job.key}: ground truth {job.where} has values {bad} outside "
                        f"0..{C - 1} and 255 (is --num-classes right?)")
    out["ignored"] = int(counts[IGNORE])
    if job.pred is not None and not job.pred_missing:
        pred = _read_mask(job.pred, f"{job.key}: prediction {job.pred}")
        _check_same_size(job.key, f"prediction {job.pred}", pred, seg)
        bad = _bad_values(pred, C)
        if bad:
            raise EvalError(f"{job.key}: prediction {job.pred} has values {bad} outside "
                            f"0..{C - 1} and 255")
        n1 = C + 1
        pl = setup.pred_lut[pred]                              # 255 -> column C
        joint = np.bincount((setup.gt_lut[seg] + pl).ravel(), minlength=n1 * n1)
        out["conf"] = joint.reshape(n1, n1)[:C]                # row C = gt 255, dropped
        if job.ctx is not None:
            ctx = _read_mask(job.ctx, f"{job.key}: context mask")
            _check_same_size(job.key, "the context mask", ctx, seg)
            wrong = (pred != seg) & (seg != IGNORE)
            out["ctx_fp"] = np.bincount(ctx[wrong].astype(np.int64) * n1 + pl[wrong])
            out["ctx_pixels"] = np.bincount(ctx.ravel(), minlength=_CTX_IDS)
    if job.cam is not None and not job.cam_missing:
        cams, classes = _load_cams(job.cam, job.key, C)
        _check_same_size(job.key, f"cams {job.cam}", cams, seg)
        T = setup.thresholds.size
        L = classes.size
        idx = setup.sweep_gt_lut[seg]                          # (gt * C) * (T + 1), 255 -> dump
        if L:
            dt = np.result_type(cams.dtype, np.float32)
            top = arg = None
            for i in range(L):
                c = cams[i].astype(dt)
                if not np.isfinite(c).all():
                    raise EvalError(f"{job.key}: {job.cam}: cams contain NaN or inf")
                if top is None:
                    top, arg = c, np.zeros(c.shape, np.uint8 if L <= 256 else np.intp)
                    continue
                better = np.greater(c, top)                    # strict: the first max wins
                np.copyto(top, c, where=better)
                np.copyto(arg, i, where=better)
            ts = setup.thresholds.astype(dt)                   # thresholds t < max: foreground
            if T <= 64:
                below = np.zeros(top.shape, np.uint8)
                for t in ts:
                    np.add(below, np.greater(top, t), out=below, casting="unsafe")
            else:
                below = np.searchsorted(ts, top, side="left")
            lab = ((classes + 1) * (T + 1)).astype(idx.dtype)  # foreground label c + 1
            idx = idx + lab[arg]
            idx += below
        out["sweep"] = np.bincount(idx.ravel(), minlength=(C + 1) * C * (T + 1))[:C * C * (T + 1)]
    return out


def _ordered_map(fn, items: Iterable, workers: int) -> Iterator:
    """``map(fn, items)`` on ``workers`` threads, results in order, at most 4*workers queued."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="evaluate") as ex:
        pending = collections.deque()
        try:
            for item in items:
                pending.append(ex.submit(fn, item))
                if len(pending) >= 4 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def _sweep_confs(hist: np.ndarray, C: int, T: int) -> np.ndarray:
    """(T, C, C) confusion matrices from the (gt, argmax class, #thresholds below max) counts."""
    h = hist.reshape(C, C, T + 1)
    above = np.flip(np.cumsum(np.flip(h, -1), -1), -1)[..., 1:]    # sum over n > j, (C, C, T)
    bg = np.cumsum(h.sum(1), -1)[:, :T]                           # sum over n <= j, (C, T)
    confs = np.ascontiguousarray(np.moveaxis(above, -1, 0))       # (T, C, C)
    confs[:, :, 0] += bg.T
    return confs


# ----------------------------------------------------------------------------- the pass


def _num_classes(gt: str, num_classes: Optional[int]) -> int:
    if os.path.isdir(gt) and _is_shards(gt):
        m = mf.read_manifest(gt)
        n = len(m["classes"]) + 1
        if num_classes is not None and num_classes != n:
            raise UsageError(f"--num-classes {num_classes}, but {gt}/manifest.json lists "
                             f"{n - 1} classes (+ background = {n})")
        return n
    if num_classes is None:
        raise UsageError("--num-classes is required when --gt is not a shard directory")
    if not 2 <= num_classes <= IGNORE:
        raise UsageError(f"--num-classes must be in 2..255, got {num_classes}")
    return num_classes


def _listing(directory: str, ext: str, what: str) -> set:
    if not os.path.isdir(directory):
        raise UsageError(f"{what} {directory}: no such directory")
    return {e.name[:-len(ext)] for e in os.scandir(directory)
            if e.name.endswith(ext) and not e.name.startswith(".")}


def _run(gt: str, num_classes: Optional[int], *, pred_dir: Optional[str] = None,
         cams_dir: Optional[str] = None, thresholds: Optional[Sequence[float]] = None,
         ctx_dir: Optional[str] = None, pairs: Optional[Sequence[tuple[int, int]]] = None,
         allow_missing: bool = False, class_names=None, contexts=None,
         workers: Optional[int] = None, keys: Optional[Sequence[str]] = None
         ) -> tuple[Optional[dict], Optional[dict]]:
    """One pass over the ground truth for the predictions and/or the CAMs."""
    if not os.path.isdir(gt):
        raise UsageError(f"--gt {gt}: no such directory")
    C = _num_classes(gt, num_classes)
    if class_names is None or isinstance(class_names, str):
        class_names = resolve_class_names(class_names, gt, C)
    class_names = list(class_names)
    if len(class_names) != C:
        raise UsageError(f"{len(class_names)} class names for {C} classes")
    if isinstance(contexts, str):
        contexts = read_contexts(contexts)
    contexts = dict(contexts) if contexts is not None else _auto_contexts(gt)
    pred_keys = _listing(pred_dir, ".png", "--pred") if pred_dir is not None else None
    cam_keys = _listing(cams_dir, ".npz", "--cams") if cams_dir is not None else None
    ts = None
    if cams_dir is not None:
        ts = np.asarray(sorted(set(float(t) for t in (thresholds or ()))), np.float64)
        if ts.size == 0 or not np.isfinite(ts).all():
            raise UsageError("thresholds: need at least one finite threshold")
    if pairs is not None:
        pairs = [(int(c), int(k)) for c, k in pairs]
        for c, k in pairs:
            if not (0 <= c < C and 0 < k < _CTX_IDS):
                raise UsageError(f"pair {c}:{k} out of range (class 0..{C - 1}, context 1..255)")
    workers = workers or min(8, os.cpu_count() or 1)
    setup = _Setup(C, ts)

    gt_keys = set()

    def jobs():
        for key, seg, ctx, where in _gt_sources(gt, ctx_dir, keys):
            gt_keys.add(key)
            yield _Job(key, seg, ctx, where,
                       pred=os.path.join(pred_dir, key + ".png") if pred_dir else None,
                       cam=os.path.join(cams_dir, key + ".npz") if cams_dir else None,
                       pred_missing=pred_keys is not None and key not in pred_keys,
                       cam_missing=cam_keys is not None and key not in cam_keys)

    conf = np.zeros((C, C + 1), np.int64)
    ctx_fp = np.zeros((_CTX_IDS, C + 1), np.int64)
    ctx_pixels = np.zeros(_CTX_IDS, np.int64)
    ctx_tp = np.zeros(C, np.int64)
    hist = np.zeros(C * C * (ts.size + 1), np.int64) if ts is not None else None
    n = dict(images=0, pred_images=0, cam_images=0, ignored=0, pred_ignored=0, cam_ignored=0,
             with_ctx=0)
    missing_pred, missing_cam = [], []
    for r in _ordered_map(lambda j: _process(j, setup), jobs(), workers):
        key = r["key"]
        n["images"] += 1
        for flag, lst, d, what in (("pred_missing", missing_pred, pred_dir, "prediction"),
                                   ("cam_missing", missing_cam, cams_dir, "CAM file")):
            if r[flag]:
                if not allow_missing:
                    ext = ".png" if what == "prediction" else ".npz"
                    raise EvalError(f"{key}: {what} {os.path.join(d, key + ext)} is missing "
                                    f"(--allow-missing leaves such keys out)")
                lst.append(key)
        if "conf" in r:
            n["pred_images"] += 1
            n["pred_ignored"] += r["ignored"]
            conf += r["conf"]
            if "ctx_fp" in r:
                n["with_ctx"] += 1
                ctx_fp.ravel()[:r["ctx_fp"].size] += r["ctx_fp"]
                ctx_pixels += r["ctx_pixels"]
                ctx_tp += np.diag(r["conf"][:, :C])
        if "sweep" in r:
            n["cam_images"] += 1
            n["cam_ignored"] += r["ignored"]
            hist += r["sweep"]

    common = dict(gt=gt, num_classes=C, class_names=class_names, gt_images=n["images"])
    evaluation = sweep = None
    if pred_dir is not None:
        m = metrics(conf[:, :C], conf[:, C])
        evaluation = dict(common, pred=pred_dir, images=n["pred_images"],
                          missing=len(missing_pred), missing_keys=missing_pred[:_SHOW_KEYS],
                          extra_predictions=len(pred_keys - gt_keys),
                          pixels=m["pixels"], ignored_pixels=n["pred_ignored"],
                          unpredicted_pixels=int(conf[:, C].sum()),
                          mean_iou=m["mean_iou"], pixel_accuracy=m["pixel_accuracy"],
                          mean_accuracy=m["mean_accuracy"])
        for name in ("iou", "precision", "recall", "tp", "fp", "fn", "gt_pixels",
                     "pred_pixels"):
            evaluation[name] = m[name].tolist()
        evaluation["unpredicted"] = conf[:, C].tolist()
        evaluation["confusion_matrix"] = conf[:, :C].tolist()
        evaluation["confusion_ratio"] = _ratio_report(
            pairs, ctx_fp, ctx_pixels, ctx_tp, n["with_ctx"], n["pred_images"], class_names,
            contexts)
    if cams_dir is not None:
        confs = _sweep_confs(hist, C, ts.size)
        per = [metrics(c) for c in confs]
        miou = [p["mean_iou"] for p in per]
        best = None if all(math.isnan(v) for v in miou) else int(np.nanargmax(miou))
        sweep = dict(common, cams=cams_dir, images=n["cam_images"], missing=len(missing_cam),
                     missing_keys=missing_cam[:_SHOW_KEYS],
                     extra_cams=len(cam_keys - gt_keys), pixels=per[0]["pixels"],
                     ignored_pixels=n["cam_ignored"], thresholds=ts.tolist(), mean_iou=miou,
                     best_threshold=None if best is None else float(ts[best]),
                     best_mean_iou=None if best is None else miou[best],
                     pixel_accuracy=[p["pixel_accuracy"] for p in per],
                     iou=[p["iou"].tolist() for p in per],
                     confusion_matrices=confs.tolist())
    return evaluation, sweep


def _ratio_report(pairs, ctx_fp, ctx_pixels, ctx_tp, with_ctx, images, class_names, contexts):
    if not with_ctx:
        if pairs:
            raise UsageError("--pairs needs context masks (--ctx DIR, or ctx.png in the shards)")
        return None
    C = len(class_names)
    if pairs is None:
        pairs = [(v, v) for v in np.flatnonzero(ctx_pixels).tolist() if 0 < v < C]
    rows = []
    for c, k in pairs:
        fp, tp = int(ctx_fp[k, c]), int(ctx_tp[c])
        rows.append({"class": c, "context": k,
                     "name": f"{contexts.get(k, f'ctx{k}')}->{class_names[c]}",
                     "fp": fp, "tp": tp, "ratio": fp / tp if tp else math.nan,
                     "context_pixels": int(ctx_pixels[k])})
    return dict(pairs=rows, mean=_nanmean([r["ratio"] for r in rows]), images_with_ctx=with_ctx,
                images_without_ctx=images - with_ctx)


# ----------------------------------------------------------------------------- public API


def evaluate(pred_dir: str, gt: str, num_classes: Optional[int], *, ctx_dir: Optional[str] = None,
             pairs: Optional[Sequence[tuple[int, int]]] = None, allow_missing: bool = False,
             class_names=None, contexts=None, workers: Optional[int] = None,
             keys: Optional[Sequence[str]] = None) -> dict:
    """Evaluate the ``<key>.png`` masks of ``pred_dir`` against ``gt`` (shard directory or
    folder of masks). ``num_classes`` may be None for shards. ``class_names``: list, FILE or
    "auto"/None; ``contexts``: {context id: name}, a contexts.txt path, or None (auto).

    Returns a JSON-ready dict (NaN stays float NaN): ``mean_iou``, ``pixel_accuracy``,
    ``mean_accuracy``; per-class lists ``iou``, ``precision``, ``recall``, ``tp``, ``fp``,
    ``fn``, ``gt_pixels``, ``pred_pixels``, ``unpredicted`` (index = mask value, names in
    ``class_names``); ``confusion_matrix`` (N x N lists, rows = ground truth); counts
    ``images``, ``gt_images``, ``missing``, ``missing_keys``, ``extra_predictions``,
    ``pixels``, ``ignored_pixels``, ``unpredicted_pixels``; ``confusion_ratio`` (None without
    context masks, else ``pairs`` [{class, context, name, fp, tp, ratio, context_pixels}],
    ``mean``, ``images_with_ctx``, ``images_without_ctx``). Raises :class:`EvalError` for
    problems in the data and :class:`UsageError` for bad arguments. ``keys``: evaluate only
    these ground-truth keys (e.g. :func:`read_key_list` of VOC's ``val.txt``)."""
    return _run(gt, num_classes, pred_dir=pred_dir, ctx_dir=ctx_dir, pairs=pairs,
                allow_missing=allow_missing, class_names=class_names, contexts=contexts,
                workers=workers, keys=keys)[0]


def sweep_thresholds(cams_dir: str, gt: str, num_classes: Optional[int],
                     thresholds: Sequence[float], *, allow_missing: bool = False,
                     class_names=None, workers: Optional[int] = None,
                     keys: Optional[Sequence[str]] = None) -> dict:
    """mIoU of the CAM pseudo-masks of ``cams_dir`` (``<key>.npz``) for every background
    threshold, in one pass. Returns ``thresholds`` (sorted, unique), ``mean_iou`` and
    ``pixel_accuracy`` (one per threshold), ``iou`` (per threshold, per class),
    ``confusion_matrices`` (T x N x N), ``best_threshold``, ``best_mean_iou``, and the counts
    ``images``, ``gt_images``, ``missing``, ``missing_keys``, ``extra_cams``, ``pixels``,
    ``ignored_pixels``."""
    return _run(gt, num_classes, cams_dir=cams_dir, thresholds=thresholds,
                allow_missing=allow_missing, class_names=class_names, workers=workers,
                keys=keys)[1]


# ----------------------------------------------------------------------------- output


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
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    atomic_write_bytes(path, data)


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m epsdist.evaluate",
        description="mIoU, per-class IoU/precision/recall, the EPS confusion ratio, and a CAM "
                    "threshold sweep against ground-truth masks (shards or a PNG folder).",
        epilog="Exit codes: 0 done, 1 evaluation error (names the key), 2 usage error.")
    p.add_argument("--gt", required=True,
                   help="shard directory (manifest.json) or folder of <key>.png masks")
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
        if not os.path.isdir(a.gt):
            raise UsageError(f"--gt {a.gt}: no such directory")
        C = _num_classes(a.gt, a.num_classes)
        names = resolve_class_names(a.class_names, a.gt, C)
        contexts = read_contexts(a.contexts) if a.contexts else _auto_contexts(a.gt)
        pairs = parse_pairs(a.pairs, names, contexts) if a.pairs else None
        thresholds = parse_thresholds(a.thresholds or DEFAULT_THRESHOLDS) if a.cams else None
        keys = read_key_list(a.key_list) if a.key_list else None
        evaluation, sweep = _run(a.gt, C, pred_dir=a.pred, cams_dir=a.cams,
                                 thresholds=thresholds, ctx_dir=a.ctx, pairs=pairs,
                                 allow_missing=a.allow_missing, class_names=names,
                                 contexts=contexts, workers=a.workers, keys=keys)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (EvalError, mf.ManifestError) as e:
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
