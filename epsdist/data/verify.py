"""Check a shard directory against its manifest.

    python -m epsdist.data.verify OUT [--quiet] [--retries N]

``OUT`` is a shard directory or the URL of one (http(s)://, s3://, gs://, pipe:...; see
epsdist.data.source): a remote shard is fetched to a temporary file, one at a time, first.
Reads ``OUT/manifest.json``, re-hashes every shard (sha256) and opens it with ``tarfile``,
decoding every sample: the image (``jpg``/``png``, fully decoded with Pillow, the same
decoder the writer validated with), ``sal.png`` (8-bit gray, the image's size), ``cls.json``
(a list of len(classes) ints 0/1), ``seg.png``/``ctx.png`` when present (8-bit indices in
{0..C, 255}, the image's size). Sample counts must match the manifest and keys must be unique
across all shards. Prints one line per shard (not with ``--quiet``), every problem, and a
summary. Exit codes: 0 all good, 1 any problem (each names its shard and key), 2 manifest
missing or invalid.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
from typing import Callable, Optional

import numpy as np
from PIL import Image

from epsdist.data import manifest as mf
from epsdist.data import source
from epsdist.data.safepath import key_problem

_MASK_FIELDS = (mf.SEG_FIELD, mf.CTX_FIELD)


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's split of a member name: key = path + basename up to its first dot."""
    directory, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), field


