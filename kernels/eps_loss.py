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

Softmax over channel chunks. A program takes BLOCK_P pixels of one image and walks the
channels in chunks of BLOCK_K (8 channels, or 4 for 16-bit logits with pixels contiguous):
only the last chunk is padded (K = 81 -> 88 lanes, not 128). Per pixel it keeps the online
softmax state: the running max m, z = sum_k e_k with e_k = exp(l_k - m), and the weighted sums
it needs (sum_k a_k e_k; with maps also sum fg_w e and sum bg_w e), rescaled by exp(m_old - m)
when the max grows; so p_k = e_k / z and pred = (1 - lam) + (sum_k a_k e_k) / z.

Passes (grid (B, cdiv(h*w, BLOCK_P)) but the coefficient pass):
  forward
  1. ``_overlap_counts_kernel`` (adaptive only): p_c > 0.5 holds for at most one channel,
     the first arg-max, where p = 1 / z; one sweep over the chunks finds it per pixel, a second
     (no loads) sums the hits per class, n_pred + (n_both << 16) packed in one int32, added
     with int32 atomics into ``counts`` (B, 2, C): exact, order-independent, deterministic.
  2. ``_coef_kernel`` (grid (B,)): the selection from ``counts`` (or ``force_bg``) once per
     image: rows a_k, fg_w, bg_w of ``coef`` (B, 3, NK) float32, NK = K rounded up to whole
     chunks and to 16 (zeros beyond K): the other kernels load one aligned row per chunk.
  3. ``_loss_kernel``: one sweep over the chunks, the blend, one partial sum of the squared
     error per program (summed afterwards in a fixed order: deterministic). No logits-sized
     output.
  backward
  4. ``_grad_kernel``: one sweep for z and sum_k a_k p_k, a second over the same chunks
     (re-read from cache) writing grad_output-scaled d(loss)/d(cam) in cam's layout.
     grad_output is read on the device (no sync).
Logits bytes moved: fwd+bwd 4 (adaptive) / 3 (naive, predefined); forward without grad 2 / 1.
Logits may be float32, bfloat16 or float16; all math is float32; the loss is float32.

Layouts. Pixels are addressed as ``b*sb + k*sk + p*sp`` when (h, w) flatten into one stride
(contiguous, channels_last, a uniformly strided view: ``FLAT_HW``, the loads then vectorise),
else through (y, x). Each thread owns whole pixels of a chunk, so the reductions over channels
need no warp shuffles: pixels contiguous, 16 bytes of pixels per thread and channel (one vector
load); ``CHANNELS_LAST`` (channel stride 1, the training layout) loads the chunk pixel-major,
the order in memory (coalesced), and converts it once through shared memory to one pixel per
thread (``_pixels_along_threads``). The launcher picks both flags from the strides and the tile
from K, the dtype, B*h*w and the device's SM count (``tile_config``: small problems get smaller
programs, so the grid still gives every SM two). Every kernel and configuration compiles for
sm_80/sm_90 without spills: ``python -m epsdist_kernels.compile_check``. The shared
@triton.jit helpers and the tile choice live in ``eps_tiles.py``.
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
from .eps_tiles import (_logits_chunk, _num_sms, _online_softmax_step, _pixel_offsets,
                        _round_to, _saliency_tile, coef_row_length, tile_config)

