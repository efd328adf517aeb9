"""Fused Triton EPS saliency loss: forward = two passes over the logits, backward = one.

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
background channel, 0 otherwise, ``pred = (1 - lam) + sum_k a_k p_k`` and, for the incoming
grad_output ``go`` (a loss scale: 65536 under fp16 training)::

    g             = go * 2 (pred - s) / (B h w)
    dloss/dcam_j  = g p_j (a_j - sum_k a_k p_k)          # float32, rounded once to cam's dtype

Passes (grid = (B, cdiv(h*w, BLOCK_P)); a program holds a (BLOCK_K, BLOCK_P) tile of all K
channels for BLOCK_P pixels, so the softmax never leaves registers):
  forward
  1. ``_overlap_counts_kernel`` (adaptive only): per-tile integer counts n_pred, n_both,
     added with int32 atomics into ``counts`` (B, 2, C); integer sums are exact and
     order-independent, so the result is deterministic.
  2. ``_loss_kernel``: selection from ``counts`` (or ``force_bg``), the blend, one partial sum
     of the squared error per program (summed afterwards in a fixed order: deterministic);
     program (b, 0) also stores the coefficients a[b, :] (B, BLOCK_K) float32 for backward.
     No logits-sized output.
  backward
  3. ``_grad_kernel``: recomputes softmax and pred from the logits and ``a`` and writes
     grad_output-scaled d(loss)/d(cam) directly. grad_output is read on the device (no sync).
Logits bytes moved: fwd+bwd 4 (adaptive) / 3 (naive, predefined); forward without grad 2 / 1.
Logits may be float32, bfloat16 or float16; all math is float32; the loss is float32.

Layouts. Pixels are addressed as ``b*sb + k*sk + p*sp`` when (h, w) flatten into one stride
(contiguous, channels_last, a uniformly strided view: ``FLAT_HW``, the loads then vectorise),
else through (y, x). ``CHANNELS_LAST`` (channel stride 1, the training layout) loads the tile
pixel-major, the order in memory (coalesced), and computes on it in a layout where each thread
owns whole pixels, converted once through shared memory (``_pixels_along_threads``), so the
reductions over channels need no warp shuffles. The launcher picks both flags from the strides
and the tile size from K, B*h*w and the device's SM count (``tile_config``). Every kernel and
configuration compiles for sm_80/sm_90 without spills: ``python -m epsdist_kernels.compile_check``.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from .eps_loss_ref import EPSMaps, check_eps_inputs

SUPPORTED_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _pixels_along_threads(ptr, offs_k, offs_p):
    """A (BLOCK_K, BLOCK_P) tile of zeros that reads no memory (every lane masked off; the
    compiler drops the load) but whose addresses run along pixels. Added to the channel-major
    tile of a channels_last load, it makes Triton's layout passes compute in a layout where each
    thread owns whole pixels (the softmax and the blend reduce over channels in registers) and
    convert the coalesced load into it once, through shared memory. Without it the channels
    stay spread over the lanes and every reduction over channels costs warp shuffles
    (450-900 per thread at K = 81 on sm_90, against ~70-160 with it: compile_check)."""
    return tl.load(ptr + offs_p[None, :] + 0 * offs_k[:, None], mask=offs_k[:, None] < 0,
                   other=0.0).to(tl.float32)


@triton.jit
def _probs_tile(
    # logits and the image b
    cam_ptr, b,
    # channels (BLOCK_K,), pixels (BLOCK_P,), the pixels' element offsets within a channel
    offs_k, offs_p, pix,
    # sizes: K channels, h*w pixels; strides of cam along b and k
    K, HW, cam_sb, cam_sk,
    # tile orientation in memory (see the module docstring)
    CHANNELS_LAST: tl.constexpr,
):
    """softmax over channels of a (BLOCK_K, BLOCK_P) tile, float32; padded channels get p = 0."""
    mask_k = offs_k < K
    mask_p = offs_p < HW
    base = cam_ptr + b.to(tl.int64) * cam_sb
    if CHANNELS_LAST:
        # coalesced: loaded pixel-major, as in memory (channels contiguous) ...
        logits = tl.trans(tl.load(base + pix[:, None] + offs_k[None, :] * cam_sk,
                                  mask=mask_p[:, None] & mask_k[None, :], other=0.0))
        # ... then computed pixel-per-thread: a layout anchor (see _pixels_along_threads)
        logits += _pixels_along_threads(cam_ptr, offs_k, offs_p)
    else:
        logits = tl.load(base + offs_k[:, None] * cam_sk + pix[None, :],
                         mask=mask_k[:, None] & mask_p[None, :], other=0.0)
    logits = tl.where(mask_k[:, None], logits.to(tl.float32), float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=0)[None, :])
    return e * (1.0 / tl.sum(e, axis=0))[None, :]


@triton.jit
def _pixel_offsets(offs_p, W, s_h, s_w, FLAT_HW: tl.constexpr):
    """Element offsets of pixels offs_p (row-major over h x w) for strides (s_h, s_w)."""
    if FLAT_HW:                                          # s_h == W * s_w: no division
        pix = offs_p * s_w
    else:
        pix = (offs_p // W) * s_h + (offs_p % W) * s_w
    return pix


@triton.jit
def _saliency_tile(
    # saliency (B, 1, H_sal, W_sal), the image b, pixels (BLOCK_P,)
    sal_ptr, b, offs_p,
    # logits width and pixel count; saliency size and H_sal/h, W_sal/w (float32)
    W, HW, H_sal, W_sal, scale_h, scale_w,
    # saliency strides along b, y, x
    sal_sb, sal_sh, sal_sw,
):
    """The nearest-resized saliency at the tile's pixels, float32 (0 outside the image)."""
    y = offs_p // W
    x = offs_p % W
    # PyTorch 'nearest': src = min(floor(dst * (in / out)), in - 1), float32 arithmetic
    sy = tl.minimum((y.to(tl.float32) * scale_h).to(tl.int32), H_sal - 1)
    sx = tl.minimum((x.to(tl.float32) * scale_w).to(tl.int32), W_sal - 1)
    s = tl.load(sal_ptr + b.to(tl.int64) * sal_sb + sy * sal_sh + sx * sal_sw,
                mask=offs_p < HW, other=0.0)
    return s.to(tl.float32)


