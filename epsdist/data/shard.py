"""Write webdataset shards (the format of :mod:`epsdist.data.manifest`) from PASCAL VOC or COCO.

Command line::

    python -m epsdist.data.shard voc --root VOC2012 --saliency SAL_DIR (--split train_aug | --list FILE)
        --out OUT [--labels FILE] [--shard-size 1000] [--workers N] [--prefix NAME] [--allow-skips]
    python -m epsdist.data.shard coco --images train2014 --annotations instances_train2014.json
        --saliency SAL_DIR --out OUT [same options, no --labels]

VOC
    ``<root>/JPEGImages/<id>.jpg``; masks from ``<root>/SegmentationClassAug/<id>.png`` if that
    folder exists, else ``<root>/SegmentationClass/<id>.png`` (palette or 8-bit gray PNGs; the raw
    indices are read, never RGB). The id list is ``<root>/ImageSets/Segmentation/<split>.txt`` or
    ``--list``: one id per line, or the SBD-style two columns
    ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` (the id is the basename stem of the
    first column; a list is two-column only when every line is), so an id with a space is kept
    whole and skipped as a bad id. Classes are the 20
    VOC names unless ``<root>/classes.txt`` lists others. Labels are the classes present in the
    mask (values 1..C; 0 and 255 are not labels) unless ``--labels`` gives them: the authors'
    ``cls_labels.npy`` ({id: multi-hot array of C}) or a JSON file {id: [class indices, 0-based]};
    the mask is still stored when one exists. ``<root>/SegmentationContext/<id>.png`` (the
    synthetic set) is stored as ``ctx.png``, and the names of ``<root>/contexts.txt``
    (``context_name class_name`` lines, line i = context id i) go into the manifest as
    ``contexts`` (what the evaluation labels confusion ratios with).
COCO
    Classes are the categories of the json sorted by category id (contiguous index = rank).
    Labels are the categories of the image's non-crowd annotations. The mask is rasterised with
    pycocotools (polygons, uncompressed and compressed RLE): crowd regions (``iscrowd=1``) are
    painted 255 first, then the non-crowd instances in order of decreasing pixel area (ties
    keep json order) with value index+1, so smaller objects on top of larger ones stay visible
    and an instance always wins over a crowd region; 255 remains only where a crowd region is
    not covered by any instance. A category seen only in crowd annotations is not a label,
    nor is one whose annotations cover no pixel (a polygon with fewer than 3 points is dropped
    with a "degenerate polygon" warning; an annotation left without pixels warns "empty
    annotation"); an image left without a label is skipped ("no label"). Images with no
    annotation at all, or crowd annotations only, are excluded before validation as expected
    (train2014 has such images; the released lists leave them out): counted in the summary line
    and the manifest's ``excluded``, not a failure. Keys are the ``file_name`` stems; saliency
    is ``SAL_DIR/<stem>.png``.
Saliency
    8-bit grayscale PNG, same size as the image. An 8-bit gray PNG is stored byte for byte;
    anything else is converted to 8-bit L and re-encoded as PNG: ``1`` -> 0/255; ``LA`` -> its
    gray channel; 16-bit gray (``I;16*``/``I``) -> round(v * 255 / 65535); palette, RGB(A) and
    other colour modes -> ITU-R 601-2 luma of the colour (Pillow's ``convert("L")``, alpha
    dropped) -- except a map with an alpha channel whose colour is flat while the alpha varies:
    then the alpha is the saliency (warning "saliency in alpha channel"). An all-zero map is
    kept with the warning "all-zero saliency". Warnings are printed like skips (first 10) and
    counted per reason in the manifest's ``warnings`` (``warning_examples``: the first 20);
    they do not change the exit code.

Output: ``OUT/<prefix>-NNNNNN.tar`` (``prefix`` defaults to the split name) plus
``manifest.json`` (the manifest module's keys, plus ``shard_size`` and ``skipped_examples``,
the first 20 "id: reason"). Sample order is list order (json order for COCO); shard i holds
kept samples [i*shard_size, (i+1)*shard_size). The run has two passes: every sample is first
validated (the image fully decoded once, saliency and masks decoded and checked), then the
kept samples are written, one shard per task (image headers only, no second decode). Members
are written with ``tarfile`` in webdataset's layout (``<key>.<field>``, fields sorted, PAX
format: a name over 100 bytes gets a PAX header, shorter ASCII names are plain USTAR) with
fixed metadata (mtime 0, mode 0444, fixed owner), so shard bytes and their sha256 do not
depend on ``--workers``. Ids may be up to 200 bytes in UTF-8 (they also become file names of
epsdist/infer.py). ``--workers N`` runs both passes on a ``spawn`` process pool (call the API
from an importable script or module, not from stdin).

Re-running into an existing OUT: every new shard is first written completely as
``.<name>.partial``; only then is the old ``OUT/manifest.json`` removed (no manifest ever
describes shards it did not write), the new shards renamed into place and the new manifest
written; older ``<prefix>-NNNNNN.tar`` shards numbered beyond the new count are deleted last.
A run that fails before that point leaves the previous output as it was. Other files and
other prefixes are left alone. Concurrent runs into the same OUT with the same prefix are not
supported.

Bad samples are skipped, printed as ``<file>: <reason>`` (first 10, stderr) and counted per
reason: missing image, unreadable image (undecodable, or not JPEG/PNG), missing saliency,
unreadable saliency, size mismatch (saliency or mask vs image, COCO image vs json), missing
mask (VOC without --labels), unreadable mask, bad mask values (named), no label, bad
annotation (COCO), duplicate id, bad id (contains '.', '/', '\\', spaces or control
characters: see :mod:`epsdist.data.safepath`; or longer than 200 bytes). An empty
(0-byte) file is reported as such. The summary line is
"wrote N samples in S shards to OUT; skipped K (reason: count, ...)"; the run exits 1 if
anything was skipped unless ``--allow-skips`` (the shards and manifest are written either
way). Bad inputs (missing folders, list, annotation or labels file, malformed json/labels)
exit 2 with a message naming the path, before anything is written. If no sample survives,
nothing is written and the exit code is 1.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from epsdist.data import manifest as mf
from epsdist.data.safepath import check_key, key_problem
from epsdist.safeload import load_label_npy

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
# Canonical order of fields in the manifest.
FIELD_ORDER = ("jpg", "png", mf.SAL_FIELD, mf.CLS_FIELD, mf.SEG_FIELD, mf.CTX_FIELD)
_PIL_FORMAT_TO_FIELD = {"JPEG": "jpg", "PNG": "png"}
_TAR_OWNER = "epsdist"
_PRINT_SKIPS = 10       # "<file>: <reason>" lines printed
_EXAMPLE_SKIPS = 20     # "id: reason" entries kept in the manifest
TAR_FORMAT = tarfile.PAX_FORMAT
_BAD_KEY = re.compile(r"[./\\\s]")
# An id becomes file names (<id>.png of infer.py, with a temporary-name prefix and suffix of
# ~20 bytes) on file systems that allow 255 bytes per name; tar members of any length are fine.
MAX_KEY_BYTES = 200


class InputError(ValueError):
    """A required input (folder, list, annotation or labels file) is missing or malformed."""


class ShardError(RuntimeError):
    """Writing failed after validation (e.g. an input file changed in between)."""


class Warn(NamedTuple):
    """A sample that is kept but looks wrong (counted per reason in the manifest)."""
    reason: str
    path: str
    detail: str


class Skip(Exception):
    """One sample cannot be used. ``reason`` is the counted category, ``detail`` the message."""

    def __init__(self, reason: str, path: str, detail: Optional[str] = None):
        super().__init__(f"{path}: {detail or reason}")
        self.reason, self.path, self.detail = reason, path, detail or reason


@dataclass(frozen=True)
class Item:
    """Everything a worker needs to build one sample (picklable, no open files)."""
    key: str
    image: str
    sal: str
    seg: Optional[str] = None                   # VOC: mask path (may not exist)
    ctx: Optional[str] = None                   # VOC: context mask path (may not exist)
    labels: Optional[tuple] = None              # class indices given by a labels file
    labels_file: Optional[str] = None           # set when labels must come from that file
    anns: Optional[tuple] = None                # COCO: ((class index, iscrowd, segmentation), ...)
    size: Optional[tuple] = None                # COCO: (width, height) from the json


@dataclass(frozen=True)
class Task:
    """What the workers share: how to turn an item's masks into labels, and the class count."""
    annotate: Callable                          # (item, (w, h), num_classes, warn) -> (labels, seg, ctx)
    num_classes: int


