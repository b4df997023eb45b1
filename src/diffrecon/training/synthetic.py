"""Synthetic training images: dead leaves, CT-like body sections, smooth random fields.

All renderers draw on a square canvas of ``size`` pixels from a numpy Generator and return
float32 (size, size) images >= 0; coordinates are in canvas units, [-1, 1] across.

- Dead leaves (Matheron 1968; as a training set for restoration networks: Achddou, Gousseau
  & Ladjal 2021, arXiv 2008.09349): occluding disks, ellipses, rectangles and polygons with
  power-law sizes, random grey levels, optional linear shading and texture.
- Body sections: an elliptical trunk with skin, fat and muscle layers, organs, a vertebra,
  ribs and optionally lungs with vessels, in attenuation relative to water (air 0).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import draw


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx) in [-1, 1], each (size, size)."""
    c = (np.arange(size) + 0.5) / size * 2 - 1
    return np.meshgrid(c, c, indexing="ij")


def coarse_field(rng: np.random.Generator, correlation: float) -> np.ndarray:
    """Control points of a smooth random field whose correlation length is ``correlation``
    (fraction of the canvas): (n, n) standard normal values, n = 2 + 1 / correlation."""
    n = int(np.clip(2 + 1 / correlation, 3, 64))
    return rng.standard_normal((n, n)).astype(np.float32)


def sample_field(control: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                 size: int) -> np.ndarray:
    """Cubic-spline interpolation of ``control`` (spread over a canvas of ``size`` pixels)
    at the grid ``rows`` x ``cols`` (1-D canvas pixel coordinates)."""
    scale = (control.shape[0] - 1) / max(size - 1, 1)
    rr, cc = np.meshgrid(rows * scale, cols * scale, indexing="ij")
    return ndimage.map_coordinates(control, [rr, cc], order=3, mode="nearest").astype(np.float32)


def smooth_field(size: int, rng: np.random.Generator, correlation: float) -> np.ndarray:
    """Zero-mean smooth random field on a (size, size) canvas, max |value| about 1;
    ``correlation`` is the correlation length as a fraction of the canvas."""
    control = coarse_field(rng, correlation)
    px = np.arange(size, dtype=np.float64)
    return sample_field(control / 2.5, px, px, size)


def _shape_mask(kind: int, size: int, cy: float, cx: float, r: float, aspect: float,
                angle: float, rng: np.random.Generator):
    """Pixel indices (rows, cols) of one leaf, clipped to the canvas."""
    to_px = (size - 1) / 2
    py, px, pr = (cy + 1) * to_px, (cx + 1) * to_px, max(r * to_px, 0.7)
    if kind == 0:
        return draw.disk((py, px), pr, shape=(size, size))
    if kind == 1:
        return draw.ellipse(py, px, pr, pr * aspect, shape=(size, size), rotation=angle)
    n = 4 if kind == 2 else int(rng.integers(3, 8))
    if kind == 2:
        base = np.array([np.pi / 4, 3 * np.pi / 4, 5 * np.pi / 4, 7 * np.pi / 4])
        radii = np.full(4, pr)
    else:
        base = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = pr * rng.uniform(0.5, 1.0, n)
    t = base + angle
    rows = py + radii * np.sin(t) * (aspect if kind == 2 else 1.0)
    cols = px + radii * np.cos(t)
    return draw.polygon(rows, cols, shape=(size, size))


def dead_leaves(size: int, rng: np.random.Generator, r_min: float = 0.01,
                r_max: float = 0.5, alpha: float = 3.0) -> np.ndarray:
    """Dead-leaves image in [0, 1]: leaves of radius density r^-alpha on [r_min, r_max]
    (canvas units) dropped until the canvas is covered or 600 leaves have fallen (what is
    left uncovered shows one background leaf)."""
    img = np.full((size, size), rng.uniform(0, 1), np.float32)
    covered = np.zeros((size, size), bool)
    yy, xx = grid(size)
    texture = smooth_field(size, rng, rng.uniform(0.005, 0.03))
    a = 1 - alpha
    for _ in range(600):
        u = rng.random()
        r = (r_min**a + u * (r_max**a - r_min**a)) ** (1 / a)
        cy, cx = rng.uniform(-1.1, 1.1, 2)
        rr, cc = _shape_mask(int(rng.integers(4)), size, cy, cx, r, rng.uniform(0.3, 1.0),
                             rng.uniform(0, np.pi), rng)
        keep = ~covered[rr, cc]   # leaves fall in front-to-back order: earlier ones occlude
        rr, cc = rr[keep], cc[keep]
        if rr.size == 0:
            continue
        value = rng.uniform(0, 1) * np.ones(rr.size, np.float32)
        if rng.random() < 0.3:   # linear shading across the leaf
            g = rng.normal(0, 0.3, 2)
            value += g[0] * (yy[rr, cc] - cy) + g[1] * (xx[rr, cc] - cx)
        if rng.random() < 0.3:   # fine texture inside the leaf
            value += rng.uniform(0.05, 0.2) * texture[rr, cc]
        img[rr, cc] = value
        covered[rr, cc] = True
        if covered.all():
            break
    return np.clip(img, 0, 1)


