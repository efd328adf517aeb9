"""Plain-PyTorch reference of the EPS saliency loss (the single source of truth).

The contract (ARCHITECTURE.md, the authors' released semantics). Inputs: logits ``cam``
(B, K=C+1, h, w) with the background map last, saliency ``S`` (B, 1, H, W) in [0, 1], image
labels ``y`` (B, C) (nonzero = present), ``tau``, ``lam``::

    s          = nearest_resize(S, (h, w))                     # F.interpolate default mode
    p          = softmax(cam, dim=1)                           # over all K channels
    ratio[b,c] = sum_px [p_c > 0.5][s > 0.5] / (sum_px [p_c > 0.5] + 1e-4 * h * w)   # no grad
    fg_sel     = y & (ratio > tau)          bg_sel = y & !(ratio > tau)   # "adaptive"
    fg         = sum_c fg_sel * p_c         bg     = p_bg + sum_c bg_sel * p_c
    pred       = lam * fg + (1 - lam) * (1 - bg)
    loss       = mean_{b,h,w} (pred - s)^2

Strategies: ``adaptive`` (above); ``naive`` (every labelled class is foreground);
``predefined`` (labelled classes in ``bg_classes`` are background, the others foreground).

The maps returned for logging are ``fg``, ``bg`` (the background-side probability of step 5,
before ``1 - bg``) and ``pred``, each (B, 1, h, w), float32, detached.

NaN logits: the softmax of a pixel with a NaN logit is NaN, so ``pred``, the loss and the
gradient are NaN; a NaN probability never counts as ``> 0.5`` in the overlap ratio.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

STRATEGIES = ("adaptive", "naive", "predefined")


class EPSMaps(NamedTuple):
    """Detached (B, 1, h, w) float32 maps for logging."""

    fg: torch.Tensor
    bg: torch.Tensor
    pred: torch.Tensor


def check_eps_inputs(cam: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor,
                     *, tau: float, lam: float, strategy: str,
                     bg_classes: Sequence[int] = ()) -> None:
    """Raise ``ValueError`` naming the argument and the expected shape for malformed input.

    Shape/dtype checks only (no device synchronisation); the [0, 1] range of the saliency is
    checked separately by :func:`check_saliency_range`.
    """
    if not isinstance(cam, torch.Tensor) or cam.dim() != 4:
        raise ValueError(f"cam: expected logits of shape (B, K=C+1, h, w), got "
                         f"{_describe(cam)}")
    if not cam.is_floating_point():
        raise ValueError(f"cam: expected floating-point logits (float32, bfloat16, float16 "
                         f"or float64), got dtype {cam.dtype}")
    B, K, h, w = cam.shape
    if K < 2:
        raise ValueError(f"cam: expected K = C+1 >= 2 channels (C classes + background), "
                         f"got shape {tuple(cam.shape)}")
    if B < 1 or h < 1 or w < 1:
        raise ValueError(f"cam: expected a non-empty (B, K, h, w) tensor, got shape "
                         f"{tuple(cam.shape)}")
    if not isinstance(saliency, torch.Tensor) or saliency.dim() != 4 or saliency.shape[1] != 1:
        raise ValueError(f"saliency: expected shape (B, 1, H, W) with B={B}, got "
                         f"{_describe(saliency)}")
    if saliency.shape[0] != B:
        raise ValueError(f"saliency: batch size {saliency.shape[0]} does not match cam's "
                         f"B={B}; expected shape ({B}, 1, H, W)")
    if not saliency.is_floating_point():
        raise ValueError(f"saliency: expected a floating-point map in [0, 1], got dtype "
                         f"{saliency.dtype} (divide 8-bit saliency PNGs by 255)")
    if saliency.shape[2] < 1 or saliency.shape[3] < 1:
        raise ValueError(f"saliency: expected a non-empty (B, 1, H, W) map, got shape "
                         f"{tuple(saliency.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"labels: expected multi-hot image labels of shape (B, C) = "
                         f"({B}, {K - 1}), got {_describe(labels)}")
    if labels.shape[0] != B:
        raise ValueError(f"labels: batch size {labels.shape[0]} does not match cam's B={B}; "
                         f"expected shape ({B}, {K - 1})")
    if labels.shape[1] != K - 1:
        raise ValueError(f"labels: expected C = K-1 = {K - 1} columns (cam has K={K} maps, "
                         f"the last is background), got shape {tuple(labels.shape)}")
    if labels.is_complex():
        raise ValueError(f"labels: expected bool/integer/float multi-hot labels, got {labels.dtype}")
    if saliency.device != cam.device or labels.device != cam.device:
        raise ValueError(f"cam, saliency and labels must be on one device, got {cam.device}, "
                         f"{saliency.device} and {labels.device}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: expected a blend weight in [0, 1], got {lam}")
    if tau != tau:
        raise ValueError("tau: expected a number, got NaN")
    if strategy == "predefined":
        if len(bg_classes) == 0:
            raise ValueError("bg_classes: strategy='predefined' needs the list of classes that "
                             "are always background (e.g. bg_classes=[18] for 'train')")
        bad = [c for c in bg_classes if not (isinstance(c, int) and 0 <= c < K - 1)]
        if bad:
            raise ValueError(f"bg_classes: expected class indices in [0, {K - 1}), got {bad}")
    elif len(bg_classes) != 0:
        raise ValueError(f"bg_classes: only used by strategy='predefined', got strategy="
                         f"{strategy!r} with bg_classes={list(bg_classes)}")


def check_saliency_range(saliency: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every saliency value is in [0, 1] (NaN included).

    Costs one reduction and a host synchronisation; trainers whose loader already guarantees
    the range pass ``check_inputs=False`` to :func:`epsdist.loss.eps_loss`.
    """
    lo, hi = torch.aminmax(saliency.detach())
    lo, hi = float(lo), float(hi)
    if not (lo >= 0.0 and hi <= 1.0):
        raise ValueError(f"saliency: expected values in [0, 1], got range [{lo}, {hi}] "
                         f"(8-bit saliency maps must be divided by 255)")


