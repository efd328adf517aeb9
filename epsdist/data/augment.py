"""Decoding and the EPS training augmentation, image and saliency together.

As the authors' training transform, in order:
  1. random resize so the long side is uniform in [lo, hi] (VOC 256..512, COCO 256..448),
     image and saliency, with PIL's antialiased bicubic (the authors' ``RandomResizeLong``
     resizes the PIL images with ``Image.CUBIC``): ``resize_bicubic``, torchvision's
     antialiased bicubic resize of the uint8 tensor, PIL's filter to within 1 grey level;
  2. horizontal flip with probability 0.5;
  3. colour jitter on the image only, the authors' torchvision ``ColorJitter(0.3, 0.3, 0.3,
     0.1)`` on a PIL image: factors drawn uniformly, applied in a random order, each op PIL's
     arithmetic (brightness, contrast, saturation: exactly; hue: within 0.01 grey levels on
     average) done in NumPy/OpenCV at several times PIL's speed;
  4. random crop to crop x crop: a window when the image is larger than the crop, a random
     placement in a canvas when it is smaller (per axis), as the authors' random_crop; the
     image canvas is the ImageNet mean colour (the authors pad normalised images with 0, the
     mean: ours is the mean rounded to uint8, within 0.007 of 0 after normalisation), the
     saliency canvas is 0;
  5. ImageNet normalisation and saliency / 255 -- applied to whole batches by
     ``normalize_batch``, after the uint8 crops crossed from the DataLoader worker to the main
     process (or the GPU): 4x fewer bytes through the worker queue, which costs more than the
     augmentation itself otherwise (BENCHMARKS.md).
OpenCV's thread pool is switched off here: the parallelism comes from the DataLoader workers.
Every random draw comes from the ``random.Random`` passed in, so a sample's augmentation
depends only on that generator's seed.

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
from PIL import Image

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
        size = (max(1, round(H * scale)), max(1, round(W * scale)))
        image = resize_bicubic(torch.from_numpy(image).permute(2, 0, 1), size)
        # torchvision's uint8 resize is ~1.5x faster on 3 channels than on 1: the saliency
        # resized as a grey RGB image (channels are independent: the same numbers)
        sal = resize_bicubic(torch.from_numpy(cv2.cvtColor(sal, cv2.COLOR_GRAY2RGB))
                             .permute(2, 0, 1), size)[:1]
        if self.hflip and rng.random() < 0.5:
            image, sal = image.flip(-1), sal.flip(-1)
        image = color_jitter(image.permute(1, 2, 0).numpy(), *self.jitter, rng=rng)
        return random_crop(image, sal[0].numpy(), self.crop_size, rng)


def resize_bicubic(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (..., H, W) -> uint8 (..., h, w): PIL's ``Image.resize((w, h), Image.BICUBIC)``,
    what the authors ran for training and for the inference scales: the bicubic filter
    (a = -0.5) widened by the factor when shrinking (antialiasing), a horizontal pass into a
    rounded 8-bit image, then a vertical pass. On the CPU torchvision's uint8 resize does this
    (Pillow's algorithm); elsewhere (the GPU) ``resize_bicubic_float`` does. Both are within
    rounding of PIL (tests/test_parity.py). The same size: unchanged."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if image.device.type != "cpu":
        return resize_bicubic_float(image, size)
    import torchvision.transforms.v2.functional as TF
    return TF.resize(image, list(size), interpolation=TF.InterpolationMode.BICUBIC,
                     antialias=True)


def resize_bicubic_float(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``resize_bicubic`` in float arithmetic on any device: PIL's two passes (width, then
    height), each rounded and clipped to 0..255 as PIL's 8-bit intermediate image."""
    import torch.nn.functional as F
    shape = image.shape
    x = image.reshape(-1, *shape[-3:]) if image.dim() >= 3 else image[None, None]
    x = x.float()
    for hw in ((x.shape[-2], size[1]), tuple(size)):
        if tuple(x.shape[-2:]) != hw:
            x = F.interpolate(x, size=hw, mode="bicubic", align_corners=False,
                              antialias=True).clamp_(0, 255).round_()
    return x.to(torch.uint8).reshape(*shape[:-2], *size)


def color_jitter(image: np.ndarray, brightness: float, contrast: float, saturation: float,
                 hue: float, *, rng: random.Random) -> np.ndarray:
    """torchvision's ``ColorJitter(brightness, contrast, saturation, hue)`` on a PIL image (what
    the authors ran), on a uint8 RGB array: the factors and the order of the four ops are drawn
    from ``rng`` as ``ColorJitter.get_params`` draws them, each op is PIL's arithmetic."""
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


