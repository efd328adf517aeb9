"""The trained stage-1 classifier at inference: load an export (safely), build the model, and
its per-view maps (multi-scale + flip, each scale resized as the authors did). Used by
``epsdist/infer.py`` and the GPU check."""
from __future__ import annotations

import os

import torch

from epsdist.config import ModelConfig, from_dict
from epsdist.data.augment import normalize_images, resize_bicubic
from epsdist.models import build_model
from epsdist.safeload import safe_torch_load


def load_export(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such file (expected RUN/export/model.pt "
                                f"written by epsdist/train.py)")
    export = safe_torch_load(path, "--checkpoint")
    missing = {"state_dict", "config", "classes", "num_maps"} - set(export)
    if missing:
        raise ValueError(f"--checkpoint {path}: not an epsdist export (missing {sorted(missing)})")
    return export


def build_inference_model(export: dict, device: torch.device,
                          compile: bool = False) -> torch.nn.Module:
    """The exported stage-1 model in eval mode on ``device`` (channels_last on CUDA), through
    ``torch.compile`` when ``compile`` (``infer.compile``)."""
    model_cfg = from_dict(ModelConfig, {**export["config"]["model"], "weights": "none"})
    model = build_model(model_cfg, len(export["classes"]), log=lambda m: None)
    model.load_state_dict(export["state_dict"])
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


@torch.no_grad()
def view_maps(model, image: torch.Tensor, scales, flip: bool, eps: bool,
              precision: str = "fp32"):
    """Per-view maps of one uint8 image (1, 3, H, W): softmax over C+1 (EPS) or ReLU'd CAMs,
    one scale per forward pass with its flip in the same batch. Each scale is resized as the
    authors did, PIL's antialiased bicubic of the 0..255 image (``resize_bicubic``), then
    normalised. ``precision`` "bf16": bf16 autocast on CUDA (``infer.precision``)."""
    H, W = image.shape[2:]
    views, flips = [], []
    autocast = image.device.type == "cuda" and precision == "bf16"
    for s in scales:
        x = normalize_images(resize_bicubic(image, (max(1, round(H * s)), max(1, round(W * s)))))
        if flip:
            x = torch.cat([x, x.flip(-1)])
        if image.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x).float()
        out = torch.softmax(out, dim=1) if eps else torch.relu(out)
        views += list(out)
        flips += [False, True][:len(out)]
    return views, flips
