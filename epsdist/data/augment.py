"""Decoding and the EPS training augmentation, image and saliency together.

As the authors' training transform, in order:
  1. random resize so the long side is uniform in [lo, hi] (VOC 256..512, COCO 256..448),
     bicubic for image and saliency (the authors' ``RandomResizeLong`` uses PIL's CUBIC);
  2. horizontal flip with probability 0.5;
  3. colour jitter on the image only, torchvision ``ColorJitter(0.3, 0.3, 0.3, 0.1)``
     semantics: brightness, contrast, saturation and hue factors drawn uniformly, applied in a
     random order; brightness scales, contrast blends with the mean grey level, saturation
     blends with the grey image, hue shifts H on PIL's 0..255 HSV scale (with wrap-around);
  4. random crop to crop x crop: a window when the image is larger than the crop, a random
     placement in a canvas when it is smaller (per axis), as the authors' random_crop; the
     image canvas is the ImageNet mean colour (the authors pad normalised images with 0, the
     mean: ours is the mean rounded to uint8, within 0.007 of 0 after normalisation), the
     saliency canvas is 0;
  5. ImageNet normalisation and saliency / 255 -- applied to whole batches by
     ``normalize_batch``, after the uint8 crops crossed from the DataLoader worker to the main
     process (or the GPU): 4x fewer bytes through the worker queue, which costs more than the
     augmentation itself otherwise (BENCHMARKS.md).
The pixel work runs in OpenCV (as mmsegmentation does): the same operations as PIL/torchvision
at several times their speed (BENCHMARKS.md). OpenCV's thread pool is switched off here: the
parallelism comes from the DataLoader workers. Every random draw comes from the
``random.Random`` passed in, so a sample's augmentation depends only on that generator's seed.

``SegAugment`` is the segmentation stage's transform (DeepLab-v2), image and class mask together:
random rescale by a factor uniform in [0.5, 1.5] (image bilinear, mask nearest, both sampled at
pixel centres so they stay aligned), horizontal flip, random crop with padding (image: the mean
colour, mask: 255 = ignore); no colour jitter. The loader picks the task from the augment
object's ``task`` ("cls" for ``TrainAugment``, "seg" for ``SegAugment``).
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np
import torch

cv2.setNumThreads(1)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_U8 = tuple(round(255 * m) for m in IMAGENET_MEAN)
IGNORE_INDEX = 255                                # mask value: not a class, no loss
_RAW_PIXELS = cv2.IMREAD_IGNORE_ORIENTATION       # masks are stored in raw pixel order


class DecodeError(ValueError):
    pass


def _require_bytes(data: bytes) -> None:
    """OpenCV asserts (cv2.error, not a DecodeError) on an empty buffer."""
    if not data:
        raise DecodeError("empty file (0 bytes)")


def decode_rgb(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> (H, W, 3) uint8 RGB; raises DecodeError."""
    _require_bytes(data)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | _RAW_PIXELS)
    if img is None:
        raise DecodeError("not a decodable image")
    return img


def decode_gray(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W) uint8; raises DecodeError."""
    _require_bytes(data)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE | _RAW_PIXELS)
    if img is None:
        raise DecodeError("not a decodable image")
    return img


def decode_mask(data: bytes) -> np.ndarray:
    """Class-index PNG bytes -> (H, W) uint8: the palette indices of a palette (``P``) PNG (the
    pseudo-masks of epsdist/infer.py), or the values of an 8-bit gray (``L``) one (the shard
    writers' ground truth). OpenCV would turn palette indices into colours, so this uses PIL.
    Raises DecodeError."""
    from PIL import Image
    _require_bytes(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("P", "L"):
                raise DecodeError(f"mask PNG of mode {im.mode}, expected P or L class indices")
            return np.array(im, dtype=np.uint8)         # a writable copy
    except DecodeError:
        raise
    except Image.UnidentifiedImageError:        # its message names the BytesIO object
        raise DecodeError(f"not a decodable mask (no image format Pillow knows, {len(data)} "
                          f"bytes)") from None
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for bad bytes
        raise DecodeError(f"not a decodable mask ({e})") from None


@dataclass(frozen=True)
class TrainAugment:
    task: ClassVar[str] = "cls"                   # the loader yields image + saliency + labels
    resize_long: tuple[int, int] = (256, 512)
    crop_size: int = 448
    hflip: bool = True
    jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)

    def __post_init__(self):
        lo, hi = self.resize_long
        if not 1 <= lo <= hi:
            raise ValueError(f"resize_long: expected 1 <= lo <= hi, got {self.resize_long}")
        if self.crop_size < 1:
            raise ValueError(f"crop_size: expected >= 1, got {self.crop_size}")

    def __call__(self, image: np.ndarray, sal: np.ndarray, rng: random.Random):
        """uint8 image (H, W, 3) RGB and saliency (H, W) -> uint8 tensors: image (3, crop, crop)
        and saliency (1, crop, crop); ``normalize_batch`` turns a batch of them into floats."""
        H, W = image.shape[:2]
        long_side = rng.randint(*self.resize_long)
        scale = long_side / max(H, W)
        size = (max(1, round(W * scale)), max(1, round(H * scale)))      # cv2 takes (w, h)
        image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
        sal = cv2.resize(sal, size, interpolation=cv2.INTER_CUBIC)
        if self.hflip and rng.random() < 0.5:
            image, sal = cv2.flip(image, 1), cv2.flip(sal, 1)
        image = color_jitter(image, *self.jitter, rng=rng)
        return random_crop(image, sal, self.crop_size, rng)


def color_jitter(image: np.ndarray, brightness: float, contrast: float, saturation: float,
                 hue: float, *, rng: random.Random) -> np.ndarray:
    """torchvision's ColorJitter on a uint8 RGB array, draws taken from ``rng``."""
    ops = []
    if brightness > 0:
        ops.append((adjust_brightness, rng.uniform(max(0.0, 1 - brightness), 1 + brightness)))
    if contrast > 0:
        ops.append((adjust_contrast, rng.uniform(max(0.0, 1 - contrast), 1 + contrast)))
    if saturation > 0:
        ops.append((adjust_saturation, rng.uniform(max(0.0, 1 - saturation), 1 + saturation)))
    if hue > 0:
        ops.append((adjust_hue, rng.uniform(-hue, hue)))
    rng.shuffle(ops)
    for op, factor in ops:
        image = op(image, factor)
    return image


def adjust_brightness(image: np.ndarray, f: float) -> np.ndarray:
    """Blend with black: f * image."""
    return cv2.convertScaleAbs(image, alpha=f)


def adjust_contrast(image: np.ndarray, f: float) -> np.ndarray:
    """Blend with the mean grey level: f * image + (1 - f) * mean(grey)."""
    mean = float(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).mean())
    return cv2.addWeighted(image, f, image, 0.0, (1 - f) * mean)


