"""Streaming training loader over epsdist shards: equal batches on every rank, exact resume.

The scheme, for one epoch ``e`` (N samples in the manifest, W ranks, batch size b per rank,
n DataLoader workers per rank):

1. Order. The shards are shuffled with ``Random(f"{seed}/{e}")``; the epoch's global sample
   order is the concatenation of the shards in that order (sample counts from the manifest).
2. Ranks. Every rank gets exactly ``B = N // (W b)`` batches: rank r reads positions
   ``[r B b, (r+1) B b)`` of the global order. The remainder (< W b samples) is dropped, and
   since the shard order changes every epoch, different samples are dropped each epoch.
   Splitting at sample level (not whole shards) keeps ranks equal whatever the shard counts;
   a slot seeks over the tar headers of samples outside its range without reading their data
   (a remote shard, epsdist.data.source, is streamed from its start: the samples before the
   range are read and dropped, the fetch stops after the range).
3. Workers. Rank batch j is made by logical worker ``j mod n``, which reads a contiguous
   sub-range of the rank's range, shuffles the raw samples with a seeded buffer
   (``webdataset.shuffle``), decodes, augments and batches them. The DataLoader serves
   workers round-robin, so the rank's batch sequence is fixed by (seed, W, n, b).
4. Augmentation draws come from ``Random(f"{seed}/{e}/{key}")``: they depend on the sample,
   not on the position in the stream, so skipping needs no replay of random draws.
5. Resume. ``state_dict()`` holds (epoch, batches consumed). Restoring to k consumed batches
   makes logical worker l skip its first ``k_l b`` raw samples (k_l = batches of l among the
   first k) before decoding, and DataLoader worker i plays logical worker ``(i + k) mod n`` so
   the round-robin continues where it stopped: the next batches equal an uninterrupted run.
6. Bad samples never change the counts (an uneven count would hang DDP): a corrupt image, a
   missing saliency, a size mismatch or the samples lost to a truncated tar or to a remote
   shard still unreachable after the retries (epsdist.data.source) are replaced by a
   good sample of the same batch, and counted by reason in ``loader.skipped``; the first
   few are logged with their shard and key.

Segmentation (``augment=SegAugment(...)``, the segmentation stage): the same plan, positions,
workers and resume; a sample is the image and its ``seg.png`` class mask (a pseudo-mask or the
ground truth; the saliency is not read) and a batch is ``Batch(image, None, labels, keys,
mask)`` with ``mask`` (b, crop, crop) int64 (uint8 through the worker queue), 255 = ignore.
A mask of the wrong size or with values outside 0..C and 255 is a skipped sample.
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import random
import signal
import tarfile
from typing import Iterator, NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from .augment import (IGNORE_INDEX, DecodeError, SegAugment, TrainAugment, decode_gray,
                      decode_mask, decode_rgb, normalize_batch, normalize_images)
from .manifest import (CLS_FIELD, IMAGE_FIELDS, SAL_FIELD, SEG_FIELD, read_manifest,
                       shard_digest_problem)
from .source import FetchOptions, ShardUnavailable, is_remote, iter_shard
from .safepath import key_problem

log = logging.getLogger("epsdist.data")
MAX_LOGGED_SKIPS = 10


class Batch(NamedTuple):
    image: torch.Tensor      # (b, 3, crop, crop) float32, ImageNet-normalised (uint8 in workers)
    saliency: torch.Tensor   # (b, 1, crop, crop) float32 in [0, 1] (uint8 in workers); seg: None
    labels: torch.Tensor     # (b, C) float32 multi-hot
    keys: list               # b sample keys (image ids)
    mask: torch.Tensor | None = None  # seg: (b, crop, crop) int64, 255 = ignore (uint8 in workers)


class SkipSample(Exception):
    """A sample that cannot be used; the message is the counted reason."""


# --------------------------------------------------------------------------- the epoch plan

def batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    n = num_samples // (world_size * batch_size)
    if n < 1:
        raise ValueError(f"{num_samples} samples cannot give every one of {world_size} ranks a "
                         f"full batch of {batch_size}; lower train.batch_size or use more data")
    return n


def worker_batches(n_batches: int, num_workers: int, worker: int) -> int:
    """How many of the first ``n_batches`` rank batches belong to logical ``worker``."""
    return n_batches // num_workers + (worker < n_batches % num_workers)


def epoch_shard_order(counts: list[int], seed: int, epoch: int) -> list[int]:
    order = list(range(len(counts)))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def slot_range(batches: int, batch_size: int, rank: int, num_workers: int,
               worker: int) -> tuple[int, int]:
    """[start, stop) of the epoch's global order read by (rank, logical worker)."""
    start = rank * batches * batch_size
    for w in range(worker):
        start += worker_batches(batches, num_workers, w) * batch_size
    return start, start + worker_batches(batches, num_workers, worker) * batch_size


