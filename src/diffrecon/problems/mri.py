"""MRI scan -> Problem: the mask, coil-map and noise policy of ``diffrecon run``.

* Mask: a fully sampled file gets a retrospective fastMRI mask (``acceleration``,
  ``mask_type``, ``center_fraction``) seeded from the file name as fastMRI does; an
  undersampled file keeps its ``mask``.
* Coil maps: a side file (``coil_maps``), else the file's ``coil_maps``, else ESPIRiT on the
  sampled calibration lines (parameters recorded).
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

from .normalise import mri_normaliser
from .problem import Problem

MASK_TYPES = ("random", "equispaced", "equispaced_fraction")


def load_mri(path, prior=None, slices=None, *, device="cpu", acceleration=None,
             mask_type=None, center_fraction: float = 0.08, coil_maps=None,
             progress=None) -> Problem:
    """The Problem of an MRI scan (module docstring); ``slices`` a sorted index list or None
    (all); ``coil_maps`` an optional side file with dataset ``coil_maps``; ``progress``
    receives a 'message' event before ESPIRiT runs."""
    from diffrecon import operators
    from diffrecon.datasets.fastmri import read_mri_scan
    from diffrecon.operators.mri import kspace_to_tensor

    scan = read_mri_scan(path, slices=slices)
    sel = list(range(scan.n_slices)) if slices is None else list(slices)
    mask, mask_info = mri_mask(scan, path, acceleration, mask_type, center_fraction)
    kspace = scan.kspace * mask  # zero unsampled lines (no-op for test-style files)
    maps, maps_info = None, {"coil_maps_source": "none (single coil)"}
    if scan.multicoil:
        if coil_maps is not None:
            maps = read_coil_maps(coil_maps, scan.kspace.shape[1:], max(sel) + 1)[sel]
            maps_info = {"coil_maps_source": f"side file {Path(coil_maps).name}"}
        elif scan.coil_maps is not None:
            maps = scan.coil_maps
            maps_info = {"coil_maps_source": "file"}
        else:
            if progress is not None:
                progress({"event": "message",
                          "text": f"{Path(path).name}: estimating coil maps (ESPIRiT)"})
            maps, params = estimate_maps(kspace, mask, path)
            maps_info = {"coil_maps_source": "espirit", "espirit": params}
    sigma = scan.attrs.get("noise_sigma")
    if isinstance(sigma, int | float) and not isinstance(sigma, bool) and math.isfinite(
            sigma) and sigma >= 0:
        sigma_src = "file attribute noise_sigma"
    else:
        sigma, sigma_src = kspace_noise_sigma(kspace, mask), "estimated from outer k-space"
    ys, phys, norms, supports, rule = [], [], [], [], ""
    mask_t = torch.as_tensor(mask, device=device)
    for j in range(len(sel)):
        s = None if maps is None else torch.as_tensor(maps[j], device=device)
        y = kspace_to_tensor(kspace[j][None], device=device)
        unit = operators.mri(mask_t, s, img_size=kspace.shape[-2:], noise_sigma=0.0,
                             device=device)
        norm, rule = mri_normaliser(unit, y, prior)
        norms.append(norm)
        ys.append(norm.to_prior(y))
        sigma_j = max(norm.to_prior(float(sigma)), model_mismatch_sigma(unit, ys[-1]))
        phys.append(operators.mri(mask_t, s, img_size=kspace.shape[-2:],
                                  noise_sigma=sigma_j, device=device))
        supports.append(None if s is None else (s.abs() ** 2).sum(0) > 0)
    rx, ry = scan.recon_size
    crop = (rx, ry) if (rx, ry) != tuple(scan.kspace.shape[-2:]) else None
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


def model_mismatch_sigma(physics, y: torch.Tensor, iters: int = 50) -> float:
    """RMS residual per sampled measurement entry of the least-squares fit (CG on A^T A):
    the part of y no image explains (coil-map errors, noise). Used as a floor for the noise
    level handed to the solvers, so a noiseless file with estimated coil maps does not ask
    for A x = y exactly (which has no solution and makes SMC's final step diverge)."""
    from diffrecon.recon.common import cg, physics_in_dtype

    with torch.no_grad():
        y64 = y.to(torch.float64)
        phys64 = physics_in_dtype(physics, torch.float64)
        x = cg(lambda v: phys64.A_adjoint(phys64.A(v)), phys64.A_adjoint(y64), iters=iters)
        r = phys64.A(x) - y64
        sampled = (y64 != 0).sum().clamp_min(1)  # k-space is exactly 0 off the mask
        return float((r.pow(2).sum() / sampled).sqrt())


def mri_mask(scan, path, acceleration, mask_type, center_fraction):
    """(mask (ky,) bool, mask info dict) for an MRI scan (module docstring); validates the
    retrospective-mask options when they are used."""
    from diffrecon.datasets.fastmri import mask_seed_from_filename

    ky = scan.kspace.shape[-1]
    if scan.mask is not None:
        if acceleration is not None:
            raise InputError(f"{path}: the file is already undersampled (has 'mask', "
                             f"acceleration {scan.acceleration:.2f}); --acceleration applies "
                             f"to fully sampled files only")
        return scan.mask, {"mask_source": "file", "acceleration": float(scan.acceleration),
                           "sampled_lines": int(scan.mask.sum())}
    if acceleration is None:
        raise InputError(f"{path}: the file holds fully sampled k-space (no 'mask'); pass "
                         f"--acceleration (and optionally --mask-type, --center-fraction) to "
                         f"undersample it retrospectively")
    mask_type = mask_type or "random"
    if mask_type not in MASK_TYPES:
        raise InputError(f"--mask-type {mask_type!r} is unknown; valid: {', '.join(MASK_TYPES)}")
    if not acceleration >= 1:
        raise InputError(f"--acceleration {acceleration!r} is not valid; expected a number >= 1")
    if not 0 < center_fraction <= 1:
        raise InputError(f"--center-fraction {center_fraction!r} is not valid; expected a "
                         f"fraction in (0, 1]")
    from diffrecon.operators.masks import fastmri_mask

    seed = mask_seed_from_filename(path)
    acc = int(acceleration) if float(acceleration).is_integer() else float(acceleration)
    mask = np.asarray(fastmri_mask(scan.kspace.shape, [center_fraction], [acc], kind=mask_type,
                                   seed=seed)).astype(bool).reshape(ky)
    return mask, {"mask_source": f"fastmri {mask_type} (seeded from the file name)",
                  "acceleration": float(acceleration), "center_fraction": float(center_fraction),
                  "mask_type": mask_type, "sampled_lines": int(mask.sum())}


def acs_width(mask: np.ndarray) -> int:
    """Width of the fully sampled calibration region around the k-space centre: the band of
    phase-encoding lines around ky // 2 for 1D (or column-wise) masks, the largest centred
    fully sampled square for 2D (Poisson-disc) masks."""
    m = np.asarray(mask, bool)
    if m.ndim == 2 and not (m.all(0) | ~m.any(0)).all():  # truly 2D pattern
        cy, cx = m.shape[0] // 2, m.shape[1] // 2
        width = 0
        while width < min(m.shape):
            w = width + 1
            lo_y, lo_x = cy - w // 2, cx - w // 2
            if lo_y < 0 or lo_x < 0 or not m[lo_y:lo_y + w, lo_x:lo_x + w].all():
                break
            width = w
        return width
    cols = m if m.ndim == 1 else m.all(0)
    c = cols.size // 2
    if not cols[c]:
        return 0
    lo, hi = c, c
    while lo > 0 and cols[lo - 1]:
        lo -= 1
    while hi < cols.size - 1 and cols[hi + 1]:
        hi += 1
    return hi - lo + 1


def calibration_params(kspace_shape, mask: np.ndarray | None, path) -> dict[str, int]:
    """ESPIRiT calibration region and kernel for a scan: calib_width = min(24, ACS lines);
    kernel_width 2 for <= 5 calibration lines, 3 up to 12, then min(6, calib // 3 + 1)
    (24 -> 6, the paper's setting). A kernel close to the calibration width leaves too few
    calibration rows (sigpy then returns zero maps), a 2-wide kernel with a larger region
    gives visibly worse maps (measured on the simulated birdcage coils). Fewer than 4 ACS
    lines raise ``InputError``."""
    acs = min(kspace_shape[-2:]) if mask is None else acs_width(mask)
    calib = int(min(24, acs, *kspace_shape[-2:]))
    if calib < 4:
        raise InputError(f"{path}: only {acs} fully sampled central k-space lines, expected at "
                         f"least 4 to estimate coil maps (ESPIRiT); store 'coil_maps' in the "
                         f"file or pass --coil-maps")
    kernel = 2 if calib <= 5 else 3 if calib <= 12 else min(6, calib // 3 + 1)
    return {"calib_width": calib, "kernel_width": int(kernel)}


def estimate_maps(kspace: np.ndarray, mask: np.ndarray | None, path) -> tuple[np.ndarray, dict]:
    """ESPIRiT maps for every slice of multi-coil k-space (slices, coils, kx, ky)."""
    from diffrecon.operators.coils import estimate_coil_maps

    params = calibration_params(kspace.shape, mask, path)
    maps, info = [], {}
    for k in kspace:
        try:
            m, info = estimate_coil_maps(k, **params)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - sigpy failures on odd data are input problems
            raise InputError(f"{path}: ESPIRiT coil-map estimation failed ({exc}); store "
                             f"'coil_maps' in the file (diffrecon calib) or pass --coil-maps"
                             ) from exc
        if not (np.sum(np.abs(m) ** 2, 0) > 0.5).any():
            raise InputError(f"{path}: ESPIRiT found no coil sensitivity (all-zero maps) with "
                             f"{params}; store 'coil_maps' in the file or pass --coil-maps")
        maps.append(m)
    return np.stack(maps).astype(np.complex64), info


def read_coil_maps(path, slice_shape, min_slices: int) -> np.ndarray:
    """Coil maps (slices, coils, kx, ky) from a side file (dataset ``coil_maps``), checked
    against the scan's per-slice k-space shape (coils, kx, ky) and slice count."""
    from diffrecon.datasets.io import check_shape, open_h5_checked, read_array

    with open_h5_checked(path) as f:
        maps = read_array(f, "coil_maps", kinds="c", ndim=4)
    check_shape(path, "coil_maps", maps.shape[1:], tuple(slice_shape),
                "(coils, kx, ky) of the scan's 'kspace'")
    if maps.shape[0] < min_slices:
        raise InputError(f"{path}: dataset 'coil_maps' has {maps.shape[0]} slices, expected at "
                         f"least {min_slices} (as many as the scan)")
    return maps.astype(np.complex64)


