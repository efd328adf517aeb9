"""What keeps a rerun of epsdist/infer.py from mixing outputs: the settings that made the masks
of an output folder, the check against them, the cleanup of ``--overwrite``, and the working
resolution that bounds the memory one image needs.

``OUT/infer_state.json`` (written atomically before the first mask) records everything that
changes a mask: the sha256 of the checkpoint file, the resolved ``infer.*`` settings, the
model kind (EPS or CAM baseline), the classes and the precision (bf16 autocast on CUDA, fp32
on the CPU). A rerun into the same OUT compares them: equal -> it resumes (images with a mask
are skipped); different -> :class:`StaleOutput` naming what differs, unless ``--overwrite``,
which first removes what infer.py wrote there (and nothing else).
"""
from __future__ import annotations

import json
import os
import re

from epsdist.data.manifest import MANIFEST, atomic_write_bytes, read_manifest

STATE = "infer_state.json"
# (folder, file name pattern) of everything infer.py writes under OUT, for --overwrite
_OUTPUTS = (("masks", r"[^/]+\.png"), ("cams", r"[^/]+\.npz"), ("panels", r"[^/]+\.png"))


class StaleOutput(ValueError):
    """OUT holds outputs made with another checkpoint or other settings."""


def working_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The (h, w) inference runs at: the image size, scaled down (aspect kept) so that the long
    side is at most ``max_side``. The views (``infer.scales``) and the upsampled CAMs are made
    at this size, so the memory of one image is bounded by ``max_side`` whatever its size."""
    long_side = max(height, width)
    if long_side <= max_side:
        return height, width
    f = max_side / long_side
    return max(1, round(height * f)), max(1, round(width * f))


# infer.* keys that change only how fast the masks are made, not the masks
SPEED_ONLY = ("compile", "batch_images", "workers")


def inference_state(checkpoint_sha256: str, infer_cfg: dict, eps: bool, classes: list,
                    device_type: str) -> dict:
    """Everything that changes a pseudo-mask, as stored in ``OUT/infer_state.json``."""
    return {"checkpoint_sha256": checkpoint_sha256,
            "model": "eps" if eps else "cam-baseline",
            "classes": list(classes),
            "precision": "bf16-autocast" if device_type == "cuda" else "fp32",
            "infer": {k: (list(v) if isinstance(v, tuple) else v) for k, v in infer_cfg.items()
                      if k not in SPEED_ONLY}}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def state_problem(out: str, state: dict) -> str | None:
    """Why the masks in ``out`` cannot be resumed with ``state`` (None: they can)."""
    path = os.path.join(out, STATE)
    if not os.path.exists(path):
        masks = os.path.join(out, "masks")
        if os.path.isdir(masks) and any(n.endswith(".png") for n in os.listdir(masks)):
            return f"{masks} holds masks of unknown provenance (no {STATE})"
        return None
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        return f"{path} is unreadable ({e})"
    before, now = _flat(old), _flat(state)
    diff = [f"{k} {before.get(k)!r} (now {now.get(k)!r})"
            for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if not diff:
        return None
    return f"{out} was made with other settings: " + "; ".join(diff)


def check_resumable(out: str, state: dict, overwrite: bool) -> None:
    """Raise :class:`StaleOutput` if ``out`` holds masks of other settings, unless
    ``overwrite`` (the caller then runs :func:`clear_previous`)."""
    problem = state_problem(out, state)
    if problem and not overwrite:
        raise StaleOutput(f"{problem}: rerun with --overwrite to replace the previous outputs, "
                          f"or choose another --out")


def clear_previous(out: str) -> int:
    """Remove what infer.py writes under ``out``: masks/*.png, cams/*.npz, panels/*.png, the
    shards its shards/manifest.json lists (and that manifest), report.json, infer_state.json.
    Other files stay. Returns how many files were removed."""
    removed = 0

    def rm(path):
        nonlocal removed
        if os.path.isfile(path):
            os.unlink(path)
            removed += 1

    for folder, pattern in _OUTPUTS:
        d = os.path.join(out, folder)
        if os.path.isdir(d):
            for name in os.listdir(d):
                if re.fullmatch(pattern, name):
                    rm(os.path.join(d, name))
    shards = os.path.join(out, "shards")
    if os.path.exists(os.path.join(shards, MANIFEST)):
        try:
            names = [s["name"] for s in read_manifest(shards)["shards"]]
        except ValueError:
            names = []
        for name in names:
            if "/" not in name:
                rm(os.path.join(shards, name))
        rm(os.path.join(shards, MANIFEST))
    rm(os.path.join(out, "report.json"))
    rm(os.path.join(out, STATE))
    return removed


def write_state(out: str, state: dict) -> None:
    os.makedirs(out, exist_ok=True)
    atomic_write_bytes(os.path.join(out, STATE), json.dumps(state, indent=1).encode() + b"\n")


def model_config_notice(config_model: dict, export_model: dict) -> str | None:
    """A warning when ``--config``'s model section differs from the checkpoint's (the
    checkpoint's is what inference builds), else None. ``weights`` (the pretrained init) is
    not compared: it does not matter once trained weights are loaded."""
    diff = [f"model.{k}: config {config_model.get(k)!r}, checkpoint {export_model.get(k)!r}"
            for k in sorted(set(config_model) | set(export_model))
            if k != "weights" and config_model.get(k) != export_model.get(k)]
    if not diff:
        return None
    return ("warning: the model settings of --config are ignored; the checkpoint's are used ("
            + "; ".join(diff) + ")")
