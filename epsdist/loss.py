"""Stage-1 losses: the EPS saliency loss (dispatching to the fused Triton kernel or the
plain-PyTorch reference) and the multi-label classification term.

Formula, kernel, reference, test and benchmark, one place each:
  * formula and reference:  kernels/eps_loss_ref.py   (epsdist_kernels.eps_loss_ref)
  * fused Triton kernels:   kernels/eps_loss.py       (epsdist_kernels.eps_loss)
  * tests:                  tests/test_eps_loss.py
  * benchmark:              kernels/bench.py          (python -m epsdist_kernels.bench)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from epsdist_kernels.eps_loss_ref import (EPSMaps, check_eps_inputs, check_saliency_range,
                                          eps_loss_reference)

IMPLS = ("auto", "torch", "triton")

__all__ = ["EPSMaps", "eps_loss", "classification_loss", "resolve_impl"]


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere; other values are checked and returned."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


def eps_loss(cam: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, *,
             tau: float = 0.4, lam: float = 0.5, strategy: str = "adaptive",
             bg_classes: Sequence[int] = (), impl: str = "auto", return_maps: bool = False,
             check_inputs: bool = True, compile: bool = False):
    """The EPS saliency loss (Lee et al., CVPR 2021), exactly the authors' released semantics.

    Args:
        cam: logits (B, K=C+1, h, w), the last channel is the background map. float32,
            bfloat16 or float16 (float64 with impl='torch'); any strides (channels_last too).
        saliency: (B, 1, H, W) floating map in [0, 1]; nearest-resized to (h, w).
        labels: (B, C) image labels, nonzero = present (bool, int or float).
        tau: overlap-ratio threshold of the adaptive map selection (0.4 in the recipes).
        lam: blend between the foreground and background maps, in [0, 1] (0.5 VOC, 0.9 COCO).
        strategy: 'adaptive' (ratio > tau decides), 'naive' (every labelled class is
            foreground) or 'predefined' (labelled classes in ``bg_classes`` are background).
        bg_classes: class indices in [0, C) for the 'predefined' strategy.
        impl: 'torch' (reference), 'triton' (fused kernels) or 'auto' (triton on CUDA).
        return_maps: also return ``EPSMaps(fg, bg, pred)``, detached (B, 1, h, w) float32.
        check_inputs: check that saliency lies in [0, 1] (one reduction and a host sync; turn
            off in a training loop whose loader guarantees the range). Shapes and dtypes are
            always checked.
        compile: run the reference (impl 'torch') through ``torch.compile`` (``train.compile``);
            the fused kernels need no compiling and ignore it.

    Returns:
        the float32 scalar loss, differentiable w.r.t. ``cam`` (not ``saliency``), or
        ``(loss, EPSMaps)``.

    Raises:
        ValueError naming the argument and the expected shape for malformed input, and for
        saliency outside [0, 1] (or NaN) when ``check_inputs``.

    NaN logits propagate: the loss (and the gradient) is NaN, so a diverged run is visible.
    """
    check_eps_inputs(cam, saliency, labels, tau=tau, lam=lam, strategy=strategy,
                     bg_classes=bg_classes)
    if check_inputs:
        check_saliency_range(saliency)
    kwargs = dict(tau=tau, lam=lam, strategy=strategy, bg_classes=bg_classes,
                  return_maps=return_maps)
    if resolve_impl(impl, cam.device) == "torch":
        fn = compiled_reference() if compile else eps_loss_reference
        return fn(cam, saliency.detach(), labels, **kwargs)
    from epsdist_kernels.eps_loss import eps_loss_triton  # imports triton only when used
    return eps_loss_triton(cam, saliency.detach(), labels, **kwargs)


_COMPILED = {}


def compiled_reference():
    """``torch.compile(eps_loss_reference)``, made once per process."""
    if "ref" not in _COMPILED:
        _COMPILED["ref"] = torch.compile(eps_loss_reference)
    return _COMPILED["ref"]


def classification_loss(cam: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """multilabel_soft_margin_loss(gap(cam)[:, :C], y): the image-level term of stage 1.

    ``cam`` may have C maps (CAM baseline) or C+1 (EPS; the background map is dropped).
    """
    C = labels.shape[1]
    if cam.dim() != 4 or cam.shape[1] not in (C, C + 1) or cam.shape[0] != labels.shape[0]:
        raise ValueError(f"cam: expected (B, C or C+1, h, w) with B={labels.shape[0]}, "
                         f"C={C}, got shape {tuple(cam.shape)}")
    scores = cam.float().mean(dim=(2, 3))[:, :C]
    return F.multilabel_soft_margin_loss(scores, labels.float())
