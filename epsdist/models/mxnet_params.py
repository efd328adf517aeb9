"""MXNet ``.params`` files without MXNet: the NDArray list format, read and written directly.

The ImageNet weights of the wide ResNet-38 (Wu et al.) that PSA and EPS start from are an
MXNet parameter file. This module parses that binary format with numpy, and maps its names to
the module names of :class:`epsdist.models.resnet38.ResNet38` the way the PSA/EPS authors'
``convert_mxnet_to_torch`` does.

File layout (all integers little-endian; ``mxnet.nd.save`` / ``NDArray::Save``):

    uint64 0x112 (kMXAPINDArrayListMagic)   uint64 reserved (0)
    uint64 N                                 then N arrays, each one of:
      V2 (magic uint32 0xF993fac9) / V3 (0xF993faca, "np shape" semantics):
          int32 storage type (0 dense; 1 row_sparse, 2 csr -> unsupported here)
          shape: int32 ndim, ndim x int64 dims   (V2: ndim 0 = empty array, nothing follows;
                                                  V3: ndim -1 or a dim -1 = empty, ndim 0 = scalar)
          context: int32 dev_type, int32 dev_id  (ignored: everything loads on the CPU)
          int32 type flag: 0 float32, 1 float64, 2 float16, 3 uint8, 4 int32, 5 int8, 6 int64,
                           7 bool
          raw data, prod(dims) x itemsize bytes, C order
      V1 (magic 0xF993fac8): shape as above (int64 dims), then context, type flag, data
      legacy (no magic): the first uint32 *is* ndim, then ndim x uint32 dims, then context,
          type flag, data (files written by MXNet before 0.9, e.g. the ResNet-38 release)
    uint64 M (M == N, or 0 for an unnamed list)   then M names: uint64 length + utf-8 bytes

Names keep MXNet's ``arg:`` / ``aux:`` prefixes here; the ResNet-38 mapping strips them.
Empty (uninitialised) arrays carry no data and are left out of the returned dict.
"""
from __future__ import annotations

import math
import os
import re
import struct
from typing import Mapping

import numpy as np

from ..atomic import atomic_path

__all__ = [
    "MXNetFormatError", "load_mxnet_params", "save_mxnet_params",
    "mxnet_to_resnet38_name", "resnet38_state_dict_from_mxnet",
]

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA

_DTYPES = {
    0: np.dtype("<f4"), 1: np.dtype("<f8"), 2: np.dtype("<f2"), 3: np.dtype("u1"),
    4: np.dtype("<i4"), 5: np.dtype("i1"), 6: np.dtype("<i8"), 7: np.dtype("?"),
}
_FLAGS = {dt: flag for flag, dt in _DTYPES.items()}
_STORAGE = {0: "default (dense)", 1: "row_sparse", 2: "csr"}
_MAX_NDIM = 32


class MXNetFormatError(ValueError):
    """A file is not a readable MXNet NDArray list; the message names the file."""


class _Reader:
    def __init__(self, f, path):
        self.f, self.path = f, path
        self.size = os.fstat(f.fileno()).st_size

    def remaining(self) -> int:
        return self.size - self.f.tell()

    def fail(self, msg):
        raise MXNetFormatError(f"MXNet params file '{self.path}': {msg}")

    def exact(self, n: int, what: str) -> bytes:
        if n > self.remaining():
            self.fail(f"truncated: needs {n} more bytes for {what} at offset {self.f.tell()}, "
                      f"but the file ends at {self.size}")
        data = self.f.read(n)
        if len(data) != n:  # file shrank under us
            self.fail(f"truncated while reading {what}")
        return data

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.exact(struct.calcsize(fmt), what))

    def into(self, arr: np.ndarray, what: str) -> None:
        nbytes = arr.nbytes
        if nbytes > self.remaining():
            self.fail(f"truncated: {what} needs {nbytes} bytes at offset {self.f.tell()}, "
                      f"but only {self.remaining()} remain")
        view = memoryview(arr.reshape(-1)).cast("B")
        got = 0
        while got < nbytes:
            n = self.f.readinto(view[got:])
            if not n:
                self.fail(f"truncated while reading {what}")
            got += n


