"""Plain-PyTorch reference of the CAM post-processing of pseudo-mask inference (the single source
of truth for ``cam_post.py``, its tests and its benchmarks).

The contract, per image. Inputs: ``views``, V maps ``A_v`` (K, h_v, w_v), each the network's
output for the image resized by a scale s_v and, where ``flips[v]``, mirrored left-right --
already softmaxed over the C+1 maps (EPS, K = C+1, background last and ignored here) or
ReLU'd (baseline CAM, K = C); image labels ``y`` (C,) (nonzero = present); the original image
size ``(H, W)``; ``bg_threshold`` t (default 0.20)::

    up_v       = bilinear(A_v, (H, W))            # F.interpolate(A_v[None], size=(H, W),
                                                  #   mode="bilinear", align_corners=False)[0]
    up_v       = up_v.flip(-1)   if flips[v]      # un-mirror
    classes    = [c < C : y[c] != 0]              # L labelled classes, increasing order
    acc[i]     = sum_v up_v[classes[i]]           # views summed in the order given
    norm[i]    = acc[i] / (max_{y,x} acc[i] + 1e-5)
    scores     = [t, norm[0], ..., norm[L-1]]     # (L+1, H, W); t is the background score
    j          = argmax_0(scores)                 # ties: the first index (torch.argmax)
    mask       = 0 if j == 0 else classes[j-1] + 1           # uint8 (H, W)

So background wins a pixel whose best class scores exactly t. Returns ``CamMasks(mask, norm,
classes)``: ``mask`` uint8 (H, W) (0 = background, c+1 = class c), ``norm`` (L, H, W) (float32;
float64 for float64 views, which only the tests use) or None unless ``return_norm``, ``classes``
(L,) int64, all on the views' device. With no labelled class: an all-zero mask, norm (0, H, W).

Arithmetic. Views are summed in float32 (float64 for float64 views), half/bfloat16 views are
upcast *before* the resize. Bilinear sampling is PyTorch's, with ``size=`` given (not
``scale_factor=``): source coordinate ``src = max((dst + 0.5) * (in / out) - 0.5, 0)`` with
``in / out`` and ``src`` computed in the compute dtype (float32 for float32 views), index
``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``, weights ``1 - (src - i0)`` and ``src - i0``.
Negative view values are allowed (the max is a signed max); NaN views give unspecified masks.
Values of ``C + 1`` above 255 do not fit the uint8 mask: C <= 254 is checked.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

NORM_EPS = 1e-5
MAX_CLASSES = 254                       # mask value C must fit uint8


class CamMasks(NamedTuple):
    """Result of :func:`cam_to_mask_reference` / ``cam_to_mask``."""

    mask: torch.Tensor                  # uint8 (H, W): 0 = background, c + 1 = class c
    norm: torch.Tensor | None           # (L, H, W) normalised maps, or None
    classes: torch.Tensor               # int64 (L,): the labelled classes, increasing


def check_cam_inputs(views, flips, labels, out_size, bg_threshold) -> tuple[int, int, int, int]:
    """Raise ``ValueError`` naming the argument for malformed input; return (C, K, H, W).

    Shape/dtype/device checks only: no device synchronisation, no look at the values.
    """
    if isinstance(views, torch.Tensor) or not isinstance(views, Sequence) or len(views) == 0:
        raise ValueError(f"views: expected a non-empty list of (K, h, w) maps, got "
                         f"{_describe(views)}")
    K = None
    for i, v in enumerate(views):
        if not isinstance(v, torch.Tensor) or v.dim() != 3:
            raise ValueError(f"views[{i}]: expected a (K, h, w) map, got {_describe(v)}")
        if not v.is_floating_point():
            raise ValueError(f"views[{i}]: expected a floating-point map (float32, bfloat16, "
                             f"float16 or float64), got dtype {v.dtype}")
        if min(v.shape) < 1:
            raise ValueError(f"views[{i}]: expected a non-empty (K, h, w) map, got shape "
                             f"{tuple(v.shape)}")
        if K is None:
            K = v.shape[0]
        elif v.shape[0] != K:
            raise ValueError(f"views[{i}]: has K={v.shape[0]} maps, views[0] has K={K}; "
                             f"every view must have the same channels")
        if v.device != views[0].device:
            raise ValueError(f"views[{i}]: on {v.device}, views[0] on {views[0].device}; "
                             f"expected one device")
    if isinstance(flips, (torch.Tensor, str)) or not isinstance(flips, Sequence) \
            or len(flips) != len(views):
        raise ValueError(f"flips: expected a list of {len(views)} bools (one per view), got "
                         f"{_describe(flips)}")
    bad = [f for f in flips if not (isinstance(f, (bool, np.bool_))
                                    or (_is_int(f) and int(f) in (0, 1)))]
    if bad:
        raise ValueError(f"flips: expected bools, got {bad!r}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"labels: expected the image's multi-hot labels of shape (C,), got "
                         f"{_describe(labels)}")
    if labels.is_complex():
        raise ValueError(f"labels: expected bool/integer/float multi-hot labels, got "
                         f"{labels.dtype}")
    C = labels.shape[0]
    if K not in (C, C + 1):
        raise ValueError(f"labels: has C={C} classes but the views have K={K} maps; expected "
                         f"K = C+1 (EPS: background map last) or K = C (CAM baseline)")
    if C > MAX_CLASSES:
        raise ValueError(f"labels: C={C} classes do not fit a uint8 mask (C <= {MAX_CLASSES})")
    if (isinstance(out_size, str) or not isinstance(out_size, Sequence) or len(out_size) != 2
            or not all(_is_int(s) and int(s) >= 1 for s in out_size)):
        raise ValueError(f"out_size: expected (H, W), two positive ints, got {out_size!r}")
    H, W = (int(s) for s in out_size)
    if not isinstance(bg_threshold, numbers.Real) or isinstance(bg_threshold, bool) \
            or math.isnan(bg_threshold):
        raise ValueError(f"bg_threshold: expected a number, got {bg_threshold!r}")
    return C, K, H, W


def labelled_classes(labels: torch.Tensor) -> torch.Tensor:
    """int64 (L,) CPU tensor of the classes with a nonzero label, increasing (syncs if on GPU)."""
    return torch.nonzero(labels.detach().cpu() != 0).flatten().to(torch.int64)


def upsample_view(view: torch.Tensor, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """Step 1: bilinear resize of one (k, h, w) view to ``size``, un-mirrored if ``flip``."""
    up = F.interpolate(view[None], size=size, mode="bilinear", align_corners=False)[0]
    return up.flip(-1) if flip else up


def cam_to_mask_reference(views: Sequence[torch.Tensor], flips: Sequence[bool],
                          labels: torch.Tensor, out_size: tuple[int, int],
                          bg_threshold: float = 0.2, *, return_norm: bool = False) -> CamMasks:
    """The CAM post-processing above in plain PyTorch (per image)."""
    C, K, H, W = check_cam_inputs(views, flips, labels, out_size, bg_threshold)
    dev = views[0].device
    dtype = torch.float64 if views[0].dtype == torch.float64 else torch.float32
    classes = labelled_classes(labels)
    L = classes.numel()
    if L == 0:
        norm = torch.zeros((0, H, W), dtype=dtype, device=dev) if return_norm else None
        return CamMasks(torch.zeros((H, W), dtype=torch.uint8, device=dev), norm,
                        classes.to(dev))
    idx = classes.to(dev)
    acc = None
    for view, flip in zip(views, flips):
        # channel selection commutes with the per-channel resize: resize only the L maps used
        up = upsample_view(view.index_select(0, idx).to(dtype), (H, W), bool(flip))
        acc = up if acc is None else acc + up
    norm = acc / (acc.amax(dim=(1, 2), keepdim=True) + NORM_EPS)
    scores = torch.cat([torch.full((1, H, W), bg_threshold, dtype=dtype, device=dev), norm])
    j = torch.argmax(scores, dim=0)
    lut = torch.cat([torch.zeros(1, dtype=torch.int64), classes + 1]).to(dev)
    mask = lut[j].to(torch.uint8)
    return CamMasks(mask, norm if return_norm else None, classes.to(dev))


def _is_int(x) -> bool:
    return hasattr(x, "__index__") and not isinstance(x, (bool, np.bool_))


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D tensor of shape {tuple(x.shape)}"
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__} of length {len(x)}"
    return f"{type(x).__name__}"
