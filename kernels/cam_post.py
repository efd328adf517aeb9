"""Fused Triton CAM post-processing of pseudo-mask inference: multi-scale/flip views -> mask.

Formulas (plain-PyTorch reference and contract: ``cam_post_ref.py``). Per image: V views
``A_v`` (K, h_v, w_v) with flags ``flip_v``, labels ``y`` (C,), output size (H, W),
background threshold t; ``classes`` = the L labelled c < C in increasing order::

    s_v         = fl32(h_v / H)    (fl32(w_v / W) along x)   # float32, as ATen for size=(H, W)
    x'          = W - 1 - x  if flip_v else x                # un-mirror by index, no copy
    src_y       = max(fl32(s_v * (y + 0.5) - 0.5), 0)        # ONE rounding (an FMA), see below
    y0          = min(floor(src_y), h_v - 1),  y1 = min(y0 + 1, h_v - 1),  ly = src_y - y0
                  (the same along x with x', w_v: src_x, x0, x1, lx)
    up_v[c,y,x] = (1-ly) ((1-lx) A[c,y0,x0] + lx A[c,y0,x1])
                +    ly  ((1-lx) A[c,y1,x0] + lx A[c,y1,x1])
    acc[i]      = sum_v up_v[classes[i]]                     # float32, views in the given order
    m[i]        = max_{y,x} acc[i]
    norm[i]     = acc[i] / (m[i] + 1e-5)                     # IEEE division (tl.math.div_rn)
    mask        = 0 where max_i norm[i] <= t, else classes[first argmax_i norm[i]] + 1

Passes (L labelled classes; a program holds a (BLOCK_L, BLOCK_P) tile of classes x pixels):
  1. ``_upsample_accumulate_kernel``, grid (cdiv(H*W, BLOCK_P), cdiv(L, BLOCK_L)): for every
     view, bilinear-sample the tile's classes straight from the view (4 gathers per class and
     pixel, cache-resident: the views are small), sum over views in registers, write ``acc``
     (L, H*W) float32 once, and fold the tile's per-class maximum into ``m`` (L,) with a float32
     ``tl.atomic_max`` (signed: ``m`` starts at -inf, so negative maps are handled; a max is
     order-independent, so the result is deterministic).
  2. ``_normalize_argmax_kernel``, grid (cdiv(H*W, BLOCK_P),): each program walks all L classes
     in BLOCK_L chunks, normalises, keeps the running best (strict ``>``, so the background and
     then the lowest class win ties, as torch.argmax does), writes the uint8 mask and, with
     ``return_norm``, the normalised maps in place over ``acc`` (no second (L, H, W) buffer).

Views of different sizes, zero-copy: the kernels take one pointer (the view at the lowest
address) and a small int64 table, one row per view: element offset of the view from that
pointer, h, w, the strides (k, y, x) and the flip flag; the L class indices follow the rows.
Views must share a dtype and a device (CPU under the interpreter, which copies each argument
to the host); any strides work (no ``.contiguous()`` copies); the
labelled channels are picked by index, so unlabelled maps are never read. Traffic: the views'
labelled channels once + acc written and read once + the mask (+ norm) -- memory-bound, 4
launches (table copy, -inf fill, two passes), none per class or per view.

Matching F.interpolate (``size=(H, W)``, align_corners=False). ATen's
``area_pixel_compute_scale`` gives ``scale = (float)in / out`` (with ``scale_factor=`` it would
be 1/scale_factor: another coordinate grid) and ``area_pixel_compute_source_index`` gives
``scale * (dst + 0.5) - 0.5``, clamped at 0, in float32 for float32 input. Compiled, that
expression is contracted to an FMA -- one rounding: measured on torch 2.14's AVX2 CPU kernel
(with two roundings the result is off by up to ~2e-6 on 0..1 maps); nvcc contracts by
default, so ATen's CUDA kernel should agree (not measured here). The kernel reproduces the
single rounding portably (the interpreter has no FMA): the product and the difference are
exact in float64 (24-bit x 24-bit mantissas), then rounded once to float32. With that the
kernel matches float32 F.interpolate to 1-2 ulp (the blend's own FMA contractions). Against
float64 F.interpolate both are off by up to half an ulp of src (~4e-6 at src ~ 100) times the
map's local slope: ~1e-5 on softmax maps, so float32 and float64 masks may differ where two
scores are that close.
Views may be float32, bfloat16 or float16 (upcast on load; all math float32).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from .cam_post_ref import (NORM_EPS, CamMasks, cam_to_mask_reference, check_cam_inputs,
                           labelled_classes)

SUPPORTED_VIEW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROW = 8                                 # int64 table entries per view (see _view_table)


# sizes change with every image: no per-size specialisation (and recompilation) of the kernels
@triton.jit(do_not_specialize=["V", "L", "H", "W"])
def _upsample_accumulate_kernel(
    # views: the view at the lowest address; table (int64): V rows of ROW entries (offset
    # from base_ptr in elements, h, w, stride_k, stride_y, stride_x, flip, 0), then L classes
    base_ptr, table_ptr,
    # outputs: acc (L, H*W) float32; cmax (L,) float32, filled with -inf by the launcher
    acc_ptr, cmax_ptr,
    # sizes: V views, L labelled classes, output H x W
    V, L, H, W,
    # table row length; tile
    ROW: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_l = tl.program_id(1)
    HW = H * W
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    y = offs_p // W
    x = offs_p % W
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    mask_lp = mask_l[:, None] & mask_p[None, :]
    cls = tl.load(table_ptr + V * ROW + offs_l, mask=mask_l, other=0)      # int64
    Hf = H.to(tl.float32)
    Wf = W.to(tl.float32)
    yc = y.to(tl.float64) + 0.5

    acc = tl.zeros((BLOCK_L, BLOCK_P), dtype=tl.float32)
    for v in range(V):
        row = table_ptr + v * ROW
        off = tl.load(row)
        h = tl.load(row + 1).to(tl.int32)
        w = tl.load(row + 2).to(tl.int32)
        s_k = tl.load(row + 3)
        s_y = tl.load(row + 4)
        s_x = tl.load(row + 5)
        flip = tl.load(row + 6)
        # ATen, align_corners=False, size given: scale = in / out in float32, then
        # src = max(fl32(scale * (dst + 0.5) - 0.5), 0) rounded once, as the FMA that ATen's
        # compiled kernels use: exact in float64 (a 24 x 24-bit product and a small shift),
        # then one rounding to float32. floor = truncation since src >= 0.
        scale_h = tl.math.div_rn(h.to(tl.float32), Hf).to(tl.float64)
        scale_w = tl.math.div_rn(w.to(tl.float32), Wf).to(tl.float64)
        xm = tl.where(flip != 0, W - 1 - x, x)                          # un-mirror by index
        src_y = tl.maximum((scale_h * yc - 0.5).to(tl.float32), 0.0)
        src_x = tl.maximum((scale_w * (xm.to(tl.float64) + 0.5) - 0.5).to(tl.float32), 0.0)
        y0 = tl.minimum(src_y.to(tl.int32), h - 1)
        x0 = tl.minimum(src_x.to(tl.int32), w - 1)
        y1 = tl.minimum(y0 + 1, h - 1)
        x1 = tl.minimum(x0 + 1, w - 1)
        ly = src_y - y0.to(tl.float32)
        lx = src_x - x0.to(tl.float32)
        hy = 1.0 - ly
        hx = 1.0 - lx
        chan = base_ptr + off + cls[:, None] * s_k                       # (BLOCK_L, 1)
        r0 = y0 * s_y
        r1 = y1 * s_y
        c0 = x0 * s_x
        c1 = x1 * s_x
        a00 = tl.load(chan + (r0 + c0)[None, :], mask=mask_lp, other=0.0).to(tl.float32)
        a01 = tl.load(chan + (r0 + c1)[None, :], mask=mask_lp, other=0.0).to(tl.float32)
        a10 = tl.load(chan + (r1 + c0)[None, :], mask=mask_lp, other=0.0).to(tl.float32)
        a11 = tl.load(chan + (r1 + c1)[None, :], mask=mask_lp, other=0.0).to(tl.float32)
        acc += (hy[None, :] * (hx[None, :] * a00 + lx[None, :] * a01)
                + ly[None, :] * (hx[None, :] * a10 + lx[None, :] * a11))

    out = acc_ptr + offs_l[:, None].to(tl.int64) * HW + offs_p[None, :]
    tl.store(out, acc, mask=mask_lp)
    tile_max = tl.max(tl.where(mask_lp, acc, float("-inf")), axis=1)
    tl.atomic_max(cmax_ptr + offs_l, tile_max, mask=mask_l)


@triton.jit(do_not_specialize=["V", "L", "HW"])
def _normalize_argmax_kernel(
    # inputs: acc (L, H*W) float32 (overwritten by norm when WRITE_NORM), cmax (L,) float32,
    # table (int64, the L classes start at V * ROW)
    acc_ptr, cmax_ptr, table_ptr,
    # output: mask (H*W,) uint8
    mask_ptr,
    # sizes; background score; the 1e-5 of the normalisation
    V, L, HW, bg_threshold, norm_eps,
    # what to write; table row length; tile
    WRITE_NORM: tl.constexpr, ROW: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    best = tl.zeros((BLOCK_P,), dtype=tl.float32) + bg_threshold        # background score
    label = tl.zeros((BLOCK_P,), dtype=tl.int64)                        # 0 = background
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        mask_lp = mask_l[:, None] & mask_p[None, :]
        cls = tl.load(table_ptr + V * ROW + offs_l, mask=mask_l, other=0)
        m = tl.load(cmax_ptr + offs_l, mask=mask_l, other=1.0)
        ptrs = acc_ptr + offs_l[:, None].to(tl.int64) * HW + offs_p[None, :]
        a = tl.load(ptrs, mask=mask_lp, other=0.0)
        denom = m + norm_eps                                            # float32, as torch
        norm = tl.math.div_rn(a, tl.zeros_like(a) + denom[:, None])
        if WRITE_NORM:
            tl.store(ptrs, norm, mask=mask_lp)
        norm = tl.where(mask_lp, norm, float("-inf"))
        # argmax over this chunk, first index on ties (classes are increasing)
        chunk_best = tl.max(norm, axis=0)
        big = tl.zeros_like(cls) + 2147483647
        chunk_cls = tl.min(tl.where(norm == chunk_best[None, :], cls[:, None], big[:, None]),
                           axis=0)
        better = chunk_best > best                                      # strict: earlier wins
        best = tl.where(better, chunk_best, best)
        label = tl.where(better, chunk_cls + 1, label)
    tl.store(mask_ptr + offs_p, label.to(tl.uint8), mask=mask_p)


# ----------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tile_config(L: int) -> tuple[int, int, int]:
    """(BLOCK_L, BLOCK_P, num_warps): up to 16 classes per tile, about 2k elements per tile."""
    block_l = min(16, triton.next_power_of_2(max(L, 1)))
    block_p = max(128, 2048 // block_l)
    return block_l, block_p, 4


class Launch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **meta)`` (also what the compile check builds)."""

    kernel: object
    grid: tuple
    args: tuple
    meta: dict