# ----------------------------------------------------------------------------- sample helpers

def _read(path: str, reason: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Skip(reason, path) from None
    except OSError as e:
        raise Skip(reason, path, f"{reason} ({e.strerror or e})") from None


def _open_image(data: bytes) -> Image.Image:
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        return Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        # Pillow's message names the in-memory buffer object; say what it means instead
        raise ValueError(f"not an image format Pillow knows ({len(data)} bytes)") from None


def _encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(
        buf, format="PNG", compress_level=6)
    return buf.getvalue()


def load_image(path: str, decode: bool) -> tuple[str, bytes, tuple[int, int]]:
    """Return (field, the file's bytes, (w, h)). ``decode`` decodes all pixels to validate."""
    data = _read(path, "missing image")
    try:
        im = _open_image(data)
        if decode:
            im.load()
        fmt, size = im.format, im.size
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise Skip("unreadable image", path, f"unreadable image ({e})") from None
    if fmt not in _PIL_FORMAT_TO_FIELD:
        raise Skip("unreadable image", path, f"unreadable image (format {fmt}, expected JPEG or PNG)")
    return _PIL_FORMAT_TO_FIELD[fmt], data, size


def saliency_to_l(im: Image.Image) -> np.ndarray:
    """8-bit L pixels of a saliency map of any mode (the rule in the module docstring)."""
    if alpha_signal(im):
        return np.asarray(im.getchannel("A"))
    if im.mode == "L":
        return np.asarray(im)
    if im.mode in ("LA", "La"):
        return np.asarray(im.getchannel(0))
    if im.mode.startswith("I;16") or im.mode == "I":
        v = np.asarray(im).astype(np.int64)
        return ((np.clip(v, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    if im.mode == "1":
        return np.asarray(im.convert("L"))
    if im.mode in ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB").convert("L"))
    raise ValueError(f"saliency mode {im.mode} not supported")


def alpha_signal(im: Image.Image) -> bool:
    """True for a map with an alpha channel whose colour/gray part is one constant value while
    the alpha varies: the saliency is in the alpha channel (the colour would give a flat map)."""
    if im.mode not in ("LA", "La", "PA", "RGBA", "RGBa"):
        return False
    lo, hi = im.getchannel("A").getextrema()
    if lo == hi:
        return False
    colour = im.convert("RGB").convert("L") if im.mode in ("PA", "RGBA", "RGBa") else im.getchannel(0)
    lo, hi = colour.getextrema()
    return lo == hi


def load_saliency(path: str, decode: bool, warn=None) -> tuple[bytes, tuple[int, int]]:
    """Return (sal.png bytes, (w, h)): the file itself if it is an 8-bit gray PNG, else converted.
    With ``decode``, ``warn(Warn)`` hears of a map taken from its alpha channel and of an
    all-zero map (kept: the image still trains its classification, but EPS gets no saliency)."""
    data = _read(path, "missing saliency")
    try:
        im = _open_image(data)
        as_is = im.format == "PNG" and im.mode == "L"
        if as_is and not decode:
            return data, im.size
        im.load()
        from_alpha = alpha_signal(im)
        pixels = np.asarray(im) if as_is else saliency_to_l(im)
    except Exception as e:  # noqa: BLE001
        raise Skip("unreadable saliency", path, f"unreadable saliency ({e})") from None
    if warn is not None and from_alpha:
        warn(Warn("saliency in alpha channel", path,
                  f"saliency in alpha channel (mode {im.mode} with flat colour; alpha used)"))
    if warn is not None and not pixels.any():
        warn(Warn("all-zero saliency", path, "all-zero saliency (no salient pixel)"))
    return (data if as_is else _encode_png(pixels)), im.size


def read_index_png(path: str, size: tuple[int, int], num_classes: int, what: str) -> np.ndarray:
    """Raw indices (palette or 8-bit gray) of a mask PNG; values must be in {0..C, 255}."""
    data = _read(path, "unreadable mask")
    try:
        with _open_image(data) as im:
            if im.mode not in ("P", "L"):
                raise ValueError(f"mode {im.mode}, expected palette or 8-bit gray indices")
            arr = np.asarray(im)        # P: the palette indices themselves
    except Exception as e:  # noqa: BLE001
        raise Skip("unreadable mask", path, f"unreadable {what} ({e})") from None
    if arr.shape != (size[1], size[0]):
        raise Skip("size mismatch", path,
                   f"size mismatch: {what} {arr.shape[::-1]} vs image {size}")
    present = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
    bad = [int(v) for v in present if v > num_classes and v != mf.IGNORE_INDEX]
    if bad:
        raise Skip("bad mask values", path,
                   f"bad mask values {bad} in {what} (allowed 0..{num_classes} and 255)")
    return arr


def build_sample(task: Task, item: Item, validate: bool):
    """The webdataset sample of ``item``; raises :class:`Skip`. Shared by VOC and COCO.

    ``validate=True`` (pass 1) decodes every pixel and runs every check but encodes nothing
    and returns the item's list of :class:`Warn`; ``validate=False`` (pass 2) reads image
    headers only and builds the sample."""
    warnings: list = []
    warn = warnings.append if validate else (lambda w: None)
    field, image_bytes, size = load_image(item.image, decode=validate)
    sal_bytes, sal_size = load_saliency(item.sal, decode=validate, warn=warn)
    if sal_size != size:
        raise Skip("size mismatch", item.sal,
                   f"size mismatch: saliency {sal_size} vs image {size} ({item.image})")
    labels, seg, ctx = task.annotate(item, size, task.num_classes, warn)
    if not labels:
        raise Skip("no label", item.labels_file or item.seg or item.image,
                   f"no label for {item.key}" + (" in the labels file" if item.labels_file else ""))
    if validate:
        return warnings
    multi_hot = [0] * task.num_classes
    for c in labels:
        multi_hot[c] = 1
    sample = {"__key__": item.key, field: image_bytes, mf.SAL_FIELD: sal_bytes,
              mf.CLS_FIELD: json.dumps(multi_hot, separators=(",", ":")).encode()}
    if seg is not None:
        sample[mf.SEG_FIELD] = _encode_png(seg)
    if ctx is not None:
        sample[mf.CTX_FIELD] = _encode_png(ctx)
    return sample


# ----------------------------------------------------------------------------- VOC

def annotate_voc(item: Item, size: tuple[int, int], num_classes: int, warn=None):
    seg = ctx = None
    if item.seg and os.path.exists(item.seg):
        seg = read_index_png(item.seg, size, num_classes, "mask")
    if item.ctx and os.path.exists(item.ctx):
        ctx = read_index_png(item.ctx, size, num_classes, "context mask")
    if item.labels_file:
        labels = item.labels or ()
    elif seg is None:
        raise Skip("missing mask", item.seg or item.image,
                   "missing mask (needed for labels; or pass --labels)")
    else:
        present = np.flatnonzero(np.bincount(seg.ravel(), minlength=256)[1:num_classes + 1])
        labels = tuple(int(c) for c in present)
    return labels, seg, ctx


def read_id_list(path: str) -> list[str]:
    """Ids from a VOC list (one id per line, taken whole) or an SBD-style two-column list
    (``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` -> ``x``: the basename stem of the first
    column). The list counts as two-column only when every line has two columns and the second
    names a file; otherwise an id with a space stays whole (and is then skipped as a bad id)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line and not line.startswith("#")]
    rows = [line.split() for line in lines]
    two_columns = bool(rows) and all(len(r) == 2 and os.path.splitext(r[1])[1] for r in rows)
    if two_columns:
        return [os.path.splitext(os.path.basename(r[0]))[0] for r in rows]
    return [line if len(r) > 1 else os.path.splitext(os.path.basename(line))[0]
            for line, r in zip(lines, rows)]


def read_class_names(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise InputError(f"{path}: lists no class names")
    return names


def load_labels_file(path: str, num_classes: int) -> dict[str, tuple]:
    """{id: class indices} from the authors' ``cls_labels.npy`` or a JSON {id: [indices]}."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: labels file not found")
    try:
        if path.endswith(".npy"):
            raw = load_label_npy(path)      # a restricted unpickler: nothing in it runs
            labels = {}
            for k, v in raw.items():
                v = np.asarray(v).ravel()
                if v.size != num_classes:
                    raise ValueError(f"{k}: {v.size} columns, expected {num_classes}")
                labels[str(k)] = tuple(int(c) for c in np.flatnonzero(v))
            return labels
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object {id: [class indices]}")
        labels = {}
        for k, v in raw.items():
            if not isinstance(v, list) or not all(
                    isinstance(c, int) and not isinstance(c, bool) and 0 <= c < num_classes
                    for c in v):
                raise ValueError(f"{k}: {v!r} is not a list of class indices in 0..{num_classes - 1}")
            labels[str(k)] = tuple(sorted(set(v)))
        return labels
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: cannot read labels ({e})") from None


def _check_num_classes(classes: list, source: str) -> None:
    if len(classes) >= mf.IGNORE_INDEX:   # mask values 1..C must stay below 255 (ignore)
        raise InputError(f"{source}: {len(classes)} classes do not fit an 8-bit mask (max 254)")


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise InputError(f"{path}: {what} not found")


def prepare_voc(root: str, saliency: str, *, split=None, list_file=None, labels_file=None):
    """(items, classes, split name) for a VOC-layout folder; raises :class:`InputError`."""
    if (split is None) == (list_file is None):
        raise InputError("give exactly one of --split and --list")
    _require_dir(root, "VOC root")
    images = os.path.join(root, "JPEGImages")
    _require_dir(images, "image folder")
    _require_dir(saliency, "saliency folder")
    if list_file is None:
        list_file = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    else:
        split = os.path.splitext(os.path.basename(list_file))[0]
    if not os.path.isfile(list_file):
        raise InputError(f"{list_file}: id list not found")
    classes_txt = os.path.join(root, "classes.txt")
    classes = read_class_names(classes_txt) if os.path.isfile(classes_txt) else list(VOC_CLASSES)
    _check_num_classes(classes, classes_txt)
    mask_dir = next((d for d in (os.path.join(root, "SegmentationClassAug"),
                                 os.path.join(root, "SegmentationClass")) if os.path.isdir(d)), None)
    if mask_dir is None and labels_file is None:
        raise InputError(f"{os.path.join(root, 'SegmentationClassAug')}: no mask folder (nor "
                         f"SegmentationClass) to derive labels from; pass --labels")
    ctx_dir = os.path.join(root, "SegmentationContext")
    ctx_dir = ctx_dir if os.path.isdir(ctx_dir) else None
    labels = load_labels_file(labels_file, len(classes)) if labels_file else None
    items = [Item(key=k, image=os.path.join(images, f"{k}.jpg"),
                  sal=os.path.join(saliency, f"{k}.png"),
                  seg=os.path.join(mask_dir, f"{k}.png") if mask_dir else None,
                  ctx=os.path.join(ctx_dir, f"{k}.png") if ctx_dir else None,
                  labels=labels.get(k) if labels is not None else None,
                  labels_file=labels_file)
             for k in read_id_list(list_file)]
    return items, classes, split


# ----------------------------------------------------------------------------- COCO

def degenerate_polygons(segmentation) -> int:
    """How many polygons of a COCO polygon list have fewer than 3 points (or an odd count)."""
    if not isinstance(segmentation, list):
        return 0
    return sum(1 for p in segmentation if not (len(p) >= 6 and len(p) % 2 == 0))


def coco_rle(segmentation, height: int, width: int):
    """pycocotools RLE of a polygon list, uncompressed RLE or compressed RLE (None if empty)."""
    from pycocotools import mask as mask_utils
    if isinstance(segmentation, list):
        # Polygons need >= 3 points; pycocotools would read a 4-number polygon as a bbox.
        polys = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        return mask_utils.merge(mask_utils.frPyObjects(polys, height, width)) if polys else None
    if isinstance(segmentation, dict) and "counts" in segmentation:
        if list(segmentation.get("size", ())) != [height, width]:
            raise ValueError(f"RLE size {segmentation.get('size')} != image [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            return mask_utils.frPyObjects(segmentation, height, width)
        return {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    raise ValueError(f"unknown segmentation type {type(segmentation).__name__}")


def annotate_coco(item: Item, size: tuple[int, int], num_classes: int, warn=None):
    """Labels = classes of the non-crowd annotations that cover at least one pixel: a
    degenerate polygon (< 3 points) is dropped with a warning, and an annotation left without
    pixels gives no label (a label without a pixel in the mask would be wrong)."""
    from pycocotools import mask as mask_utils
    warn = warn or (lambda w: None)
    if size != item.size:
        raise Skip("size mismatch", item.image,
                   f"size mismatch: image {size} vs annotation {item.size}")
    width, height = size
    seg = np.zeros((height, width), np.uint8)
    crowd_rles, instances = [], []
    try:
        for order, (c, crowd, segmentation) in enumerate(item.anns):
            dropped = degenerate_polygons(segmentation)
            if dropped:
                warn(Warn("degenerate polygon", item.image,
                          f"degenerate polygon: {dropped} polygon(s) with fewer than 3 points in "
                          f"annotation {order} (class {c}) dropped"))
            rle = coco_rle(segmentation, height, width)
            area = 0 if rle is None else int(mask_utils.area(rle))
            if not crowd and area == 0:
                warn(Warn("empty annotation", item.image,
                          f"empty annotation: annotation {order} (class {c}) covers no pixel; "
                          f"class {c} is not a label unless another annotation has pixels"))
            if area == 0:
                continue
            if crowd:
                crowd_rles.append(rle)
            else:
                instances.append((-area, order, c, rle))
        for rle in crowd_rles:
            seg[mask_utils.decode(rle).astype(bool)] = mf.IGNORE_INDEX
        for _, _, c, rle in sorted(instances, key=lambda t: t[:2]):  # larger first
            seg[mask_utils.decode(rle).astype(bool)] = c + 1
    except Exception as e:  # noqa: BLE001
        raise Skip("bad annotation", item.image, f"bad annotation ({e})") from None
    labels = tuple(sorted({c for _, _, c, _ in instances}))
    return labels, (seg if labels else None), None


def prepare_coco(images: str, annotations: str, saliency: str):
    """(items, classes, split name, excluded) for a COCO image folder and instances json.
    Images without any annotation or with crowd annotations only are left out before
    validation (COCO's train2014 has such images; the released image lists leave them out):
    ``excluded`` counts them per reason ("no annotations", "only crowd annotations")."""
    _require_dir(images, "image folder")
    if not os.path.isfile(annotations):
        raise InputError(f"{annotations}: annotation file not found")
    _require_dir(saliency, "saliency folder")
    try:
        with open(annotations, encoding="utf-8") as f:
            data = json.load(f)
        categories = sorted(data["categories"], key=lambda c: c["id"])
        index = {c["id"]: i for i, c in enumerate(categories)}
        classes = [c["name"] for c in categories]
        per_image: dict = {im["id"]: [] for im in data["images"]}
        for a in data["annotations"]:
            if a["category_id"] not in index:
                raise ValueError(f"annotation {a.get('id')}: unknown category_id {a['category_id']}")
            if a["image_id"] not in per_image:
                raise ValueError(f"annotation {a.get('id')}: unknown image_id {a['image_id']}")
            per_image[a["image_id"]].append(
                (index[a["category_id"]], bool(a.get("iscrowd", 0)), a["segmentation"]))
        items, excluded = [], collections.Counter()
        for im in data["images"]:
            anns = per_image[im["id"]]
            if not anns or all(crowd for _, crowd, _ in anns):
                excluded["only crowd annotations" if anns else "no annotations"] += 1
                continue
            key = os.path.splitext(os.path.basename(im["file_name"]))[0]
            items.append(Item(key=key, image=os.path.join(images, im["file_name"]),
                              sal=os.path.join(saliency, f"{key}.png"),
                              anns=tuple(per_image[im["id"]]),
                              size=(int(im["width"]), int(im["height"]))))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{annotations}: not a COCO instances file ({type(e).__name__}: {e})") from None
    _check_num_classes(classes, annotations)
    stem = os.path.splitext(os.path.basename(annotations))[0]
    split = stem[len("instances_"):] if stem.startswith("instances_") else stem
    return items, classes, split, dict(sorted(excluded.items()))


# ----------------------------------------------------------------------------- the two passes

def _validate_chunk(args) -> list:
    """Pass 1 worker: per item (None, [Warn, ...]) for a kept one, ((reason, path, detail), [])
    for a skipped one."""
    task, items = args
    out = []
    for item in items:
        try:
            out.append((None, build_sample(task, item, validate=True)))
        except Skip as s:
            out.append(((s.reason, s.path, s.detail), []))
    return out


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def add_sample(tar: tarfile.TarFile, sample: dict) -> None:
    """Members ``<key>.<field>`` in sorted field order (as webdataset's TarWriter) with fixed
    metadata (mtime 0, mode 0444, fixed owner), so equal samples give equal bytes. tarfile is
    used directly: importing webdataset pulls in torch, seconds per worker process. Open the
    tar with ``TAR_FORMAT`` (PAX): a member name over 100 bytes gets a PAX header instead of
    failing; shorter ASCII names give the same bytes as USTAR."""
    key = check_key(sample["__key__"])     # refuses keys that could become paths elsewhere
    for field in sorted(k for k in sample if k != "__key__"):
        data = sample[field]
        info = tarfile.TarInfo(f"{key}.{field}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = _TAR_OWNER
        tar.addfile(info, io.BytesIO(data))


def _write_shard(args) -> dict:
    """Pass 2 worker: write one shard under its temporary name ``.<name>.partial`` (renamed
    into place by :func:`_commit` once every shard is complete)."""
    task, out, name, items = args
    tmp = os.path.join(out, f".{name}.partial")
    fields = set()
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w|", format=TAR_FORMAT) as tar:
                for item in items:
                    try:
                        sample = build_sample(task, item, validate=False)
                    except Skip as s:
                        raise ShardError(f"{s} (the file changed while sharding)") from None
                    fields.update(k for k in sample if k != "__key__")
                    add_sample(tar, sample)
            f.flush()
            os.fsync(f.fileno())
        digest = mf.sha256_file(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"name": name, "count": len(items), "sha256": digest, "fields": sorted(fields)}


def _chunks(seq: Sequence, size: int) -> list:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=None, file=sys.stderr)


@contextlib.contextmanager
def _mapper(workers: int):
    """An ordered ``map``: the builtin for one worker, else a spawn Pool's ``imap``."""
    if workers == 1:
        yield map
        return
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        yield pool.imap
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()


def _key_skips(items: list[Item]) -> list:
    """Skips that need no file access (duplicate or unusable keys), as (reason, path, detail)."""
    seen, pre = set(), []
    for it in items:
        if not it.key or _BAD_KEY.search(it.key) or key_problem(it.key):
            pre.append(("bad id", it.image, f"bad id {it.key!r} (no '.', '/', '\\', spaces or "
                        f"control characters allowed)"))
        elif len(it.key.encode("utf-8")) > MAX_KEY_BYTES:
            pre.append(("bad id", it.image, f"bad id {it.key!r} ({len(it.key.encode('utf-8'))} "
                                            f"bytes in UTF-8; at most {MAX_KEY_BYTES} allowed)"))
        elif it.key in seen:
            pre.append(("duplicate id", it.image, f"duplicate id {it.key}"))
        else:
            pre.append(None)
        seen.add(it.key)
    return pre


def _validate(items: list[Item], task: Task, imap, workers: int) -> tuple[list, list]:
    """Pass 1: per item None (kept) or (reason, path, detail), in item order; and the
    :class:`Warn` list of the kept items, in item order."""
    results = _key_skips(items)
    warnings = [[] for _ in items]
    todo = [i for i, r in enumerate(results) if r is None]
    chunks = _chunks(todo, max(1, min(64, len(todo) // (workers * 8))))
    with _progress(len(items), "validate") as bar:
        bar.update(len(items) - len(todo))
        jobs = [(task, [items[i] for i in c]) for c in chunks]
        for chunk, res in zip(chunks, imap(_validate_chunk, jobs)):
            for i, (r, w) in zip(chunk, res):
                results[i], warnings[i] = r, w
            bar.update(len(chunk))
    return results, [w for ws in warnings for w in ws]


def _write(kept: list[Item], task: Task, out: str, prefix: str, shard_size: int, imap) -> list:
    """Pass 2: one task per shard, each written as ``.<name>.partial``; if anything fails the
    partial files are removed and the previous output is untouched."""
    partial = re.compile(r"\." + re.escape(prefix) + r"-\d{6,}\.tar\.partial")
    _remove_matching(out, partial)          # left by an interrupted earlier run
    jobs = [(task, out, shard_name(prefix, i), c) for i, c in enumerate(_chunks(kept, shard_size))]
    shards = []
    try:
        with _progress(len(kept), "write") as bar:
            for s in imap(_write_shard, jobs):
                shards.append(s)
                bar.update(s["count"])
    except BaseException:
        _remove_matching(out, partial)
        raise
    return shards


def _remove_matching(out: str, pattern: re.Pattern, keep=lambda m: False) -> None:
    for fn in os.listdir(out):
        m = pattern.fullmatch(fn)
        if m and not keep(m):
            os.unlink(os.path.join(out, fn))


def _commit(out: str, shards: list[dict]) -> None:
    """Put complete ``.<name>.partial`` shards in place. The old manifest goes first, so none
    ever describes shards it did not write; nothing old is touched before this point."""
    if os.path.exists(os.path.join(out, mf.MANIFEST)):
        os.unlink(os.path.join(out, mf.MANIFEST))
    for s in shards:
        os.replace(os.path.join(out, f".{s['name']}.partial"), os.path.join(out, s["name"]))


def _counts_text(what: str, counts: dict) -> str:
    n = sum(counts.values())
    return f"{what} {n}" + (" (" + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ")"
                            if n else "")


def write_shards(items: list[Item], task: Task, out: str, *, source: str, split: str,
                 classes: list[str], shard_size: int = 1000, workers: int = 1,
                 prefix: Optional[str] = None, allow_skips: bool = False,
                 log=print, contexts: Optional[list[str]] = None,
                 excluded: Optional[dict] = None) -> dict:
    """Validate ``items``, write the kept ones as shards + manifest; return the summary.
    ``log(msg, file=...)`` prints (skips and warnings go to stderr, the final line to stdout).
    ``contexts``: context names (id = position + 1) for the manifest. ``excluded``:
    {reason: count} of inputs left out on purpose before ``items`` (reported and
    recorded, not a failure)."""
    if shard_size < 1 or workers < 1:
        raise InputError("--shard-size and --workers must be >= 1")
    prefix = prefix or split
    if not prefix or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", prefix):
        raise InputError(f"prefix {prefix!r}: use letters, digits, '_', '-', '.'")
    excluded = dict(excluded or {})
    with _mapper(workers) as imap:
        results, warnings = _validate(items, task, imap, workers)
        kept = [it for it, r in zip(items, results) if r is None]
        skips = [(it.key, r) for it, r in zip(items, results) if r is not None]
        for key, (reason, path, detail) in skips[:_PRINT_SKIPS]:
            log(f"{path}: {detail}", file=sys.stderr)
        if len(skips) > _PRINT_SKIPS:
            log(f"... and {len(skips) - _PRINT_SKIPS} more skipped", file=sys.stderr)
        for w in warnings[:_PRINT_SKIPS]:
            log(f"{w.path}: warning: {w.detail}", file=sys.stderr)
        if len(warnings) > _PRINT_SKIPS:
            log(f"... and {len(warnings) - _PRINT_SKIPS} more warnings", file=sys.stderr)
        skipped = dict(sorted(collections.Counter(r[0] for _, r in skips).items()))
        warned = dict(sorted(collections.Counter(w.reason for w in warnings).items()))
        skip_text = _counts_text("skipped", skipped)
        if warned:
            skip_text += "; " + _counts_text("warnings", warned)
        if excluded:
            skip_text += "; " + _counts_text("excluded as expected", excluded)
        summary = {"out": out, "num_samples": len(kept), "num_shards": 0, "shards": [],
                   "skipped": skipped, "exit_code": 1 if skips and not allow_skips else 0,
                   "skipped_examples": [f"{k}: {r[2]}" for k, r in skips[:_EXAMPLE_SKIPS]],
                   "warnings": warned, "excluded": excluded,
                   "warning_examples": [f"{w.path}: {w.detail}" for w in warnings[:_EXAMPLE_SKIPS]]}
        if not kept:
            log(f"no samples to write (of {len(items)}); {skip_text}; nothing written to {out}",
                file=sys.stderr)
            summary["exit_code"] = 1
            return summary
        os.makedirs(out, exist_ok=True)
        shards = _write(kept, task, out, prefix, shard_size, imap)
    _commit(out, shards)

    present = set().union(*(s.pop("fields") for s in shards))
    mf.write_manifest(out, {
        "format": mf.FORMAT, "source": source, "split": split, "classes": list(classes),
        "num_samples": len(kept), "fields": [f for f in FIELD_ORDER if f in present],
        "shards": shards, "shard_size": shard_size, "skipped": skipped,
        "skipped_examples": summary["skipped_examples"], "warnings": warned,
        "warning_examples": summary["warning_examples"], "excluded": excluded,
        **({"contexts": list(contexts)} if contexts else {})})
    # Stale shards of an earlier, larger run with the same prefix.
    _remove_matching(out, re.compile(re.escape(prefix) + r"-(\d{6,})\.tar"),
                     keep=lambda m: int(m.group(1)) < len(shards))
    summary.update(num_shards=len(shards), shards=shards)
    log(f"wrote {len(kept)} samples in {len(shards)} shards to {out}; {skip_text}")
    return summary


# ----------------------------------------------------------------------------- public API

def shard_voc(root, saliency, out, *, split=None, list_file=None, labels_file=None,
              shard_size=1000, workers=1, prefix=None, allow_skips=False, log=print) -> dict:
    """Shard a VOC-layout folder. Returns the summary (``exit_code`` 0 or 1, counts, shards);
    raises :class:`InputError` for a missing/malformed input (CLI exit code 2)."""
    items, classes, split = prepare_voc(root, saliency, split=split, list_file=list_file,
                                        labels_file=labels_file)
    contexts_txt = os.path.join(root, "contexts.txt")
    contexts = ([line.split()[0] for line in read_class_names(contexts_txt)]
                if os.path.isfile(contexts_txt) else None)
    return write_shards(items, Task(annotate_voc, len(classes)), out, source="voc", split=split,
                        classes=classes, shard_size=shard_size, workers=workers, prefix=prefix,
                        allow_skips=allow_skips, log=log, contexts=contexts)


def shard_coco(images, annotations, saliency, out, *, shard_size=1000, workers=1, prefix=None,
               allow_skips=False, log=print) -> dict:
    """Shard COCO images + instances json; same contract as :func:`shard_voc`."""
    items, classes, split, excluded = prepare_coco(images, annotations, saliency)
    return write_shards(items, Task(annotate_coco, len(classes)), out, source="coco", split=split,
                        classes=classes, shard_size=shard_size, workers=workers, prefix=prefix,
                        allow_skips=allow_skips, log=log, excluded=excluded)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m epsdist.data.shard",
                                description="Write epsdist webdataset shards from VOC or COCO.")
    sub = p.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--saliency", required=True, help="folder of <id>.png saliency maps")
    common.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    common.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    common.add_argument("--workers", type=int, default=1, help="worker processes")
    common.add_argument("--prefix", help="shard name prefix (default: the split name)")
    common.add_argument("--allow-skips", action="store_true",
                        help="exit 0 even if some samples were skipped")
    voc = sub.add_parser("voc", parents=[common], help="PASCAL VOC layout (also the synthetic set)")
    voc.add_argument("--root", required=True, help="VOC2012 folder (JPEGImages/, ...)")
    g = voc.add_mutually_exclusive_group(required=True)
    g.add_argument("--split", help="ImageSets/Segmentation/<split>.txt, e.g. train_aug")
    g.add_argument("--list", dest="list_file", help="id list file (first column used)")
    voc.add_argument("--labels", dest="labels_file",
                     help="cls_labels.npy or JSON {id: [class indices]} (default: from masks)")
    coco = sub.add_parser("coco", parents=[common], help="MS COCO images + instances json")
    coco.add_argument("--images", required=True, help="image folder, e.g. train2014")
    coco.add_argument("--annotations", required=True, help="instances_*.json")
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    opts = dict(shard_size=a.shard_size, workers=a.workers, prefix=a.prefix,
                allow_skips=a.allow_skips)
    try:
        if a.source == "voc":
            summary = shard_voc(a.root, a.saliency, a.out, split=a.split, list_file=a.list_file,
                                labels_file=a.labels_file, **opts)
        else:
            summary = shard_coco(a.images, a.annotations, a.saliency, a.out, **opts)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return summary["exit_code"]


if __name__ == "__main__":
    # Run main() from the importable module so spawned workers resolve the same functions.
    from epsdist.data import shard as _shard
    sys.exit(_shard.main())
