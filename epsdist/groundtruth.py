"""Ground truth for the evaluation: masks from a shard directory (``seg.png`` / ``ctx.png``
of every sample, read with ``tarfile``) or a folder of PNGs, key lists, class and context names,
and the errors every part of the evaluation raises.

Inputs
    ``--gt`` is either a shard directory or its URL (``manifest.json`` + ``*.tar``, see
    :mod:`epsdist.data.manifest`: the ``seg.png`` and, when present, ``ctx.png`` of every
    sample are read with ``tarfile``; a sample without ``seg.png`` is an error) or a folder of
    ``<key>.png`` masks (every ``*.png`` in it; ``--ctx DIR`` adds context masks
    ``DIR/<key>.png``, an image without one simply has none). Every key of the ground truth is
    evaluated, or only those of ``--list FILE`` (an id list like VOC's ``val.txt``: first
    column, basename stem; a listed key without ground truth is an error). ``--pred DIR``
    holds ``<key>.png``; ``--cams DIR`` holds ``<key>.npz``. A key without a prediction (or
    CAM file) is an error naming it (exit 1) unless ``--allow-missing``: then the key is left
    out of every metric (not counted as wrong), and the number and the first keys are
    reported. Predictions for keys the ground truth does not have are ignored and counted
    (``extra_predictions``).
Masks
    PNG, palette (``P``, the palette indices are read, never the colours) or 8-bit gray
    (``L``); other modes are an error. Ground truth: 0 = background, 1..N-1 = classes,
    255 = ignore (those pixels are left out of everything). Predictions: 0..N-1, and 255 =
    "no prediction": the pixel stays in the evaluation, its ground-truth class gets a false
    negative, it counts as wrong in the pixel accuracy, and no class gets a false positive
    (``unpredicted_pixels``). Any other value (in either) is an error naming the key and the
    values. A prediction (or CAM, or context mask) whose size differs from the ground truth's
    is an error naming the key and both sizes; nothing is ever cropped or resized.
Class names (``--class-names``)
    ``auto`` (default): ``["background"] + manifest classes`` for shards; else a
    ``classes.txt`` in the ground-truth folder or its parent (the synthetic layout); else the
    VOC names when N = 21; else ``class1, class2, ...``. A FILE has one name a line: N lines,
    or N - 1 (then ``background`` is prepended). ``--num-classes`` may be left out for shards
    (then 1 + the manifest's classes); given, it must agree with the manifest.
"""
from __future__ import annotations

import io
import os
import tarfile
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image

from epsdist.data import manifest as mf
from epsdist.data import source
from epsdist.data.safepath import key_path, skip_unsafe_key
from epsdist.metrics import IGNORE

CTX_IDS = 256                    # context ids are uint8 values


class EvalError(ValueError):
    """A problem in the data being evaluated (exit code 1); the message names the key."""


class UsageError(ValueError):
    """A command-line problem: a bad option value or a path that does not exist (exit code 2)."""


# ----------------------------------------------------------------------------- reading


def read_mask(src: Union[str, bytes], what: str) -> np.ndarray:
    """Raw indices of a palette or 8-bit gray PNG given as a path or bytes."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as im:
            if im.mode not in ("P", "L"):
                raise EvalError(f"{what}: mode {im.mode}, expected palette (P) or 8-bit gray "
                                f"(L) class indices")
            return np.asarray(im)                 # P: the palette indices themselves
    except EvalError:
        raise
    except Exception as e:  # noqa: BLE001
        raise EvalError(f"{what}: unreadable ({e})") from None


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's split of a member name: key = path + basename up to its first dot."""
    directory, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), field


def is_shards(gt: str) -> bool:
    return source.is_remote(gt) or os.path.isfile(os.path.join(gt, mf.MANIFEST))


def no_gt(gt: str) -> bool:
    """True when ``gt`` is neither a URL nor an existing directory."""
    return not source.is_remote(gt) and not os.path.isdir(gt)


def _png_keys(directory: str) -> list[str]:
    return sorted(e.name[:-4] for e in os.scandir(directory)
                  if e.name.endswith(".png") and not e.name.startswith(".") and e.is_file())


