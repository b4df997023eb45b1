"""MRI scan -> Problem: the mask, coil-map and noise policy of ``diffrecon run``.

* Mask: a fully sampled file gets a retrospective fastMRI mask (``acceleration``,
  ``mask_type``, ``center_fraction``) seeded from the file name as fastMRI does; an
  undersampled file keeps its ``mask``.
* Coil maps: a side file (``coil_maps``), else the file's ``coil_maps``, else ESPIRiT on the
  sampled calibration lines (parameters recorded); readout crop and coil compression first
  (``problems.mri_coils``, whose names this module re-exports).
* Noise level: the file's ``noise_sigma`` attribute, else a robust estimate from the outer
  k-space rows, floored per slice by the model-mismatch level of the least-squares fit.
* Normalisation: ``normalise.mri_normaliser``, per slice, from a short least-squares SENSE
  image (coil maps normalised to sum |S|^2 = 1, so images are on the scale of
  ``reconstruction_rss``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from diffrecon.errors import InputError

from .mri_coils import (
    COMPRESS_ABOVE,
    COMPRESSION_ENERGY,
    MIN_VIRTUAL_COILS,
    acs_width,
    cached_maps,
    calibration_params,
    compression_spec,
    espirit_slice,
    estimate_maps,
    read_coil_maps,
    readout_width,
    sense_setup,
)
from .normalise import mri_normaliser
from .problem import Problem

MASK_TYPES = ("random", "equispaced", "equispaced_fraction")

__all__ = ["COMPRESSION_ENERGY", "COMPRESS_ABOVE", "MASK_TYPES", "MIN_VIRTUAL_COILS",
           "MISMATCH_ITERS", "acs_width", "cached_maps", "calibration_params",
           "check_mask_options", "check_mri_file", "compression_spec", "espirit_slice",
           "estimate_maps", "kspace_noise_sigma", "load_mri", "model_mismatch_sigma",
           "mri_mask", "read_coil_maps", "readout_width", "sense_setup"]


def load_mri(path, prior=None, slices=None, *, device="cpu", acceleration=None,
             mask_type=None, center_fraction: float = 0.08, coil_maps=None,
             coil_compression: int | str | None = "auto", maps_cache=None,
             progress=None) -> Problem:
    """The Problem of an MRI scan (module docstring); ``slices`` a sorted index list or None
    (all); ``coil_maps`` an optional side file with dataset ``coil_maps``;
    ``coil_compression`` 'auto', 'off' or a virtual coil count (:func:`compression_spec`);
    ``maps_cache`` a directory for ESPIRiT maps (:func:`cached_maps`; None: no cache);
    ``progress`` receives a 'message' event before ESPIRiT runs."""
    from diffrecon import operators
    from diffrecon.datasets.fastmri import read_mri_scan
    from diffrecon.operators.mri import kspace_to_tensor

    scan = read_mri_scan(path, slices=slices)
    sel = list(range(scan.n_slices)) if slices is None else list(slices)
    mask, mask_info = mri_mask(scan, path, acceleration, mask_type, center_fraction)
    kspace = scan.kspace * mask  # zero unsampled lines (no-op for test-style files)
    sigma = scan.attrs.get("noise_sigma")
    if isinstance(sigma, int | float) and not isinstance(sigma, bool) and math.isfinite(
            sigma) and sigma >= 0:
        sigma_src = "file attribute noise_sigma"
    else:
        sigma, sigma_src = kspace_noise_sigma(kspace, mask), "estimated from outer k-space"
    kspace, maps, maps_info = sense_setup(scan, kspace, mask, sel, path, coil_maps,
                                          coil_compression, maps_cache, progress)
    grid = tuple(kspace[0].shape[-2:])  # the reconstruction grid (after the readout crop)
    ys, phys, norms, supports, rule = [], [], [], [], ""
    mask_t = torch.as_tensor(mask, device=device)
    for j in range(len(sel)):
        s = None if maps is None else torch.as_tensor(maps[j], device=device)
        y = kspace_to_tensor(kspace[j][None], device=device)
        unit = operators.mri(mask_t, s, img_size=grid, noise_sigma=0.0,
                             device=device)
        norm, rule = mri_normaliser(unit, y, prior)
        norms.append(norm)
        ys.append(norm.to_prior(y))
        sigma_j = max(norm.to_prior(float(sigma)), model_mismatch_sigma(unit, ys[-1]))
        phys.append(operators.mri(mask_t, s, img_size=grid,
                                  noise_sigma=sigma_j, device=device))
        supports.append(None if s is None else (s.abs() ** 2).sum(0) > 0)
    rx, ry = scan.recon_size
    crop = (rx, ry) if (rx, ry) != grid else None
    meta = {**mask_info, **maps_info, "noise_sigma": float(sigma), "noise_sigma_source": sigma_src,
            "coils": int(scan.n_coils), "mask": mask.astype(np.uint8)}
    return Problem(Path(path), "mri", sel, ys, phys, norms, 2, rule, crop, meta,
                   supports if any(m is not None and not m.all() for m in supports) else None)


def kspace_noise_sigma(kspace: np.ndarray, mask: np.ndarray | None) -> float:
    """Robust per-component noise std of k-space from its outer 1/8 readout rows (where the
    signal is weakest) on sampled lines: median(|k|) / sqrt(2 ln 2) (Rayleigh median)."""
    k = np.asarray(kspace)
    kx = k.shape[-2]
    edge = max(1, kx // 16)
    rows = np.concatenate([k[..., :edge, :], k[..., kx - edge:, :]], axis=-2)
    if mask is not None:
        m = np.asarray(mask, bool)
        m = m if m.ndim == 1 else m.any(0)  # columns with any sample (2D masks)
        rows = rows[..., m]
    mags = np.abs(rows).ravel()
    mags = mags[mags > 0]
    if mags.size == 0:
        return 0.0
    return float(np.median(mags) / math.sqrt(2 * math.log(2)))


MISMATCH_ITERS = 20


def model_mismatch_sigma(physics, y: torch.Tensor, iters: int = MISMATCH_ITERS) -> float:
    """RMS residual per sampled measurement entry of the least-squares fit (CG on A^T A, in
    the measurement's own dtype): the part of y no image explains (coil-map errors, noise).
    Used as a floor for the noise level handed to the solvers, so a noiseless file with
    estimated coil maps does not ask for A x = y exactly (which has no solution and makes
    SMC's final step diverge). 20 float32 iterations on the compressed, readout-cropped
    operator give the 50-iteration float64 value to 2.4% (from above: the floor errs
    high) at a fifth of its cost (320 x 320, 8 virtual coils: 0.48 vs 2.15 CPU-s; 0.18 with
    the fused normal operator, ``recon.common.normal_operator``)."""
    from diffrecon.recon.common import cg, normal_operator

    with torch.no_grad():
        x = cg(normal_operator(physics), physics.A_adjoint(y), iters=iters)
        r = physics.A(x) - y
        sampled = (y != 0).sum().clamp_min(1)  # k-space is exactly 0 off the mask
        return float((r.pow(2).sum() / sampled).sqrt())


def check_mask_options(path, file_acceleration, acceleration, mask_type, center_fraction):
    """InputError unless the retrospective-mask options fit the file: ``file_acceleration``
    None (fully sampled: ``acceleration`` required) or the file mask's (then none given)."""
    if file_acceleration is not None:
        if acceleration is not None:
            raise InputError(f"{path}: the file is already undersampled (has 'mask', "
                             f"acceleration {file_acceleration:.2f}); --acceleration applies "
                             f"to fully sampled files only")
        return
    if acceleration is None:
        raise InputError(f"{path}: the file holds fully sampled k-space (no 'mask'); pass "
                         f"--acceleration (and optionally --mask-type, --center-fraction) to "
                         f"undersample it retrospectively")
    if (mask_type or "random") not in MASK_TYPES:
        raise InputError(f"--mask-type {mask_type!r} is unknown; valid: {', '.join(MASK_TYPES)}")
    if not acceleration >= 1:
        raise InputError(f"--acceleration {acceleration!r} is not valid; expected a number >= 1")
    if not 0 < center_fraction <= 1:
        raise InputError(f"--center-fraction {center_fraction!r} is not valid; expected a "
                         f"fraction in (0, 1]")


def check_mri_file(path, acquisition: dict) -> None:
    """The acquisition options checked against an MRI scan without reading its k-space
    (dataset shapes and the small 'mask' only): the mask options
    (:func:`check_mask_options`), ``coil_compression`` against the coil count, a
    ``coil_maps`` side file's per-slice shape. Called before any expensive work."""
    from diffrecon.datasets.io import check_shape, open_h5_checked

    with open_h5_checked(path) as f:
        if "kspace" not in f or not hasattr(f["kspace"], "shape"):
            return  # read_mri_scan reports it
        shape = f["kspace"].shape
        file_acc = None
        if "mask" in f and hasattr(f["mask"], "shape"):
            m = np.asarray(f["mask"][()])
            if m.size and m.dtype.kind in "biuf":
                file_acc = m.size / max(int(np.count_nonzero(m)), 1)
    check_mask_options(path, file_acc, acquisition.get("acceleration"),
                       acquisition.get("mask_type"), acquisition.get("center_fraction", 0.08))
    multicoil = len(shape) == 4
    if multicoil:
        compression_spec(acquisition.get("coil_compression", "auto"), shape[1])
    side = acquisition.get("coil_maps")
    if side is not None and multicoil:
        with open_h5_checked(side) as f:
            if "coil_maps" not in f or not hasattr(f["coil_maps"], "shape"):
                raise InputError(f"{side}: no dataset 'coil_maps', expected the coil maps of "
                                 f"{Path(path).name} (diffrecon calib -o)")
            check_shape(side, "coil_maps", f["coil_maps"].shape[1:], shape[1:],
                        "(coils, kx, ky) of the scan's 'kspace'")


def mri_mask(scan, path, acceleration, mask_type, center_fraction):
    """(mask (ky,) bool, mask info dict) for an MRI scan (module docstring); validates the
    retrospective-mask options when they are used."""
    from diffrecon.datasets.fastmri import mask_seed_from_filename

    ky = scan.kspace.shape[-1]
    check_mask_options(path, scan.acceleration, acceleration, mask_type, center_fraction)
    if scan.mask is not None:
        return scan.mask, {"mask_source": "file", "acceleration": float(scan.acceleration),
                           "sampled_lines": int(scan.mask.sum())}
    mask_type = mask_type or "random"
    from diffrecon.operators.masks import fastmri_mask

    seed = mask_seed_from_filename(path)
    acc = int(acceleration) if float(acceleration).is_integer() else float(acceleration)
    mask = np.asarray(fastmri_mask(scan.kspace.shape, [center_fraction], [acc], kind=mask_type,
                                   seed=seed)).astype(bool).reshape(ky)
    return mask, {"mask_source": f"fastmri {mask_type} (seeded from the file name)",
                  "acceleration": float(acceleration), "center_fraction": float(center_fraction),
                  "mask_type": mask_type, "sampled_lines": int(mask.sum())}
