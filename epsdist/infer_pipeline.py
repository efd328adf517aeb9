"""The pseudo-mask pipeline of ``epsdist/infer.py``: decode beside the network, several images
per forward, write beside the network.

Three stages overlap, so the accelerator does not wait on the CPU:

1. Decode (``infer.workers`` DataLoader processes; 0 = in the main process): each reads whole
   shards of this rank's images (shard j goes to worker j mod workers), checks the key
   (``epsdist.data.safepath``; an unsafe key is a named skip), skips an image whose outputs
   exist (a rerun), decodes the JPEG and the labels, and resizes the image to its working size
   (``infer.max_side``, ``infer_guard.working_size``). An image that cannot be decoded (any
   exception) becomes a named, counted skip; only a shard that cannot be read stops the run.
   On CUDA the decoded images arrive in pinned memory (``pin_memory``) and are copied
   asynchronously (``non_blocking``).
2. Infer (main process): images of one working size are grouped, up to ``infer.batch_images``
   and together at most ``infer.max_side ** 2`` pixels (so ``max_side`` bounds the memory of
   a forward as it bounds one image's), and one forward per scale carries all their views
   (``epsdist.cams.batched_view_maps``); the fused post-processing (``cam_to_mask``) then makes
   each image's mask. A group waits for its size for at most ``4 * batch_images`` decoded
   images, then goes as it is. ``batch_images: 1`` is one image per forward, in stream order.
   A group that fails (RuntimeError, e.g. out of memory, or MemoryError) is retried one image
   at a time; an image that still fails is a named, counted skip.
3. Write (``epsdist.infer_outputs.Writer``: a few threads, bounded queue): the mask resized back to the original
   size, the PNG, the CAMs (.npz) and the panels, each written atomically; the mask last (its
   existence marks the image as done). A write that fails stops the run with ``WriteError``
   naming the file: never a silently missing mask.

SIGTERM (and Ctrl-C) end the run through the normal cleanup: the writer threads are stopped
and joined, the decode workers shut down.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from epsdist.cams import batched_view_maps
from epsdist.config import InferConfig
from epsdist.data.augment import decode_gray, decode_rgb
from epsdist.data.manifest import CLS_FIELD, IMAGE_FIELDS, SAL_FIELD, SEG_FIELD
from epsdist.data.safepath import key_path, key_problem
from epsdist.data.source import FetchOptions, iter_shard
from epsdist.infer_guard import working_size
from epsdist.infer_outputs import Writer, resize, write_outputs

OUTPUT_DIRS = ("masks", "cams", "panels")


@dataclass
class Job:
    """What one rank does: its images of ``shards`` (index mod ``world_size`` == ``rank``)."""

    shards: str                     # shard directory or URL
    manifest: dict
    out: str                        # OUT: masks/, cams/, panels/ under it
    icfg: InferConfig = field(default_factory=InferConfig)
    eps: bool = True                # EPS model (softmax over C+1) or CAM baseline (ReLU)
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    cams: bool = False              # also write cams/<key>.npz
    panels: int = 0                 # panels of the first N images (global sample index)
    fetch: FetchOptions | None = None

    @property
    def dirs(self) -> dict:
        return {d: os.path.join(self.out, d) for d in OUTPUT_DIRS}


class Item(NamedTuple):
    """One decoded sample (what a decode worker sends)."""

    key: str
    status: str                     # "ok", "existing" (outputs there) or "skip"
    note: str = ""                  # "skip": the reason, printed with the key
    image: torch.Tensor | None = None   # (h, w, 3) uint8 at the working size
    height: int = 0                 # the original size
    width: int = 0
    labels: torch.Tensor | None = None  # (C,) float32 multi-hot
    panel: bool = False             # draw its panel (with saliency / ground truth when present)
    sal: torch.Tensor | None = None     # panels: (h, w) uint8 at the working size
    gt: torch.Tensor | None = None


# --------------------------------------------------------------------------- 1. decode

def decode_sample(sample: dict, index: int, job: Job) -> Item:
    """A raw sample (global index ``index``) -> an Item at its working size, or a skip."""
    key = sample["__key__"]
    problem = key_problem(key)
    if problem:                         # never a path outside OUT: skipped and named
        return Item(key, "skip", f"{key!r}: unsafe sample key, {problem}")
    dirs = job.dirs
    if (os.path.exists(key_path(dirs["masks"], key, ".png"))
            and (not job.cams or os.path.exists(key_path(dirs["cams"], key, ".npz")))):
        return Item(key, "existing")
    try:
        image = decode_rgb(next((sample[f] for f in IMAGE_FIELDS if f in sample), None))
        labels = torch.tensor(json.loads(sample[CLS_FIELD]), dtype=torch.float32)
        H, W = image.shape[:2]
        h, w = working_size(H, W, job.icfg.max_side)
        small = (h, w) != (H, W)
        work = resize(image, h, w, Image.BILINEAR) if small else image
        sal = gt = None
        want_panel = index < job.panels
        if want_panel and SAL_FIELD in sample:
            sal = decode_gray(sample[SAL_FIELD])
            sal = torch.from_numpy(resize(sal, h, w, Image.BILINEAR) if small else sal)
        if want_panel and SEG_FIELD in sample:
            gt = np.asarray(Image.open(io.BytesIO(sample[SEG_FIELD])))
            gt = torch.from_numpy(resize(gt, h, w, Image.NEAREST) if small else gt.copy())
    except Exception as e:              # noqa: BLE001 -- any bad image: a named skip
        return Item(key, "skip", f"{key}: {type(e).__name__}: {e}")
    return Item(key, "ok", "", torch.from_numpy(work), H, W, labels, want_panel, sal, gt)


class DecodedSamples(IterableDataset):
    """The rank's samples of ``job``, decoded (``decode_sample``); with DataLoader workers,
    worker i reads the shards j with j mod workers == i."""

    def __init__(self, job: Job):
        self.job = job

    def __iter__(self):
        job, info = self.job, get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        offset = 0
        for j, entry in enumerate(job.manifest["shards"]):
            start, offset = offset, offset + entry["count"]
            if j % workers != worker:
                continue
            mine = lambda i, start=start: (start + i) % job.world_size == job.rank  # noqa: E731
            for index, sample in iter_shard(job.shards, entry, want=mine, fetch=job.fetch):
                if sample is not None:
                    yield decode_sample(sample, start + index, job)


def _worker_init(worker_id: int) -> None:
    """Decode workers leave Ctrl-C to the main process (which shuts them down) and end on
    SIGTERM (the handler inherited from the main process would raise in the worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --------------------------------------------------------------------------- 2. infer

def group_size(height: int, width: int, icfg: InferConfig) -> int:
    """How many images of working size (height, width) one forward carries: up to
    ``infer.batch_images``, together at most ``infer.max_side ** 2`` pixels (at least one)."""
    return max(1, min(icfg.batch_images, icfg.max_side ** 2 // (height * width)))


class Grouper:
    """Decoded images -> groups of one working size (``group_size``); a size waits for its
    group for at most ``hold`` pending images, then goes as it is (oldest size first)."""

    def __init__(self, icfg: InferConfig, hold: int | None = None):
        self.icfg, self.hold = icfg, hold or 4 * icfg.batch_images
        self.buckets: dict[tuple[int, int], list[Item]] = {}

    def add(self, item: Item) -> list[list[Item]]:
        size = tuple(item.image.shape[:2])
        bucket = self.buckets.setdefault(size, [])
        bucket.append(item)
        ready = []
        if len(bucket) >= group_size(*size, self.icfg):
            ready.append(self.buckets.pop(size))
        while sum(len(b) for b in self.buckets.values()) > self.hold:
            ready.append(self.buckets.pop(next(iter(self.buckets))))
        return ready

    def flush(self) -> list[list[Item]]:
        ready, self.buckets = list(self.buckets.values()), {}
        return ready


def group_masks(model, images: list[torch.Tensor], labels: list[torch.Tensor],
                icfg: InferConfig, eps: bool, device: torch.device, need_norm: bool):
    """N same-size (h, w, 3) uint8 host images (pinned on CUDA) and their labels -> per image
    (mask (h, w) uint8 numpy, normalised CAMs (L, h, w) on the host or None, classes (L,)
    numpy): all views of the N images through ``batched_view_maps`` (one forward per scale),
    then ``cam_to_mask`` per image. What infer.py and the GPU check (``epsdist.gpucheck``) run."""
    from epsdist_kernels.cam_post import cam_to_mask
    cuda = device.type == "cuda"
    if len(images) == 1:
        batch = images[0][None]
    else:                               # stacked into pinned memory on CUDA
        batch = torch.empty((len(images), *images[0].shape), dtype=torch.uint8, pin_memory=cuda)
        torch.stack(images, out=batch)
    x = batch.permute(0, 3, 1, 2).to(device, non_blocking=cuda)
    size = tuple(x.shape[2:])
    out = []
    for (views, flips), lab in zip(batched_view_maps(model, x, icfg.scales, icfg.flip, eps,
                                                     icfg.precision), labels):
        mask, norm, classes = cam_to_mask(views, flips, lab, size, icfg.bg_threshold,
                                          return_norm=need_norm, impl=icfg.impl)
        out.append((mask.cpu().numpy().astype(np.uint8),
                    None if norm is None else norm.cpu(), classes.cpu().numpy()))
    return out


def infer_group(model, items: list[Item], job: Job) -> list:
    """``group_masks`` of a group of decoded items."""
    return group_masks(model, [it.image for it in items], [it.labels for it in items], job.icfg,
                       job.eps, job.device, need_norm=job.cams or any(it.panel for it in items))


def infer_or_skip(model, items: list[Item], job: Job) -> list[tuple[Item, tuple | None]]:
    """(item, result) per item; a group that fails is retried one image at a time, and an image
    that still fails (out of memory, ...) gets None and is named, so the others get masks."""
    try:
        return list(zip(items, infer_group(model, items, job)))
    except (RuntimeError, MemoryError) as e:
        if job.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(items) > 1:
            return [pair for it in items for pair in infer_or_skip(model, [it], job)]
        message = str(e).splitlines()[0] if str(e) else ""
        print(f"skipping {items[0].key}: inference failed ({type(e).__name__}: {message})",
              file=sys.stderr, flush=True)
        return [(items[0], None)]


# --------------------------------------------------------------------------- the loop

@contextlib.contextmanager
def sigterm_exits():
    """SIGTERM raises SystemExit(143) in the main thread, so the cleanup runs; a forked child
    that has not replaced the handler yet just ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(model, job: Job, progress=None) -> Counter:
    """Masks (and CAMs, panels) of the rank's images of ``job``. Returns the counts
    ``written``, ``existing``, ``skipped`` (each skip named on stderr); raises WriteError.
    ``progress``: a tqdm bar, advanced per image and closed at the end."""
    for d in job.dirs.values():
        os.makedirs(d, exist_ok=True)
    workers, cuda = job.icfg.workers, job.device.type == "cuda"
    loader = DataLoader(DecodedSamples(job), batch_size=None, num_workers=workers,
                        pin_memory=cuda, worker_init_fn=_worker_init if workers else None,
                        prefetch_factor=4 if workers else None)
    counts = Counter(written=0, existing=0, skipped=0)
    grouper, writer, items = Grouper(job.icfg), Writer(), None

    def infer(group):
        for item, result in infer_or_skip(model, group, job):
            if result is None:
                counts["skipped"] += 1
            else:
                writer.submit(write_outputs, item, result, job.dirs, job.cams)
                counts["written"] += 1

    try:
        with sigterm_exits():
            items = iter(loader)
            for item in items:
                if item.status == "ok":
                    for group in grouper.add(item):
                        infer(group)
                elif item.status == "existing":
                    counts["existing"] += 1
                else:
                    print(f"skipping {item.note}", file=sys.stderr, flush=True)
                    counts["skipped"] += 1
                if progress is not None:
                    progress.update(1)
            for group in grouper.flush():
                infer(group)
            writer.close()
    finally:
        writer.close(abort=True)            # after a normal close: nothing left to do
        # the decode workers end now, not when the iterator is collected (an exception's
        # traceback may hold it): DataLoader's own shutdown, as at the end of an epoch
        getattr(items, "_shutdown_workers", lambda: None)()
        if progress is not None:
            progress.close()
    return counts
