"""Speed of the pseudo-mask pipeline (``epsdist.infer_pipeline``, what ``epsdist/infer.py`` runs
per rank) on the CPU: ms per image for each ``infer.batch_images`` x ``infer.workers`` setting.

    python -m epsdist.infer_bench --images 64 --size 112 --batch-images 1 4 --workers 0 2

A random-initialised model of ``--config`` (default: the synthetic recipe, the tiny backbone)
over ``--images`` synthetic images of ``--size`` px (``epsdist.data.synthetic``, sharded as
``epsdist.data.shard`` does) in a temporary folder. Each setting runs the whole pipeline --
decode, the 4 scales x 2 flips through the network, CAM post-processing, PNG writing -- into a
fresh output folder ``--repeats`` times after one untimed warm-up run; the table gives the
median and the best wall time per image (and every run: on a shared machine the best is the
least disturbed). On a CPU without ``TRITON_INTERPRET`` the CAM
post-processing is the PyTorch reference (``infer.impl=auto``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from epsdist.atomic import atomic_write_bytes


def prepare(root: str, images: int, size: int, config: str):
    """Synthetic shards and a random-initialised model: (shard dir, manifest, model, eps)."""
    from epsdist.config import load_config
    from epsdist.data import shard, synthetic
    from epsdist.data.manifest import read_manifest
    from epsdist.models import build_model
    data, shards = os.path.join(root, "data"), os.path.join(root, "shards")
    synthetic.generate(data, images, 0, seed=0, size=size, workers=1, progress=False)
    shard.shard_voc(data, os.path.join(data, "saliency"), shards, split="train",
                    shard_size=max(1, images // 4), log=lambda *a, **k: None)
    cfg = load_config(config)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(synthetic.CLASSES), log=lambda m: None).eval()
    return shards, read_manifest(shards), model, cfg.model.eps_head


def time_setting(model, shards, manifest, eps, root, batch_images, workers, repeats) -> list:
    """Seconds per image of each of ``repeats`` runs (after a warm-up run)."""
    from epsdist.config import InferConfig
    from epsdist.infer_pipeline import Job, run
    icfg = InferConfig(batch_images=batch_images, workers=workers)
    per_image = []
    for r in range(repeats + 1):
        out = tempfile.mkdtemp(prefix=f"b{batch_images}w{workers}r{r}-", dir=root)
        t0 = time.perf_counter()
        counts = run(model, Job(shards, manifest, out, icfg, eps))
        elapsed = time.perf_counter() - t0
        if counts["written"] != manifest["num_samples"]:
            raise RuntimeError(f"expected {manifest['num_samples']} masks, got {dict(counts)}")
        if r:                                   # run 0 warms up
            per_image.append(elapsed / counts["written"])
    return per_image


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m epsdist.infer_bench",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=112, help="synthetic image side (px)")
    ap.add_argument("--config", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "configs", "synthetic_eps.yaml"))
    ap.add_argument("--batch-images", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.images < 1 or args.repeats < 1 or min(args.batch_images) < 1 or min(args.workers) < 0:
        ap.error("--images, --repeats, --batch-images >= 1 and --workers >= 0 expected")
    rows = []
    with tempfile.TemporaryDirectory(prefix="infer-bench-") as root:
        shards, manifest, model, eps = prepare(root, args.images, args.size, args.config)
        for b in args.batch_images:
            for w in args.workers:
                runs = time_setting(model, shards, manifest, eps, root, b, w, args.repeats)
                rows.append(dict(batch_images=b, workers=w,
                                 ms_per_image=1e3 * statistics.median(runs),
                                 runs_ms=[1e3 * x for x in runs]))
    print(f"{args.images} images of {args.size}x{args.size}, CPU, {torch.get_num_threads()} "
          f"torch threads\n")
    print("| infer.batch_images | infer.workers | ms / image (median) | best | runs |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch_images']} | {r['workers']} | {r['ms_per_image']:.2f} | "
              f"{min(r['runs_ms']):.2f} | " + ", ".join(f"{x:.2f}" for x in r["runs_ms"]) + " |")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(dict(images=args.images, size=args.size,
                                                      rows=rows), indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
