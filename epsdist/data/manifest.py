"""The shard format: what one sample holds and what ``manifest.json`` says about the shards.

A shard directory holds ``<prefix>-NNNNNN.tar`` webdataset shards and ``manifest.json``.
One sample per image; its tar members are ``<key>.<field>``:

    jpg      the source image bytes, unchanged (JPEG; PNG sources keep the ``png`` field)
    sal.png  8-bit grayscale saliency, 0..255 -> [0, 1]
    cls.json multi-hot labels: a JSON list of C ints (0/1), column c = classes[c]
    seg.png  ground-truth mask (optional): 0 = background, 1..C = classes, 255 = ignore
    ctx.png  context mask (optional, the synthetic set): c+1 where the context of class c is

``manifest.json``::

    {"format": "epsdist-shards/1", "source": "voc" | "coco" | "synthetic", "split": "...",
     "classes": [C names], "num_samples": N, "fields": ["jpg", "sal.png", ...],
     "shards": [{"name": "train-000000.tar", "count": n, "sha256": "..."}, ...],
     "skipped": {"reason": count, ...}}
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from typing import Callable, Iterator

from ..atomic import atomic_write_bytes  # noqa: F401  (re-exported: one atomic writer)

FORMAT = "epsdist-shards/1"
MANIFEST = "manifest.json"
IMAGE_FIELDS = ("jpg", "png")
SAL_FIELD = "sal.png"
CLS_FIELD = "cls.json"
SEG_FIELD = "seg.png"
CTX_FIELD = "ctx.png"
IGNORE_INDEX = 255


class ManifestError(ValueError):
    """A shard directory or its manifest is missing or malformed."""


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str, manifest: dict) -> None:
    atomic_write_bytes(os.path.join(directory, MANIFEST),
                       json.dumps(manifest, indent=1).encode() + b"\n")


def read_manifest(directory: str) -> dict:
    """Load and check ``directory/manifest.json``; errors name the file and the problem."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: no manifest.json (expected a shard directory written by "
                            f"`python -m epsdist.data.shard`)")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON: {e}") from None
    for key in ("format", "classes", "shards", "num_samples"):
        if key not in m:
            raise ManifestError(f"{path}: missing key {key!r}")
    if m["format"] != FORMAT:
        raise ManifestError(f"{path}: format {m['format']!r}, expected {FORMAT!r}")
    if not m["shards"]:
        raise ManifestError(f"{path}: lists no shards")
    for s in m["shards"]:
        if not {"name", "count", "sha256"} <= set(s):
            raise ManifestError(f"{path}: shard entry {s!r} needs name, count and sha256")
    if sum(s["count"] for s in m["shards"]) != m["num_samples"]:
        raise ManifestError(f"{path}: shard counts do not add up to num_samples")
    return m


def shard_paths(directory: str, manifest: dict) -> list[str]:
    return [os.path.join(directory, s["name"]) for s in manifest["shards"]]


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples, flattened) used for mask PNGs: 0 black,
    1 (128,0,0), ..., 255 (224,224,192)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def sample_key(member_name: str) -> tuple[str | None, str | None]:
    """webdataset's split of a member name into (key, field): the field starts at the first
    dot of the base name (``a/b.sal.png`` -> ``a/b``, ``sal.png``)."""
    directory, _, base = member_name.rpartition("/")
    if "." not in base:
        return None, None
    stem, _, field = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), field


def iter_tar_samples(path: str, want: Callable[[int], bool] = lambda i: True,
                     stop: int | None = None) -> Iterator[tuple[int, dict | None]]:
    """``(index, sample)`` for the samples of one tar in order, ``sample`` a dict
    ``{"__key__", field: bytes}`` when ``want(index)``, else None: the data of unwanted
    samples is never read (tarfile seeks over it). Stops before index ``stop``. Raises
    tarfile/OS errors for unreadable or truncated tars."""
    with tarfile.open(path, mode="r:") as tar:
        index, current, keep = -1, None, False
        for member in tar:
            if not member.isfile():
                continue
            key, field = sample_key(member.name)
            if key is None:
                continue
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield index, (current if keep else None)
                index += 1
                if stop is not None and index >= stop:
                    return
                current, keep = {"__key__": key}, want(index)
            if keep:
                current[field] = tar.extractfile(member).read()
        if current is not None:
            yield index, (current if keep else None)


def iter_rank_samples(directory: str, manifest: dict, rank: int = 0, world_size: int = 1,
                      limit: int | None = None) -> Iterator[tuple[int, dict]]:
    """``(global index, sample)`` for this rank's share of a shard directory: the samples whose
    index in shard order (counts from the manifest) is ``rank`` modulo ``world_size`` (the split
    of epsdist/infer.py), only the first ``limit`` samples when given. Other ranks' samples are
    never read."""
    stop = manifest["num_samples"] if limit is None else min(limit, manifest["num_samples"])
    offset = 0
    for path, entry in zip(shard_paths(directory, manifest), manifest["shards"]):
        if offset >= stop:
            return
        start = offset
        mine = lambda i, start=start: (start + i) % world_size == rank  # noqa: E731
        for index, sample in iter_tar_samples(path, want=mine, stop=stop - start):
            if sample is not None:
                yield start + index, sample
        offset += entry["count"]