def _ellipse(yy, xx, cy, cx, ay, ax, angle):
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    return ((dx * c + dy * s) / ax) ** 2 + ((-dx * s + dy * c) / ay) ** 2 <= 1


def body_section(size: int, rng: np.random.Generator) -> np.ndarray:
    """CT-like trunk section, attenuation relative to water (air 0, fat ~0.9, soft tissue
    ~1.0-1.07, bone 1.3-2.2, lung ~0.2)."""
    yy, xx = grid(size)
    angle = rng.uniform(-0.2, 0.2)
    ay, ax = rng.uniform(0.45, 0.75), rng.uniform(0.7, 0.95)
    cy, cx = rng.uniform(-0.08, 0.08, 2)
    img = np.zeros((size, size), np.float32)
    layers = [(1.0, rng.uniform(1.0, 1.06)),                    # skin
              (rng.uniform(0.93, 0.98), rng.uniform(0.88, 0.93)),  # subcutaneous fat
              (rng.uniform(0.8, 0.9), rng.uniform(1.03, 1.07)),  # muscle wall
              (rng.uniform(0.7, 0.82), rng.uniform(1.0, 1.05))]  # abdominal / thoracic cavity
    for shrink, value in layers:
        img[_ellipse(yy, xx, cy, cx, ay * shrink, ax * shrink, angle)] = value
    inner = _ellipse(yy, xx, cy, cx, ay * 0.7, ax * 0.7, angle)
    if rng.random() < 0.5:   # thorax: two lungs with vessels
        for side in (-1, 1):
            ly, lx = cy - 0.05 * ay, cx + side * 0.38 * ax
            lung = _ellipse(yy, xx, ly, lx, ay * rng.uniform(0.45, 0.6),
                            ax * rng.uniform(0.25, 0.33), side * rng.uniform(0, 0.3)) & inner
            img[lung] = rng.uniform(0.15, 0.3)
            for _ in range(int(rng.integers(5, 25))):
                vy, vx = ly + rng.normal(0, 0.15 * ay), lx + rng.normal(0, 0.1 * ax)
                r = rng.uniform(0.004, 0.02)
                img[lung & _ellipse(yy, xx, vy, vx, r, r, 0)] = rng.uniform(1.0, 1.06)
    for _ in range(int(rng.integers(3, 10))):   # organs
        oy, ox = cy + rng.normal(0, 0.25 * ay), cx + rng.normal(0, 0.3 * ax)
        organ = _ellipse(yy, xx, oy, ox, rng.uniform(0.05, 0.3) * ay, rng.uniform(0.05, 0.3) * ax,
                         rng.uniform(0, np.pi)) & inner & (img > 0.5)
        img[organ] = rng.uniform(0.98, 1.08)
    # vertebra: body + cortical ring, posterior (bottom of the image)
    vy, vx = cy + 0.55 * ay, cx + rng.normal(0, 0.02)
    vr = rng.uniform(0.06, 0.1) * ax
    bone = rng.uniform(1.6, 2.2)
    img[_ellipse(yy, xx, vy, vx, vr, vr * 1.1, 0)] = bone
    img[_ellipse(yy, xx, vy, vx, vr * 0.75, vr * 0.85, 0)] = rng.uniform(1.2, 1.4)
    img[_ellipse(yy, xx, vy + 1.5 * vr, vx, vr * 0.6, vr * 0.3, 0)] = bone
    for _ in range(int(rng.integers(0, 9))):   # ribs along the wall
        t = rng.uniform(0, 2 * np.pi)
        ry, rx = cy + 0.78 * ay * np.sin(t), cx + 0.78 * ax * np.cos(t)
        r = rng.uniform(0.015, 0.03)
        img[_ellipse(yy, xx, ry, rx, r, r * rng.uniform(1, 2), t)] = rng.uniform(1.3, 2.0)
    body = img > 0
    img = img * (1 + 0.01 * smooth_field(size, rng, 0.01)) * body
    return ndimage.gaussian_filter(img, rng.uniform(0.3, 0.8)).astype(np.float32)


def smooth_phase(rng: np.random.Generator):
    """A smooth random MR phase (radians) as a function of canvas pixel coordinates:
    constant + linear ramp (up to ~2 pi across the canvas) + a smooth random field of
    amplitude up to ~pi. Returns ``phase(rows, cols, size) -> (len(rows), len(cols))``."""
    c0, ramp = rng.uniform(-np.pi, np.pi), rng.normal(0, 2.0, 2)
    amp, control = rng.uniform(0, np.pi), coarse_field(rng, rng.uniform(0.1, 0.3)) / 2.5

    def phase(rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
        yy, xx = np.meshgrid(rows / size * 2 - 1, cols / size * 2 - 1, indexing="ij")
        return c0 + ramp[0] * yy + ramp[1] * xx + amp * sample_field(control, rows, cols, size)

    return phase
