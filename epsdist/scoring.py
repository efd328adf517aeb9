"""One pass over the ground truth that scores predicted masks (``<key>.png``) and/or sweeps
the background threshold of CAMs (``<key>.npz``): :func:`evaluate`, :func:`sweep_thresholds`
and :func:`run` (both at once, what ``python -m epsdist.evaluate`` calls).

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
Speed
    Files are decoded by ``--workers`` threads (default min(8, CPUs)); results are summed in
    key order, so the numbers (and the first error reported) do not depend on it.
"""
from __future__ import annotations

import collections
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from epsdist.groundtruth import (CTX_IDS, EvalError, UsageError, auto_contexts, gt_sources, no_gt,
                                 read_contexts, read_mask, resolve_class_names,
                                 resolve_num_classes)
from epsdist.data.safepath import key_path
from epsdist.metrics import IGNORE, bad_from_counts, bad_values, metrics, nanmean
_SHOW_KEYS = 20                   # missing keys listed in the report / JSON


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


def _size(a: np.ndarray) -> str:
    return f"{a.shape[1]}x{a.shape[0]}"


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
    seg = read_mask(job.seg, f"{job.key}: ground truth {job.where}")
    counts = np.bincount(seg.ravel(), minlength=256)
    bad = bad_from_counts(counts, C)
    if bad:
        raise EvalError(f"{job.key}: ground truth {job.where} has values {bad} outside "
                        f"0..{C - 1} and 255 (is --num-classes right?)")
    out["ignored"] = int(counts[IGNORE])
    if job.pred is not None and not job.pred_missing:
        pred = read_mask(job.pred, f"{job.key}: prediction {job.pred}")
        _check_same_size(job.key, f"prediction {job.pred}", pred, seg)
        bad = bad_values(pred, C)
        if bad:
            raise EvalError(f"{job.key}: prediction {job.pred} has values {bad} outside "
                            f"0..{C - 1} and 255")
        n1 = C + 1
        pl = setup.pred_lut[pred]                              # 255 -> column C
        joint = np.bincount((setup.gt_lut[seg] + pl).ravel(), minlength=n1 * n1)
        out["conf"] = joint.reshape(n1, n1)[:C]                # row C = gt 255, dropped
        if job.ctx is not None:
            ctx = read_mask(job.ctx, f"{job.key}: context mask")
            _check_same_size(job.key, "the context mask", ctx, seg)
            wrong = (pred != seg) & (seg != IGNORE)
            out["ctx_fp"] = np.bincount(ctx[wrong].astype(np.int64) * n1 + pl[wrong])
            out["ctx_pixels"] = np.bincount(ctx.ravel(), minlength=CTX_IDS)
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


def _listing(directory: str, ext: str, what: str) -> set:
    if not os.path.isdir(directory):
        raise UsageError(f"{what} {directory}: no such directory")
    return {e.name[:-len(ext)] for e in os.scandir(directory)
            if e.name.endswith(ext) and not e.name.startswith(".")}


def run(gt: str, num_classes: Optional[int], *, pred_dir: Optional[str] = None,
         cams_dir: Optional[str] = None, thresholds: Optional[Sequence[float]] = None,
         ctx_dir: Optional[str] = None, pairs: Optional[Sequence[tuple[int, int]]] = None,
         allow_missing: bool = False, class_names=None, contexts=None,
         workers: Optional[int] = None, keys: Optional[Sequence[str]] = None
         ) -> tuple[Optional[dict], Optional[dict]]:
    """One pass over the ground truth for the predictions and/or the CAMs."""
    if no_gt(gt):
        raise UsageError(f"--gt {gt}: no such directory")
    C = resolve_num_classes(gt, num_classes)
    if class_names is None or isinstance(class_names, str):
        class_names = resolve_class_names(class_names, gt, C)
    class_names = list(class_names)
    if len(class_names) != C:
        raise UsageError(f"{len(class_names)} class names for {C} classes")
    if isinstance(contexts, str):
        contexts = read_contexts(contexts)
    contexts = dict(contexts) if contexts is not None else auto_contexts(gt)
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
            if not (0 <= c < C and 0 < k < CTX_IDS):
                raise UsageError(f"pair {c}:{k} out of range (class 0..{C - 1}, context 1..255)")
    workers = workers or min(8, os.cpu_count() or 1)
    setup = _Setup(C, ts)

    gt_keys, unsafe = set(), []

    def jobs():
        for key, seg, ctx, where in gt_sources(gt, ctx_dir, keys, unsafe):
            gt_keys.add(key)
            yield _Job(key, seg, ctx, where,
                       pred=key_path(pred_dir, key, ".png") if pred_dir else None,
                       cam=key_path(cams_dir, key, ".npz") if cams_dir else None,
                       pred_missing=pred_keys is not None and key not in pred_keys,
                       cam_missing=cam_keys is not None and key not in cam_keys)

    conf = np.zeros((C, C + 1), np.int64)
    ctx_fp = np.zeros((CTX_IDS, C + 1), np.int64)
    ctx_pixels = np.zeros(CTX_IDS, np.int64)
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

    common = dict(gt=gt, num_classes=C, class_names=class_names, gt_images=n["images"],
                  unsafe_keys=len(unsafe),
                  unsafe_key_examples=[k for k, _ in unsafe[:_SHOW_KEYS]])
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
    return dict(pairs=rows, mean=nanmean([r["ratio"] for r in rows]), images_with_ctx=with_ctx,
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
    return run(gt, num_classes, pred_dir=pred_dir, ctx_dir=ctx_dir, pairs=pairs,
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
    return run(gt, num_classes, cams_dir=cams_dir, thresholds=thresholds,
                allow_missing=allow_missing, class_names=class_names, workers=workers,
                keys=keys)[1]