@triton.jit
def _overlap_counts_kernel(
    # inputs
    cam_ptr, sal_ptr,
    # output: int32 (B, 2, C), zeroed; [b, 0, c] = n_pred, [b, 1, c] = n_both
    counts_ptr,
    # sizes
    K, W, HW, H_sal, W_sal, scale_h, scale_w,
    # strides of cam (b, k, y, x) and of saliency (b, y, x)
    cam_sb, cam_sk, cam_sh, cam_sw,
    sal_sb, sal_sh, sal_sw,
    # layout and tile
    FLAT_HW: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix = _pixel_offsets(offs_p, W, cam_sh, cam_sw, FLAT_HW)
    p = _probs_tile(cam_ptr, pid_b, offs_k, offs_p, pix, K, HW, cam_sb, cam_sk, CHANNELS_LAST)
    s = _saliency_tile(sal_ptr, pid_b, offs_p, W, HW, H_sal, W_sal, scale_h, scale_w,
                       sal_sb, sal_sh, sal_sw)
    on = (p > 0.5) & (offs_p < HW)[None, :]                # NaN > 0.5 is false
    n_pred = tl.sum(on.to(tl.int32), axis=1)
    n_both = tl.sum((on & (s > 0.5)[None, :]).to(tl.int32), axis=1)
    C = K - 1
    is_fg = offs_k < C
    row = counts_ptr + pid_b * 2 * C
    tl.atomic_add(row + offs_k, n_pred, mask=is_fg)
    tl.atomic_add(row + C + offs_k, n_both, mask=is_fg)


@triton.jit
def _loss_kernel(
    # inputs: logits, saliency, labels (B, C), force_bg (C,) uint8, counts (B, 2, C) int32
    cam_ptr, sal_ptr, labels_ptr, force_bg_ptr, counts_ptr,
    # outputs: partial sums (B, n_blocks) f32; coefficients a (B, BLOCK_K) f32;
    # maps fg, bg, pred (B, h*w) f32
    partial_ptr, coef_ptr, fg_ptr, bg_ptr, pred_ptr,
    # sizes
    K, W, HW, H_sal, W_sal, scale_h, scale_w,
    # strides
    cam_sb, cam_sk, cam_sh, cam_sw,
    sal_sb, sal_sh, sal_sw,
    lab_sb, lab_sc,
    # EPS hyper-parameters; eps_area = 1e-4 h w
    tau, lam, eps_area,
    # what to compute
    ADAPTIVE: tl.constexpr, WRITE_COEF: tl.constexpr, WRITE_MAPS: tl.constexpr,
    # layout and tile
    FLAT_HW: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
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
    if WRITE_COEF:          # a_k for the backward pass, written once per image
        tl.store(coef_ptr + pid_b * BLOCK_K + offs_k, lam * fg_w - (1.0 - lam) * bg_w,
                 mask=(offs_k < BLOCK_K) & (pid_p == 0))

    # --- blend and squared error ------------------------------------------------------
    pix = _pixel_offsets(offs_p, W, cam_sh, cam_sw, FLAT_HW)
    p = _probs_tile(cam_ptr, pid_b, offs_k, offs_p, pix, K, HW, cam_sb, cam_sk, CHANNELS_LAST)
    s = _saliency_tile(sal_ptr, pid_b, offs_p, W, HW, H_sal, W_sal, scale_h, scale_w,
                       sal_sb, sal_sh, sal_sw)
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


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """float32 x -> DTYPE, rounded to nearest even. For bfloat16 the rounding is done on the
    bits first (exact, so the cast only drops zeros): Triton's CPU interpreter truncates
    float32 -> bfloat16 casts, the GPU rounds; this way both round."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)    # NaN stays NaN
    return x.to(DTYPE)


@triton.jit
def _grad_kernel(
    # inputs: logits, saliency, coefficients a (B, BLOCK_K) f32, grad_output (a 0-d tensor)
    cam_ptr, sal_ptr, coef_ptr, gout_ptr,
    # output: d(loss)/d(cam) * grad_output, cam's dtype, strides (b, k, pixel)
    grad_ptr,
    # sizes
    K, W, HW, H_sal, W_sal, scale_h, scale_w,
    # strides
    cam_sb, cam_sk, cam_sh, cam_sw,
    sal_sb, sal_sh, sal_sw,
    grad_sb, grad_sk, grad_sp,
    # EPS blend weight; inv_n = 1 / (B h w)
    lam, inv_n,
    # layout and tile
    FLAT_HW: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    a = tl.load(coef_ptr + pid_b * BLOCK_K + offs_k)
    go = tl.load(gout_ptr).to(tl.float32)

    pix = _pixel_offsets(offs_p, W, cam_sh, cam_sw, FLAT_HW)
    p = _probs_tile(cam_ptr, pid_b, offs_k, offs_p, pix, K, HW, cam_sb, cam_sk, CHANNELS_LAST)
    s = _saliency_tile(sal_ptr, pid_b, offs_p, W, HW, H_sal, W_sal, scale_h, scale_w,
                       sal_sb, sal_sh, sal_sw)
    a_dot_p = tl.sum(a[:, None] * p, axis=0)
    diff = tl.where(mask_p, (1.0 - lam) + a_dot_p - s, 0.0)
    g = (2.0 * inv_n * go) * diff                       # float32: a loss scale cannot overflow
    grad = _round_to(g[None, :] * p * (a[:, None] - a_dot_p[None, :]), grad_ptr.dtype.element_ty)
    base = grad_ptr + pid_b.to(tl.int64) * grad_sb
    gpix = offs_p * grad_sp
    mask_k = offs_k < K
    if CHANNELS_LAST:
        tl.store(base + gpix[:, None] + offs_k[None, :] * grad_sk, tl.trans(grad),
                 mask=mask_p[:, None] & mask_k[None, :])
    else:
        tl.store(base + offs_k[:, None] * grad_sk + gpix[None, :], grad,
                 mask=mask_k[:, None] & mask_p[None, :])


# ----------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------

class Launch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **meta)`` (also what the compile check builds)."""

    kernel: object
    grid: tuple
    args: tuple
    meta: dict


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


DEFAULT_SMS = 132                       # H100 / H200; the interpreter has no device to ask


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def tile_config(K: int, B: int, HW: int, n_sm: int = DEFAULT_SMS) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_P, num_warps): all K channels per tile, about 4k elements per tile,
    fewer pixels per tile while the grid would not give every SM two programs; 16 tile
    elements per thread (at 32, or with 16 warps, ptxas spills at K = 81: compile_check)."""
    block_k = triton.next_power_of_2(K)
    block_p = max(16, min(1024, 4096 // block_k))
    while block_p > 32 and B * triton.cdiv(HW, block_p) < 2 * n_sm:
        block_p //= 2
    return block_k, block_p, max(1, min(8, block_k * block_p // (32 * 16)))


def _layout(x: torch.Tensor) -> tuple[bool, bool]:
    """(FLAT_HW, CHANNELS_LAST) of a (B, K, h, w) tensor."""
    _, K, h, w = x.shape
    flat = h == 1 or x.stride(2) == w * x.stride(3)
    return flat, flat and K > 1 and x.stride(1) == 1 and x.stride(3) >= K


def _common(cam: torch.Tensor, saliency: torch.Tensor, n_sm: int | None):
    """(sizes, strides, layout meta, grid) shared by the three kernels; n_sm None: ask the
    device."""
    B, K, h, w = cam.shape
    H_sal, W_sal = saliency.shape[2:]
    # float32 H/h exactly as ATen computes it for nearest interpolation
    scale_h = float(np.float32(H_sal) / np.float32(h))
    scale_w = float(np.float32(W_sal) / np.float32(w))
    sizes = (K, w, h * w, H_sal, W_sal, scale_h, scale_w)
    strides = (*cam.stride(), saliency.stride(0), saliency.stride(2), saliency.stride(3))
    block_k, block_p, num_warps = tile_config(K, B, h * w, n_sm or _num_sms(cam.device))
    flat, cl = _layout(cam)
    meta = dict(FLAT_HW=flat, CHANNELS_LAST=cl, BLOCK_K=block_k, BLOCK_P=block_p,
                num_warps=num_warps)
    return sizes, strides, meta, (B, triton.cdiv(h * w, block_p))


def forward_launches(cam, saliency, labels, force_bg, *, tau: float, lam: float,
                     write_coef: bool, write_maps: bool, n_sm: int | None = None):
    """Buffers and launches of the forward: ``(launches, counts, partial, coef, maps)``.

    ``force_bg`` is None for the adaptive strategy, else a (C,) uint8 device tensor.
    """
    B, K, h, w = cam.shape
    dev = cam.device
    sizes, strides, meta, grid = _common(cam, saliency, n_sm)
    adaptive = force_bg is None
    counts = torch.zeros((B, 2, K - 1) if adaptive else (1,), dtype=torch.int32, device=dev)
    partial = torch.empty(grid, dtype=torch.float32, device=dev)
    coef = (torch.empty((B, meta["BLOCK_K"]), dtype=torch.float32, device=dev) if write_coef
            else partial)
    maps = (torch.empty((3, B, 1, h, w), dtype=torch.float32, device=dev) if write_maps
            else None)
    map_args = (maps[0], maps[1], maps[2]) if write_maps else (partial, partial, partial)
    launches = []
    if adaptive:
        launches.append(Launch(_overlap_counts_kernel, grid,
                               (cam, saliency, counts, *sizes, *strides), meta))
    launches.append(Launch(
        _loss_kernel, grid,
        (cam, saliency, labels, counts if adaptive else force_bg, counts, partial, coef,
         *map_args, *sizes, *strides, labels.stride(0), labels.stride(1),
         float(tau), float(lam), 1e-4 * h * w),
        dict(ADAPTIVE=adaptive, WRITE_COEF=write_coef, WRITE_MAPS=write_maps, **meta)))
    return launches, counts, partial, (coef if write_coef else None), maps


def backward_launch(cam, saliency, coef, grad_output, grad, *, lam: float,
                    n_sm: int | None = None) -> Launch:
    """The launch of ``_grad_kernel`` writing into ``grad`` (flat over (h, w), see _grad_buffer)."""
    B, K, h, w = cam.shape
    sizes, strides, meta, grid = _common(cam, saliency, n_sm)
    return Launch(_grad_kernel, grid,
                  (cam, saliency, coef, grad_output, grad, *sizes, *strides,
                   grad.stride(0), grad.stride(1), grad.stride(3), float(lam), 1.0 / (B * h * w)),
                  meta)


def _grad_buffer(cam: torch.Tensor) -> torch.Tensor:
    """Like cam (channels_last stays channels_last), always flat over (h, w)."""
    grad = torch.empty_like(cam)
    return grad if _layout(grad)[0] else torch.empty(cam.shape, dtype=cam.dtype,
                                                     device=cam.device)


def _check_launch_inputs(cam: torch.Tensor) -> None:
    if cam.dtype not in SUPPORTED_LOGIT_DTYPES:
        raise ValueError(f"cam: the Triton EPS loss takes float32, bfloat16 or float16 logits, "
                         f"got {cam.dtype} (use impl='torch' for float64)")
    if cam.device.type != "cuda" and not _interpreting():
        raise ValueError(f"cam: the Triton EPS loss needs CUDA tensors (or TRITON_INTERPRET=1 "
                         f"for the CPU interpreter), got device {cam.device}")
    B, K, h, w = cam.shape
    if K * h * w >= 2**31:
        raise ValueError(f"cam: K*h*w = {K * h * w} elements per image, expected < 2**31")


def _run(launch: Launch) -> None:
    launch.kernel[launch.grid](*launch.args, **launch.meta)


# ----------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------

class EPSSaliencyLoss(torch.autograd.Function):
    """Forward: counts + loss passes, keeping only the (B, K) coefficients a; backward: one
    pass that recomputes softmax and writes grad_output * d(loss)/d(cam). Nothing of the
    logits' size lives between forward and backward but the logits themselves."""

    @staticmethod
    def forward(ctx, cam, saliency, labels, force_bg, tau, lam, want_maps):
        _check_launch_inputs(cam)
        if saliency.dtype not in SUPPORTED_LOGIT_DTYPES:
            saliency = saliency.float()
        if labels.dtype == torch.bool:
            labels = labels.view(torch.uint8)            # no copy; the kernel tests != 0
        B, _, h, w = cam.shape
        launches, _, partial, coef, maps = forward_launches(
            cam, saliency, labels, force_bg, tau=tau, lam=lam,
            write_coef=ctx.needs_input_grad[0], write_maps=want_maps)
        for launch in launches:
            _run(launch)
        loss = partial.sum() / (B * h * w)
        ctx.save_for_backward(cam, saliency, coef)
        ctx.lam = lam
        if not want_maps:
            return loss
        ctx.mark_non_differentiable(maps[0], maps[1], maps[2])
        return (loss, maps[0], maps[1], maps[2])

    @staticmethod
    def backward(ctx, grad_loss, *_grad_maps):
        cam, saliency, coef = ctx.saved_tensors
        grad = _grad_buffer(cam)
        gout = grad_loss.detach().to(torch.float32).reshape(())
        _run(backward_launch(cam, saliency, coef, gout, grad, lam=ctx.lam))
        return grad, None, None, None, None, None, None


@functools.lru_cache(maxsize=64)
def _force_bg(C: int, bg_classes: tuple, device: torch.device) -> torch.Tensor:
    """(C,) uint8 on ``device``, 1 = always background; made once per (C, classes, device)."""
    flags = torch.zeros(C, dtype=torch.uint8)
    flags[list(bg_classes)] = 1
    return flags.to(device)


def eps_loss_triton(cam: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, *,
                    tau: float = 0.4, lam: float = 0.5, strategy: str = "adaptive",
                    bg_classes: Sequence[int] = (), return_maps: bool = False):
    """Same signature and result as ``eps_loss_reference``, fused in Triton. No host
    synchronisation: the strategies' class flags are cached on the device."""
    check_eps_inputs(cam, saliency, labels, tau=tau, lam=lam, strategy=strategy,
                     bg_classes=bg_classes)
    force_bg = None
    if strategy != "adaptive":
        force_bg = _force_bg(cam.shape[1] - 1, tuple(bg_classes), cam.device)
    out = EPSSaliencyLoss.apply(cam, saliency, labels, force_bg, tau, lam, return_maps)
    if not return_maps:
        return out
    return out[0], EPSMaps(*out[1:])