def read_range(shard_dir: str, shards: list[dict], order: list[int], start: int,
               stop: int, fetch: FetchOptions | None = None) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__shard__", field: bytes}`` at positions [start, stop) of the
    concatenation of ``shards`` in ``order``. Samples a truncated or unreadable tar cannot
    deliver come out as ``{"__error__": reason}`` placeholders, so the count is exact.
    ``shard_dir`` may be a URL (epsdist.data.source, fetched with ``fetch``)."""
    offset = 0
    for idx in order:
        count = shards[idx]["count"]
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            yield from _read_shard_part(shard_dir, shards[idx], lo - offset, hi - offset, fetch)
        offset += count
        if offset >= stop:
            break


def _read_shard_part(shard_dir: str, entry: dict, lo: int, hi: int,
                     fetch: FetchOptions | None) -> Iterator[dict]:
    name, delivered = entry["name"], 0
    # A local shard is checked against the manifest before any of its samples is used (remote
    # ones are checked when they enter data.cache_dir).
    problem = (entry.get("sha256") and not is_remote(shard_dir)
               and shard_digest_problem(os.path.join(shard_dir, name), entry["sha256"]))
    if problem:                     # no sample of a shard that is not the manifest's is used
        yield from ({"__error__": problem, "__key__": None, "__shard__": name} for _ in range(lo, hi))
        return
    try:
        for index, sample in iter_shard(shard_dir, entry, want=lambda i: lo <= i < hi, stop=hi,
                                        fetch=fetch):
            if sample is not None:
                sample["__shard__"] = name
                yield sample
                delivered += 1
    except ShardUnavailable as e:
        reason = f"unreachable shard {name}: {e}"
    except (tarfile.TarError, OSError, EOFError) as e:
        reason = f"unreadable tar {name}: {type(e).__name__}: {e}"
    else:
        reason = f"truncated tar {name}: fewer samples than manifest.json lists"
    for _ in range(hi - lo - delivered):
        yield {"__error__": reason, "__key__": None, "__shard__": name}


# --------------------------------------------------------------------------- decoding

def decode_sample(raw: dict, num_classes: int, augment: TrainAugment, seed: int, epoch: int):
    """Raw sample -> (image, saliency, labels, key) -- or (image, mask, labels, key) for a
    segmentation augment; raises SkipSample with the reason."""
    if getattr(augment, "task", "cls") == "seg":
        return decode_seg_sample(raw, num_classes, augment, seed, epoch)
    if CLS_FIELD not in raw and "__error__" not in raw:
        raise SkipSample("missing labels")
    key, image, sal = _decode_image_and(raw, SAL_FIELD, decode_gray, "saliency")
    labels = _decode_labels(raw, num_classes)
    image, sal = augment(image, sal, random.Random(f"{seed}/{epoch}/{key}"))
    return image, sal, labels, key


def decode_seg_sample(raw: dict, num_classes: int, augment: SegAugment, seed: int, epoch: int):
    """Raw sample -> (image, mask, labels, key) for the segmentation stage; raises SkipSample.
    Labels come from ``cls.json``, or from the classes present in the mask without one."""
    key, image, mask = _decode_image_and(raw, SEG_FIELD, decode_mask, "mask")
    present = np.bincount(mask.ravel(), minlength=256)
    if present[num_classes + 1:IGNORE_INDEX].any() or present[IGNORE_INDEX + 1:].any():
        raise SkipSample("mask values outside 0..C and 255")
    if CLS_FIELD in raw:
        labels = _decode_labels(raw, num_classes)
    else:
        labels = torch.from_numpy(present[1:num_classes + 1] > 0).float()
    image, mask = augment(image, mask, random.Random(f"{seed}/{epoch}/{key}"))
    return image, mask, labels, key


def _decode_image_and(raw: dict, field: str, decode, what: str):
    """(key, RGB image, decoded ``field``) of a raw sample whose two pictures agree in size."""
    if "__error__" in raw:
        raise SkipSample(raw["__error__"])
    if key_problem(raw["__key__"]):      # a key that could name a path elsewhere: never used
        raise SkipSample(f"unsafe key ({key_problem(raw['__key__'])})")
    image_bytes = next((raw[f] for f in IMAGE_FIELDS if f in raw), None)
    if image_bytes is None:
        raise SkipSample("missing image")
    if field not in raw:
        raise SkipSample(f"missing {what}")
    try:
        image = decode_rgb(image_bytes)
    except DecodeError:
        raise SkipSample("corrupt image") from None
    try:
        second = decode(raw[field])
    except DecodeError:
        raise SkipSample(f"corrupt {what}") from None
    if second.shape != image.shape[:2]:
        raise SkipSample(f"image/{what} size mismatch")
    return raw["__key__"], image, second


def _decode_labels(raw: dict, num_classes: int) -> torch.Tensor:
    try:
        labels = torch.tensor(json.loads(raw[CLS_FIELD]), dtype=torch.float32)
    except (ValueError, TypeError):
        raise SkipSample("corrupt labels") from None
    if labels.shape != (num_classes,):
        raise SkipSample("labels of the wrong length")
    return labels


class _Skipped(NamedTuple):
    """A sample that was skipped, in place in the stream."""

    reason: str
    shard: str
    key: str


def batch_with_substitutes(decoded: Iterator, batch_size: int, where: str, task: str = "cls"):
    """Group (sample | SkipSample) into batches of exactly ``batch_size``; a skipped sample is
    replaced by a good one of the same batch (or the last good one seen). Yields
    ``(Batch, [(reason, shard, key), ...])``; for ``task="seg"`` the samples' second item is
    the mask and goes to ``Batch.mask``."""
    last_good = None
    for group in iter(lambda: list(itertools.islice(decoded, batch_size)), []):
        good = [s for s in group if not isinstance(s, _Skipped)]
        skips = [(s.reason, s.shard, s.key) for s in group if isinstance(s, _Skipped)]
        if good:
            last_good = good[-1]
        elif last_good is None:
            raise RuntimeError(f"{where}: no decodable sample in a whole batch; first problem: "
                               f"{skips[0][1]} {skips[0][2]}: {skips[0][0]}")
        filled = [s if not isinstance(s, _Skipped) else (good[i % len(good)] if good else last_good)
                  for i, s in enumerate(group)]
        images, sals, labels, keys = zip(*filled)            # seg: sals are the masks
        # default_collate stacks straight into shared memory inside a DataLoader worker,
        # which saves the copy the worker->main queue would otherwise make
        if task == "seg":
            yield Batch(default_collate(images), None, default_collate(labels), list(keys),
                        mask=default_collate(sals)), skips
            continue
        yield Batch(default_collate(images), default_collate(sals), default_collate(labels),
                    list(keys)), skips


# --------------------------------------------------------------------------- the dataset

class _EpochStream(IterableDataset):
    """One rank's batches for one epoch, from batch ``first_batch`` on (see module doc)."""

    def __init__(self, shard_dir, manifest, *, epoch, first_batch, rank, world_size,
                 num_workers, batch_size, seed, augment, shuffle_buffer, fetch=None):
        super().__init__()
        self.shard_dir, self.manifest, self.epoch = shard_dir, manifest, epoch
        self.first_batch, self.rank, self.world_size = first_batch, rank, world_size
        self.num_workers, self.batch_size, self.seed = num_workers, batch_size, seed
        self.augment, self.shuffle_buffer, self.fetch = augment, shuffle_buffer, fetch

    def __iter__(self):
        info = get_worker_info()
        n = max(1, self.num_workers)
        worker = ((info.id if info else 0) + self.first_batch) % n
        batches = batches_per_rank(self.manifest["num_samples"], self.world_size, self.batch_size)
        counts = [s["count"] for s in self.manifest["shards"]]
        order = epoch_shard_order(counts, self.seed, self.epoch)
        start, stop = slot_range(batches, self.batch_size, self.rank, n, worker)
        tag = f"{self.seed}/{self.epoch}/{self.rank}/{worker}"
        raw = wds.DataPipeline(
            lambda: read_range(self.shard_dir, self.manifest["shards"], order, start, stop,
                               self.fetch),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                        rng=random.Random(tag)),
        )
        skip = worker_batches(self.first_batch, n, worker) * self.batch_size
        decoded = (self._decode(s) for s in itertools.islice(iter(raw), skip, None))
        where = f"rank {self.rank} worker {worker} epoch {self.epoch}"
        logged = 0
        task = getattr(self.augment, "task", "cls")
        for batch, skips in batch_with_substitutes(decoded, self.batch_size, where, task):
            for reason, shard, key in skips:
                if logged < MAX_LOGGED_SKIPS:
                    log.warning("skipping %s of %s: %s (%s)", f"sample {key!r}" if key is not None
                                else "a sample", shard, reason, where)
                    logged += 1
            yield batch, [s[0] for s in skips]

    def _decode(self, raw):
        try:
            return decode_sample(raw, len(self.manifest["classes"]), self.augment, self.seed,
                                 self.epoch)
        except SkipSample as e:
            return _Skipped(str(e), raw.get("__shard__"), raw.get("__key__"))


