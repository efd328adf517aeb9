"""The embedded synthetic dataset: scenes where co-occurring context fools a CAM.

EPS ("Railroad is not a Train", Lee et al., CVPR 2021) exists because a classifier trained with
image labels only learns the context that always comes with a class (the rails under a train,
the water under a boat) and its localization maps fire on that context; saliency maps, which
follow objects and not their surroundings, correct it. This module generates a small dataset
with exactly that structure, so the demo and the tests train EPS on something where the method
visibly matters, without downloading anything.

Classes and their contexts (``CLASSES[c]`` always comes with ``CONTEXTS[c]``; a context never
appears without its class; contexts are *not* classes: their pixels are background, 0, in the
ground truth)::

    label  class  context   what the context looks like
    1      boat   water     blue band with horizontal waves, wavy top edge, under the hull
    2      train  rails     gray-brown gravel band, dark sleepers, two steel rail lines
    3      bird   foliage   green leafy canopy (union of ellipses) and a brown branch it sits on
    4      car    road      dark asphalt band with a light curb line and white dashes

Each image (``size`` x ``size``, default 112) has a random textured background (two-colour
gradient, low-frequency blotches, pixel noise), one or two objects of distinct classes (each in
its own part of the canvas, with its context adjacent), and sometimes a few non-class "clutter"
shapes on the background. Objects have class-specific shapes (hull + cabin or sail; carriage with
a window row, stripe and wheels; bird body, head, beak, tail, wing, legs; car body, cabin,
windows, wheels) and class-specific colour ranges (boat red, car orange, train yellow, bird
purple/magenta), random position, scale and mirroring.

Saliency maps imitate an off-the-shelf salient-object detector: the union of the object masks,
randomly dilated or eroded by a pixel, Gaussian-blurred; with probability 0.25 per object a chunk
of the object is missing; with probability 0.2 per image the map also fires on a clutter shape
on the background (a "distractor"); contexts are never salient beyond the blur at the object's
edge.

Output (VOC layout under ``out_dir``)::

    JPEGImages/<id>.jpg            RGB, JPEG quality 90
    SegmentationClass/<id>.png     mode "P", VOC palette; 0 background, 1..C classes,
                                   255 ignore on a 2-px band along object boundaries (as VOC)
    SegmentationContext/<id>.png   mode "L"; c on the pixels of the context of class c (1..C),
                                   0 elsewhere (always background, never ignore, in the seg mask)
    saliency/<id>.png              mode "L", 0..255
    ImageSets/Segmentation/train.txt, val.txt    ids, one a line (syn_train_000000, syn_val_...)
    classes.txt                    the C class names in label order (label c = line c)
    contexts.txt                   "context_name class_name" lines, in label order
    synthetic.json                 generator version, seed, size, counts, per-class image counts

Every file is written under a temporary name and renamed into place. The id lists, classes.txt,
contexts.txt and synthetic.json are written last, so an interrupted run never lists an image
that is missing. An existing output directory is reused: files of the same name are
overwritten; files of a previous, larger dataset are left in place but are not in the id lists.

Every image is a pure function of ``(seed, split, index, size)`` (a numpy Generator seeded with
``[seed, split_code, index]``), so parallel workers give byte-identical output to a serial run.

    python -m epsdist.data.synthetic --out data/synthetic --num-train 800 --num-val 200 \
        --seed 0 --size 112 --workers 4
"""
from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
import multiprocessing
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from epsdist.data.manifest import atomic_write_bytes, voc_palette

__all__ = ["CLASSES", "CONTEXTS", "CONTEXT_OF", "VERSION", "MIN_SIZE", "voc_palette",
           "render_sample", "generate", "sample_id", "main"]

VERSION = 1
CLASSES = ("boat", "train", "bird", "car")
CONTEXTS = ("water", "rails", "foliage", "road")          # CONTEXTS[c] belongs to CLASSES[c]
CONTEXT_OF = dict(zip(CLASSES, CONTEXTS))
NUM_CLASSES = len(CLASSES)
IGNORE = 255
MIN_SIZE = 64
SPLITS = {"train": 1, "val": 2}

P_TWO_OBJECTS = 0.5        # else one object
P_MISSING_PART = 0.25      # per object: the saliency map misses a chunk of it
P_DISTRACTOR = 0.2         # per image: the saliency map fires on a background clutter shape
P_CLUTTER = 0.35           # per image: 1-2 non-salient clutter shapes on the background
MIN_OBJECT_PX = 40         # an object keeps at least this many labelled pixels (at size 112)
MIN_CONTEXT_PX = 60


_PALETTE = voc_palette()


def sample_id(split: str, index: int, width: int = 6) -> str:
    return f"syn_{split}_{index:0{width}d}"


# ----------------------------------------------------------------------------- helpers


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((h % 360.0) / 360.0, min(max(s, 0.0), 1.0),
                                  min(max(v, 0.0), 1.0))
    return np.array([r, g, b], np.float32) * 255.0


def _rand_hsv(rng: np.random.Generator, h, s, v) -> np.ndarray:
    return _hsv(rng.uniform(*h), rng.uniform(*s), rng.uniform(*v))


