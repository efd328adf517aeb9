"""Class-index masks as palette PNGs: what the pseudo-masks (``epsdist/infer.py``), the
segmentation stage's val predictions and the demo write, and what ``python -m
epsdist.evaluate`` reads back (palette indices are the class values, 255 = ignore)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .manifest import voc_palette

PALETTE = voc_palette()


def encode_mask(mask: np.ndarray) -> bytes:
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(PALETTE)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