def adjust_saturation(image: np.ndarray, f: float) -> np.ndarray:
    """Blend with the grey image: f * image + (1 - f) * grey."""
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(image, f, grey, 1 - f, 0.0)


def adjust_hue(image: np.ndarray, f: float) -> np.ndarray:
    """Shift H by f (in turns) on the 0..255 HSV scale, wrapping around."""
    shift = int(f * 255) % 256
    if shift == 0:
        return image
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
    lut = ((np.arange(256) + shift) % 256).astype(np.uint8)
    hsv[..., 0] = cv2.LUT(hsv[..., 0], lut)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def random_crop(image: np.ndarray, sal: np.ndarray, crop: int, rng: random.Random,
                sal_fill: int = 0):
    """The authors' random crop with padding -> uint8 tensors (3, crop, crop), (1, crop, crop).
    The image is padded with the mean colour, the second map with ``sal_fill``."""
    H, W = image.shape[:2]

    def offsets(n):
        space = n - crop
        if space > 0:
            return 0, rng.randint(0, space), crop          # (canvas start, image start, len)
        return rng.randint(0, -space), 0, n

    cy, iy, hh = offsets(H)
    cx, ix, ww = offsets(W)
    out_img = torch.tensor(MEAN_U8, dtype=torch.uint8).view(3, 1, 1).repeat(1, crop, crop)
    out_sal = torch.full((1, crop, crop), sal_fill, dtype=torch.uint8)
    out_img[:, cy:cy + hh, cx:cx + ww] = torch.from_numpy(
        np.ascontiguousarray(image[iy:iy + hh, ix:ix + ww].transpose(2, 0, 1)))
    out_sal[0, cy:cy + hh, cx:cx + ww] = torch.from_numpy(sal[iy:iy + hh, ix:ix + ww])
    return out_img, out_sal


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (b, 3, H, W) images -> float32 ImageNet-normalised, on the tensor's device."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std)


def normalize_batch(images: torch.Tensor, sals: torch.Tensor):
    """uint8 (b, 3, H, W) images and (b, 1, H, W) saliency -> float32 ImageNet-normalised
    images and saliency in [0, 1], on the tensors' device."""
    return normalize_images(images), sals.float().div_(255)


@dataclass(frozen=True)
class SegAugment:
    """The DeepLab-v2 training augmentation of an image and its class mask (see module doc).

    ``aug(image, mask, rng)``: uint8 image (H, W, 3) RGB and mask (H, W) -> uint8 tensors
    image (3, crop, crop) and mask (crop, crop), padding = mean colour / 255."""

    task: ClassVar[str] = "seg"                   # the loader yields image + mask (+ labels)
    scale_range: tuple[float, float] = (0.5, 1.5)
    crop_size: int = 321
    hflip: bool = True

    def __post_init__(self):
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range: expected 0 < lo <= hi, got {self.scale_range}")
        if self.crop_size < 1:
            raise ValueError(f"crop_size: expected >= 1, got {self.crop_size}")

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: random.Random):
        H, W = image.shape[:2]
        scale = rng.uniform(*self.scale_range)
        size = (max(1, round(W * scale)), max(1, round(H * scale)))      # cv2 takes (w, h)
        if size != (W, H):
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            # INTER_NEAREST_EXACT samples at pixel centres like INTER_LINEAR (PIL's NEAREST);
            # plain INTER_NEAREST is shifted by up to half a source pixel
            mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST_EXACT)
        if self.hflip and rng.random() < 0.5:
            image, mask = cv2.flip(image, 1), cv2.flip(mask, 1)
        image, mask = random_crop(image, mask, self.crop_size, rng, sal_fill=IGNORE_INDEX)
        return image, mask[0]
