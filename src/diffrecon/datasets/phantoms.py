"""Synthetic phantoms (pure numpy, seeded): DIVal-style random ellipses, an MR-like
complex phantom with smooth phase, and Shepp-Logan.

Splits: phantom ``index`` of split ``split`` is drawn from
``np.random.default_rng([FAMILY_ID[family], SPLIT_OFFSET[split] + index])``. The offsets
are 10^7 apart, so the train / val / test sets are disjoint by construction: priors train on
``train``, tuning uses ``val``, benchmarks and reported figures use ``test`` only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SPLIT_OFFSET = {"train": 0, "val": 10_000_000, "test": 20_000_000}
FAMILY_ID = {"ellipses": 1, "mri": 2}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size) + 0.5) / size * 2 - 1
    return np.meshgrid(c, c, indexing="ij")  # (row = y, col = x) in [-1, 1]


def _add_ellipses(img, yy, xx, values, cy, cx, ay, ax, theta):
    for v, y0, x0, a, b, t in zip(values, cy, cx, ay, ax, theta, strict=True):
        ct, st = np.cos(t), np.sin(t)
        dy, dx = yy - y0, xx - x0
        u = (dx * ct + dy * st) / b
        w = (-dx * st + dy * ct) / a
        img[u * u + w * w <= 1] += v
    return img


def random_ellipses(size: int, rng: np.random.Generator) -> np.ndarray:
    """DIVal / LoDoPaB-style random ellipse phantom in [0, 1], float32 (size, size).

    Number of ellipses ~ Poisson(25) + 3, values U(-0.4, 1), semi-axes U(0.05, 0.45) *
    (1 - |centre|), centres in the unit disc, random rotation; clipped at 0 and scaled to
    max 1 (Leuschner et al. 2021, DIVal ``EllipsesDataset``, re-derived).
    """
    yy, xx = _grid(size)
    n = int(rng.poisson(25)) + 3
    r = np.sqrt(rng.uniform(0, 0.8, n))
    phi = rng.uniform(0, 2 * np.pi, n)
    cy, cx = r * np.sin(phi), r * np.cos(phi)
    shrink = 1 - 0.8 * r
    ay = rng.uniform(0.05, 0.45, n) * shrink
    ax = rng.uniform(0.05, 0.45, n) * shrink
    values = rng.uniform(-0.4, 1.0, n)
    img = _add_ellipses(np.zeros((size, size)), yy, xx, values, cy, cx, ay, ax,
                        rng.uniform(0, np.pi, n))
    img = np.clip(img, 0, None)
    peak = img.max()
    return (img / peak if peak > 0 else img).astype(np.float32)


def _smooth_field(size: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=scale * size,
                                    mode="wrap")
    return field / (np.abs(field).max() + 1e-12)


def mri_phantom(size: int, rng: np.random.Generator) -> np.ndarray:
    """Anatomy-like complex MR phantom, complex64 (size, size), magnitude max 1.

    A head-like ellipse with a bright fat/skull ring, darker CSF ventricles, several grey /
    white-matter-like tissue blobs, a smooth multiplicative bias field and mild texture;
    phase = random low-order polynomial + smooth random field (|phase| up to ~pi).
    """
    yy, xx = _grid(size)
    cy, cx = rng.uniform(-0.05, 0.05, 2)
    a, b = rng.uniform(0.72, 0.9), rng.uniform(0.58, 0.78)
    t = rng.uniform(-0.3, 0.3)
    ct, st = np.cos(t), np.sin(t)
    u = ((xx - cx) * ct + (yy - cy) * st) / b
    w = (-(xx - cx) * st + (yy - cy) * ct) / a
    rho = np.sqrt(u * u + w * w)
    head = rho <= 1.0
    ring = head & (rho >= rng.uniform(0.86, 0.92))
    mag = np.where(head, rng.uniform(0.45, 0.6), 0.0)
    mag = np.where(ring, rng.uniform(0.8, 1.0), mag)
    inner = head & ~ring
    n = int(rng.integers(6, 14))
    rr = np.sqrt(rng.uniform(0, 0.5, n))
    ph = rng.uniform(0, 2 * np.pi, n)
    blob = np.zeros((size, size))
    _add_ellipses(blob, yy, xx, rng.uniform(-0.35, 0.35, n), cy + a * rr * np.sin(ph) * 0.8,
                  cx + b * rr * np.cos(ph) * 0.8, rng.uniform(0.04, 0.22, n) * a,
                  rng.uniform(0.04, 0.22, n) * b, rng.uniform(0, np.pi, n))
    # ventricles: two dark symmetric ellipses near the centre
    vy, vx = rng.uniform(-0.15, 0.05), rng.uniform(0.08, 0.18)
    vent = np.zeros((size, size))
    for sgn in (-1, 1):
        _add_ellipses(vent, yy, xx, [1.0], [cy + vy], [cx + sgn * vx],
                      [rng.uniform(0.12, 0.25)], [rng.uniform(0.04, 0.08)],
                      [sgn * rng.uniform(0.0, 0.4)])
    mag = np.where(inner, mag + blob, mag)
    mag = np.where(inner & (vent > 0), rng.uniform(0.08, 0.2), mag)
    texture = 1 + 0.06 * _smooth_field(size, rng, 0.01)
    bias = 1 + 0.25 * _smooth_field(size, rng, 0.2)
    mag = np.clip(mag * texture * bias, 0, None) * head
    mag = ndimage.gaussian_filter(mag, 0.4)
    mag /= mag.max() + 1e-12
    c = rng.normal(0, 1.0, 3)
    phase = c[0] * 0.5 + c[1] * xx + c[2] * yy + 1.5 * _smooth_field(size, rng, 0.15)
    return (mag * np.exp(1j * phase)).astype(np.complex64)


def shepp_logan(size: int) -> np.ndarray:
    """Modified Shepp-Logan phantom (scikit-image), resized to (size, size), float32 in [0, 1]."""
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    img = resize(shepp_logan_phantom(), (size, size), anti_aliasing=True)
    return (img / img.max()).astype(np.float32)


def phantom(family: str, size: int, index: int = 0, split: str = "train") -> np.ndarray:
    """Phantom ``index`` of ``split`` in ``family`` ('ellipses' float32, 'mri' complex64,
    'shepp-logan' float32, ignoring index/split)."""
    if family == "shepp-logan":
        return shepp_logan(size)
    if family not in FAMILY_ID:
        raise ValueError(f"unknown phantom family {family!r}; valid: ellipses, mri, shepp-logan")
    if split not in SPLIT_OFFSET:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLIT_OFFSET)}")
    rng = np.random.default_rng([FAMILY_ID[family], SPLIT_OFFSET[split] + int(index)])
    return random_ellipses(size, rng) if family == "ellipses" else mri_phantom(size, rng)


def phantom_batch(family: str, size: int, indices, split: str = "train") -> np.ndarray:
    """Stack of phantoms (len(indices), size, size)."""
    return np.stack([phantom(family, size, i, split) for i in indices])
