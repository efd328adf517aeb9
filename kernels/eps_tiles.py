"""Tiles of the fused EPS loss (``eps_loss.py``): the @triton.jit helpers its kernels share
(loading a chunk of logits in either layout, one online-softmax step, the resized saliency,
rounding) and the launcher's choice of tile (channels per chunk, pixels per program, warps)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _pixels_along_threads(ptr, k0, offs_k, offs_p):
    """A (BLOCK_K, BLOCK_P) tile of zeros that reads no memory (every lane masked off; the
    compiler drops the load: offs_k must be a plain tl.arange) but whose addresses run along
    pixels, one pixel per thread (stride 2: no vector), and depend on the chunk k0 (a
    loop-invariant anchor is hoisted out of the chunk loop and loses its hold). Added to the
    channel-major tile of a channels_last load, it makes Triton's layout passes compute in a
    layout where each thread owns whole pixels (the softmax and the blend reduce over channels
    in registers) and convert the coalesced load into it once, through shared memory. Without
    it the channels stay spread over the lanes and every reduction over channels costs warp
    shuffles (450-900 per thread at K = 81 on sm_90 with a whole-K tile: compile_check)."""
    return tl.load(ptr + k0 + 2 * offs_p[None, :] + 0 * offs_k[:, None],
                   mask=offs_k[:, None] < 0, other=0.0).to(tl.float32)


@triton.jit
def _logits_chunk(
    # logits and the image b
    cam_ptr, b,
    # first channel of the chunk, tl.arange(0, BLOCK_K), pixels (BLOCK_P,), their offsets
    k0, offs_k, offs_p, pix,
    # sizes: K channels, h*w pixels; strides of cam along b and k
    K, HW, cam_sb, cam_sk,
    # tile orientation in memory (see the module docstring)
    CHANNELS_LAST: tl.constexpr,
):
    """(BLOCK_K, BLOCK_P) float32 logits of channels k0 + offs_k; -inf on channels >= K,
    0 on pixels >= h*w."""
    kk = k0 + offs_k
    mask_k = kk < K
    mask_p = offs_p < HW
    base = cam_ptr + b.to(tl.int64) * cam_sb
    if CHANNELS_LAST:
        # coalesced: loaded pixel-major, as in memory (channels contiguous) ...
        logits = tl.trans(tl.load(base + pix[:, None] + kk[None, :] * cam_sk,
                                  mask=mask_p[:, None] & mask_k[None, :], other=0.0))
        # ... then computed pixel-per-thread: a layout anchor (see _pixels_along_threads)
        logits += _pixels_along_threads(cam_ptr, k0, offs_k, offs_p)
    else:
        logits = tl.load(base + kk[:, None] * cam_sk + pix[None, :],
                         mask=mask_k[:, None] & mask_p[None, :], other=0.0)
    return tl.where(mask_k[:, None], logits.to(tl.float32), float("-inf"))


@triton.jit
def _online_softmax_step(logits, m):
    """One chunk of the online softmax: the new running max ``m_new`` (BLOCK_P,), the factor
    ``alpha`` = exp(m - m_new) that rescales sums taken against the old max, and the chunk's
    e = exp(logits - m_new). A pixel whose logits so far are all -inf keeps e = 0 (not NaN)."""
    m_new = tl.maximum(m, tl.max(logits, axis=0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp(m - shift), tl.exp(logits - shift[None, :])


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
def _round_to(x, DTYPE: tl.constexpr):
    """float32 x -> DTYPE, rounded to nearest even. For bfloat16 the rounding is done on the
    bits first (exact, so the cast only drops zeros): Triton's CPU interpreter truncates
    float32 -> bfloat16 casts, the GPU rounds; this way both round."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)    # NaN stays NaN
    return x.to(DTYPE)


# ----------------------------------------------------------------------------------------
# Tile choice
# ----------------------------------------------------------------------------------------

DEFAULT_SMS = 132                       # H100 / H200; the interpreter has no device to ask
CHUNK_ELEMENTS = 32          # pixels contiguous: elements of a chunk per thread (BLOCK_K x vec)
CHUNK_CHANNELS_LAST = 8      # channels_last: channels per chunk, one pixel per thread


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def chunk_size(K: int, max_chunk: int) -> int:
    """Channels per chunk: the power of two <= max_chunk that minimises the padded channel
    count plus a cost of 2 channels per chunk (the online-softmax rescale), larger on ties.
    Only the last chunk is padded: K = 81 -> 8 x 11 = 88 or 32 x 3 = 96, never 128."""
    cands = [c for c in (2, 4, 8, 16, 32) if c <= max(2, min(max_chunk, K))]
    return min(cands, key=lambda c: (triton.cdiv(K, c) * (c + 2), -c))


def tile_config(K: int, B: int, HW: int, *, channels_last: bool = False, elem_size: int = 4,
                n_sm: int = DEFAULT_SMS) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_P, num_warps) for logits (B, K, HW) of ``elem_size`` bytes.

    Each thread owns whole pixels of every chunk, so the reductions over channels stay in
    registers. Pixels contiguous: vec = 16 / elem_size pixels per thread (one 16-byte load per
    channel), chunks of up to CHUNK_ELEMENTS / vec channels. channels_last: one pixel per
    thread, chunks of up to CHUNK_CHANNELS_LAST channels (loaded pixel-major, converted through
    shared memory; with 16 or 32 ptxas takes 96-255 registers at K = 81, with 8 48-72 at the
    same instruction count per pixel: compile_check). Then, while the grid would not give
    every SM two programs, fewer warps, then fewer pixels per thread (down to 32 pixels)."""
    if channels_last:
        per_thread, block_k = 1, chunk_size(K, CHUNK_CHANNELS_LAST)
    else:
        per_thread = 16 // elem_size
        block_k = chunk_size(K, CHUNK_ELEMENTS // per_thread)
    num_warps = 4
    while B * triton.cdiv(HW, 32 * num_warps * per_thread) < 2 * n_sm:
        if num_warps > 1:
            num_warps //= 2
        elif per_thread > 1:
            per_thread //= 2
        else:
            break
    return block_k, 32 * num_warps * per_thread, num_warps


def coef_row_length(K: int, block_k: int) -> int:
    """NK: K rounded up to whole chunks (the coefficient rows are read without masks) and to
    a multiple of 16 (Triton then knows the rows are 16-byte aligned: vector loads)."""
    return triton.cdiv(triton.cdiv(K, block_k) * block_k, 16) * 16
