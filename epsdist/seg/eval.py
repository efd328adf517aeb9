"""Validation of the segmentation network: (multi-scale, flip) inference over the ground-truth
val shards split across ranks, optional dense CRF, mIoU through :mod:`epsdist.metrics`.

Inference of one image (original size, ImageNet-normalised): for every scale s in
``eval.scales`` the image resized bilinearly by s (and, with ``eval.flip``, its mirror in the
same batch) goes through the network; the logits are upsampled bilinearly to the original size
and turned into softmax probabilities; the probabilities of all views are averaged (flipped
views flipped back). With ``eval.crf`` the average goes through the fully connected CRF of
Kraehenbuehl & Koltun (``pydensecrf``) with the parameters the EPS authors published (their
DeepLab code's defaults: bilateral w 4, xy std 67, rgb std 3; gaussian w 3, xy std 1;
10 iterations). The prediction is the argmax.

Ranks take the val samples whose index (shard order) is their rank modulo the world size (the
split of epsdist/infer.py). Each rank adds its images to a ``metrics.confusion_matrix``; the
matrices are summed across ranks and ``metrics.metrics`` gives the mIoU (VOC convention:
background included; a class absent from ground truth and prediction is left out). With
``eval.save_pred`` every prediction is written as a palette PNG to
``run.dir/val_pred/iter_NNNNNNNN/<key>.png``, so ``python -m epsdist.evaluate --pred DIR
--gt VAL_SHARDS`` reproduces the number (tested).
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from .. import dist as D
from .. import metrics
from ..data.augment import DecodeError, decode_mask, decode_rgb, normalize_images
from ..data.manifest import IMAGE_FIELDS, SEG_FIELD, atomic_write_bytes, iter_rank_samples
from ..data.manifest import read_manifest
from ..data.masks import encode_mask
from ..data.source import fetch_options
from ..data.safepath import key_path, key_problem

log = logging.getLogger("epsdist.segment")


@torch.no_grad()
def predict_probs(model, image: np.ndarray, scales=(1.0,), flip: bool = False,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """(K, H, W) float32 class probabilities of one uint8 RGB image (H, W, 3): softmax
    averaged over the scales (and flips), each view's logits upsampled bilinearly to (H, W)."""
    device = torch.device(device)
    H, W = image.shape[:2]
    x = normalize_images(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
                         .to(device))
    cuda = device.type == "cuda"
    total, views = None, 0
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, size=(max(1, round(H * s)), max(1, round(W * s))),
                                            mode="bilinear", align_corners=False)
        if flip:
            xs = torch.cat([xs, xs.flip(-1)])
        if cuda:
            xs = xs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(xs).float()
        out = F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)
        prob = torch.softmax(out, dim=1)
        prob = prob[0] + prob[1].flip(-1) if flip else prob[0]
        total = prob if total is None else total + prob
        views += 2 if flip else 1
    return total / views


def dense_crf(image: np.ndarray, probs: np.ndarray, ecfg) -> np.ndarray:
    """Dense-CRF refinement of (K, H, W) probabilities for the uint8 RGB ``image`` with the
    ``eval.crf_*`` parameters; returns (K, H, W) float32 marginals."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax
    K, H, W = probs.shape
    d = dcrf.DenseCRF2D(W, H, K)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    d.addPairwiseGaussian(sxy=ecfg.crf_pos_xy_std, compat=ecfg.crf_pos_w)
    d.addPairwiseBilateral(sxy=ecfg.crf_bi_xy_std, srgb=ecfg.crf_bi_rgb_std,
                           rgbim=np.ascontiguousarray(image), compat=ecfg.crf_bi_w)
    q = d.inference(ecfg.crf_iters)
    return np.asarray(q, dtype=np.float32).reshape(K, H, W)


def predict(model, image: np.ndarray, ecfg, device) -> np.ndarray:
    """(H, W) uint8 prediction for ``image`` with the ``eval`` settings (scales, flip, crf)."""
    probs = predict_probs(model, image, ecfg.scales, ecfg.flip, device)
    if ecfg.crf:
        return dense_crf(image, probs.cpu().numpy(), ecfg).argmax(0).astype(np.uint8)
    return probs.argmax(0).to(torch.uint8).cpu().numpy()


def all_background_miou(conf: np.ndarray) -> float:
    """The mIoU of predicting background (0) everywhere, from a confusion matrix's rows."""
    base = np.zeros_like(conf)
    base[:, 0] = conf.sum(1)
    return float(metrics.metrics(base)["mean_iou"])


def validate(engine, cfg, info: D.DistInfo, pred_dir: str | None, class_names: list) -> dict:
    """Evaluate the model on ``data.val_shards`` (every rank takes part; every rank gets the
    result). Writes the predictions under ``pred_dir`` unless it is None."""
    t0 = time.perf_counter()
    ecfg, K = cfg.eval, cfg.data.num_classes + 1
    manifest = read_manifest(cfg.data.val_shards, fetch_options(cfg.data))
    conf = np.zeros((K, K), np.int64)
    counts = np.zeros(2, np.int64)                   # images, skipped
    module = engine.module if hasattr(engine, "module") else engine
    was_training = module.training
    engine.eval()
    if pred_dir is not None:
        os.makedirs(pred_dir, exist_ok=True)
    try:
        for _, sample in iter_rank_samples(cfg.data.val_shards, manifest, info.rank,
                                           info.world_size, ecfg.max_images or None,
                                           fetch=fetch_options(cfg.data)):
            key = sample["__key__"]
            if key_problem(key):            # never a path outside pred_dir: skipped and named
                log.warning("val: skipping %r: unsafe key (%s)", key, key_problem(key))
                counts[1] += 1
                continue
            if SEG_FIELD not in sample:
                raise ValueError(f"data.val_shards: sample {key} has no {SEG_FIELD} (the val "
                                 f"shards need ground truth)")
            try:
                image = decode_rgb(next(sample[f] for f in IMAGE_FIELDS if f in sample))
                gt = decode_mask(sample[SEG_FIELD])
            except (DecodeError, StopIteration) as e:
                log.warning("val: skipping %s: %s", key, e or "no image")
                counts[1] += 1
                continue
            if gt.shape != image.shape[:2]:
                log.warning("val: skipping %s: image %s vs ground truth %s", key,
                            image.shape[:2], gt.shape)
                counts[1] += 1
                continue
            pred = predict(engine, image, ecfg, info.device)
            try:
                conf += metrics.confusion_matrix(pred, gt, K)
            except ValueError as e:
                raise ValueError(f"data.val_shards: sample {key}: {e}") from None
            counts[0] += 1
            if pred_dir is not None:
                path = key_path(pred_dir, key, ".png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                atomic_write_bytes(path, encode_mask(pred))
    finally:
        engine.train(was_training)
    totals = torch.from_numpy(np.concatenate([conf.ravel(), counts]))
    D.all_reduce_sum(totals)
    conf, counts = totals[:K * K].numpy().reshape(K, K), totals[K * K:].tolist()
    m = metrics.metrics(conf)
    return {"mean_iou": m["mean_iou"], "pixel_accuracy": m["pixel_accuracy"],
            "mean_accuracy": m["mean_accuracy"],
            "iou": {name: float(v) for name, v in zip(class_names, m["iou"])},
            "all_background_mean_iou": all_background_miou(conf),
            "images": int(counts[0]), "skipped": int(counts[1]),
            "eval": {"scales": list(ecfg.scales), "flip": ecfg.flip, "crf": ecfg.crf},
            "pred_dir": pred_dir, "seconds": round(time.perf_counter() - t0, 3),
            "confusion_matrix": conf.tolist()}
