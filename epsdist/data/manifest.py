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

and, for a dataset with context masks (``ctx.png``), ``"contexts": [names]`` (context id =
position + 1).
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from typing import Callable, Iterator

from ..atomic import atomic_write_bytes  # noqa: F401  (re-exported: one atomic writer)
from .safepath import shard_name_problem

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


_DIGEST_CHECKED: dict = {}      # (path, size, mtime_ns) -> problem or None, per process


def shard_digest_problem(path: str, expected: str) -> str | None:
    """None if the file's sha256 is ``expected``, else the problem naming the file. Hashed once
    per process for a given (path, size, mtime): a loader worker checks a shard the first time
    it opens it, before any of its samples are used."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{path}: cannot read ({e.strerror or e})"
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _DIGEST_CHECKED:
        digest = sha256_file(path)
        _DIGEST_CHECKED[key] = (None if digest == expected else
                                f"sha256 mismatch {os.path.basename(path)}: {digest[:12]}... "
                                f"!= manifest {expected[:12]}... (modified or damaged shard)")
    return _DIGEST_CHECKED[key]


def write_manifest(directory: str, manifest: dict) -> None:
    atomic_write_bytes(os.path.join(directory, MANIFEST),
                       json.dumps(manifest, indent=1).encode() + b"\n")


def read_manifest(location: str, fetch=None) -> dict:
    """Load and check ``location/manifest.json``; errors name the file and the problem.
    ``location``: a shard directory, or the URL of one (``epsdist.data.source``; ``fetch``: its
    FetchOptions, the defaults when None)."""
    from .source import is_remote, read_remote_manifest
    if is_remote(location):
        return read_remote_manifest(location, fetch)
    path = os.path.join(location, MANIFEST)
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: no manifest.json (expected a shard directory written by "
                            f"`python -m epsdist.data.shard`)")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON: {e}") from None
    return check_manifest(m, path)


def check_manifest(m, path: str) -> dict:
    """``m`` if it is a valid manifest, else ManifestError naming ``path`` and the problem."""
    if not isinstance(m, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    for key in ("format", "classes", "shards", "num_samples"):
        if key not in m:
            raise ManifestError(f"{path}: missing key {key!r}")
    if m["format"] != FORMAT:
        raise ManifestError(f"{path}: format {m['format']!r}, expected {FORMAT!r}")
    if not m["shards"]:
        raise ManifestError(f"{path}: lists no shards")
    for s in m["shards"]:
        if not isinstance(s, dict) or not {"name", "count", "sha256"} <= set(s):
            raise ManifestError(f"{path}: shard entry {s!r} needs name, count and sha256")
        try:
            check_shard_name(s["name"])
        except ManifestError as e:
            raise ManifestError(f"{path}: {e}") from None
    if sum(s["count"] for s in m["shards"]) != m["num_samples"]:
        raise ManifestError(f"{path}: shard counts do not add up to num_samples")
    return m


def check_shard_name(name) -> str:
    """``name`` if it may name a shard of a shard directory (a plain file name: see
    :func:`epsdist.data.safepath.shard_name_problem`), else ManifestError naming it."""
    problem = shard_name_problem(name)
    if problem:
        raise ManifestError(f"unsafe shard name {name!r}: {problem} (expected a file name inside "
                            f"the shard directory)")
    return name


def shard_paths(location: str, manifest: dict) -> list[str]:
    """The path (or URL) of every shard of ``manifest``, through ``source.join_shard``."""
    from .source import join_shard
    return [join_shard(location, s["name"]) for s in manifest["shards"]]


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
                     stop: int | None = None, fileobj=None) -> Iterator[tuple[int, dict | None]]:
    """``(index, sample)`` for the samples of one tar in order, ``sample`` a dict
    ``{"__key__", field: bytes}`` when ``want(index)``, else None: the data of unwanted
    samples is never read (tarfile seeks over it). Stops before index ``stop``. Raises
    tarfile/OS errors for unreadable or truncated tars. ``fileobj``: read this stream instead
    of opening ``path`` (a remote shard: unwanted samples are read and dropped)."""
    with tarfile.open(path, mode="r:" if fileobj is None else "r|", fileobj=fileobj) as tar:
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


def iter_rank_samples(location: str, manifest: dict, rank: int = 0, world_size: int = 1,
                      limit: int | None = None, fetch=None) -> Iterator[tuple[int, dict]]:
    """``(global index, sample)`` for this rank's share of a shard directory (or the URL of
    one, ``fetch`` its FetchOptions): the samples whose index in shard order (counts from the
    manifest) is ``rank`` modulo ``world_size`` (the split of epsdist/infer.py), only the first
    ``limit`` samples when given. Other ranks' samples are never decoded (never read from a
    local directory)."""
    from .source import iter_shard
    stop = manifest["num_samples"] if limit is None else min(limit, manifest["num_samples"])
    offset = 0
    for entry in manifest["shards"]:
        if offset >= stop:
            return
        start = offset
        mine = lambda i, start=start: (start + i) % world_size == rank  # noqa: E731
        for index, sample in iter_shard(location, entry, want=mine, stop=stop - start,
                                        fetch=fetch):
            if sample is not None:
                yield start + index, sample
        offset += entry["count"]