class _Canvas:
    """Masks drawn with PIL (fast, exact) on S x S boolean arrays."""

    def __init__(self, size: int):
        self.S = size
        yy, xx = np.mgrid[0:size, 0:size]
        self.yy = yy.astype(np.float32)
        self.xx = xx.astype(np.float32)

    def draw(self, fn) -> np.ndarray:
        im = Image.new("L", (self.S, self.S), 0)
        fn(ImageDraw.Draw(im))
        return np.frombuffer(im.tobytes(), np.uint8).reshape(self.S, self.S) > 0

    def polygon(self, pts) -> np.ndarray:
        pts = [(float(x), float(y)) for x, y in pts]
        return self.draw(lambda d: d.polygon(pts, fill=255))

    def ellipse(self, cx, cy, rx, ry) -> np.ndarray:
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        return self.draw(lambda d: d.ellipse(box, fill=255))

    def rect(self, x0, y0, x1, y1, radius: float = 0.0) -> np.ndarray:
        box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        if radius >= 1:
            r = int(min(radius, (box[2] - box[0]) / 2, (box[3] - box[1]) / 2))
            return self.draw(lambda d: d.rounded_rectangle(box, radius=max(r, 0), fill=255))
        return self.draw(lambda d: d.rectangle(box, fill=255))

    def line(self, pts, width: float) -> np.ndarray:
        pts = [(float(x), float(y)) for x, y in pts]
        w = max(1, int(round(width)))
        return self.draw(lambda d: d.line(pts, fill=255, width=w))

    def region(self, reg) -> np.ndarray:
        x0, y0, w, h = reg
        m = np.zeros((self.S, self.S), bool)
        m[y0:y0 + h, x0:x0 + w] = True
        return m


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in about [-1, 1] with ``cells`` blobs across the image."""
    g = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(g).resize((size, size), Image.BICUBIC))


def _dilate(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary dilation with a k x k square (k odd), separable."""
    r = k // 2
    h, w = mask.shape
    p = np.pad(mask, ((0, 0), (r, r)))
    out = np.zeros_like(mask)
    for d in range(k):
        out |= p[:, d:d + w]
    p = np.pad(out, ((r, r), (0, 0)))
    out = np.zeros_like(mask)
    for d in range(k):
        out |= p[d:d + h]
    return out


def _paint(img, mask, rgb, rng, noise=6.0, shade=None):
    """img[mask] = rgb (x shade field) + pixel noise."""
    n = int(np.count_nonzero(mask))
    if n == 0:
        return
    col = np.broadcast_to(np.asarray(rgb, np.float32), (n, 3))
    if shade is not None:
        col = col * shade[mask][:, None]
    if noise > 0:
        col = col + rng.normal(0.0, noise, (n, 3)).astype(np.float32)
    img[mask] = col


# ----------------------------------------------------------------------------- the scene
#
# Each object gets a region (x0, y0, w, h) of the canvas and builds, inside it, a list of
# context parts and a list of object parts: (mask, painter) pairs. Painters are closures that
# paint their mask on the float image; masks are boolean S x S arrays.


def _fit(width: float, ratio: float, avail_h: float, min_w: float) -> float:
    """Object width so that width * ratio (its height) fits into avail_h."""
    return max(min(width, avail_h / ratio), min_w)


