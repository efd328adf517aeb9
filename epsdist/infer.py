"""Pseudo-masks: multi-scale + flip CAM inference of a stage-1 model over a shard directory.

    deepspeed [--num_gpus N] epsdist/infer.py --config CONFIG --checkpoint RUN/export/model.pt \\
        --shards SHARDS --out OUT [--cams] [--panels N] [key=value ...]
    (also plain python, torchrun and srun)

For every image: the views are the scales ``infer.scales`` (0.5, 1, 1.5, 2) and, with
``infer.flip``, their horizontal flips, batched per scale together with the views of up to
``infer.batch_images`` images of the same working size; EPS models give softmax(C+1 maps),
CAM-baseline models ReLU'd CAMs; the fused CAM kernel (``epsdist_kernels.cam_post``) upsamples
each view bilinearly to the original size, sums the views of the image's labelled classes,
divides each class map by its max (+1e-5), puts the background score ``infer.bg_threshold``
in front and takes the argmax. ``infer.workers`` processes decode the images and a few threads
write the outputs while the network runs (``epsdist.infer_pipeline``); neither changes a mask.

Output under OUT:
  masks/<key>.png    the pseudo-mask (VOC palette PNG, original size; 0 = background, c+1 = class c)
  cams/<key>.npz     with --cams: ``cams`` (L, H, W) float16 normalised maps of the labelled
                     classes and ``classes`` (L,) for ``python -m epsdist.evaluate --thresholds``
  panels/<key>.png   with --panels N: image | saliency | CAM per labelled class | pseudo-mask |
                     ground truth, for the first N images
  shards/            the input shards with ``seg.png`` replaced by the pseudo-mask (same keys,
                     same shard names), for the segmentation stage
  report.json        mIoU / confusion ratio against the ground truth, when the shards have it
  infer_state.json   the checkpoint's sha256 and the settings that made the masks
Images are split across ranks by index; a rerun skips images whose outputs exist (every file
is written under a temporary name and renamed), so an interrupted run continues -- but only
with the same checkpoint (sha256) and settings (``infer.*`` but the speed-only ``compile``,
``batch_images`` and ``workers``; model kind, classes, precision):
a mismatch is an error naming what differs (exit 2), unless ``--overwrite``, which first
removes the previous masks, CAMs, panels, shards, report and state (only those files).

An image larger than ``infer.max_side`` (long side) is processed at that size and its mask
resized back (nearest) to the original size, so one image's memory is bounded. An image that
cannot be decoded or still fails (RuntimeError, e.g. out of memory, or MemoryError) is a
named, counted skip; the run finishes, reports, and exits 1 unless ``--allow-skips``. An output
that cannot be written stops the run: exit 1, an ``error:`` line naming the file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from epsdist import dist as D
from epsdist.cams import build_inference_model, load_export
from epsdist.config import add_config_args, config_from_args, dump_yaml, run_cli, to_dict
from epsdist.data.manifest import (SEG_FIELD, atomic_write_bytes, read_manifest, sha256_file,
                                   write_manifest)
from epsdist.data.source import fetch_options, is_remote, iter_shard, redact
from epsdist.data.safepath import key_path, key_problem, shard_path
from epsdist.infer_guard import (StaleOutput, check_resumable, clear_previous, inference_state,
                                 model_config_notice, write_state)
from epsdist.infer_outputs import WriteError
from epsdist.infer_pipeline import Job, run

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="epsdist/infer.py", description=__doc__.split("\n")[0])
    add_config_args(ap)
    ap.add_argument("--checkpoint", required=True, help="RUN/export/model.pt of epsdist/train.py")
    ap.add_argument("--shards", required=True,
                    help="shard directory (or its URL) to make pseudo-masks for")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--cams", action="store_true", help="also save the normalised CAMs (.npz)")
    ap.add_argument("--panels", type=int, default=0, metavar="N",
                    help="write PNG panels for the first N images")
    ap.add_argument("--no-shards", action="store_true", help="do not write pseudo-mask shards")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the outputs of another checkpoint or other settings in --out")
    ap.add_argument("--allow-skips", action="store_true",
                    help="exit 0 even if some images were skipped")
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return ap.parse_intermixed_args(argv)        # overrides before and after the options


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    export = load_export(args.checkpoint)
    fetch = fetch_options(cfg.data)
    manifest = read_manifest(args.shards, fetch)
    if list(manifest["classes"]) != list(export["classes"]):
        raise ValueError(f"--shards {args.shards} has classes {manifest['classes']}, the model "
                         f"was trained on {export['classes']}")
    info = D.setup(cfg.run.dist_timeout_s)
    eps = export["config"]["model"]["eps_head"]
    state = prepare_output(args, cfg, export, info)
    if state is None:
        D.shutdown()
        return 2
    model = build_inference_model(export, info.device, cfg.infer.compile)
    job = Job(args.shards, manifest, args.out, cfg.infer, eps, info.device, info.rank,
              info.world_size, args.cams, args.panels, fetch)
    try:
        counts = run(model, job, progress_bar(info, manifest))
    except WriteError as e:                     # never a silently missing mask
        print(f"error: rank {info.rank}: {e}", file=sys.stderr, flush=True)
        return 1
    totals = torch.tensor([counts["written"], counts["existing"], counts["skipped"]])
    D.all_reduce_sum(totals)
    D.barrier()
    written, existing, skipped = totals.tolist()
    if info.is_main:
        print(f"pseudo-masks: {written} written, {existing} already there, {skipped} skipped "
              f"(named above) -> {job.dirs['masks']}", flush=True)
        if not args.no_shards:
            write_pseudo_shards(args.shards, manifest, job.dirs["masks"],
                                os.path.join(args.out, "shards"), args.checkpoint,
                                state["checkpoint_sha256"], fetch)
        if SEG_FIELD in manifest.get("fields", [SEG_FIELD]):
            report(args, job.dirs["masks"], len(export["classes"]) + 1,
                   allow_missing=skipped > 0)
    D.barrier()
    D.shutdown()
    if skipped and not args.allow_skips:
        if info.is_main:
            print(f"error: {skipped} image(s) skipped; exit 1 (--allow-skips to accept)",
                  file=sys.stderr, flush=True)
        return 1
    return 0


def prepare_output(args, cfg, export, info) -> dict | None:
    """The state of this run, checked against OUT's (None: refused, the reason printed) and
    written there (``--overwrite`` first removes the previous outputs)."""
    notice = model_config_notice(to_dict(cfg.model), export["config"]["model"])
    if info.is_main and notice and (args.config or any(o.strip().startswith("model.")
                                                        for o in args.overrides)):
        print(notice, file=sys.stderr, flush=True)
    state = inference_state(sha256_file(args.checkpoint), to_dict(cfg.infer),
                            export["config"]["model"]["eps_head"], export["classes"],
                            info.device.type)
    try:
        check_resumable(args.out, state, args.overwrite)
    except StaleOutput as e:
        if info.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return None
    D.barrier()                                 # every rank has read the old state
    if info.is_main:
        if args.overwrite:
            clear_previous(args.out)
        write_state(args.out, state)
    D.barrier()
    return state


def progress_bar(info, manifest):
    """A tqdm bar of rank 0's images (None on the other ranks)."""
    if not info.is_main:
        return None
    from tqdm import tqdm
    return tqdm(total=-(-manifest["num_samples"] // info.world_size), unit="img",
                desc=f"pseudo-masks (rank 0 of {info.world_size})",
                mininterval=1 if sys.stderr.isatty() else 30)


def write_pseudo_shards(src: str, manifest: dict, masks_dir: str, out: str, checkpoint: str,
                        checkpoint_sha256: str | None = None, fetch=None):
    """The input shards (a directory or URL) with ``seg.png`` replaced by the pseudo-mask, shard for shard. Every
    shard is written as ``.<name>.partial`` first; only when all are complete is the old
    manifest removed, the shards renamed into place and the new manifest written, and then
    the old shards the new manifest does not list are removed."""
    import tarfile
    from epsdist.data.shard import TAR_FORMAT, add_sample

    os.makedirs(out, exist_ok=True)
    old = set()
    if os.path.exists(os.path.join(out, "manifest.json")):
        try:
            old = {s["name"] for s in read_manifest(out)["shards"]}
        except ValueError:
            pass
    shards, missing, partials = [], 0, []
    try:
        for entry in manifest["shards"]:
            name = entry["name"]
            tmp = os.path.join(out, f".{name}.partial")
            partials.append(tmp)
            count = 0
            with tarfile.open(tmp, "w", format=TAR_FORMAT) as tar:
                for _, sample in iter_shard(src, entry, fetch=fetch):
                    key = sample["__key__"]
                    mask_path = None if key_problem(key) else key_path(masks_dir, key, ".png")
                    if mask_path is None or not os.path.exists(mask_path):
                        missing += 1
                        continue
                    with open(mask_path, "rb") as f:
                        sample[SEG_FIELD] = f.read()
                    add_sample(tar, sample)
                    count += 1
            if count:
                shards.append({"name": name, "count": count, "sha256": sha256_file(tmp)})
    except BaseException:
        for tmp in partials:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    if os.path.exists(os.path.join(out, "manifest.json")):
        os.unlink(os.path.join(out, "manifest.json"))
    kept = {s["name"] for s in shards}
    for tmp in partials:
        name = os.path.basename(tmp)[1:-len(".partial")]
        if name in kept:
            os.replace(tmp, shard_path(out, name))
        else:
            os.unlink(tmp)
    write_manifest(out, {**manifest, "source": f"pseudo-masks of {manifest.get('source')}",
                         "num_samples": sum(s["count"] for s in shards), "shards": shards,
                         "pseudo_masks": {"from_shards": redact(src) if is_remote(src)
                                          else os.path.abspath(src),
                                          "checkpoint": os.path.abspath(checkpoint),
                                          "checkpoint_sha256": checkpoint_sha256,
                                          "missing": missing}})
    for name in old - kept:
        if "/" not in name and os.path.isfile(os.path.join(out, name)):
            os.unlink(os.path.join(out, name))
    print(f"pseudo-mask shards: {sum(s['count'] for s in shards)} samples in {len(shards)} "
          f"shards -> {out}" + (f" ({missing} images without a mask left out)" if missing else ""),
          flush=True)


def report(args, masks_dir: str, num_classes: int, allow_missing: bool) -> None:
    from epsdist.scoring import evaluate
    result = evaluate(masks_dir, args.shards, num_classes, allow_missing=allow_missing)
    atomic_write_bytes(os.path.join(args.out, "report.json"),
                       json.dumps(result, indent=1, default=float).encode())
    print(f"pseudo-mask mIoU {100 * result['mean_iou']:.2f} "
          f"(report: {os.path.join(args.out, 'report.json')})", flush=True)


if __name__ == "__main__":
    sys.exit(run_cli(main))                 # a config error: one line, exit 2
