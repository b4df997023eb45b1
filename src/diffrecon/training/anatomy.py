"""Real head anatomy for training: the MNI152 2009c template (shipped by nilearn) with a
synthetic skull and scalp, resliced at random oblique planes, scales and contrasts.

The nilearn template is skull-stripped (T1 plus grey / white-matter probability maps, 1 mm
isotropic, 197 x 233 x 189). Real scans show skull, marrow, scalp fat and muscle around the
brain, so :func:`head_model` adds those as soft shells at fixed distances (perturbed by a
smooth random field, +-2 mm) outside the brain mask. Each drawn slice then gets a random tissue
contrast: a random lookup table on the T1 intensity or a random mix of tissue classes for MR
(covering T1-, T2-, PD- and FLAIR-like looks), or attenuation values relative to water for CT.

Coordinates: volumes are indexed (x, y, z) in mm (voxel = 1 mm). A slice is a plane through
``centre`` spanned by two orthonormal vectors; pixel spacing in mm is ``1 / px_per_mm``. A
resolution pyramid (1, 2, 4 mm) avoids aliasing when a head is rendered small.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

MNI_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
             "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
             "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
# shells outside the brain, from the inside out: (name, thickness in mm)
SHELLS = (("csf", 2.0), ("inner_table", 2.0), ("marrow", 3.0), ("outer_table", 2.0),
          ("muscle", 2.5), ("fat", 4.0), ("skin", 1.5))
CHANNELS = ("t1", "gm", "wm", "csf_in") + tuple(name for name, _ in SHELLS)
PAD_MM = 28


def mni_directory() -> Path:
    """Folder of nilearn's shipped MNI152 template files (no download)."""
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data"


@dataclass
class HeadModel:
    """Soft tissue channels (len(CHANNELS), X, Y, Z) float32 per pyramid level (1, 2, 4 mm)
    and the brain's bounding box in mm (for choosing slice centres)."""

    levels: list[np.ndarray]
    brain_lo: np.ndarray
    brain_hi: np.ndarray