def _boat(rng, cv: _Canvas, reg, k: float):
    x0, y0, w, h = reg
    # water band at the bottom of the region, with a wavy top edge
    hb = max(10 * k, h * rng.uniform(0.26, 0.4))
    yb = y0 + h - hb - h * rng.uniform(0.0, 0.08)
    amp, lam, ph = rng.uniform(0.5, 1.8) * k, rng.uniform(10, 22) * k, rng.uniform(0, 2 * math.pi)
    xs = np.linspace(x0, x0 + w, 24)
    top = [(x, yb + amp * math.sin(2 * math.pi * x / lam + ph)) for x in xs]
    water = cv.polygon(top + [(x0 + w, yb + hb), (x0, yb + hb)]) & cv.region(reg)
    base = _rand_hsv(rng, (195, 225), (0.5, 0.85), (0.45, 0.8))
    wl, wp = rng.uniform(3.0, 6.0) * k, rng.uniform(0, 2 * math.pi)
    waves = 1.0 + 0.16 * np.sin(2 * math.pi * cv.yy / wl + wp + 0.5 * np.sin(cv.xx / (4 * k)))
    ctx = [(water, lambda img, m, r: _paint(img, m, base, r, noise=5.0, shade=waves))]

    # hull resting on the water line, superstructure (cabin or sail) on top of the hull
    sail = rng.random() < 0.5
    rh = rng.uniform(0.2, 0.3)                       # hull height / width
    rs = rng.uniform(0.9, 1.4) if sail else rng.uniform(0.3, 0.5)   # super height / width
    bw = _fit(w * rng.uniform(0.5, 0.85), rh + rs, yb - y0 - 2, 12 * k)
    hh, sh = bw * rh, bw * rs
    cx = rng.uniform(x0 + bw / 2 + 1, x0 + w - bw / 2 - 1)
    flip = rng.choice([-1.0, 1.0])
    bot = yb + rng.uniform(0.5, 2.0) * k
    htop = bot - hh
    L, R = cx - bw / 2, cx + bw / 2

    def fx(x):                                       # mirror around cx
        return cx + flip * (x - cx)

    hull = cv.polygon([(fx(L), htop), (fx(R), htop), (fx(R - bw * 0.18), bot),
                       (fx(L + bw * 0.06), bot)])
    hull_col = _rand_hsv(rng, (-15, 10), (0.7, 1.0), (0.65, 0.95))
    hshade = 1.0 - 0.25 * np.clip((cv.yy - htop) / max(hh, 1), 0, 1)
    parts = [(hull, lambda img, m, r: _paint(img, m, hull_col, r, noise=5.0, shade=hshade))]
    pale = _rand_hsv(rng, (40, 60), (0.25, 0.45), (0.85, 1.0))
    if sail:
        mx = cx + flip * rng.uniform(-0.1, 0.1) * bw
        sw = bw * rng.uniform(0.3, 0.45)
        sa = cv.polygon([(mx, htop - sh), (mx, htop), (mx + flip * sw, htop)])
        mast = cv.line([(mx, htop - sh), (mx, htop)], width=max(1.0, 1.5 * k))
        dark = _rand_hsv(rng, (20, 40), (0.3, 0.6), (0.15, 0.3))
        parts += [(sa, lambda img, m, r: _paint(img, m, pale, r, noise=4.0)),
                  (mast, lambda img, m, r: _paint(img, m, dark, r, noise=3.0))]
    else:
        cw = bw * rng.uniform(0.3, 0.5)
        ccx = cx + flip * rng.uniform(-0.2, 0.05) * bw
        cab = cv.rect(ccx - cw / 2, htop - sh, ccx + cw / 2, htop + 1)
        win_h = sh * 0.35
        nwin = max(1, int(cw / (4 * k)))
        wins = np.zeros_like(cab)
        for i in range(nwin):
            wx = ccx - cw / 2 + (i + 0.5) * cw / nwin
            wins |= cv.rect(wx - cw / nwin * 0.25, htop - sh * 0.75,
                            wx + cw / nwin * 0.25, htop - sh * 0.75 + win_h)
        wins &= cab
        dark = _rand_hsv(rng, (175, 190), (0.35, 0.55), (0.82, 0.95))   # tinted glass
        parts += [(cab, lambda img, m, r: _paint(img, m, pale, r, noise=4.0)),
                  (wins, lambda img, m, r: _paint(img, m, dark, r, noise=3.0))]
    return ctx, parts