def _decode(data: bytes) -> Image.Image:
    if not data:
        raise ValueError("empty member (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:        # its message names the BytesIO object
        raise ValueError(f"no image format Pillow knows, {len(data)} bytes") from None
    im.load()
    return im


def check_sample(key: str, fields: dict, classes: list) -> list[str]:
    """Problems of one sample (messages without the shard name)."""
    problems = [f"{key!r}: unsafe key, {key_problem(key)}"] if key_problem(key) else []
    images = [f for f in mf.IMAGE_FIELDS if f in fields]
    unknown = sorted(set(fields) - set(mf.IMAGE_FIELDS) - {mf.SAL_FIELD, mf.CLS_FIELD, *_MASK_FIELDS})
    if unknown:
        problems.append(f"{key}: unknown fields {unknown}")
    if len(images) != 1:
        return problems + [f"{key}: expected one image field (jpg or png), found {images or 'none'}"]
    try:
        size = _decode(fields[images[0]]).size
    except Exception as e:  # noqa: BLE001
        return problems + [f"{key}: {images[0]} does not decode ({e})"]
    if mf.SAL_FIELD not in fields:
        problems.append(f"{key}: no {mf.SAL_FIELD}")
    else:
        try:
            sal = _decode(fields[mf.SAL_FIELD])
            if sal.mode != "L":
                problems.append(f"{key}: {mf.SAL_FIELD} mode {sal.mode}, expected L")
            if sal.size != size:
                problems.append(f"{key}: {mf.SAL_FIELD} size {sal.size} != image size {size}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"{key}: {mf.SAL_FIELD} does not decode ({e})")
    if mf.CLS_FIELD not in fields:
        problems.append(f"{key}: no {mf.CLS_FIELD}")
    else:
        try:
            cls = json.loads(fields[mf.CLS_FIELD])
            if not (isinstance(cls, list) and len(cls) == len(classes)
                    and all(type(v) is int and v in (0, 1) for v in cls)):
                problems.append(f"{key}: {mf.CLS_FIELD} is not a list of {len(classes)} ints 0/1")
        except ValueError as e:
            problems.append(f"{key}: {mf.CLS_FIELD} is not JSON ({e})")
    for field in _MASK_FIELDS:
        if field not in fields:
            continue
        try:
            mask = _decode(fields[field])
        except Exception as e:  # noqa: BLE001
            problems.append(f"{key}: {field} does not decode ({e})")
            continue
        if mask.mode not in ("L", "P"):
            problems.append(f"{key}: {field} mode {mask.mode}, expected 8-bit indices")
            continue
        if mask.size != size:
            problems.append(f"{key}: {field} size {mask.size} != image size {size}")
        values = np.flatnonzero(np.bincount(np.asarray(mask).ravel(), minlength=256))
        bad = [int(v) for v in values if v > len(classes) and v != mf.IGNORE_INDEX]
        if bad:
            problems.append(f"{key}: {field} has values {bad} outside 0..{len(classes)} and 255")
    return problems


def check_shard(path: str, entry: dict, classes: list, seen: dict) -> list[str]:
    """Problems of one shard (each message starts with the shard name). ``seen``: key -> shard."""
    name = entry["name"]
    if not os.path.isfile(path):
        return [f"{name}: missing"]
    problems = []
    digest = mf.sha256_file(path)
    if digest != entry["sha256"]:
        problems.append(f"{name}: sha256 {digest} != manifest {entry['sha256']}")
    count = 0
    try:
        with tarfile.open(path, "r:") as tar:
            key, fields = None, {}

            def finish():
                nonlocal count
                if key is None:
                    return
                count += 1
                if key in seen:
                    problems.append(f"{name}: {key}: duplicate key (also in {seen[key]})")
                seen[key] = name
                problems.extend(f"{name}: {p}" for p in check_sample(key, fields, classes))

            for member in tar:
                if not member.isfile():
                    problems.append(f"{name}: {member.name}: not a regular file")
                    continue
                k, field = _split_member(member.name)
                if k != key:
                    finish()
                    key, fields = k, {}
                if field in fields:
                    problems.append(f"{name}: {k}: field {field} twice")
                fields[field] = tar.extractfile(member).read()
            finish()
    except (tarfile.TarError, EOFError, OSError) as e:
        problems.append(f"{name}: unreadable or truncated tar after {count} samples ({e})")
        return problems
    if count != entry["count"]:
        problems.append(f"{name}: {count} samples, manifest says {entry['count']}")
    return problems


def verify(out: str, *, log: Optional[Callable[[str], None]] = None,
           fetch: Optional[source.FetchOptions] = None) -> list[str]:
    """All problems of the shard directory (or URL) ``out`` (empty list = good). ``log`` gets
    one line per shard. Raises :class:`epsdist.data.manifest.ManifestError` if the manifest is
    missing/invalid."""
    m = mf.read_manifest(out, fetch)
    classes = m["classes"]
    problems, seen = [], {}
    for entry, path in zip(m["shards"], mf.shard_paths(out, m)):
        if source.is_remote(out):
            shard_problems = _check_remote_shard(path, entry, classes, seen, fetch)
        else:
            shard_problems = check_shard(path, entry, classes, seen)
        problems += shard_problems
        if log:
            log(f"{entry['name']}: {entry['count']} samples, "
                + (f"{len(shard_problems)} problem(s)" if shard_problems else "ok"))
    return problems


def _check_remote_shard(url, entry, classes, seen, fetch) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="epsdist-verify-") as tmp:
        path = os.path.join(tmp, "shard.tar")
        try:
            source.fetch_file(url, path, fetch or source.FetchOptions())
        except source.ShardUnavailable as e:
            return [f"{entry['name']}: unreachable ({e})"]
        return check_shard(path, entry, classes, seen)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m epsdist.data.verify",
                                description="Check shards against their manifest.json.")
    p.add_argument("out", help="shard directory (holds manifest.json), or the URL of one")
    p.add_argument("--quiet", action="store_true", help="no per-shard lines")
    p.add_argument("--retries", type=int, default=source.FetchOptions.retries,
                   help="retries of a failed fetch (remote OUT)")
    a = p.parse_args(argv)
    fetch = source.FetchOptions(retries=a.retries)
    try:
        m = mf.read_manifest(a.out, fetch)
        problems = verify(a.out, log=None if a.quiet else print, fetch=fetch)
    except mf.ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem, file=sys.stderr)
    n, s, where = m["num_samples"], len(m["shards"]), source.redact(a.out)
    if problems:
        print(f"{where}: FAILED, {len(problems)} problem(s) in {s} shards ({n} samples listed)")
        return 1
    print(f"{where}: ok, {n} samples in {s} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
