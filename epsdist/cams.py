"""The trained stage-1 classifier at inference: load an export (safely), build the model, and
its per-view maps (multi-scale + flip, each scale resized as the authors did; several
same-size images per forward). Used by ``epsdist/infer.py`` (through
``epsdist.infer_pipeline``) and the GPU check."""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def per_image_kernels(device: torch.device):
    """On the CPU, PyTorch's native convolutions, which compute every image of a batch on its
    own: oneDNN (chosen for a batch > 1) and NNPACK (from a batch of 16) pick their algorithm by
    batch size and round differently, so an image's maps would depend on how many images share
    its forward. Elsewhere (CUDA): nothing changes."""
    if device.type != "cpu":
        yield
        return
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with torch.backends.nnpack.flags(enabled=False):
            yield
    finally:
        torch.backends.mkldnn.enabled = saved


@torch.no_grad()
def batched_view_maps(model, images: torch.Tensor, scales, flip: bool, eps: bool,
                      precision: str = "fp32") -> list[tuple[list, list[bool]]]:
    """Per-view maps of N same-size uint8 images (N, 3, H, W): softmax over C+1 (EPS) or
    ReLU'd CAMs, one forward pass per scale carrying the N images and, with ``flip``, their
    flips (2N views). Each scale is resized as the authors did, PIL's antialiased bicubic of
    the 0..255 image (``resize_bicubic``), then normalised. ``precision`` "bf16": bf16
    autocast on CUDA (``infer.precision``). Returns, per image, its views (C+1 or C, h_s, w_s)
    and their flip flags, scale by scale (the view, then its flip): what ``view_maps`` gives for
    that image alone. On the CPU (fp32) the maps do not depend on N, bit for bit: the input is
    NCHW, the convolutions are the per-image native ones (``per_image_kernels``) and the softmax
    runs per view (tests/test_infer_pipeline.py)."""
    N, _, H, W = images.shape
    cpu = images.device.type == "cpu"
    per = [([], []) for _ in range(N)]
    autocast = images.device.type == "cuda" and precision == "bf16"
    for s in scales:
        x = normalize_images(resize_bicubic(images, (max(1, round(H * s)), max(1, round(W * s)))))
        if flip:
            x = torch.cat([x, x.flip(-1)])
        # an explicit layout (torch.cat picks either, by N and by whether the scale resized)
        x = x.contiguous(memory_format=torch.contiguous_format if cpu else torch.channels_last)
        with (torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast),
              per_image_kernels(images.device)):
            out = model(x).float()
        if eps and cpu:                     # per view: the CPU softmax rounds by the shape
            out = [torch.softmax(v, dim=0) for v in out]
        else:
            out = torch.softmax(out, dim=1) if eps else torch.relu(out)
        for i, (views, flips) in enumerate(per):
            views.append(out[i])
            flips.append(False)
            if flip:
                views.append(out[N + i])
                flips.append(True)
    return per


def view_maps(model, image: torch.Tensor, scales, flip: bool, eps: bool,
              precision: str = "fp32"):
    """``batched_view_maps`` of one uint8 image (1, 3, H, W): (views, flips), one scale per
    forward pass with its flip in the same batch."""
    return batched_view_maps(model, image, scales, flip, eps, precision)[0]
