"""Confusion-matrix metrics of class-index masks and the EPS confusion ratio: the one
implementation behind ``python -m epsdist.evaluate``, the pseudo-mask report of
``epsdist/infer.py``, the segmentation stage's validation and the demo.

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
    used, and for shards the ``contexts`` of their manifest (``epsdist.data.shard`` copies
    them from the dataset's ``contexts.txt``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from epsdist.data import manifest as mf
IGNORE = mf.IGNORE_INDEX          # 255: ignore in the ground truth, "no prediction" in a mask


def bad_from_counts(counts: np.ndarray, num_classes: int) -> list[int]:
    counts = counts.copy()
    counts[:num_classes] = 0
    counts[IGNORE] = 0
    return [int(v) for v in np.flatnonzero(counts)[:10]]


def bad_values(arr: np.ndarray, num_classes: int) -> list[int]:
    """Values other than 0..num_classes-1 and 255 (at most 10)."""
    if arr.dtype == np.uint8:
        return bad_from_counts(np.bincount(arr.ravel(), minlength=256), num_classes)
    arr = np.asarray(arr)
    bad = (arr < 0) | ((arr >= num_classes) & (arr != IGNORE))
    return [int(v) for v in np.unique(arr[bad])[:10]] if bad.any() else []


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
        bad = bad_values(np.asarray(arr), num_classes)
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


def nanmean(x: np.ndarray) -> float:
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
                mean_iou=nanmean(iou), mean_accuracy=nanmean(recall),
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