def _shard_samples(gt: str) -> Iterator[tuple[str, Optional[bytes], Optional[bytes], str]]:
    """(key, seg.png bytes or None, ctx.png bytes or None, shard name) of every sample."""
    manifest = mf.read_manifest(gt)
    if source.is_remote(gt):
        yield from _remote_shard_samples(gt, manifest)
        return
    for entry, path in zip(manifest["shards"], mf.shard_paths(gt, manifest)):
        name = entry["name"]
        if not os.path.isfile(path):
            raise EvalError(f"{gt}: shard {name} listed in manifest.json is missing")
        count = 0
        try:
            with tarfile.open(path, "r:") as tar:
                key, fields = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    k, field = _split_member(member.name)
                    if k != key:
                        if key is not None:
                            count += 1
                            yield key, fields.get(mf.SEG_FIELD), fields.get(mf.CTX_FIELD), name
                        key, fields = k, {}
                    if field in (mf.SEG_FIELD, mf.CTX_FIELD):
                        fields[field] = tar.extractfile(member).read()
                if key is not None:
                    count += 1
                    yield key, fields.get(mf.SEG_FIELD), fields.get(mf.CTX_FIELD), name
        except (tarfile.TarError, EOFError, OSError) as e:
            raise EvalError(f"{gt}: shard {name} unreadable or truncated after {count} samples "
                            f"({e})") from None
        if count != entry["count"]:
            raise EvalError(f"{gt}: shard {name} holds {count} samples, manifest.json says "
                            f"{entry['count']}")


def _remote_shard_samples(gt: str, manifest: dict):
    """_shard_samples of a shard directory URL (fetched, retried: epsdist.data.source)."""
    for entry in manifest["shards"]:
        name, count = entry["name"], 0
        try:
            for _, s in source.iter_shard(gt, entry):
                count += 1
                yield s["__key__"], s.get(mf.SEG_FIELD), s.get(mf.CTX_FIELD), name
        except (tarfile.TarError, EOFError, OSError) as e:
            raise EvalError(f"{source.redact(gt)}: shard {name} unreadable after {count} "
                            f"samples ({e})") from None
        if count != entry["count"]:
            raise EvalError(f"{source.redact(gt)}: shard {name} holds {count} samples, "
                            f"manifest.json says {entry['count']}")


def read_key_list(path: str) -> list[str]:
    """Keys from a VOC/SBD id list: first column, basename stem (``/JPEGImages/x.jpg`` -> x)."""
    keys = []
    for line in _read_lines(path):
        if not line.startswith("#"):
            keys.append(os.path.splitext(os.path.basename(line.split()[0]))[0])
    return keys


def gt_sources(gt: str, ctx_dir: Optional[str] = None, keys: Optional[Sequence[str]] = None,
               unsafe: Optional[list] = None):
    """(key, seg source, ctx source or None, where) per ground-truth image; sources are paths
    or bytes. Duplicate keys and samples without a mask are errors. ``keys``: only these (every
    one must exist in the ground truth). Unsafe keys (:mod:`epsdist.data.safepath`) are skipped,
    named on stderr and appended to ``unsafe`` as (key, reason)."""
    wanted = None if keys is None else set(keys)
    if wanted is not None and not wanted:
        raise UsageError("the key list is empty")
    if no_gt(gt):
        raise UsageError(f"--gt {gt}: no such directory")
    if ctx_dir is not None and not os.path.isdir(ctx_dir):
        raise UsageError(f"--ctx {ctx_dir}: no such directory")
    ctx_keys = set(_png_keys(ctx_dir)) if ctx_dir is not None else set()

    def ctx_of(key):
        return key_path(ctx_dir, key, ".png") if key in ctx_keys else None

    if is_shards(gt):
        seen = {}
        for key, seg, ctx, shard in _shard_samples(gt):
            if skip_unsafe_key(key, f"{gt}: {shard}", unsafe):
                continue
            if key in seen:
                raise EvalError(f"{gt}: key {key} appears twice (shards {seen[key]} and {shard})")
            seen[key] = shard
            if wanted is not None and key not in wanted:
                continue
            if seg is None:
                raise EvalError(f"{gt}: {shard}: sample {key} has no {mf.SEG_FIELD} (no ground "
                                f"truth for it)")
            if ctx_dir is not None:
                ctx = ctx_of(key)
            yield key, seg, ctx, f"{shard}:{key}.{mf.SEG_FIELD}"
        absent = [] if wanted is None else sorted(wanted - set(seen))
    else:
        present = _png_keys(gt)
        if not present:
            raise EvalError(f"--gt {gt}: no manifest.json and no *.png masks")
        absent = [] if wanted is None else sorted(wanted - set(present))
        if absent:            # before any work: a PNG folder's keys are known up front
            raise EvalError(f"{len(absent)} listed keys have no ground truth in {gt}: "
                            f"{', '.join(absent[:5])}")
        for key in present:
            if (wanted is None or key in wanted) and not skip_unsafe_key(key, gt, unsafe):
                path = key_path(gt, key, ".png")
                yield key, path, ctx_of(key), path
    if absent:
        raise EvalError(f"{len(absent)} listed keys have no ground truth in {gt}: "
                        f"{', '.join(absent[:5])}")


