"""Loading files that hold pickles (model exports, checkpoints, the released label file) without
ever running code from them.

A pickle can name any Python callable and have it called while it loads; a crafted
``model.pt`` or ``cls_labels.npy`` would run arbitrary code the moment it is opened. So:

``safe_torch_load(path, what)``
    ``torch.load(weights_only=True)``: tensors, dicts, lists, tuples, strings, numbers, None.
    A file that needs anything else is refused with :class:`UnsafeFileError`, which names the
    file and the type it asked for; nothing in it is executed. Exports and checkpoints written
    by epsdist hold only these types (the per-rank RNG state goes through
    :func:`numpy_rng_to_safe` / :func:`numpy_rng_from_safe`).
``load_label_npy(path)``
    The authors' ``cls_labels.npy`` (``np.save`` of a dict {image id: multi-hot array}) is a
    pickle inside an ``.npy`` file. It is read by a restricted unpickler that resolves only the
    numpy names an array needs (``ndarray``, ``dtype``, ``_reconstruct``, ``scalar``,
    ``_frombuffer``, and ``_codecs.encode``, which protocol-2 pickles use for bytes; under
    numpy 1 and numpy 2 module names);
    any other global is refused before it is imported, and the result must be a dict of
    numeric arrays.
"""
from __future__ import annotations

import pickle
import re

import numpy as np

__all__ = ["UnsafeFileError", "safe_torch_load", "numpy_rng_to_safe", "numpy_rng_from_safe",
           "load_label_npy"]


class UnsafeFileError(ValueError):
    """A file that cannot be loaded without running code from it (or is not a pickle at all)."""


_REFUSED = re.compile(r"(Unsupported global: GLOBAL [\w.]+|unsupported GLOBAL [\w.]+"
                      r"|Unsupported operand \d+|Unsupported class [\w.]+)")


def safe_torch_load(path: str, what: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)``; a refused or unreadable file raises
    :class:`UnsafeFileError` naming ``what`` (e.g. "--checkpoint") and ``path``."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = _REFUSED.search(str(e))
        detail = found.group(1) if found else str(e).strip().splitlines()[-1]
        raise UnsafeFileError(
            f"{what} {path}: refused by the safe loader (torch.load weights_only=True): it "
            f"needs more than tensors, dicts, lists, strings and numbers ({detail}). Loading it "
            f"could run code from the file, so it was not loaded; epsdist's own exports and "
            f"checkpoints never need this: re-export the model with epsdist/train.py") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise UnsafeFileError(f"{what} {path}: not a readable torch.save file "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from None


def numpy_rng_to_safe(state: tuple) -> dict:
    """``np.random.get_state()`` as plain types + a tensor (loadable with weights_only=True)."""
    import torch

    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def numpy_rng_from_safe(state: dict) -> tuple:
    """Inverse of :func:`numpy_rng_to_safe`: the tuple ``np.random.set_state`` takes."""
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
            state["has_gauss"], state["cached_gaussian"])


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Resolves only what a pickled numpy array needs; every other global is refused."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (f"numpy.{core}.{module}", name) for core in ("core", "_core")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                             ("numeric", "_frombuffer"))}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def load_label_npy(path: str) -> dict:
    """{image id: 1-D numeric array} from a pickled-dict ``.npy`` (the released
    ``cls_labels.npy``), read without running code; anything else is :class:`UnsafeFileError`."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            if dtype != np.dtype(object) or shape != ():
                raise UnsafeFileError(f"{path}: a {dtype} array of shape {shape}, expected the "
                                      f"pickled dict {{image id: multi-hot array}} of "
                                      f"cls_labels.npy")
            obj = _ArrayOnlyUnpickler(f).load()
    except UnsafeFileError:
        raise
    except (pickle.UnpicklingError, ValueError, EOFError, AttributeError, TypeError,
            IndexError, KeyError, ImportError) as e:
        raise UnsafeFileError(f"{path}: refused: not the pickled dict of numpy arrays of "
                              f"cls_labels.npy ({type(e).__name__}: {e}); nothing in it was "
                              f"run") from None
    obj = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
    if not isinstance(obj, dict):
        raise UnsafeFileError(f"{path}: holds a {type(obj).__name__}, expected a dict "
                              f"{{image id: multi-hot array}}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf":
            raise UnsafeFileError(f"{path}: entry {k!r}: expected a string id and a numeric "
                                  f"array, got {type(k).__name__} -> {type(v).__name__}"
                                  f"{'' if not isinstance(v, np.ndarray) else ' ' + str(v.dtype)}")
    return obj
