"""Pseudo-masks: multi-scale + flip CAM inference of a stage-1 model over a shard directory.

    deepspeed [--num_gpus N] epsdist/infer.py --config CONFIG --checkpoint RUN/export/model.pt \\
        --shards SHARDS --out OUT [--cams] [--panels N] [key=value ...]
    (also plain python, torchrun and srun)

For every image: the views are the scales ``infer.scales`` (0.5, 1, 1.5, 2) and, with
``infer.flip``, their horizontal flips, batched per scale; EPS models give softmax(C+1 maps),
CAM-baseline models ReLU'd CAMs; the fused CAM kernel (``epsdist_kernels.cam_post``) upsamples
each view bilinearly to the original size, sums the views of the image's labelled classes,
divides each class map by its max (+1e-5), puts the background score ``infer.bg_threshold``
in front and takes the argmax.

Output under OUT:
  masks/<key>.png    the pseudo-mask (VOC palette PNG, original size; 0 = background, c+1 = class c)
  cams/<key>.npz     with --cams: ``cams`` (L, H, W) float16 normalised maps of the labelled
                     classes and ``classes`` (L,) for ``python -m epsdist.evaluate --thresholds``
  panels/<key>.png   with --panels N: image | saliency | CAM per labelled class | pseudo-mask |
                     ground truth, for the first N images
  shards/            the input shards with ``seg.png`` replaced by the pseudo-mask (same keys,
                     same shard names), for the segmentation stage
  report.json        mIoU / confusion ratio against the ground truth, when the shards have it
Images are split across ranks by index; a rerun skips images whose outputs exist (every file
is written under a temporary name and renamed), so an interrupted run continues.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from epsdist import dist as D
from epsdist.config import ModelConfig, add_config_args, config_from_args, dump_yaml, from_dict
from epsdist.data.augment import (DecodeError, decode_gray, decode_rgb, normalize_images,
                                  resize_bicubic)
from epsdist.data.manifest import (CLS_FIELD, IMAGE_FIELDS, SAL_FIELD, SEG_FIELD,
                                   atomic_write_bytes, iter_tar_samples, read_manifest,
                                   sha256_file, shard_paths, voc_palette, write_manifest)
from epsdist.models import build_model

PALETTE = voc_palette()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="epsdist/infer.py", description=__doc__.split("\n")[0])
    add_config_args(ap)
    ap.add_argument("--checkpoint", required=True, help="RUN/export/model.pt of epsdist/train.py")
    ap.add_argument("--shards", required=True, help="shard directory to make pseudo-masks for")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--cams", action="store_true", help="also save the normalised CAMs (.npz)")
    ap.add_argument("--panels", type=int, default=0, metavar="N",
                    help="write PNG panels for the first N images")
    ap.add_argument("--no-shards", action="store_true", help="do not write pseudo-mask shards")
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def load_export(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such file (expected RUN/export/model.pt "
                                f"written by epsdist/train.py)")
    export = torch.load(path, map_location="cpu", weights_only=False)
    missing = {"state_dict", "config", "classes", "num_maps"} - set(export)
    if missing:
        raise ValueError(f"--checkpoint {path}: not an epsdist export (missing {sorted(missing)})")
    return export


def build_inference_model(export: dict, device: torch.device) -> torch.nn.Module:
    model_cfg = from_dict(ModelConfig, {**export["config"]["model"], "weights": "none"})
    model = build_model(model_cfg, len(export["classes"]), log=lambda m: None)
    model.load_state_dict(export["state_dict"])
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def view_maps(model, image: torch.Tensor, scales, flip: bool, eps: bool,
              precision: str = "fp32"):
    """Per-view maps of one uint8 image (1, 3, H, W): softmax over C+1 (EPS) or ReLU'd CAMs,
    one scale per forward pass with its flip in the same batch. Each scale is resized as the
    authors did, PIL's antialiased bicubic of the 0..255 image (``resize_bicubic``), then
    normalised. ``precision`` "bf16": bf16 autocast on CUDA (``infer.precision``)."""
    H, W = image.shape[2:]
    views, flips = [], []
    autocast = image.device.type == "cuda" and precision == "bf16"
    for s in scales:
        x = normalize_images(resize_bicubic(image, (max(1, round(H * s)), max(1, round(W * s)))))
        if flip:
            x = torch.cat([x, x.flip(-1)])
        if image.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x).float()
        out = torch.softmax(out, dim=1) if eps else torch.relu(out)
        views += list(out)
        flips += [False, True][:len(out)]
    return views, flips


def encode_mask(mask: np.ndarray) -> bytes:
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(PALETTE)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def panel(image: np.ndarray, sal: np.ndarray | None, norm: np.ndarray, mask: np.ndarray,
          gt: np.ndarray | None) -> np.ndarray:
    """image | saliency | one CAM per labelled class | pseudo-mask | ground truth, side by side."""
    pal = np.array(PALETTE, dtype=np.uint8).reshape(256, 3)
    gray = lambda m: np.repeat((np.clip(m, 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)  # noqa: E731
    tiles = [image]
    if sal is not None:
        tiles.append(np.repeat(sal[..., None], 3, -1))
    tiles += [gray(c) for c in norm]
    tiles.append(pal[mask])
    if gt is not None:
        tiles.append(pal[gt])
    sep = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([t for tile in tiles for t in (tile, sep)][:-1], axis=1)


def main(argv=None) -> int:
    from epsdist_kernels.cam_post import cam_to_mask

    args = parse_args(argv)
    cfg = config_from_args(args)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    export = load_export(args.checkpoint)
    manifest = read_manifest(args.shards)
    if list(manifest["classes"]) != list(export["classes"]):
        raise ValueError(f"--shards {args.shards} has classes {manifest['classes']}, the model "
                         f"was trained on {export['classes']}")
    info = D.setup(cfg.run.dist_timeout_s)
    model = build_inference_model(export, info.device)
    eps = export["config"]["model"]["eps_head"]
    C = len(export["classes"])
    dirs = {d: os.path.join(args.out, d) for d in ("masks", "cams", "panels")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)

    def done(key):
        return (os.path.exists(os.path.join(dirs["masks"], f"{key}.png"))
                and (not args.cams or os.path.exists(os.path.join(dirs["cams"], f"{key}.npz"))))

    progress = None
    if info.is_main:
        from tqdm import tqdm
        progress = tqdm(total=-(-manifest["num_samples"] // info.world_size), unit="img",
                        desc=f"pseudo-masks (rank 0 of {info.world_size})",
                        mininterval=1 if sys.stderr.isatty() else 30)
    counts = {"written": 0, "existing": 0, "skipped": 0}
    offset = 0
    for path, entry in zip(shard_paths(args.shards, manifest), manifest["shards"]):
        start = offset
        mine = lambda i, start=start: (start + i) % info.world_size == info.rank  # noqa: E731
        for index, sample in iter_tar_samples(path, want=mine):
            if sample is None:
                continue
            key = sample["__key__"]
            if done(key):
                counts["existing"] += 1
            elif infer_sample(model, sample, key, cfg.infer, eps, C, dirs, args,
                              start + index < args.panels, cam_to_mask, info.device):
                counts["written"] += 1
            else:
                counts["skipped"] += 1
            if progress is not None:
                progress.update(1)
        offset += entry["count"]
    if progress is not None:
        progress.close()
    totals = torch.tensor([counts["written"], counts["existing"], counts["skipped"]])
    D.all_reduce_sum(totals)
    D.barrier()
    if info.is_main:
        written, existing, skipped = totals.tolist()
        print(f"pseudo-masks: {written} written, {existing} already there, {skipped} skipped "
              f"(unreadable) -> {dirs['masks']}", flush=True)
        if not args.no_shards:
            write_pseudo_shards(args.shards, manifest, dirs["masks"],
                                os.path.join(args.out, "shards"), args.checkpoint)
        if SEG_FIELD in manifest.get("fields", [SEG_FIELD]):
            report(args, dirs["masks"], C + 1, allow_missing=skipped > 0)
    D.barrier()
    D.shutdown()
    return 0


def infer_sample(model, sample, key, icfg, eps, C, dirs, args, want_panel, cam_to_mask,
                 device) -> bool:
    image_bytes = next((sample[f] for f in IMAGE_FIELDS if f in sample), None)
    try:
        image = decode_rgb(image_bytes)
        labels = torch.tensor(json.loads(sample[CLS_FIELD]), dtype=torch.float32)
    except (DecodeError, KeyError, TypeError, ValueError) as e:
        print(f"skipping {key}: {type(e).__name__}: {e}", file=sys.stderr)
        return False
    x = torch.from_numpy(image).permute(2, 0, 1)[None].to(device)
    views, flips = view_maps(model, x, icfg.scales, icfg.flip, eps, icfg.precision)
    need_norm = args.cams or want_panel
    mask, norm, classes = cam_to_mask(views, flips, labels, tuple(image.shape[:2]),
                                      icfg.bg_threshold, return_norm=need_norm, impl=icfg.impl)
    mask = mask.cpu().numpy()
    if args.cams:
        buf = io.BytesIO()
        np.savez_compressed(buf, cams=norm.cpu().numpy().astype(np.float16),
                            classes=classes.cpu().numpy())
        atomic_write_bytes(os.path.join(dirs["cams"], f"{key}.npz"), buf.getvalue())
    if want_panel:
        sal = decode_gray(sample[SAL_FIELD]) if SAL_FIELD in sample else None
        gt = (np.asarray(Image.open(io.BytesIO(sample[SEG_FIELD])))
              if SEG_FIELD in sample else None)
        grid = panel(image, sal, norm.float().cpu().numpy(), mask, gt)
        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG")
        atomic_write_bytes(os.path.join(dirs["panels"], f"{key}.png"), buf.getvalue())
    # the mask last: its existence marks the sample as done for a rerun
    atomic_write_bytes(os.path.join(dirs["masks"], f"{key}.png"), encode_mask(mask))
    return True


def write_pseudo_shards(src: str, manifest: dict, masks_dir: str, out: str, checkpoint: str):
    """The input shards with ``seg.png`` replaced by the pseudo-mask, shard for shard."""
    import tarfile
    from epsdist.data.shard import add_sample

    os.makedirs(out, exist_ok=True)
    shards, missing = [], 0
    for path, entry in zip(shard_paths(src, manifest), manifest["shards"]):
        name = entry["name"]
        tmp = os.path.join(out, f".{name}.partial")
        count = 0
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for _, sample in iter_tar_samples(path):
                mask_path = os.path.join(masks_dir, f"{sample['__key__']}.png")
                if not os.path.exists(mask_path):
                    missing += 1
                    continue
                with open(mask_path, "rb") as f:
                    sample[SEG_FIELD] = f.read()
                add_sample(tar, sample)
                count += 1
        if count:
            os.replace(tmp, os.path.join(out, name))
            shards.append({"name": name, "count": count,
                           "sha256": sha256_file(os.path.join(out, name))})
        else:
            os.unlink(tmp)
    write_manifest(out, {**manifest, "source": f"pseudo-masks of {manifest.get('source')}",
                         "num_samples": sum(s["count"] for s in shards), "shards": shards,
                         "pseudo_masks": {"from_shards": os.path.abspath(src),
                                          "checkpoint": os.path.abspath(checkpoint),
                                          "missing": missing}})
    print(f"pseudo-mask shards: {sum(s['count'] for s in shards)} samples in {len(shards)} "
          f"shards -> {out}" + (f" ({missing} images without a mask left out)" if missing else ""),
          flush=True)


def report(args, masks_dir: str, num_classes: int, allow_missing: bool) -> None:
    from epsdist import evaluate
    result = evaluate.evaluate(masks_dir, args.shards, num_classes, allow_missing=allow_missing)
    atomic_write_bytes(os.path.join(args.out, "report.json"),
                       json.dumps(result, indent=1, default=float).encode())
    print(f"pseudo-mask mIoU {100 * result['mean_iou']:.2f} "
          f"(report: {os.path.join(args.out, 'report.json')})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