def _view_table(views: Sequence[torch.Tensor], flips: Sequence[bool],
                classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(base view, int64 table on the views' device): see ``_upsample_accumulate_kernel``.

    One host-to-device copy per image, from pinned memory on CUDA (asynchronous: no sync).
    """
    base = min(views, key=lambda v: v.data_ptr())
    esize = base.element_size()
    rows = []
    for v, flip in zip(views, flips):
        delta = v.data_ptr() - base.data_ptr()
        if delta % esize:                                 # cannot happen for torch tensors
            raise ValueError("views: a view's address is not aligned to its element size")
        rows += [delta // esize, v.shape[1], v.shape[2], *v.stride(), int(bool(flip)), 0]
    rows += classes.tolist()
    table = torch.tensor(rows, dtype=torch.int64)
    if base.device.type == "cuda":
        table = table.pin_memory()
    return base, table.to(base.device, non_blocking=True)


def plan_cam_to_mask(views: Sequence[torch.Tensor], flips: Sequence[bool],
                     classes: torch.Tensor, out_size: tuple[int, int], bg_threshold: float,
                     *, return_norm: bool):
    """Buffers and launches of both passes: ``(launches, table, acc, cmax, mask)``.
    ``classes``: the (L,) labelled classes, L >= 1, on the CPU."""
    H, W = out_size
    dev = views[0].device
    L = classes.numel()
    base, table = _view_table(views, flips, classes)
    acc = torch.empty((L, H, W), dtype=torch.float32, device=dev)
    cmax = torch.full((L,), float("-inf"), dtype=torch.float32, device=dev)
    mask = torch.empty((H, W), dtype=torch.uint8, device=dev)
    block_l, block_p, num_warps = tile_config(L)
    V = len(views)
    launches = [
        Launch(_upsample_accumulate_kernel, (triton.cdiv(H * W, block_p), triton.cdiv(L, block_l)),
               (base, table, acc, cmax, V, L, H, W),
               dict(ROW=ROW, BLOCK_L=block_l, BLOCK_P=block_p, num_warps=num_warps)),
        Launch(_normalize_argmax_kernel, (triton.cdiv(H * W, block_p),),
               (acc, cmax, table, mask, V, L, H * W, float(bg_threshold), NORM_EPS),
               dict(WRITE_NORM=return_norm, ROW=ROW, BLOCK_L=block_l, BLOCK_P=block_p,
                    num_warps=num_warps)),
    ]
    return launches, table, acc, cmax, mask


def cam_to_mask_triton(views: Sequence[torch.Tensor], flips: Sequence[bool],
                       labels: torch.Tensor, out_size: tuple[int, int],
                       bg_threshold: float = 0.2, *, return_norm: bool = False) -> CamMasks:
    """Same signature and result as ``cam_to_mask_reference`` (norm float32), fused in Triton.
    ``classes`` of the result is a slice of the kernels' table (no extra copy)."""
    C, K, H, W = check_cam_inputs(views, flips, labels, out_size, bg_threshold)
    if H * W >= 2**31:
        raise ValueError(f"out_size: H*W = {H * W} pixels, expected < 2**31")
    dtype, dev = views[0].dtype, views[0].device
    for i, v in enumerate(views):
        if v.dtype not in SUPPORTED_VIEW_DTYPES:
            raise ValueError(f"views[{i}]: the Triton CAM post-processing takes float32, "
                             f"bfloat16 or float16 maps, got {v.dtype} (use impl='torch')")
        if v.dtype != dtype:
            raise ValueError(f"views[{i}]: dtype {v.dtype} differs from views[0]'s {dtype}; "
                             f"expected one dtype")
    if _interpreting():
        if dev.type != "cpu":                 # the interpreter copies each argument to host,
            raise ValueError(                 # which would break the cross-view offsets
                f"views: under TRITON_INTERPRET=1 the kernels need CPU tensors, got {dev}")
    elif dev.type != "cuda":
        raise ValueError(f"views: the Triton CAM post-processing needs CUDA tensors (or "
                         f"TRITON_INTERPRET=1 for the CPU interpreter), got device {dev}")
    classes = labelled_classes(labels)
    L = classes.numel()
    if L == 0:
        norm = torch.zeros((0, H, W), dtype=torch.float32, device=dev) if return_norm else None
        return CamMasks(torch.zeros((H, W), dtype=torch.uint8, device=dev), norm,
                        torch.zeros(0, dtype=torch.int64, device=dev))
    launches, table, acc, _, mask = plan_cam_to_mask(views, flips, classes, (H, W),
                                                     bg_threshold, return_norm=return_norm)
    for launch in launches:
        launch.kernel[launch.grid](*launch.args, **launch.meta)
    return CamMasks(mask, acc if return_norm else None, table[len(views) * ROW:])


IMPLS = ("auto", "triton", "torch")


def cam_to_mask(views: Sequence[torch.Tensor], flips: Sequence[bool], labels: torch.Tensor,
                out_size: tuple[int, int], bg_threshold: float = 0.2, *,
                return_norm: bool = False, impl: str = "auto") -> CamMasks:
    """Views of one image -> ``CamMasks(mask, norm or None, classes)`` (see ``cam_post_ref``).

    ``views``: V (K, h_v, w_v) maps (softmaxed EPS output, K = C+1, or ReLU'd CAMs, K = C) of
    the image resized by s_v and mirrored where ``flips[v]``; ``labels`` (C,) multi-hot, on the
    CPU (no synchronisation) or on the views' device (one, to list the labelled classes);
    ``out_size`` (H, W); ``bg_threshold`` is the background score. ``return_norm`` also returns
    the (L, H, W) normalised maps of the labelled classes. Malformed input raises ``ValueError``
    naming the argument. ``impl``: ``"auto"`` runs the Triton kernels for CUDA views and the
    reference elsewhere; ``"triton"`` / ``"torch"`` force one.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        on_cuda = (not isinstance(views, torch.Tensor) and isinstance(views, Sequence)
                   and len(views) > 0 and isinstance(views[0], torch.Tensor)
                   and views[0].device.type == "cuda")
        impl = "triton" if on_cuda else "torch"
    fn = cam_to_mask_triton if impl == "triton" else cam_to_mask_reference
    return fn(views, flips, labels, out_size, bg_threshold, return_norm=return_norm)
