"""Fused Triton EPS saliency loss: the loss and d(loss)/d(cam) in two passes over the logits.

Formulas (the contract of ARCHITECTURE.md; plain-PyTorch reference: ``eps_loss_ref.py``).
Logits ``cam`` (B, K=C+1, h, w), background last; saliency ``S`` (B, 1, H, W); labels ``y`` (B, C)::

    s[b,y,x]   = S[b, 0, min(floor(y * (H/h)), H-1), min(floor(x * (W/w)), W-1)]   # 'nearest'
    p          = softmax(cam, dim=1)
    ratio[b,c] = n_both[b,c] / (n_pred[b,c] + 1e-4 * h * w)
                 n_pred = sum_px [p_c > 0.5],  n_both = sum_px [p_c > 0.5][s > 0.5]
    fg_sel     = y & sel,  bg_sel = y & !sel,  sel = (ratio > tau)        # adaptive
                                                sel = !force_bg[c]         # naive / predefined
    fg         = sum_c fg_sel p_c,   bg = p_bg + sum_c bg_sel p_c
    pred       = lam fg + (1 - lam)(1 - bg)
    loss       = 1/(B h w) sum_{b,y,x} (pred - s)^2

Gradient. With a_k = lam for fg_sel channels, -(1 - lam) for bg_sel channels and the
background channel, 0 otherwise, ``pred = (1 - lam) + sum_k a_k p_k`` and

    g             = 2 (pred - s) / (B h w)
    dloss/dcam_j  = g p_j (a_j - sum_k a_k p_k)

Passes (grid = (B, cdiv(h*w, BLOCK_P)) for both; a program holds a (BLOCK_K, BLOCK_P) tile of
all K channels for BLOCK_P pixels, so the softmax never leaves registers):
  1. ``_overlap_counts_kernel`` (adaptive only): per-tile integer counts n_pred, n_both,
     added with int32 atomics into ``counts`` (B, 2, C); integer sums are exact and
     order-independent, so the result is deterministic.
  2. ``_loss_grad_kernel``: selection from ``counts``, the blend, one partial sum of the
     squared error per program (summed afterwards in a fixed order: deterministic), and
     d(loss)/d(cam) written in the logits' dtype, so backward is a scale by grad_output.
Logits may be float32, bfloat16 or float16; all math is float32; the loss is float32.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from .eps_loss_ref import EPSMaps, check_eps_inputs

SUPPORTED_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _softmax_and_saliency_tile(
    # tensors
    cam_ptr, sal_ptr,
    # which image and which pixels
    pid_b, offs_k, offs_p,
    # sizes: K channels, image width W, pixels HW; saliency H_sal x W_sal and H_sal/h, W_sal/w
    K, W, HW, H_sal, W_sal, scale_h, scale_w,
    # strides of cam (b, k, y, x) and of saliency (b, y, x)
    cam_sb, cam_sk, cam_sh, cam_sw,
    sal_sb, sal_sh, sal_sw,
):
    """Load a (BLOCK_K, BLOCK_P) tile of logits, return (p, s, pixel mask) in float32."""
    mask_k = offs_k < K
    mask_p = offs_p < HW
    y = offs_p // W
    x = offs_p % W
    b = pid_b.to(tl.int64)
    logits = tl.load(cam_ptr + b * cam_sb + offs_k[:, None] * cam_sk
                     + (y * cam_sh + x * cam_sw)[None, :],
                     mask=mask_k[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
    logits = tl.where(mask_k[:, None], logits, float("-inf"))      # padded channels: p = 0
    e = tl.exp(logits - tl.max(logits, axis=0)[None, :])
    p = e / tl.sum(e, axis=0)[None, :]
    # PyTorch 'nearest': src = min(floor(dst * (in / out)), in - 1), float32 arithmetic
    sy = tl.minimum((y.to(tl.float32) * scale_h).to(tl.int32), H_sal - 1)
    sx = tl.minimum((x.to(tl.float32) * scale_w).to(tl.int32), W_sal - 1)
    s = tl.load(sal_ptr + b * sal_sb + sy * sal_sh + sx * sal_sw, mask=mask_p, other=0.0)
    return p, s.to(tl.float32), mask_p


@triton.jit
def _overlap_counts_kernel(
    # inputs
    cam_ptr, sal_ptr,
    # output: int32 (B, 2, C), zeroed; [b, 0, c] = n_pred, [b, 1, c] = n_both
    counts_ptr,
    # sizes
    K, W, HW, H_sal, W_sal, scale_h, scale_w,
    # strides
    cam_sb, cam_sk, cam_sh, cam_sw,
    sal_sb, sal_sh, sal_sw,
    # tile
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p, s, mask_p = _softmax_and_saliency_tile(
        cam_ptr, sal_ptr, pid_b, offs_k, offs_p, K, W, HW, H_sal, W_sal, scale_h, scale_w,
        cam_sb, cam_sk, cam_sh, cam_sw, sal_sb, sal_sh, sal_sw)
    on = (p > 0.5) & mask_p[None, :]                      # NaN > 0.5 is false
    n_pred = tl.sum(on.to(tl.int32), axis=1)
    n_both = tl.sum((on & (s > 0.5)[None, :]).to(tl.int32), axis=1)
    C = K - 1
    is_fg = offs_k < C
    row = counts_ptr + pid_b * 2 * C
    tl.atomic_add(row + offs_k, n_pred, mask=is_fg)
    tl.atomic_add(row + C + offs_k, n_both, mask=is_fg)


@triton.jit
def _loss_grad_kernel(
    # inputs: logits, saliency, labels (B, C), force_bg (C,) uint8, counts (B, 2, C) int32
    cam_ptr, sal_ptr, labels_ptr, force_bg_ptr, counts_ptr,
    # outputs: partial sums (B, n_blocks) f32; grad like cam; maps fg, bg, pred (B, h*w) f32
    partial_ptr, grad_ptr, fg_ptr, bg_ptr, pred_ptr,
    # sizes
    K, W, HW, H_sal, W_sal, scale_h, scale_w,
    # strides
    cam_sb, cam_sk, cam_sh, cam_sw,
    sal_sb, sal_sh, sal_sw,
    lab_sb, lab_sc,
    grad_sb, grad_sk, grad_sh, grad_sw,
    # EPS hyper-parameters; inv_n = 1 / (B h w); eps_area = 1e-4 h w
    tau, lam, inv_n, eps_area,
    # what to compute
    ADAPTIVE: tl.constexpr, WRITE_GRAD: tl.constexpr, WRITE_MAPS: tl.constexpr,
    # tile
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    C = K - 1
    is_fg = offs_k < C

    # --- map selection for image b: fg_w[k], bg_w[k] in {0, 1} -------------------------
    present = tl.load(labels_ptr + pid_b * lab_sb + offs_k * lab_sc, mask=is_fg, other=0) != 0
    if ADAPTIVE:
        n_pred = tl.load(counts_ptr + pid_b * 2 * C + offs_k, mask=is_fg, other=0)
        n_both = tl.load(counts_ptr + pid_b * 2 * C + C + offs_k, mask=is_fg, other=0)
        sel = (n_both.to(tl.float32) / (n_pred.to(tl.float32) + eps_area)) > tau
    else:
        sel = tl.load(force_bg_ptr + offs_k, mask=is_fg, other=1) == 0
    fg_w = (present & sel).to(tl.float32)
    bg_w = ((present & (sel == 0)) | (offs_k == C)).to(tl.float32)

    # --- blend and squared error ------------------------------------------------------
    p, s, mask_p = _softmax_and_saliency_tile(
        cam_ptr, sal_ptr, pid_b, offs_k, offs_p, K, W, HW, H_sal, W_sal, scale_h, scale_w,
        cam_sb, cam_sk, cam_sh, cam_sw, sal_sb, sal_sh, sal_sw)
    fg = tl.sum(fg_w[:, None] * p, axis=0)
    bg = tl.sum(bg_w[:, None] * p, axis=0)
    pred = lam * fg + (1.0 - lam) * (1.0 - bg)
    diff = tl.where(mask_p, pred - s, 0.0)
    tl.store(partial_ptr + pid_b * tl.num_programs(1) + pid_p, tl.sum(diff * diff, axis=0))

    if WRITE_MAPS:
        out = pid_b.to(tl.int64) * HW + offs_p
        tl.store(fg_ptr + out, fg, mask=mask_p)
        tl.store(bg_ptr + out, bg, mask=mask_p)
        tl.store(pred_ptr + out, pred, mask=mask_p)

    # --- d(loss)/d(cam) = g p_j (a_j - sum_k a_k p_k) -----------------------------------
    if WRITE_GRAD:
        a = lam * fg_w - (1.0 - lam) * bg_w
        a_dot_p = lam * fg - (1.0 - lam) * bg
        g = 2.0 * diff * inv_n
        grad = g[None, :] * p * (a[:, None] - a_dot_p[None, :])
        y = offs_p // W
        x = offs_p % W
        ptrs = (grad_ptr + pid_b.to(tl.int64) * grad_sb + offs_k[:, None] * grad_sk
                + (y * grad_sh + x * grad_sw)[None, :])
        tl.store(ptrs, grad.to(grad_ptr.dtype.element_ty),
                 mask=(offs_k < K)[:, None] & mask_p[None, :])


# ----------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tile_config(K: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_P, num_warps): all K channels per tile, about 8k elements per tile."""
    block_k = triton.next_power_of_2(K)
    block_p = max(16, min(1024, 8192 // block_k))
    return block_k, block_p, 8 if block_k * block_p >= 8192 else 4


def eps_loss_triton_forward(cam: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor,
                            *, tau: float, lam: float, force_bg: torch.Tensor | None,
                            write_grad: bool, write_maps: bool):
    """Run both passes. Returns ``(loss, grad or None, EPSMaps or None)``.

    ``force_bg`` is None for the adaptive strategy, else a (C,) uint8 tensor: 1 = the class is
    background when present (predefined), all zeros = naive.
    """
    if cam.dtype not in SUPPORTED_LOGIT_DTYPES:
        raise ValueError(f"cam: the Triton EPS loss takes float32, bfloat16 or float16 logits, "
                         f"got {cam.dtype} (use impl='torch' for float64)")
    if cam.device.type != "cuda" and not _interpreting():
        raise ValueError(f"cam: the Triton EPS loss needs CUDA tensors (or TRITON_INTERPRET=1 "
                         f"for the CPU interpreter), got device {cam.device}")
    if saliency.dtype not in SUPPORTED_LOGIT_DTYPES:
        saliency = saliency.float()
    if labels.dtype == torch.bool:
        labels = labels.view(torch.uint8)                # no copy; the kernel tests != 0
    B, K, h, w = cam.shape
    C = K - 1
    H_sal, W_sal = saliency.shape[2:]
    # float32 H/h exactly as ATen computes it for nearest interpolation
    scale_h = float(np.float32(H_sal) / np.float32(h))
    scale_w = float(np.float32(W_sal) / np.float32(w))
    block_k, block_p, num_warps = tile_config(K)
    grid = (B, triton.cdiv(h * w, block_p))
    dev = cam.device

    counts = torch.zeros((B, 2, C), dtype=torch.int32, device=dev)
    sizes = (K, w, h * w, H_sal, W_sal, scale_h, scale_w)
    cam_strides = tuple(cam.stride())
    sal_strides = (saliency.stride(0), saliency.stride(2), saliency.stride(3))
    adaptive = force_bg is None
    if adaptive:
        _overlap_counts_kernel[grid](
            cam, saliency, counts, *sizes, *cam_strides, *sal_strides,
            BLOCK_K=block_k, BLOCK_P=block_p, num_warps=num_warps)
        force_bg = counts                                  # unused placeholder pointer
    partial = torch.empty(grid, dtype=torch.float32, device=dev)
    grad = torch.empty_like(cam) if write_grad else None   # keeps channels_last layout
    maps = (torch.empty((3, B, 1, h, w), dtype=torch.float32, device=dev) if write_maps
            else None)
    grad_arg = grad if write_grad else cam
    map_args = (maps[0], maps[1], maps[2]) if write_maps else (partial, partial, partial)
    _loss_grad_kernel[grid](
        cam, saliency, labels, force_bg, counts,
        partial, grad_arg, *map_args,
        *sizes, *cam_strides, *sal_strides,
        labels.stride(0), labels.stride(1),
        *tuple(grad_arg.stride()),
        float(tau), float(lam), 1.0 / (B * h * w), 1e-4 * h * w,
        ADAPTIVE=adaptive, WRITE_GRAD=write_grad, WRITE_MAPS=write_maps,
        BLOCK_K=block_k, BLOCK_P=block_p, num_warps=num_warps)
    loss = partial.sum() / (B * h * w)
    return loss, grad, (EPSMaps(maps[0], maps[1], maps[2]) if write_maps else None)


# ----------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------

class EPSSaliencyLoss(torch.autograd.Function):
    """Forward runs both passes and keeps d(loss)/d(cam); backward scales it by grad_output.

    The stored gradient is scaled in place (no second full-size buffer), so a second backward
    through the same graph (``retain_graph=True``) raises instead of returning a wrong value.
    """

    @staticmethod
    def forward(ctx, cam, saliency, labels, force_bg, tau, lam, want_maps):
        loss, grad, maps = eps_loss_triton_forward(
            cam, saliency, labels, tau=tau, lam=lam, force_bg=force_bg,
            write_grad=ctx.needs_input_grad[0], write_maps=want_maps)
        ctx.save_for_backward(grad)
        ctx.used = False
        if not want_maps:
            return loss
        ctx.mark_non_differentiable(*maps)
        return (loss, *maps)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_maps):
        if ctx.used:
            raise RuntimeError("EPSSaliencyLoss: backward ran twice through the same graph; "
                               "recompute the loss (or use impl='torch') for repeated backward")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None, None, None, None


def eps_loss_triton(cam: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, *,
                    tau: float = 0.4, lam: float = 0.5, strategy: str = "adaptive",
                    bg_classes: Sequence[int] = (), return_maps: bool = False):
    """Same signature and result as ``eps_loss_reference``, fused in Triton."""
    check_eps_inputs(cam, saliency, labels, tau=tau, lam=lam, strategy=strategy,
                     bg_classes=bg_classes)
    force_bg = None
    if strategy != "adaptive":
        force_bg = torch.zeros(cam.shape[1] - 1, dtype=torch.uint8)
        force_bg[list(bg_classes)] = 1
        force_bg = force_bg.to(cam.device)
    out = EPSSaliencyLoss.apply(cam, saliency, labels, force_bg, tau, lam, return_maps)
    if not return_maps:
        return out
    return out[0], EPSMaps(*out[1:])