def _train(rng, cv: _Canvas, reg, k: float):
    x0, y0, w, h = reg
    hb = max(10 * k, h * rng.uniform(0.24, 0.36))
    yb = y0 + h - hb - h * rng.uniform(0.0, 0.1)
    band = cv.rect(x0, yb, x0 + w, yb + hb) & cv.region(reg)
    gravel = _rand_hsv(rng, (190, 240), (0.03, 0.12), (0.38, 0.55))
    grain = 1.0 + 0.18 * _smooth_noise(rng, cv.S, max(4, cv.S // 3))
    sleeper_col = _rand_hsv(rng, (18, 30), (0.45, 0.65), (0.2, 0.32))
    steel = _rand_hsv(rng, (200, 220), (0.0, 0.08), (0.75, 0.92))
    period, sw = rng.uniform(6, 10) * k, rng.uniform(2, 3.5) * k
    off = rng.uniform(0, period)
    sleepers = np.zeros_like(band)
    x = x0 + off - period
    while x < x0 + w:
        sleepers |= cv.rect(x, yb + 0.15 * hb, x + sw, yb + 0.95 * hb)
        x += period
    sleepers &= band
    r1, r2 = yb + 0.28 * hb, yb + 0.62 * hb
    rails = (cv.line([(x0, r1), (x0 + w, r1)], 2 * k) | cv.line([(x0, r2), (x0 + w, r2)], 2 * k))
    rails &= band
    ctx = [(band, lambda img, m, r: _paint(img, m, gravel, r, noise=16.0, shade=grain)),
           (sleepers, lambda img, m, r: _paint(img, m, sleeper_col, r, noise=5.0)),
           (rails, lambda img, m, r: _paint(img, m, steel, r, noise=4.0))]

    # one or two carriages standing on the upper rail
    ratio = rng.uniform(0.22, 0.32)                  # carriage height / total length
    tl = _fit(w * rng.uniform(0.6, 0.92), ratio, r1 - y0 - 2, 16 * k)
    th = tl * ratio
    tx = rng.uniform(x0 + 1, x0 + w - tl - 1) if w - tl > 2 else x0 + (w - tl) / 2
    ncar = 2 if (rng.random() < 0.4 and tl > 40 * k) else 1
    gap = 2 * k
    carl = (tl - gap * (ncar - 1)) / ncar
    wr = max(1.5 * k, th * 0.1)
    bot = r1 + 0.5 * k
    body_col = _rand_hsv(rng, (45, 62), (0.75, 1.0), (0.8, 1.0))
    stripe_col = body_col * rng.uniform(0.45, 0.6)
    win_col = _rand_hsv(rng, (175, 190), (0.35, 0.55), (0.82, 0.95))   # tinted glass
    wheel_col = _rand_hsv(rng, (0, 360), (0.0, 0.1), (0.08, 0.18))
    flip = rng.random() < 0.5
    body = np.zeros_like(band)
    wins = np.zeros_like(band)
    stripe = np.zeros_like(band)
    wheels = np.zeros_like(band)
    for i in range(ncar):
        cx0 = tx + i * (carl + gap)
        cx1 = cx0 + carl
        btop, bbot = bot - th, bot - wr
        car = cv.rect(cx0, btop, cx1, bbot, radius=th * 0.15)
        front = (i == ncar - 1) != flip if ncar > 1 else True
        if front:                                    # slanted nose on the leading end
            nl = min(th * 0.6, carl * 0.25)
            if flip:
                car &= ~cv.polygon([(cx0 - 1, btop - 1), (cx0 + nl, btop - 1),
                                    (cx0 - 1, btop + th * 0.45)])
            else:
                car &= ~cv.polygon([(cx1 + 1, btop - 1), (cx1 - nl, btop - 1),
                                    (cx1 + 1, btop + th * 0.45)])
        body |= car
        nwin = max(2, int(carl / (th * 0.55)))
        for j in range(nwin):
            wx = cx0 + (j + 0.5) * carl / nwin
            ww = carl / nwin * 0.28
            wins |= cv.rect(wx - ww, btop + 0.18 * th, wx + ww, btop + 0.45 * th)
        stripe |= cv.rect(cx0, btop + 0.58 * (th - wr), cx1, btop + 0.72 * (th - wr))
        for wx in (cx0 + carl * 0.18, cx0 + carl * 0.38, cx0 + carl * 0.62, cx0 + carl * 0.82):
            wheels |= cv.ellipse(wx, bot - wr, wr, wr)
    if ncar > 1:
        cy = bot - wr - th * 0.3
        body |= cv.rect(tx + carl - 1, cy - k, tx + carl + gap + 1, cy + k)
    wins &= body
    stripe &= body & ~wins
    parts = [(body, lambda img, m, r: _paint(img, m, body_col, r, noise=5.0)),
             (stripe, lambda img, m, r: _paint(img, m, stripe_col, r, noise=4.0)),
             (wins, lambda img, m, r: _paint(img, m, win_col, r, noise=3.0)),
             (wheels, lambda img, m, r: _paint(img, m, wheel_col, r, noise=3.0))]
    return ctx, parts


def _bird(rng, cv: _Canvas, reg, k: float):
    x0, y0, w, h = reg
    # branch crossing the region, the bird standing on it, foliage around
    ya = y0 + h * rng.uniform(0.55, 0.85)
    yb_ = ya + h * rng.uniform(-0.15, 0.15)
    bwid = rng.uniform(3.0, 5.5) * k
    branch = cv.line([(x0 - 2, ya), (x0 + w + 2, yb_)], bwid)
    bl_ratio = rng.uniform(0.45, 0.6)                # body height / body length
    bl = _fit(w * rng.uniform(0.36, 0.58), bl_ratio * 1.9, min(ya, yb_) - bwid / 2 - y0 - 2, 10 * k)
    bh = bl * bl_ratio
    bx = rng.uniform(x0 + bl * 0.8, x0 + w - bl * 0.8) if w > 1.6 * bl + 2 else x0 + w / 2
    by_branch = ya + (yb_ - ya) * (bx - x0) / max(w, 1) - bwid / 2
    leg = bh * 0.35
    cy = by_branch - leg - bh / 2
    d = rng.choice([-1.0, 1.0])                      # facing direction
    body = cv.ellipse(bx, cy, bl / 2, bh / 2)
    hr = bh * rng.uniform(0.36, 0.46)
    hx, hy = bx + d * bl * 0.42, cy - bh * 0.45
    head = cv.ellipse(hx, hy, hr, hr)
    beak = cv.polygon([(hx + d * hr * 0.8, hy - hr * 0.3), (hx + d * hr * 0.8, hy + hr * 0.3),
                       (hx + d * hr * 1.9, hy + hr * 0.05)])
    tail = cv.polygon([(bx - d * bl * 0.35, cy - bh * 0.1), (bx - d * bl * 0.35, cy + bh * 0.25),
                       (bx - d * bl * 0.85, cy - bh * 0.45), (bx - d * bl * 0.8, cy - bh * 0.1)])
    wing = cv.ellipse(bx - d * bl * 0.05, cy - bh * 0.02, bl * 0.3, bh * 0.26) & body
    eye = cv.ellipse(hx + d * hr * 0.35, hy - hr * 0.2, max(0.8, hr * 0.18), max(0.8, hr * 0.18))
    legs = (cv.line([(bx - bl * 0.1, cy + bh * 0.4), (bx - bl * 0.1, by_branch + 1)], max(1, k))
            | cv.line([(bx + bl * 0.1, cy + bh * 0.4), (bx + bl * 0.1, by_branch + 1)], max(1, k)))
    body_col = _rand_hsv(rng, (275, 320), (0.55, 0.9), (0.55, 0.9))
    wing_col = body_col * rng.uniform(0.55, 0.75)
    beak_col = _rand_hsv(rng, (40, 55), (0.8, 1.0), (0.85, 1.0))
    dark = _rand_hsv(rng, (0, 360), (0.0, 0.2), (0.05, 0.15))
    parts = [(body | head | tail, lambda img, m, r: _paint(img, m, body_col, r, noise=5.0)),
             (wing, lambda img, m, r: _paint(img, m, wing_col, r, noise=4.0)),
             (beak, lambda img, m, r: _paint(img, m, beak_col, r, noise=3.0)),
             (legs | eye, lambda img, m, r: _paint(img, m, dark, r, noise=2.0))]

    # foliage: a canopy of ellipses around and behind the bird
    fol = np.zeros_like(body)
    fcx, fcy = bx + rng.uniform(-0.2, 0.2) * w, cy + rng.uniform(-0.15, 0.1) * h
    for _ in range(int(rng.integers(4, 8))):
        ex = fcx + rng.uniform(-0.35, 0.35) * w
        ey = fcy + rng.uniform(-0.3, 0.2) * h
        fol |= cv.ellipse(ex, ey, rng.uniform(0.15, 0.3) * w, rng.uniform(0.12, 0.25) * h)
    fol &= cv.region(reg)
    leaf = _rand_hsv(rng, (90, 140), (0.5, 0.85), (0.38, 0.65))
    leaves = 1.0 + 0.22 * _smooth_noise(rng, cv.S, max(6, cv.S // 5)) \
        + 0.1 * _smooth_noise(rng, cv.S, max(12, cv.S // 2))
    bark = _rand_hsv(rng, (20, 35), (0.5, 0.7), (0.22, 0.38))
    branch &= cv.region(reg)
    ctx = [(fol, lambda img, m, r: _paint(img, m, leaf, r, noise=7.0, shade=leaves)),
           (branch, lambda img, m, r: _paint(img, m, bark, r, noise=5.0))]
    return ctx, parts


def _car(rng, cv: _Canvas, reg, k: float):
    x0, y0, w, h = reg
    hb = max(12 * k, h * rng.uniform(0.28, 0.4))
    yb = y0 + h - hb - h * rng.uniform(0.0, 0.08)
    road = cv.rect(x0, yb, x0 + w, yb + hb) & cv.region(reg)
    asphalt = _rand_hsv(rng, (0, 360), (0.0, 0.08), (0.2, 0.34))
    curb_col = _rand_hsv(rng, (0, 360), (0.0, 0.06), (0.65, 0.8))
    dash_col = _rand_hsv(rng, (0, 360), (0.0, 0.05), (0.88, 1.0))
    curb = cv.rect(x0, yb, x0 + w, yb + 1.5 * k) & road
    dy = yb + hb * rng.uniform(0.6, 0.75)
    dl, dg = rng.uniform(5, 9) * k, rng.uniform(4, 7) * k
    dashes = np.zeros_like(road)
    x = x0 + rng.uniform(-dl, 0)
    while x < x0 + w:
        dashes |= cv.rect(x, dy - k, x + dl, dy + k)
        x += dl + dg
    dashes &= road
    ctx = [(road, lambda img, m, r: _paint(img, m, asphalt, r, noise=7.0)),
           (curb, lambda img, m, r: _paint(img, m, curb_col, r, noise=4.0)),
           (dashes, lambda img, m, r: _paint(img, m, dash_col, r, noise=4.0))]

    ratio = rng.uniform(0.42, 0.55)                  # total height / length
    bot = yb + hb * rng.uniform(0.3, 0.55)
    cl = _fit(w * rng.uniform(0.45, 0.75), ratio, bot - y0 - 2, 14 * k)
    ch = cl * ratio
    cx = rng.uniform(x0 + cl / 2 + 1, x0 + w - cl / 2 - 1) if w - cl > 2 else x0 + w / 2
    d = rng.choice([-1.0, 1.0])
    wr = cl * rng.uniform(0.085, 0.105)
    body_top = bot - ch * 0.58
    body = cv.rect(cx - cl / 2, body_top, cx + cl / 2, bot - wr * 0.9, radius=ch * 0.12)
    cb = cl * rng.uniform(0.55, 0.68)                # cabin bottom width
    ct = cb * rng.uniform(0.6, 0.78)                 # cabin top width
    ccx = cx - d * cl * rng.uniform(0.0, 0.08)
    top = bot - ch
    cab = cv.polygon([(ccx - cb / 2, body_top + 1), (ccx + cb / 2, body_top + 1),
                      (ccx + ct / 2, top), (ccx - ct / 2, top)])
    inset = max(1.0, ch * 0.08)
    win = cv.polygon([(ccx - cb / 2 + 2 * inset, body_top), (ccx + cb / 2 - 2 * inset, body_top),
                      (ccx + ct / 2 - inset, top + inset), (ccx - ct / 2 + inset, top + inset)])
    pillar = cv.rect(ccx - max(0.8, k * 0.8), top, ccx + max(0.8, k * 0.8), body_top)
    win &= ~pillar
    wheels = (cv.ellipse(cx - cl * 0.3, bot - wr, wr, wr) | cv.ellipse(cx + cl * 0.3, bot - wr, wr, wr))
    hubs = (cv.ellipse(cx - cl * 0.3, bot - wr, wr * 0.5, wr * 0.5)
            | cv.ellipse(cx + cl * 0.3, bot - wr, wr * 0.5, wr * 0.5))
    light = cv.ellipse(cx + d * cl * 0.46, body_top + ch * 0.12, max(1.0, 1.3 * k), max(1.0, 1.1 * k))
    body_col = _rand_hsv(rng, (18, 35), (0.75, 1.0), (0.75, 1.0))
    win_col = _rand_hsv(rng, (175, 190), (0.35, 0.55), (0.82, 0.95))   # tinted glass
    tyre = _rand_hsv(rng, (0, 360), (0.0, 0.1), (0.04, 0.1))
    hub_col = _rand_hsv(rng, (0, 360), (0.0, 0.05), (0.55, 0.7))
    lamp = _rand_hsv(rng, (50, 60), (0.2, 0.4), (0.95, 1.0))
    parts = [(body | cab, lambda img, m, r: _paint(img, m, body_col, r, noise=5.0)),
             (win, lambda img, m, r: _paint(img, m, win_col, r, noise=3.0)),
             (light & body, lambda img, m, r: _paint(img, m, lamp, r, noise=2.0)),
             (wheels, lambda img, m, r: _paint(img, m, tyre, r, noise=3.0)),
             (hubs, lambda img, m, r: _paint(img, m, hub_col, r, noise=3.0))]
    return ctx, parts


_BUILDERS = (_boat, _train, _bird, _car)


def _clutter(rng, cv: _Canvas, occupied: np.ndarray, k: float):
    """A random non-class shape on free background, or None when there is no room."""
    S = cv.S
    for _ in range(12):
        r = rng.uniform(4.0, 9.0) * k
        cx, cy = rng.uniform(r, S - r), rng.uniform(r, S - r)
        kind = int(rng.integers(0, 3))
        if kind == 0:
            m = cv.ellipse(cx, cy, r, r * rng.uniform(0.5, 1.0))
        elif kind == 1:
            m = cv.rect(cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r * rng.uniform(0.4, 1.0))
        else:
            n = int(rng.integers(3, 7))
            a = np.sort(rng.uniform(0, 2 * math.pi, n))
            rr = r * rng.uniform(0.6, 1.0, n)
            m = cv.polygon(list(zip(cx + rr * np.cos(a), cy + rr * np.sin(a))))
        if m.sum() >= 12 * k * k and not (m & occupied).any():
            col = _rand_hsv(rng, (0, 360), (0.15, 0.7), (0.3, 0.9))
            return m, col
    return None


# ----------------------------------------------------------------------------- rendering


def _render_once(rng: np.random.Generator, size: int) -> dict:
    S = size
    k = S / 112.0
    cv = _Canvas(S)

    # background: two-colour gradient at a random angle, blotches, pixel noise
    c1 = _rand_hsv(rng, (0, 360), (0.0, 0.45), (0.35, 0.9))
    c2 = _rand_hsv(rng, (0, 360), (0.0, 0.45), (0.35, 0.9))
    ang = rng.uniform(0, 2 * math.pi)
    t = (cv.xx * math.cos(ang) + cv.yy * math.sin(ang))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    img += _smooth_noise(rng, S, int(rng.integers(3, 7)))[..., None] * rng.uniform(8, 25)
    img += rng.normal(0, rng.uniform(3, 8), img.shape).astype(np.float32)

    # objects and their contexts, one region of the canvas each
    n = 2 if rng.random() < P_TWO_OBJECTS else 1
    classes = [int(c) for c in rng.choice(NUM_CLASSES, n, replace=False)]
    if n == 1:
        regions = [(0, 0, S, S)]
    else:
        a = int(round(S * rng.uniform(0.42, 0.58)))
        if rng.random() < 0.5:
            regions = [(0, 0, a, S), (a, 0, S - a, S)]
        else:
            regions = [(0, 0, S, a), (0, a, S, S - a)]
        if rng.random() < 0.5:
            regions.reverse()
    lab = np.zeros((S, S), np.uint8)
    ctx = np.zeros((S, S), np.uint8)
    obj_masks = []
    scenes = []
    for c, reg in zip(classes, regions):
        cparts, oparts = _BUILDERS[c](rng, cv, reg, k)
        inside = cv.region(reg)                      # nothing leaves its region
        cparts = [(m & inside, f) for m, f in cparts]
        oparts = [(m & inside, f) for m, f in oparts]
        scenes.append((cparts, oparts))
        cm = np.zeros((S, S), bool)
        for m, _ in cparts:
            cm |= m
        om = np.zeros((S, S), bool)
        for m, _ in oparts:
            om |= m
        ctx[cm & ~om] = c + 1
        obj_masks.append((c, om))
    for c, om in obj_masks:
        lab[om] = c + 1
    occupied = _dilate((lab > 0) | (ctx > 0), 5)

    # clutter on the free background; one of them may become a saliency distractor
    distractor = None
    if rng.random() < P_DISTRACTOR:
        cl = _clutter(rng, cv, occupied, k)
        if cl is not None:
            distractor = cl[0]
            _paint(img, cl[0], cl[1], rng, noise=5.0)
            occupied |= _dilate(cl[0], 3)
    if rng.random() < P_CLUTTER:
        for _ in range(int(rng.integers(1, 3))):
            cl = _clutter(rng, cv, occupied, k)
            if cl is not None:
                _paint(img, cl[0], cl[1], rng, noise=5.0)
                occupied |= _dilate(cl[0], 3)

    # paint contexts, then objects (painters are applied in order, later parts on top)
    for cparts, oparts in scenes:
        for m, paint in cparts:
            paint(img, m, rng)
    for cparts, oparts in scenes:
        for m, paint in oparts:
            paint(img, m, rng)
    img *= rng.uniform(0.9, 1.1)                     # global exposure
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    # ground truth: labels with a 2-px ignore band on object boundaries (VOC style)
    pad = np.pad(lab, 1, mode="edge")
    mx = np.maximum.reduce([pad[dy:dy + S, dx:dx + S] for dy in range(3) for dx in range(3)])
    mn = np.minimum.reduce([pad[dy:dy + S, dx:dx + S] for dy in range(3) for dx in range(3)])
    seg = lab.copy()
    seg[mx != mn] = IGNORE
    ctx[seg != 0] = 0

    # saliency: object masks (maybe minus a chunk), maybe a distractor, jitter, blur
    sal = np.zeros((S, S), np.float32)
    missing = []
    for c, om in obj_masks:
        m = om.copy()
        lost = 0.0
        if rng.random() < P_MISSING_PART:
            ys, xs = np.nonzero(om)
            bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            for _ in range(6):
                i = int(rng.integers(0, len(xs)))
                chunk = cv.ellipse(xs[i], ys[i], bw * rng.uniform(0.2, 0.4),
                                   bh * rng.uniform(0.25, 0.5))
                lost = float((chunk & om).sum() / om.sum())
                if 0.12 <= lost <= 0.5:
                    m &= ~chunk
                    break
                lost = 0.0
        missing.append(lost)
        sal = np.maximum(sal, m * rng.uniform(0.85, 1.0))
    if distractor is not None:
        sal = np.maximum(sal, distractor * rng.uniform(0.6, 0.95))
    u = rng.random()
    sal8 = Image.fromarray(np.clip(sal * 255 + 0.5, 0, 255).astype(np.uint8))
    if u < 0.25:
        sal8 = sal8.filter(ImageFilter.MaxFilter(3))
    elif u < 0.5:
        sal8 = sal8.filter(ImageFilter.MinFilter(3))
    sal8 = sal8.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.5) * k))
    saliency = np.asarray(sal8, dtype=np.uint8).copy()

    present = sorted(int(v) for v in np.unique(seg) if 0 < v < IGNORE)
    return dict(image=image, seg=seg, ctx=ctx, sal=saliency, labels=present,
                meta=dict(classes=[c + 1 for c in classes], missing=missing,
                          distractor=distractor is not None))


def _valid(s: dict, size: int) -> bool:
    area = (size / 112.0) ** 2
    for c in s["meta"]["classes"]:
        if (s["seg"] == c).sum() < MIN_OBJECT_PX * area or (s["ctx"] == c).sum() < MIN_CONTEXT_PX * area:
            return False
    return bool(s["labels"]) and s["labels"] == sorted(s["meta"]["classes"])


def render_sample(seed: int, index: int, size: int = 112, split: str = "train") -> dict:
    """Render image ``index`` of ``split`` for ``seed``; a pure function of its arguments.

    Returns ``image`` (size x size x 3 uint8 RGB), ``seg`` (uint8: 0 background, 1..C class,
    255 ignore), ``ctx`` (uint8: c where the context of class c is, else 0), ``sal`` (uint8
    saliency 0..255), ``labels`` (sorted 1-based class ids present in ``seg``; cls.json column
    ``c - 1``) and ``meta`` (what the generator did: planned classes, fraction of each object
    missing from the saliency map, whether a distractor is salient)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed} index={index}")
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    for _ in range(20):
        s = _render_once(rng, size)
        if _valid(s, size):
            return s
    raise RuntimeError(f"could not render a valid sample (seed={seed} split={split} index={index})")


# ----------------------------------------------------------------------------- writing


def _png(arr: np.ndarray, mode: str) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    im = Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.tobytes())
    if mode == "P":
        im.putpalette(_PALETTE)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _jpg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


_SUBDIRS = ("JPEGImages", "SegmentationClass", "SegmentationContext", "saliency",
            os.path.join("ImageSets", "Segmentation"))


def _write_one(task) -> tuple[str, int, list[int]]:
    out_dir, seed, size, split, index, width = task
    s = render_sample(seed, index, size, split)
    sid = sample_id(split, index, width)
    atomic_write_bytes(os.path.join(out_dir, "JPEGImages", sid + ".jpg"), _jpg(s["image"]))
    atomic_write_bytes(os.path.join(out_dir, "SegmentationClass", sid + ".png"), _png(s["seg"], "P"))
    atomic_write_bytes(os.path.join(out_dir, "SegmentationContext", sid + ".png"), _png(s["ctx"], "L"))
    atomic_write_bytes(os.path.join(out_dir, "saliency", sid + ".png"), _png(s["sal"], "L"))
    return split, index, s["labels"]


def generate(out_dir: str, num_train: int, num_val: int, seed: int = 0, size: int = 112,
             workers: int = 1, progress: bool = True) -> dict:
    """Write the dataset under ``out_dir`` (VOC layout, see the module docstring).

    Returns a summary: ``out_dir``, ``num_train``, ``num_val``, ``seed``, ``size``,
    ``classes``, ``contexts`` ({context: class}), ``class_counts`` ({split: {class: images}}),
    ``seconds`` and ``images_per_s``."""
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    if num_val < 0:
        raise ValueError(f"num_val must be >= 0, got {num_val}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    for d in _SUBDIRS:
        os.makedirs(os.path.join(out_dir, d), exist_ok=True)
    width = max(6, len(str(max(num_train, num_val) - 1)))
    tasks = ([(out_dir, seed, size, "train", i, width) for i in range(num_train)]
             + [(out_dir, seed, size, "val", i, width) for i in range(num_val)])
    counts = {sp: {c: 0 for c in CLASSES} for sp in ("train", "val")}
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(tasks), desc="synthetic", unit="img", file=sys.stderr)
        except ImportError:                          # tqdm is a dependency; be lenient anyway
            bar = None

    def consume(results):
        for split, _, labels in results:
            for c in labels:
                counts[split][CLASSES[c - 1]] += 1
            if bar is not None:
                bar.update(1)

    try:
        if workers == 1 or len(tasks) < 2 * workers:
            consume(map(_write_one, tasks))
        else:
            chunk = max(1, min(32, len(tasks) // (workers * 4)))
            with multiprocessing.get_context().Pool(workers) as pool:
                consume(pool.imap_unordered(_write_one, tasks, chunksize=chunk))
    finally:
        if bar is not None:
            bar.close()

    # the lists last: they only ever name files that exist
    ids = lambda sp, n: "".join(sample_id(sp, i, width) + "\n" for i in range(n))  # noqa: E731
    seg_sets = os.path.join(out_dir, "ImageSets", "Segmentation")
    atomic_write_bytes(os.path.join(seg_sets, "train.txt"), ids("train", num_train).encode())
    atomic_write_bytes(os.path.join(seg_sets, "val.txt"), ids("val", num_val).encode())
    atomic_write_bytes(os.path.join(out_dir, "classes.txt"),
                       "".join(c + "\n" for c in CLASSES).encode())
    atomic_write_bytes(os.path.join(out_dir, "contexts.txt"),
                       "".join(f"{x} {c}\n" for x, c in zip(CONTEXTS, CLASSES)).encode())
    seconds = time.perf_counter() - t0
    summary = dict(out_dir=out_dir, num_train=num_train, num_val=num_val, seed=seed, size=size,
                   classes=list(CLASSES), contexts=dict(zip(CONTEXTS, CLASSES)),
                   class_counts=counts, seconds=round(seconds, 3),
                   images_per_s=round(len(tasks) / max(seconds, 1e-9), 1))
    meta = dict(summary, generator="epsdist.data.synthetic", version=VERSION)
    meta.pop("out_dir"); meta.pop("seconds"); meta.pop("images_per_s")
    atomic_write_bytes(os.path.join(out_dir, "synthetic.json"),
                       json.dumps(meta, indent=1).encode() + b"\n")
    return summary


# ----------------------------------------------------------------------------- CLI


def _int_at_least(lo: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{what} must be >= {lo}, got {v}")
        return v
    return parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m epsdist.data.synthetic",
        description="Generate the synthetic EPS dataset (objects with always co-occurring "
                    "contexts, saliency maps, VOC layout). Files in an existing output "
                    "directory are overwritten.")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--num-train", type=_int_at_least(1, "--num-train"), required=True)
    p.add_argument("--num-val", type=_int_at_least(0, "--num-val"), required=True)
    p.add_argument("--seed", type=_int_at_least(0, "--seed"), default=0)
    p.add_argument("--size", type=_int_at_least(MIN_SIZE, "--size"), default=112,
                   help=f"image side in pixels (>= {MIN_SIZE}; default 112)")
    p.add_argument("--workers", type=_int_at_least(1, "--workers"), default=1)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out!r} exists and is not a directory")
    s = generate(a.out, a.num_train, a.num_val, seed=a.seed, size=a.size, workers=a.workers,
                 progress=not a.no_progress)
    print(f"wrote {s['num_train']} train + {s['num_val']} val images ({s['size']}px, seed "
          f"{s['seed']}) to {a.out} in {s['seconds']:.2f}s ({s['images_per_s']:.0f} img/s); "
          f"classes: {', '.join(s['classes'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