def _ignore_stop_signal(worker_id: int) -> None:
    """Workers leave SIGUSR1 (Slurm's time-limit warning, delivered to every process of the
    step) to the trainer process, which checkpoints and exits."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class ShardLoader:
    """Training batches for one rank; iterate once per epoch (``for batch in loader``).

    ``len(loader)`` is the batch count of a whole epoch, equal on every rank. Workers send
    uint8 crops; the batch is moved to ``device`` (pinned, asynchronous on CUDA) and
    normalised there. ``augment``: ``TrainAugment`` (stage 1: image, saliency, labels) or
    ``SegAugment`` (segmentation: image, mask, labels). ``shard_dir`` may be the URL of a
    shard directory (epsdist.data.source), fetched as ``fetch`` says.
    """

    def __init__(self, shard_dir: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, seed: int = 0,
                 augment: TrainAugment | SegAugment | None = None,
                 shuffle_buffer: int = 256, device: torch.device | str | None = None,
                 fetch: FetchOptions | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError(f"batch_size >= 1, num_workers >= 0, shuffle_buffer >= 1 expected, "
                             f"got {batch_size}, {num_workers}, {shuffle_buffer}")
        self.shard_dir, self.fetch = shard_dir, fetch
        self.manifest = read_manifest(shard_dir, fetch)
        self.classes = list(self.manifest["classes"])
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self.augment = augment or TrainAugment()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batches = batches_per_rank(self.manifest["num_samples"], world_size, batch_size)
        self.epoch, self.consumed = 0, 0
        self.skipped: collections.Counter = collections.Counter()

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Batch]:
        stream = _EpochStream(
            self.shard_dir, self.manifest, epoch=self.epoch, first_batch=self.consumed,
            rank=self.rank, world_size=self.world_size, num_workers=self.num_workers,
            batch_size=self.batch_size, seed=self.seed, augment=self.augment,
            shuffle_buffer=self.shuffle_buffer, fetch=self.fetch)
        cuda = self.device.type == "cuda"
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                            worker_init_fn=_ignore_stop_signal if self.num_workers else None,
                            pin_memory=cuda, prefetch_factor=2 if self.num_workers else None)
        for batch, reasons in loader:
            self.skipped.update(reasons)
            self.consumed += 1
            if batch.mask is not None:
                images = normalize_images(batch.image.to(self.device, non_blocking=cuda))
                yield Batch(images, None, batch.labels.to(self.device, non_blocking=cuda),
                            batch.keys, batch.mask.to(self.device, non_blocking=cuda).long())
                continue
            images, sals = (t.to(self.device, non_blocking=cuda) for t in batch[:2])
            images, sals = normalize_batch(images, sals)
            yield Batch(images, sals, batch.labels.to(self.device, non_blocking=cuda), batch.keys)
        if self.consumed != self.batches:
            raise RuntimeError(f"rank {self.rank}: epoch {self.epoch} gave {self.consumed} "
                               f"batches, expected {self.batches}")
        self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "world_size": self.world_size, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "num_samples": self.manifest["num_samples"],
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` stopped. With another world size, worker count,
        batch size, seed or dataset the stream cannot be reproduced: the loader then starts
        the next epoch and logs a warning (the rest of the interrupted epoch is not seen)."""
        self.skipped = collections.Counter(state.get("skipped", {}))
        mine = self.state_dict()
        same = all(state.get(k) == mine[k] for k in
                   ("seed", "world_size", "num_workers", "batch_size", "num_samples"))
        if same:
            self.epoch, self.consumed = state["epoch"], state["consumed"]
            if self.consumed >= self.batches:
                self.epoch, self.consumed = self.epoch + 1, 0
        else:
            changed = {k: (state.get(k), mine[k]) for k in
                       ("seed", "world_size", "num_workers", "batch_size", "num_samples")
                       if state.get(k) != mine[k]}
            log.warning("loader state from another layout %s (saved, now): the interrupted "
                        "epoch %s cannot be replayed exactly; starting epoch %s",
                        changed, state["epoch"], state["epoch"] + 1)
            self.epoch, self.consumed = state["epoch"] + 1, 0