@functools.lru_cache(maxsize=1)
def head_model(seed: int = 0) -> HeadModel:
    """Build (once per process) the MNI head with synthetic shells; about 15 s, ~0.9 GB."""
    import nibabel as nib

    d = mni_directory()
    vol = {k: np.asarray(nib.load(d / f).get_fdata(), np.float32) for k, f in MNI_FILES.items()}
    t1 = np.pad(vol["t1"] / 255.0, PAD_MM)
    gm, wm = (np.pad(np.clip(vol[k], 0, 1), PAD_MM) for k in ("gm", "wm"))
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(t1 > 0.02, iterations=2))
    csf_in = np.clip(brain.astype(np.float32) - gm - wm, 0, 1)
    rng = np.random.default_rng(seed)
    # distance outside the brain, perturbed by a smooth field (+-2 mm) so shells are uneven
    dist = ndimage.distance_transform_edt(~brain).astype(np.float32)
    coarse = rng.standard_normal(tuple(s // 12 + 2 for s in dist.shape)).astype(np.float32)
    wobble = ndimage.zoom(coarse, [a / b for a, b in zip(dist.shape, coarse.shape,
                                                            strict=True)], order=3)
    dist = dist + 2.0 * wobble[: dist.shape[0], : dist.shape[1], : dist.shape[2]]
    channels = [t1, gm, wm, csf_in]
    edge = 0.0
    for _name, width in SHELLS:
        inner, outer = edge, edge + width
        # soft shell: 1 inside [inner, outer], linear 1-voxel ramps (partial volume)
        shell = np.clip(np.minimum(dist - inner + 0.5, outer - dist + 0.5), 0, 1)
        shell[brain] = 0
        channels.append(shell.astype(np.float32))
        edge = outer
    full = np.stack(channels).astype(np.float32)
    levels = [full]
    for _ in range(2):
        prev = levels[-1]
        smooth = ndimage.gaussian_filter(prev, sigma=(0, 0.8, 0.8, 0.8))
        levels.append(np.ascontiguousarray(smooth[:, ::2, ::2, ::2]))
    idx = np.argwhere(brain)
    return HeadModel(levels, idx.min(0).astype(float), idx.max(0).astype(float))


def random_rotation(rng: np.random.Generator, tilt_deg: float = 20.0) -> np.ndarray:
    """3x3 rotation: an axial, coronal or sagittal base plane, tilted by up to ``tilt_deg``
    about random axes, then rotated in-plane uniformly. Rows 0, 1 span the slice."""
    base = [np.eye(3)[[0, 1, 2]], np.eye(3)[[0, 2, 1]], np.eye(3)[[1, 2, 0]]][rng.integers(3)]
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(-tilt_deg, tilt_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    tilt = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    phi = rng.uniform(0, 2 * np.pi)
    spin = np.array([[np.cos(phi), -np.sin(phi), 0], [np.sin(phi), np.cos(phi), 0], [0, 0, 1]])
    return spin @ base @ tilt


def reslice(model: HeadModel, uv: np.ndarray, centre: np.ndarray, rotation: np.ndarray,
            mm_per_px: float, spacing_px: float = 1.0) -> np.ndarray:
    """Tissue channels (len(CHANNELS), H, W) at in-plane pixel coordinates ``uv`` (2, H, W)
    relative to the plane centre (pixel = ``mm_per_px`` mm). ``spacing_px`` is the grid
    spacing of ``uv`` in pixels; it picks the pyramid level that avoids aliasing."""
    step_mm = mm_per_px * spacing_px
    level = int(np.clip(np.floor(np.log2(max(step_mm, 1.0))), 0, len(model.levels) - 1))
    vol = model.levels[level]
    mm = centre[:, None, None] + mm_per_px * (rotation[0][:, None, None] * uv[0]
                                              + rotation[1][:, None, None] * uv[1])
    vox = mm / 2**level
    return np.stack([ndimage.map_coordinates(c, vox, order=1, mode="constant", cval=0.0,
                                             prefilter=False) for c in vol]).astype(np.float32)


def slice_centre(model: HeadModel, rng: np.random.Generator) -> np.ndarray:
    """A plane centre inside the brain's bounding box (mm), away from its outer 10%."""
    span = model.brain_hi - model.brain_lo
    return model.brain_lo + span * rng.uniform(0.1, 0.9, 3)


def mr_contrast(rng: np.random.Generator):
    """A random MR-like contrast: returns ``f(tissue) -> magnitude >= 0`` (T1 lookup table
    keeping the template's fine detail, or a tissue-class mix for T2 / PD / FLAIR looks)."""
    lut = rng.random() < 0.5
    knots, lut_values = np.linspace(0, 1, 6), np.concatenate([[0.0], rng.uniform(0.05, 1, 5)])
    brain_level = rng.uniform(0.0, 1.0, 3)  # csf, gm, wm
    levels = {"csf": rng.uniform(0.05, 1.0), "inner_table": rng.uniform(0.0, 0.08),
              "marrow": rng.uniform(0.1, 0.7), "outer_table": rng.uniform(0.0, 0.08),
              "muscle": rng.uniform(0.15, 0.6), "fat": rng.uniform(0.3, 1.0),
              "skin": rng.uniform(0.2, 0.7)}

    def contrast(tissue: np.ndarray) -> np.ndarray:
        t1, gm, wm, csf_in = tissue[:4]
        if lut:
            brain = np.interp(t1, knots, lut_values)
        else:
            brain = brain_level[0] * csf_in + brain_level[1] * gm + brain_level[2] * wm
        shells = dict(zip(CHANNELS[4:], tissue[4:], strict=True))
        return np.clip(brain + sum(v * shells[k] for k, v in levels.items()), 0, None)

    return contrast


def ct_contrast(rng: np.random.Generator):
    """Random CT attenuation relative to water (air 0, water 1, cortical bone 1.6-2.4):
    returns ``f(tissue) -> attenuation``."""
    bone = rng.uniform(1.6, 2.4)
    levels = {"csf": rng.uniform(0.99, 1.01), "inner_table": bone,
              "marrow": rng.uniform(1.15, 1.5), "outer_table": bone,
              "muscle": rng.uniform(1.03, 1.07), "fat": rng.uniform(0.88, 0.93),
              "skin": rng.uniform(1.0, 1.06)}
    brain_level = (rng.uniform(0.99, 1.01), rng.uniform(1.035, 1.05), rng.uniform(1.02, 1.035))

    def contrast(tissue: np.ndarray) -> np.ndarray:
        _, gm, wm, csf_in = tissue[:4]
        shells = dict(zip(CHANNELS[4:], tissue[4:], strict=True))
        brain = brain_level[0] * csf_in + brain_level[1] * gm + brain_level[2] * wm
        return np.clip(brain + sum(v * shells[k] for k, v in levels.items()), 0, None)

    return contrast
