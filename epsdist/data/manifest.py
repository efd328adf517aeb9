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
import tempfile

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


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