def iter_ground_truth(gt: str, ctx_dir: Optional[str] = None,
                      keys: Optional[Sequence[str]] = None
                      ) -> Iterator[tuple[str, np.ndarray, Optional[np.ndarray]]]:
    """Yield ``(key, seg, ctx)`` for every ground-truth image of ``gt`` (a shard directory or a
    folder of ``<key>.png``), in shard order / sorted key order. ``seg`` and ``ctx`` are the raw
    uint8 indices; ``ctx`` is None when the image has no context mask (``ctx_dir`` replaces
    the shards' ``ctx.png``). ``keys``: only these keys (each must exist)."""
    for key, seg_src, ctx_src, where in gt_sources(gt, ctx_dir, keys):
        seg = read_mask(seg_src, f"{key}: ground truth {where}")
        ctx = None if ctx_src is None else read_mask(ctx_src, f"{key}: context mask")
        yield key, seg, ctx


# ----------------------------------------------------------------------------- names


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from None


def resolve_num_classes(gt: str, num_classes: Optional[int]) -> int:
    if is_shards(gt):
        m = mf.read_manifest(gt)
        n = len(m["classes"]) + 1
        if num_classes is not None and num_classes != n:
            raise UsageError(f"--num-classes {num_classes}, but {gt}/manifest.json lists "
                             f"{n - 1} classes (+ background = {n})")
        return n
    if num_classes is None:
        raise UsageError("--num-classes is required when --gt is not a shard directory")
    if not 2 <= num_classes <= IGNORE:
        raise UsageError(f"--num-classes must be in 2..255, got {num_classes}")
    return num_classes


def resolve_class_names(spec: Optional[str], gt: str, num_classes: int) -> list[str]:
    """Class names (length N, index = mask value): see "Class names" in the module docstring."""
    if spec not in (None, "auto"):
        names = _read_lines(spec)
        if len(names) == num_classes - 1:
            names = ["background"] + names
        if len(names) != num_classes:
            raise UsageError(f"--class-names {spec}: {len(names)} names, expected {num_classes} "
                             f"(or {num_classes - 1} without background)")
        return names
    if is_shards(gt):
        names = ["background"] + list(mf.read_manifest(gt)["classes"])
        if len(names) == num_classes:
            return names
    for d in (gt, os.path.dirname(os.path.abspath(gt))):
        path = os.path.join(d, "classes.txt")
        if os.path.isfile(path):
            names = _read_lines(path)
            names = ["background"] + names if len(names) == num_classes - 1 else names
            if len(names) == num_classes:
                return names
    if num_classes == 21:
        from epsdist.data.shard import VOC_CLASSES
        return ["background"] + list(VOC_CLASSES)
    return ["background"] + [f"class{i}" for i in range(1, num_classes)]


def read_contexts(path: str) -> dict[int, str]:
    """``contexts.txt`` ("context_name class_name" lines) -> {context id (line number, from 1):
    context name}."""
    out = {}
    for i, line in enumerate(_read_lines(path), 1):
        out[i] = line.split()[0]
    return out


def auto_contexts(gt: str) -> dict[int, str]:
    """{context id: name} from a ``contexts.txt`` in ``gt`` or its parent, else from the
    ``contexts`` list of a shard directory's manifest (id = position + 1), else empty."""
    for d in (gt, os.path.dirname(os.path.abspath(gt))):
        path = os.path.join(d, "contexts.txt")
        if os.path.isfile(path):
            return read_contexts(path)
    if is_shards(gt):
        return {i: name for i, name in enumerate(mf.read_manifest(gt).get("contexts", ()), 1)}
    return {}