def _read_array(r: _Reader, i: int):
    """One NDArray; returns a numpy array, or None for an empty (uninitialised) array."""
    what = f"array #{i}"
    (magic,) = r.unpack("<I", f"{what} header")
    if magic in (V2_MAGIC, V3_MAGIC):
        (stype,) = r.unpack("<i", f"{what} storage type")
        if stype != 0:
            kind = _STORAGE.get(stype, f"unknown storage type {stype}")
            r.fail(f"{what} uses {kind} storage; only dense (default storage) arrays are "
                   f"supported")
        (ndim,) = r.unpack("<i", f"{what} ndim")
        if magic == V3_MAGIC and ndim == -1:
            return None
        if ndim < 0 or ndim > _MAX_NDIM:
            r.fail(f"{what} has an invalid ndim {ndim} (corrupt file?)")
        shape = r.unpack(f"<{ndim}q", f"{what} shape")
        if (magic == V2_MAGIC and ndim == 0) or any(d == -1 for d in shape):
            return None
    elif magic == V1_MAGIC:
        (ndim,) = r.unpack("<i", f"{what} ndim")
        if ndim < 0 or ndim > _MAX_NDIM:
            r.fail(f"{what} has an invalid ndim {ndim} (corrupt file?)")
        shape = r.unpack(f"<{ndim}q", f"{what} shape")
        if ndim == 0:
            return None
    else:  # legacy layout: the "magic" is ndim, the dims are uint32
        ndim = magic
        if ndim > _MAX_NDIM:
            r.fail(f"{what} starts with 0x{magic:08x}, which is neither an NDArray magic "
                   f"(0xf993fac8/9/a) nor a plausible legacy ndim (corrupt or not MXNet?)")
        shape = r.unpack(f"<{ndim}I", f"{what} shape")
        if ndim == 0:
            return None
    if any(d < 0 for d in shape):
        r.fail(f"{what} has a negative dimension in shape {tuple(shape)}")
    r.unpack("<ii", f"{what} context")  # dev_type, dev_id: always loaded on the CPU
    (flag,) = r.unpack("<i", f"{what} type flag")
    if flag not in _DTYPES:
        r.fail(f"{what} has unsupported dtype flag {flag} (supported: 0 float32, 1 float64, "
               f"2 float16, 3 uint8, 4 int32, 5 int8, 6 int64, 7 bool)")
    dtype = _DTYPES[flag]
    count = math.prod(shape)  # exact (Python ints): corrupt dims cannot overflow
    if count * dtype.itemsize > r.remaining():
        r.fail(f"truncated: {what} of shape {tuple(shape)} ({dtype}) needs "
               f"{count * dtype.itemsize} bytes at offset {r.f.tell()}, but only "
               f"{r.remaining()} remain")
    arr = np.empty(tuple(shape), dtype=dtype)
    r.into(arr, f"{what} data")
    return arr


