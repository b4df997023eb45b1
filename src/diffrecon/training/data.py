"""Training image families: broad mixtures of real anatomy, photographs and synthetic images
with heavy augmentation, drawn deterministically per (seed, step, index).

Families (value conventions are what the shipped priors declare):

- ``mri``: complex MR images as 2 channels (real, imag). Magnitude from the MNI head with
  random MR contrasts (45%), the MR-like phantoms (25%), dead leaves (10%), photographs (15%)
  and random ellipses (5%), times a smooth random phase (the phantoms keep their own).
- ``ct``: attenuation relative to water, 1 channel: MNI head with skull and scalp (35%),
  body sections (25%), random ellipses (15%), dead leaves (10%), photographs (15%).
- ``natural``: grey photographs (65%), dead leaves (20%), MR anatomy (10%), body sections (5%).
- ``gray``: the union of ``ct`` and ``natural`` (the common start of both priors).
- ``ellipses`` / ``mri-phantoms``: the earlier phantom families (``datasets.phantoms``).

Every image is drawn on a canvas of random size (``crop`` to 4 ``crop`` pixels, so the same
anatomy appears at many pixel scales), augmented (scale, rotation, flips, elastic warp for
anatomy, gamma / inversion for photographs, bias field, blur, noise floor), normalised so that
:func:`~diffrecon.problems.normalise.reference_level` of the whole canvas is ``g``,
g ~ U(0.75, 1.05) (mean :data:`INTENSITY_REFERENCE`), and cropped. Scans are brought to the
same convention at reconstruction time, and the random gain makes the prior tolerant of
errors in that estimate.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from diffrecon.datasets import phantoms
from diffrecon.problems.normalise import reference_level  # the one intensity statistic
from diffrecon.training import anatomy, photos, synthetic

INTENSITY_REFERENCE = 0.9  # mean reference level of the training images (prior units)
GAIN_RANGE = (0.75, 1.05)


# ----------------------------------------------------------------------------- sources
# A source draws one random image on a canvas of ``size`` pixels and returns its *view*:
# ``view(rows, cols, spacing)`` renders the grid rows x cols (1-D canvas pixel coordinates,
# ``spacing`` pixels apart) as a real image >= 0, or complex64 for sources with their own
# phase. Rendering only the crop window, plus a coarse grid of the whole canvas for the
# intensity level, keeps large canvases cheap.

View = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def _raster(img: np.ndarray) -> View:
    """View of an image already drawn at full canvas resolution."""
    def view(rows, cols, spacing):
        return img[np.ix_(rows.astype(int), cols.astype(int))]
    return view


def _bias(rng: np.random.Generator, strength: float, size: int):
    control = synthetic.coarse_field(rng, rng.uniform(0.2, 0.5)) / 2.5
    gain = strength * rng.uniform(0, 1)
    return lambda rows, cols: np.exp(gain * synthetic.sample_field(control, rows, cols, size))


def _head(size: int, rng: np.random.Generator, contrast) -> View:
    """A random oblique head slice filling 50-130% of the canvas, elastically warped, with a
    random contrast and bias field."""
    model = anatomy.head_model()
    rot = anatomy.random_rotation(rng)
    centre = 0.5 * (model.brain_lo + model.brain_hi)
    extent = model.brain_hi - model.brain_lo
    centre = (centre + rot[2] * rng.uniform(-0.4, 0.4) * float(extent @ np.abs(rot[2]))
              + rng.normal(0, 8, 3) * (1 - np.abs(rot[2])))
    mm_per_px = 200.0 / (rng.uniform(0.5, 1.3) * size)
    warp_amp = rng.uniform(0.5, 3.0) if rng.random() < 0.7 else 0.0
    warp = [synthetic.coarse_field(rng, rng.uniform(0.08, 0.2)) / 2.5 for _ in range(2)]
    bias = _bias(rng, 0.4, size)
    half = (size - 1) / 2

    def view(rows, cols, spacing):
        uv = np.stack(np.meshgrid(rows - half, cols - half, indexing="ij"))
        if warp_amp:
            uv = uv + warp_amp * np.stack([synthetic.sample_field(w, rows, cols, size)
                                           for w in warp])
        tissue = anatomy.reslice(model, uv, centre, rot, mm_per_px, spacing)
        return contrast(tissue) * bias(rows, cols)
    return view


def anatomy_mr(size: int, rng: np.random.Generator) -> View:
    return _head(size, rng, anatomy.mr_contrast(rng))


def anatomy_ct(size: int, rng: np.random.Generator) -> View:
    return _head(size, rng, anatomy.ct_contrast(rng))


def photo(size: int, rng: np.random.Generator) -> View:
    """A random rotated / scaled window of a training photograph, random gamma / inversion."""
    pics = photos.training_photos()
    src = pics[rng.integers(len(pics))]
    zoom = np.exp(rng.uniform(np.log(0.5), np.log(2.5)))   # source px per canvas px
    zoom = min(zoom, 0.95 * min(src.shape) / size)
    angle = rng.uniform(0, 2 * np.pi) if rng.random() < 0.3 else 0.0
    ca, sa = np.cos(angle), np.sin(angle)
    half = 0.5 * size * zoom * (abs(ca) + abs(sa))
    lo, hi = np.array([half, half]), np.array(src.shape) - 1 - half
    centre = rng.uniform(np.minimum(lo, hi), np.maximum(lo, hi))
    flip, invert = rng.random() < 0.5, rng.random() < 0.15
    gamma = np.exp(rng.uniform(np.log(0.6), np.log(1.6)))
    mid = (size - 1) / 2

    def view(rows, cols, spacing):
        step = zoom * spacing
        pic = ndimage.gaussian_filter(src, 0.4 * step) if step > 1.5 else src
        v, u = np.meshgrid(rows - mid, (cols - mid) * (-1 if flip else 1), indexing="ij")
        r = centre[0] + zoom * (ca * v - sa * u)
        c = centre[1] + zoom * (sa * v + ca * u)
        img = np.clip(ndimage.map_coordinates(pic, [r, c], order=1, mode="reflect"), 0, 1)
        return (1.0 - img if invert else img) ** gamma
    return view


def dead_leaves(size: int, rng: np.random.Generator) -> View:
    img = synthetic.dead_leaves(size, rng, r_min=max(1.5 / size, 0.015),
                                r_max=rng.uniform(0.2, 0.8))
    return _raster(img ** np.exp(rng.uniform(np.log(0.6), np.log(1.6))))


def body_section(size: int, rng: np.random.Generator) -> View:
    return _raster(synthetic.body_section(size, rng))


def ellipses(size: int, rng: np.random.Generator) -> View:
    return _raster(phantoms.random_ellipses(size, rng))


def mri_phantom(size: int, rng: np.random.Generator) -> View:
    return _raster(phantoms.mri_phantom(size, rng))


Source = Callable[[int, np.random.Generator], View]
MIXTURES: dict[str, tuple[int, list[tuple[float, Source]]]] = {
    "mri": (2, [(0.45, anatomy_mr), (0.25, mri_phantom), (0.10, dead_leaves), (0.15, photo),
                (0.05, ellipses)]),
    "ct": (1, [(0.35, anatomy_ct), (0.25, body_section), (0.15, ellipses),
               (0.10, dead_leaves), (0.15, photo)]),
    "natural": (1, [(0.65, photo), (0.20, dead_leaves), (0.10, anatomy_mr),
                    (0.05, body_section)]),
    "gray": (1, [(0.35, photo), (0.175, anatomy_ct), (0.125, body_section), (0.125, dead_leaves),
                 (0.15, ellipses), (0.075, anatomy_mr)]),
    "ellipses": (1, [(1.0, ellipses)]),
    "mri-phantoms": (2, [(1.0, mri_phantom)]),
}
FAMILIES = tuple(MIXTURES)
LEGACY = ("ellipses", "mri-phantoms")   # drawn exactly as the earlier phantom priors saw them
COARSE = 48   # grid of the whole canvas on which the intensity level is measured


def family_channels(family: str) -> int:
    if family not in MIXTURES:
        raise ValueError(f"unknown training family {family!r}; valid: {', '.join(FAMILIES)}")
    return MIXTURES[family][0]


def draw_crop(family: str, size: int, crop: int, rng: np.random.Generator) -> np.ndarray:
    """One augmented, normalised crop of a random canvas: (C, crop, crop) float32."""
    channels, mixture = MIXTURES[family]
    weights = np.array([w for w, _ in mixture])
    view = mixture[rng.choice(len(mixture), p=weights / weights.sum())][1](size, rng)
    r0, c0 = rng.integers(0, size - crop + 1, 2)
    rows, cols = np.arange(r0, r0 + crop, dtype=float), np.arange(c0, c0 + crop, dtype=float)
    img = view(rows, cols, 1.0)
    if family not in LEGACY:
        spacing = max(size / COARSE, 1.0)
        coarse = np.arange(0, size, spacing, dtype=float)
        level = reference_level(np.abs(view(coarse, coarse, spacing)))
        if not level > 0:
            return draw_crop(family, size, crop, rng)
        if rng.random() < 0.3:   # acquisition blur
            blur = rng.uniform(0.3, 1.0)
            img = (ndimage.gaussian_filter(img.real, blur)
                   + 1j * ndimage.gaussian_filter(img.imag, blur)) if np.iscomplexobj(img) \
                else ndimage.gaussian_filter(img, blur)
        img = img * (rng.uniform(*GAIN_RANGE) / level)
        if channels == 2 and not np.iscomplexobj(img):
            img = img * np.exp(1j * synthetic.smooth_phase(rng)(rows, cols, size))
        if rng.random() < 0.3:   # noise floor of the reference image itself
            noise = rng.uniform(0.0, 0.03) * rng.standard_normal((channels, crop, crop))
            img = img + (noise[0] + 1j * noise[1] if channels == 2 else noise[0])
    if channels == 2:
        return np.stack([img.real, img.imag]).astype(np.float32)
    return np.asarray(img, np.float32)[None]


def make_batch(family: str, step: int, batch_size: int, crop: int, seed: int) -> np.ndarray:
    """The deterministic training batch of ``step``: (B, C, crop, crop) float32. Image i
    depends only on (seed, step, i)."""
    out = []
    for i in range(batch_size):
        rng = np.random.default_rng([seed, step, i])
        if family in LEGACY:
            size = 128
        else:
            size = int(round(np.exp(rng.uniform(np.log(crop), np.log(4 * crop)))))
        img = draw_crop(family, max(size, crop), crop, rng)
        if rng.random() < 0.5:
            img = img[:, :, ::-1]
        img = np.rot90(img, k=int(rng.integers(4)), axes=(1, 2))
        out.append(np.ascontiguousarray(img))
    return np.stack(out)


# ----------------------------------------------------------------------------- user files


def load_h5_images(paths: list) -> np.ndarray:
    """Training images from HDF5 files with an ``image`` dataset ((N, H, W) real or complex,
    or (N, C, H, W)): (N_total, C, H, W) float32 (complex -> 2 channels real, imag)."""
    import h5py

    from diffrecon.errors import InputError

    out = []
    for p in map(str, paths):
        if not os.path.isfile(p):
            raise InputError(f"--family {p!r} is neither one of {', '.join(FAMILIES)} nor an "
                             "existing HDF5 file with an 'image' dataset (file does not exist)")
        with h5py.File(p, "r") as f:
            if "image" not in f:
                raise InputError(f"training file {p!r} has no 'image' dataset")
            arr = np.asarray(f["image"])
        if arr.ndim == 2:
            arr = arr[None]
        if np.iscomplexobj(arr):
            arr = np.stack([arr.real, arr.imag], axis=1)
        elif arr.ndim == 3:
            arr = arr[:, None]
        if arr.ndim != 4:
            raise InputError(f"dataset 'image' in {p!r} must be (N, H, W), (N, C, H, W) or "
                             f"complex (N, H, W); got shape {arr.shape}")
        out.append(arr.astype(np.float32))
    shapes = {a.shape[1:] for a in out}
    if len(shapes) != 1:
        raise InputError(f"'image' datasets in the training files differ in shape: {shapes}")
    return np.concatenate(out)


def h5_batch(images: np.ndarray, step: int, batch_size: int, crop: int,
             seed: int) -> np.ndarray:
    """Deterministic batch of random crops / flips / rot90 of stored images."""
    h, w = images.shape[-2:]
    if h < crop or w < crop:
        raise ValueError(f"training images ({h}x{w}) are smaller than crop {crop}")
    rng = np.random.default_rng([seed, step])
    out = []
    for i in range(batch_size):
        img = images[(step * batch_size + i) % len(images)]
        r, c = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        img = img[:, r:r + crop, c:c + crop]
        if rng.random() < 0.5:
            img = img[:, :, ::-1]
        out.append(np.ascontiguousarray(np.rot90(img, k=int(rng.integers(4)), axes=(1, 2))))
    return np.stack(out)