SUPPORTED_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    # layout and tile (BLOCK_K: channels per chunk)
    FLAT_HW: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pix = _pixel_offsets(offs_p, W, cam_sh, cam_sw, FLAT_HW)
    # At most one channel has p > 0.5: the first arg-max, with p = 1 / sum_k exp(l_k - max).
    # One pass over the chunks keeps the running max, its channel and that sum per pixel.
    m = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    z = tl.zeros((BLOCK_P,), tl.float32)
    top = tl.zeros((BLOCK_P,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        logits = _logits_chunk(cam_ptr, pid_b, k0, offs_k, offs_p, pix, K, HW, cam_sb,
                               cam_sk, CHANNELS_LAST)
        m_new, alpha, e = _online_softmax_step(logits, m)
        z = z * alpha + tl.sum(e, axis=0)
        top = tl.where(m_new > m, k0 + tl.argmax(logits, axis=0), top)
        m = m_new
    s = _saliency_tile(sal_ptr, pid_b, offs_p, W, HW, H_sal, W_sal, scale_h, scale_w,
                       sal_sb, sal_sh, sal_sw)
    on = ((1.0 / z) > 0.5) & (offs_p < HW)                 # NaN > 0.5 is false
    code = tl.where(on, 1 + (s > 0.5).to(tl.int32) * 65536, 0)    # n_pred + n_both << 16
    # per-class sums over the tile's pixels (BLOCK_P < 65536: the halves cannot carry)
    C = K - 1
    row = counts_ptr + pid_b * 2 * C
    for k0 in range(0, C, BLOCK_K):
        cls = k0 + offs_k
        packed = tl.sum(tl.where(cls[:, None] == top[None, :], code[None, :], 0), axis=1)
        hit = (cls < C) & (packed != 0)
        tl.atomic_add(row + cls, packed & 0xFFFF, mask=hit)
        tl.atomic_add(row + C + cls, packed >> 16, mask=hit)


@triton.jit
def _coef_kernel(
    # inputs: labels (B, C), force_bg (C,) uint8, counts (B, 2, C) int32
    labels_ptr, force_bg_ptr, counts_ptr,
    # output: float32 (B, 3, NK), NK = K rounded up to the loss tile's BLOCK_K:
    # rows a_k, fg_w[k], bg_w[k] (0 on padded channels)
    coef_ptr,
    # sizes and label strides
    K, NK, lab_sb, lab_sc,
    # EPS hyper-parameters; eps_area = 1e-4 h w
    tau, lam, eps_area,
    ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr,
):
    """The map selection of image b, once per image (grid (B,))."""
    b = tl.program_id(0)
    C = K - 1
    out = coef_ptr + b * 3 * NK
    for k0 in range(0, NK, BLOCK):
        offs_k = k0 + tl.arange(0, BLOCK)
        is_fg = offs_k < C
        present = tl.load(labels_ptr + b * lab_sb + offs_k * lab_sc, mask=is_fg, other=0) != 0
        if ADAPTIVE:
            n_pred = tl.load(counts_ptr + b * 2 * C + offs_k, mask=is_fg, other=0)
            n_both = tl.load(counts_ptr + b * 2 * C + C + offs_k, mask=is_fg, other=0)
            sel = (n_both.to(tl.float32) / (n_pred.to(tl.float32) + eps_area)) > tau
        else:
            sel = tl.load(force_bg_ptr + offs_k, mask=is_fg, other=1) == 0
        fg_w = (present & sel).to(tl.float32)
        bg_w = ((present & (sel == 0)) | (offs_k == C)).to(tl.float32)
        in_row = offs_k < NK
        tl.store(out + offs_k, lam * fg_w - (1.0 - lam) * bg_w, mask=in_row)
        tl.store(out + NK + offs_k, fg_w, mask=in_row)
        tl.store(out + 2 * NK + offs_k, bg_w, mask=in_row)


@triton.jit
def _loss_kernel(
    # inputs: logits, saliency, coefficients (B, 3, NK) f32 from _coef_kernel
    cam_ptr, sal_ptr, coef_ptr,
    # outputs: partial sums (B, n_blocks) f32; maps fg, bg, pred (B, h*w) f32
    partial_ptr, fg_ptr, bg_ptr, pred_ptr,
    # sizes; NK: length of a coefficient row
    K, W, HW, H_sal, W_sal, scale_h, scale_w, NK,
    # strides
    cam_sb, cam_sk, cam_sh, cam_sw,
    sal_sb, sal_sh, sal_sw,
    # EPS blend weight
    lam,
    # what to compute
    WRITE_MAPS: tl.constexpr,
    # layout and tile (BLOCK_K: channels per chunk)
    FLAT_HW: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    pix = _pixel_offsets(offs_p, W, cam_sh, cam_sw, FLAT_HW)
    coef = coef_ptr + pid_b * 3 * NK + offs_k
    # online softmax over the chunks: sums of e = exp(l - m) against the running max m
    m = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    z = tl.zeros((BLOCK_P,), tl.float32)                 # sum_k e_k
    ae = tl.zeros((BLOCK_P,), tl.float32)                # sum_k a_k e_k
    fe = tl.zeros((BLOCK_P,), tl.float32)                # sum_k fg_w e_k (maps only)
    be = tl.zeros((BLOCK_P,), tl.float32)                # sum_k bg_w e_k (maps only)
    for k0 in range(0, K, BLOCK_K):
        logits = _logits_chunk(cam_ptr, pid_b, k0, offs_k, offs_p, pix, K, HW, cam_sb,
                               cam_sk, CHANNELS_LAST)
        a = tl.load(coef + k0)                           # one (BLOCK_K,) row per chunk
        m, alpha, e = _online_softmax_step(logits, m)
        z = z * alpha + tl.sum(e, axis=0)
        ae = ae * alpha + tl.sum(a[:, None] * e, axis=0)
        if WRITE_MAPS:
            fe = fe * alpha + tl.sum(tl.load(coef + NK + k0)[:, None] * e, axis=0)
            be = be * alpha + tl.sum(tl.load(coef + 2 * NK + k0)[:, None] * e, axis=0)
    inv_z = 1.0 / z
    pred = (1.0 - lam) + ae * inv_z                      # = lam fg + (1 - lam)(1 - bg)
    s = _saliency_tile(sal_ptr, pid_b, offs_p, W, HW, H_sal, W_sal, scale_h, scale_w,
                       sal_sb, sal_sh, sal_sw)
    diff = tl.where(mask_p, pred - s, 0.0)
    tl.store(partial_ptr + pid_b * tl.num_programs(1) + pid_p, tl.sum(diff * diff, axis=0))

    if WRITE_MAPS:
        out = pid_b.to(tl.int64) * HW + offs_p
        tl.store(fg_ptr + out, fe * inv_z, mask=mask_p)
        tl.store(bg_ptr + out, be * inv_z, mask=mask_p)
        tl.store(pred_ptr + out, pred, mask=mask_p)


@triton.jit
def _grad_kernel(
    # inputs: logits, saliency, coefficients (row a of (B, 3, NK)), grad_output (0-d tensor)
    cam_ptr, sal_ptr, coef_ptr, gout_ptr,
    # output: d(loss)/d(cam) * grad_output, cam's dtype, strides (b, k, pixel)
    grad_ptr,
    # sizes; NK: length of a coefficient row
    K, W, HW, H_sal, W_sal, scale_h, scale_w, NK,
    # strides
    cam_sb, cam_sk, cam_sh, cam_sw,
    sal_sb, sal_sh, sal_sw,
    grad_sb, grad_sk, grad_sp,
    # EPS blend weight; inv_n = 1 / (B h w)
    lam, inv_n,
    # layout and tile (BLOCK_K: channels per chunk)
    FLAT_HW: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    pix = _pixel_offsets(offs_p, W, cam_sh, cam_sw, FLAT_HW)
    coef = coef_ptr + pid_b * 3 * NK + offs_k
    # pass 1 over the chunks: softmax normaliser and sum_k a_k p_k (online, as _loss_kernel)
    m = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    z = tl.zeros((BLOCK_P,), tl.float32)
    ae = tl.zeros((BLOCK_P,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        logits = _logits_chunk(cam_ptr, pid_b, k0, offs_k, offs_p, pix, K, HW, cam_sb,
                               cam_sk, CHANNELS_LAST)
        m, alpha, e = _online_softmax_step(logits, m)
        z = z * alpha + tl.sum(e, axis=0)
        ae = ae * alpha + tl.sum(tl.load(coef + k0)[:, None] * e, axis=0)
    inv_z = 1.0 / z
    shift = tl.where(m == float("-inf"), 0.0, m)
    a_dot_p = ae * inv_z
    s = _saliency_tile(sal_ptr, pid_b, offs_p, W, HW, H_sal, W_sal, scale_h, scale_w,
                       sal_sb, sal_sh, sal_sw)
    diff = tl.where(mask_p, (1.0 - lam) + a_dot_p - s, 0.0)
    g = (2.0 * inv_n * tl.load(gout_ptr).to(tl.float32)) * diff   # float32: a loss scale
    #                                                               cannot overflow
    # pass 2: re-read each chunk (the program's tile is still in cache), write the gradient
    base = grad_ptr + pid_b.to(tl.int64) * grad_sb
    gpix = offs_p * grad_sp
    for k0 in range(0, K, BLOCK_K):
        logits = _logits_chunk(cam_ptr, pid_b, k0, offs_k, offs_p, pix, K, HW, cam_sb,
                               cam_sk, CHANNELS_LAST)
        p = tl.exp(logits - shift[None, :]) * inv_z[None, :]
        a = tl.load(coef + k0)
        grad = _round_to(g[None, :] * p * (a[:, None] - a_dot_p[None, :]),
                         grad_ptr.dtype.element_ty)
        kk = k0 + offs_k
        mask_k = kk < K
        if CHANNELS_LAST:
            tl.store(base + gpix[:, None] + kk[None, :] * grad_sk, tl.trans(grad),
                     mask=mask_p[:, None] & mask_k[None, :])
        else:
            tl.store(base + kk[:, None] * grad_sk + gpix[None, :], grad,
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



def _layout(x: torch.Tensor) -> tuple[bool, bool]:
    """(FLAT_HW, CHANNELS_LAST) of a (B, K, h, w) tensor."""
    _, K, h, w = x.shape
    flat = h == 1 or x.stride(2) == w * x.stride(3)
    return flat, flat and K > 1 and x.stride(1) == 1 and x.stride(3) >= K


def _common(cam: torch.Tensor, saliency: torch.Tensor, n_sm: int | None):
    """(sizes, strides, layout meta, grid) shared by the pixel kernels; n_sm None: ask the
    device."""
    B, K, h, w = cam.shape
    H_sal, W_sal = saliency.shape[2:]
    # float32 H/h exactly as ATen computes it for nearest interpolation
    scale_h = float(np.float32(H_sal) / np.float32(h))
    scale_w = float(np.float32(W_sal) / np.float32(w))
    flat, cl = _layout(cam)
    block_k, block_p, num_warps = tile_config(K, B, h * w, channels_last=cl,
                                              elem_size=cam.element_size(),
                                              n_sm=n_sm or _num_sms(cam.device))
    sizes = (K, w, h * w, H_sal, W_sal, scale_h, scale_w)
    strides = (*cam.stride(), saliency.stride(0), saliency.stride(2), saliency.stride(3))
    meta = dict(FLAT_HW=flat, CHANNELS_LAST=cl, BLOCK_K=block_k, BLOCK_P=block_p,
                num_warps=num_warps)
    return sizes, strides, meta, (B, triton.cdiv(h * w, block_p))


def forward_launches(cam, saliency, labels, force_bg, *, tau: float, lam: float,
                     write_maps: bool, n_sm: int | None = None):
    """Buffers and launches of the forward: ``(launches, counts, partial, coef, maps)``.

    ``force_bg`` is None for the adaptive strategy, else a (C,) uint8 device tensor.
    """
    B, K, h, w = cam.shape
    dev = cam.device
    sizes, strides, meta, grid = _common(cam, saliency, n_sm)
    nk = coef_row_length(K, meta["BLOCK_K"])
    adaptive = force_bg is None
    counts = torch.zeros((B, 2, K - 1) if adaptive else (1,), dtype=torch.int32, device=dev)
    coef = torch.empty((B, 3, nk), dtype=torch.float32, device=dev)
    partial = torch.empty(grid, dtype=torch.float32, device=dev)
    maps = (torch.empty((3, B, 1, h, w), dtype=torch.float32, device=dev) if write_maps
            else None)
    map_args = (maps[0], maps[1], maps[2]) if write_maps else (partial, partial, partial)
    launches = []
    if adaptive:
        launches.append(Launch(_overlap_counts_kernel, grid,
                               (cam, saliency, counts, *sizes, *strides), meta))
    launches.append(Launch(
        _coef_kernel, (B,),
        (labels, counts if adaptive else force_bg, counts, coef, K, nk, labels.stride(0),
         labels.stride(1), float(tau), float(lam), 1e-4 * h * w),
        dict(ADAPTIVE=adaptive, BLOCK=min(128, triton.next_power_of_2(nk)), num_warps=1)))
    launches.append(Launch(
        _loss_kernel, grid,
        (cam, saliency, coef, partial, *map_args, *sizes, nk, *strides, float(lam)),
        dict(WRITE_MAPS=write_maps, **meta)))
    return launches, counts, partial, coef, maps


def backward_launch(cam, saliency, coef, grad_output, grad, *, lam: float,
                    n_sm: int | None = None) -> Launch:
    """The launch of ``_grad_kernel`` writing into ``grad`` (flat over (h, w), see _grad_buffer)."""
    B, K, h, w = cam.shape
    sizes, strides, meta, grid = _common(cam, saliency, n_sm)
    assert coef.shape == (B, 3, coef_row_length(K, meta["BLOCK_K"])), "coef from another tile"
    return Launch(_grad_kernel, grid,
                  (cam, saliency, coef, grad_output, grad, *sizes, coef.shape[2], *strides,
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
            cam, saliency, labels, force_bg, tau=tau, lam=lam, write_maps=want_maps)
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