def nearest_resize(saliency: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Step 1: PyTorch's default 'nearest' interpolation, as the released code does."""
    return F.interpolate(saliency, size=size, mode="nearest")


def select_maps(ratio: torch.Tensor, labels: torch.Tensor, *, tau: float, strategy: str,
                bg_classes: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: boolean (B, C) masks ``fg_sel`` and ``bg_sel``."""
    present = labels != 0
    if strategy == "adaptive":
        to_fg = ratio > tau
    elif strategy == "naive":
        to_fg = torch.ones_like(present)
    else:  # predefined
        to_fg = torch.ones_like(present)
        to_fg[:, list(bg_classes)] = False
    return present & to_fg, present & ~to_fg


def eps_loss_reference(cam: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, *,
                       tau: float = 0.4, lam: float = 0.5, strategy: str = "adaptive",
                       bg_classes: Sequence[int] = (), return_maps: bool = False):
    """The EPS saliency loss in plain PyTorch; differentiable in ``cam``.

    Math runs in float32 for half/bfloat16 logits and in the logits' dtype otherwise (tests
    run it in float64). Returns the scalar loss, or ``(loss, EPSMaps)`` when ``return_maps``.
    """
    check_eps_inputs(cam, saliency, labels, tau=tau, lam=lam, strategy=strategy,
                     bg_classes=bg_classes)
    dtype = torch.float64 if cam.dtype == torch.float64 else torch.float32
    B, K, h, w = cam.shape
    C = K - 1
    s = nearest_resize(saliency.to(dtype), (h, w))                     # (B, 1, h, w)
    p = torch.softmax(cam.to(dtype), dim=1)                            # (B, K, h, w)

    with torch.no_grad():
        on = p[:, :C] > 0.5                                            # (B, C, h, w)
        n_pred = on.sum(dim=(2, 3)).to(dtype)
        n_both = (on & (s > 0.5)).sum(dim=(2, 3)).to(dtype)
        ratio = n_both / (n_pred + 1e-4 * h * w)
        fg_sel, bg_sel = select_maps(ratio, labels, tau=tau, strategy=strategy,
                                     bg_classes=bg_classes)

    fg = (p[:, :C] * fg_sel[:, :, None, None]).sum(dim=1, keepdim=True)
    bg = p[:, C:] + (p[:, :C] * bg_sel[:, :, None, None]).sum(dim=1, keepdim=True)
    pred = lam * fg + (1.0 - lam) * (1.0 - bg)
    loss = ((pred - s) ** 2).mean()
    if not return_maps:
        return loss
    maps = EPSMaps(fg.detach().float(), bg.detach().float(), pred.detach().float())
    return loss, maps


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}"