# torchvision's PIL path runs PIL's ImageEnhance (brightness, contrast, saturation: Image.blend
# with a degenerate image) and a round trip through PIL's 8-bit HSV (hue). PIL itself is 3-4x
# slower than the loader's budget allows (its HSV conversions alone take ~4 ms for a VOC-sized
# image: BENCHMARKS.md), so these four functions do PIL's arithmetic in float32 NumPy/OpenCV;
# tests/test_parity.py checks them against torchvision's PIL path on photo-like images.

def _grey(image: np.ndarray) -> np.ndarray:
    """PIL's ``convert("L")`` (ITU-R 601-2 luma, PIL's own rounding)."""
    return np.asarray(Image.fromarray(image).convert("L"))


def _blend(degenerate, image: np.ndarray, f: float) -> np.ndarray:
    """PIL's ``Image.blend(degenerate, image, f)``: degenerate + f * (image - degenerate) in
    float32, clipped to 0..255 and truncated to uint8."""
    d = np.asarray(degenerate, dtype=np.float32)
    out = d + np.float32(f) * (image.astype(np.float32) - d)
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


_LEVELS = np.arange(256, dtype=np.uint8)


def adjust_brightness(image: np.ndarray, f: float) -> np.ndarray:
    """PIL ``ImageEnhance.Brightness``: blend with black (a per-level table)."""
    return cv2.LUT(image, _blend(0.0, _LEVELS, f))


def adjust_contrast(image: np.ndarray, f: float) -> np.ndarray:
    """PIL ``ImageEnhance.Contrast``: blend with the mean grey level, rounded to an integer
    (a per-level table)."""
    mean = cv2.mean(_grey(image))[0]                    # exact: a sum of integers / count
    return cv2.LUT(image, _blend(float(int(mean + 0.5)), _LEVELS, f))


def adjust_saturation(image: np.ndarray, f: float) -> np.ndarray:
    """PIL ``ImageEnhance.Color``: blend with the grey image (in place, float32: PIL's
    grey + f * (image - grey), clipped, truncated)."""
    grey = cv2.cvtColor(_grey(image), cv2.COLOR_GRAY2RGB).astype(np.float32)
    out = image.astype(np.float32)
    out -= grey
    out *= np.float32(f)
    out += grey
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


_SCALES = {}


def _channel_scale(hsv: np.ndarray, scale: tuple[float, float, float]) -> None:
    """hsv (H, W, 3) float32 *= scale per channel, in place, as one contiguous multiply by a
    cached (tiled) row of the factors: NumPy's broadcast over a last axis of 3 is ~10x slower."""
    flat = hsv.reshape(-1)
    tiled = _SCALES.get(scale)
    if tiled is None or tiled.size < flat.size:
        tiled = _SCALES[scale] = np.tile(np.array(scale, np.float32), max(flat.size // 3, 1 << 18))
    flat *= tiled[:flat.size]


def adjust_hue(image: np.ndarray, f: float) -> np.ndarray:
    """torchvision's PIL ``adjust_hue``: to PIL's 8-bit HSV (H and S truncated to 0..255), add
    ``int(f * 255)`` to H modulo 256, back to RGB (PIL rounds). The HSV conversions run in
    float32 OpenCV; a pixel whose H or S lands on a truncation boundary can come out one step
    off (~0.2 % of a photo's pixels; mean difference < 0.01 grey levels)."""
    shift = int(np.int32(f * 255)) & 255
    hsv = cv2.cvtColor(image.astype(np.float32), cv2.COLOR_RGB2HSV)  # H in degrees, S in 0..1
    _channel_scale(hsv, (255 / 360, 255, 1))
    hsv8 = hsv.astype(np.uint8)                                      # truncates, as PIL
    hsv8[..., 0] += np.uint8(shift)                                  # modulo 256
    hsv = hsv8.astype(np.float32)
    _channel_scale(hsv, (360 / 255, 1 / 255, 1))
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)            # within float rounding of 0..255
    rgb += np.float32(0.5)                                # round half up, as PIL
    return rgb.astype(np.uint8)


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
    out_img = torch.empty((3, crop, crop), dtype=torch.uint8)
    out_sal = torch.empty((1, crop, crop), dtype=torch.uint8)
    if hh < crop or ww < crop:                                   # a canvas shows
        out_img.copy_(torch.tensor(MEAN_U8, dtype=torch.uint8).view(3, 1, 1).expand_as(out_img))
        out_sal.fill_(sal_fill)
    # one strided copy each, straight from the (H, W, 3) window into the (3, crop, crop) canvas
    out_img[:, cy:cy + hh, cx:cx + ww] = _tensor(image[iy:iy + hh, ix:ix + ww]).permute(2, 0, 1)
    out_sal[0, cy:cy + hh, cx:cx + ww] = _tensor(sal[iy:iy + hh, ix:ix + ww])
    return out_img, out_sal


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor viewing ``a`` (copied only when it has negative strides, which torch lacks)."""
    if any(st < 0 for st in a.strides):
        a = np.ascontiguousarray(a)
    return torch.from_numpy(a)


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