def load_mxnet_params(path) -> dict[str, np.ndarray]:
    """Read an MXNet NDArray list file (``mxnet.nd.save`` / ``*.params``) without MXNet.

    Returns ``{name: array}`` in file order; names keep their ``arg:`` / ``aux:`` prefixes.
    Raises ``FileNotFoundError`` for a missing file and :class:`MXNetFormatError` (a
    ``ValueError``) naming the file for a bad magic, a truncated file, an unsupported dtype,
    sparse storage, or an unnamed array list.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        r = _Reader(f, path)
        if r.size < 16:
            r.fail(f"truncated: {r.size} bytes is shorter than the 16-byte list header")
        header, _reserved = r.unpack("<QQ", "list header")
        if header != LIST_MAGIC:
            r.fail(f"bad magic 0x{header:x} (expected 0x{LIST_MAGIC:x}, the NDArray list "
                   f"magic); not an MXNet .params / nd.save file")
        (n,) = r.unpack("<Q", "array count")
        if n > r.remaining() // 4:  # every array takes at least 4 bytes
            r.fail(f"implausible array count {n} for a {r.size}-byte file (corrupt?)")
        arrays = [_read_array(r, i) for i in range(n)]
        (m,) = r.unpack("<Q", "name count")
        if m == 0 and n > 0:
            r.fail(f"holds {n} unnamed arrays (saved from a list, not a dict); a parameter "
                   f"file names its arrays")
        if m != n:
            r.fail(f"holds {n} arrays but {m} names (corrupt?)")
        out: dict[str, np.ndarray] = {}
        for i in range(m):
            (length,) = r.unpack("<Q", f"length of name #{i}")
            raw = r.exact(length, f"name #{i}")
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                r.fail(f"name #{i} is not valid utf-8: {raw[:40]!r}")
            if name in out:
                r.fail(f"duplicate array name {name!r}")
            if arrays[i] is not None:
                out[name] = arrays[i]
    return out


def _as_numpy(name, value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.newbyteorder("<") not in _FLAGS:
        raise ValueError(f"save_mxnet_params: array {name!r} has dtype {arr.dtype}, which "
                         f"MXNet files cannot hold here (float32/64/16, uint8, int8/32/64, bool)")
    return arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)  # keeps 0-d


def save_mxnet_params(path, arrays: Mapping[str, object], *, version: str = "v2") -> None:
    """Write ``{name: array}`` as an MXNet NDArray list file (what ``mxnet.nd.save`` writes).

    ``version``: ``"v2"`` (default; MXNet >= 1.0), ``"v3"`` (np-shape semantics), ``"v1"``
    (int64 shapes, no storage type) or ``"legacy"`` (no magic, uint32 shapes; MXNet < 0.9).
    Values may be numpy arrays or torch tensors. Written atomically (temp file + rename).
    """
    if version not in ("v1", "v2", "v3", "legacy"):
        raise ValueError(f"save_mxnet_params: version must be v1, v2, v3 or legacy, "
                         f"got {version!r}")
    path = os.fspath(path)
    items = [(str(k), _as_numpy(k, v)) for k, v in arrays.items()]
    with atomic_path(path) as tmp:       # temp file + rename, umask mode, fsync
        with open(tmp, "wb") as f:
            f.write(struct.pack("<QQQ", LIST_MAGIC, 0, len(items)))
            for name, arr in items:
                shape = arr.shape
                if arr.ndim == 0 and version != "v3":
                    raise ValueError(f"save_mxnet_params: {name!r} is 0-d; only version='v3' "
                                     f"can store scalars (elsewhere ndim 0 means 'empty')")
                if version in ("v2", "v3"):
                    magic = V2_MAGIC if version == "v2" else V3_MAGIC
                    f.write(struct.pack(f"<Iii{arr.ndim}q", magic, 0, arr.ndim, *shape))
                elif version == "v1":
                    f.write(struct.pack(f"<Ii{arr.ndim}q", V1_MAGIC, arr.ndim, *shape))
                else:
                    if any(d >= 2 ** 32 for d in shape):
                        raise ValueError(f"save_mxnet_params: {name!r} has a dimension too "
                                         f"large for the legacy (uint32) layout")
                    f.write(struct.pack(f"<I{arr.ndim}I", arr.ndim, *shape))
                flag = _FLAGS[arr.dtype.newbyteorder("<")]
                f.write(struct.pack("<iii", 1, 0, flag))  # context cpu(0), type flag
                f.write(arr.tobytes(order="C"))
            f.write(struct.pack("<Q", len(items)))
            for name, _ in items:
                raw = name.encode("utf-8")
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)


# ----------------------------------------------------------------------------- ResNet-38 names

_BN_SUFFIX = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
              "moving_var": "running_var"}
# res<stage><unit>_<branch>_<param> (conv) and bn<stage><unit>_<branch>_<param> (BatchNorm);
# unit "a" is the first block of a stage (b<stage>), "b<k>" the k-th next one (b<stage>_<k>).
_BLOCK_RE = re.compile(r"^(res|bn)(\d)(a|b(\d+))_(branch(?:1|2a|2b1|2b2))_"
                       r"(weight|bias|gamma|beta|moving_mean|moving_var)$")
_BN7_RE = re.compile(r"^bn7_(gamma|beta|moving_mean|moving_var)$")
_DROPPED_RE = re.compile(r"^linear1000_")


def mxnet_to_resnet38_name(name: str):
    """The ResNet-38 module name for one MXNet array name.

    Returns the torch name, ``None`` for arrays that are dropped on purpose (the ImageNet
    classifier ``linear1000_*``), or ``""`` for names that follow no rule. Rules (those of the
    PSA/EPS authors' ``convert_mxnet_to_torch``), after stripping ``arg:`` / ``aux:``:

    * ``conv1a_weight`` -> ``conv1a.weight``
    * ``res<S>a_<branch>_weight`` -> ``b<S>.conv_<branch>.weight``;
      ``res<S>b<K>_<branch>_weight`` -> ``b<S>_<K>.conv_<branch>.weight``
    * ``bn<S>a_<branch>_{gamma,beta,moving_mean,moving_var}`` ->
      ``b<S>.bn_<branch>.{weight,bias,running_mean,running_var}`` (``b<K>`` -> ``b<S>_<K>``)
    * ``bn7_{gamma,...}`` -> ``bn7.{weight,...}``
    * ``linear1000_*`` -> dropped
    """
    base = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
    if base == "conv1a_weight":
        return "conv1a.weight"
    if _DROPPED_RE.match(base):
        return None
    m = _BN7_RE.match(base)
    if m:
        return f"bn7.{_BN_SUFFIX[m.group(1)]}"
    m = _BLOCK_RE.match(base)
    if m:
        kind, stage, unit, k, branch, param = m.groups()
        block = f"b{stage}" if unit == "a" else f"b{stage}_{k}"
        if kind == "res" and param in ("weight", "bias"):
            return f"{block}.conv_{branch}.{param}"
        if kind == "bn" and param in _BN_SUFFIX:
            return f"{block}.bn_{branch}.{_BN_SUFFIX[param]}"
    return ""


def resnet38_state_dict_from_mxnet(arrays: Mapping[str, np.ndarray]) -> dict:
    """Rename MXNet ResNet-38 arrays to a torch state dict for ``ResNet38``.

    ``linear1000_*`` (the ImageNet classifier) is dropped. Names that follow no rule are kept
    under their MXNet name (prefix stripped) so that ``load_state_dict(strict=False)`` reports
    them as unexpected instead of losing them silently. Two arrays mapping to one name is an
    error.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for name, value in arrays.items():
        key = mxnet_to_resnet38_name(name)
        if key is None:
            continue
        if key == "":
            key = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
        if key in out:
            raise ValueError(f"MXNet arrays {source[key]!r} and {name!r} both map to {key!r}")
        arr = np.asarray(value)
        if not arr.flags.writeable:
            arr = arr.copy()
        out[key] = torch.from_numpy(arr)
        source[key] = name
    return out
