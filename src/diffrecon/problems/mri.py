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
             coil_compression: int | str | None = "auto", maps_cache=None,
             progress=None) -> Problem:
    """The Problem of an MRI scan (module docstring); ``slices`` a sorted index list or None
    (all); ``coil_maps`` an optional side file with dataset ``coil_maps``;
    ``coil_compression`` 'auto', 'off' or a virtual coil count (:func:`compression_plan`);
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


COMPRESS_ABOVE = 8  # 'auto' coil compression only for scans with more physical coils
MIN_VIRTUAL_COILS = 8  # 'auto' keeps at least this many (well above the acceleration)
COMPRESSION_ENERGY = 0.999  # 'auto' keeps at least this fraction of the k-space energy
OFF = ("off", "none", "0")


def compression_spec(spec, n_coils: int | None = None) -> int | str | None:
    """``--coil-compression`` as ``compress_coils`` takes it: None (no compression: 'off',
    'none', 0, or 'auto' with at most ``COMPRESS_ABOVE`` coils, or K equal to the coil
    count), 'auto' or an int K in [1, coils]. ``n_coils`` None checks the spelling only."""
    text = str(spec).strip().lower() if spec is not None else "off"
    if text in OFF or spec is False:
        return None
    if text == "auto":
        return "auto" if n_coils is None or n_coils > COMPRESS_ABOVE else None
    try:
        k = int(text)
    except ValueError:
        k = -1
    if isinstance(spec, bool) or k < 1 or (isinstance(spec, float) and not spec.is_integer()):
        raise InputError(f"--coil-compression {spec!r} is not valid; expected auto, off or a "
                         f"number of virtual coils >= 1")
    if n_coils is not None and k > n_coils:
        raise InputError(f"--coil-compression {spec!r}: the scan has only {n_coils} coils")
    return None if k == n_coils else k


def readout_width(recon_x: int, kx: int, mask: np.ndarray) -> int:
    """Readout samples kept by the reconSpace crop (``operators.readout``): the reconSpace x
    size when it is smaller than the k-space readout kx and the mask is a column (ky) mask
    (a 2D mask undersamples the readout too: no crop), else kx."""
    return int(recon_x) if 1 <= recon_x < kx and np.asarray(mask).ndim == 1 else int(kx)


def sense_setup(scan, kspace, mask, sel, path, coil_maps, compression, cache, progress):
    """(k-space, coil maps or None, provenance) of the selected slices on the reconstruction
    grid (arrays (slices, coils, H, W), or lists of (coils, H, W) per slice after coil
    compression, which may keep different coil counts per slice): readout cropped to
    reconSpace (:func:`readout_width`), coils SVD-compressed (:func:`compression_spec`),
    maps from the side file / the scan (cropped and compressed like the k-space: virtual
    maps = matrix @ maps) or ESPIRiT on the compressed coils (:func:`cached_maps`)."""
    from diffrecon.operators.coils import apply_coil_matrix, compress_coils
    from diffrecon.operators.readout import crop_readout

    kx = kspace.shape[-2]
    width = readout_width(scan.recon_size[0], kx, mask)
    info: dict = {"readout": f"cropped {kx} -> {width} (reconSpace)" if width < kx
                  else f"{kx} (no crop)"}
    if width < kx:
        kspace = crop_readout(kspace, width)
    if not scan.multicoil:
        return kspace, None, {**info, "coil_maps_source": "none (single coil)"}
    top = (kx - width) // 2
    maps, source = None, None
    if coil_maps is not None:
        maps, source = read_coil_maps(coil_maps, scan.kspace.shape[1:], sel), \
            f"side file {Path(coil_maps).name}"
    elif scan.coil_maps is not None:
        maps, source = scan.coil_maps, "file"
    if maps is not None:
        maps = maps[..., top:top + width, :]
    n = scan.n_coils
    spec = compression_spec(compression, n)
    if spec is None:
        info["coil_compression"] = {"method": "none", "coils": n}
    else:
        # slice by slice: a slice's operator does not depend on which others are selected
        ccs = [compress_coils(k, spec, energy=COMPRESSION_ENERGY,
                              min_coils=min(MIN_VIRTUAL_COILS, n)) for k in kspace]
        kspace = [cc.kspace for cc in ccs]
        counts = sorted({k.shape[0] for k in kspace})
        info["coil_compression"] = {
            "method": "svd (per slice, all sampled k-space)", "physical_coils": n,
            "virtual_coils": counts[0] if len(counts) == 1 else counts,
            "rule": (f"auto: >= {COMPRESSION_ENERGY} of the energy, >= {MIN_VIRTUAL_COILS} "
                     f"coils" if spec == "auto" else "fixed"),
            "energy_kept_min": float(min(cc.energy for cc in ccs))}
        if maps is not None:
            maps = [np.ascontiguousarray(apply_coil_matrix(m, cc.matrix), dtype=np.complex64)
                    for m, cc in zip(maps, ccs, strict=True)]
    if maps is not None:
        return kspace, maps, {**info, "coil_maps_source": source}
    maps, params, reused = cached_maps(kspace, mask, sel, path, {**info, "spec": spec},
                                       cache, progress)
    info.update(coil_maps_source="espirit", espirit=params, espirit_cache=(
        "off" if cache is None else f"{reused} of {len(sel)} slices reused"))
    return kspace, maps, info


def cached_maps(kspace, mask, sel, path, setup: dict, cache, progress):
    """ESPIRiT maps (coils, H, W) of each slice of ``kspace`` (the reconstruction grid's, after
    coil compression) on the coarse calibration grid (``estimate_coil_maps(grid='auto')``),
    one slice at a time; with a ``cache`` directory each slice's maps live in
    ``cache/espirit-<key digest>.h5`` keyed by the input's SHA-256, the slice, the mask, the
    readout crop, the compression and the calibration parameters (stored in the file and
    compared on reuse; an unreadable or mismatched file is recomputed). Returns (maps per
    slice, parameters, number of slices reused)."""
    import hashlib
    import json

    from diffrecon.datasets.io import sha256_file
    from diffrecon.operators.coils import espirit_params

    shape = tuple(kspace[0].shape[-2:])
    cal = calibration_params(shape, mask, path)
    params = espirit_params(shape, mask=mask, grid="auto", **cal)
    base = None
    if cache is not None:
        base = {"format": 1, "input_sha256": sha256_file(path),
                "mask_sha256": hashlib.sha256(np.asarray(mask, bool).tobytes()).hexdigest(),
                "shape": list(shape), "setup": setup, "espirit": params}
    out, reused, told = [], 0, False
    for j, k in enumerate(sel):
        file = key = None
        if base is not None:
            key = json.dumps({**base, "slice": int(k)}, sort_keys=True, default=str)
            file = Path(cache) / f"espirit-{hashlib.sha256(key.encode()).hexdigest()[:24]}.h5"
            m = _read_cached(file, key, kspace[j].shape)
            if m is not None:
                out.append(m)
                reused += 1
                continue
        if progress is not None and not told:
            told = True
            progress({"event": "message",
                      "text": f"{Path(path).name}: estimating coil maps (ESPIRiT)"})
        out.append(espirit_slice(kspace[j], mask, path, cal))
        if file is not None:
            _write_cached(file, key, out[-1])
    return out, params, reused


def _read_cached(file: Path, key: str, shape) -> np.ndarray | None:
    import h5py

    try:
        with h5py.File(file, "r") as f:
            if f.attrs.get("key") != key or f["coil_maps"].shape != tuple(shape):
                return None
            return f["coil_maps"][()].astype(np.complex64)
    except (OSError, KeyError):
        return None


def _write_cached(file: Path, key: str, maps: np.ndarray) -> None:
    """Best effort: a cache that cannot be written only costs the next run the ESPIRiT."""
    from diffrecon.datasets.io import atomic_h5

    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_h5(file) as f:
            f.create_dataset("coil_maps", data=maps)
            f.attrs["key"] = key
    except (OSError, InputError):
        pass


def espirit_slice(k: np.ndarray, mask, path, cal: dict) -> np.ndarray:
    """ESPIRiT maps (coils, H, W) of one slice's k-space on the coarse calibration grid;
    failures and all-zero maps are ``InputError`` naming the file."""
    from diffrecon.operators.coils import estimate_coil_maps

    try:
        m, _ = estimate_coil_maps(k, mask=mask, grid="auto", **cal)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - sigpy failures on odd data are input problems
        raise InputError(f"{path}: ESPIRiT coil-map estimation failed ({exc}); store "
                         f"'coil_maps' in the file (diffrecon calib) or pass --coil-maps"
                         ) from exc
    if not (np.sum(np.abs(m) ** 2, 0) > 0.5).any():
        raise InputError(f"{path}: ESPIRiT found no coil sensitivity (all-zero maps) with "
                         f"{cal}; store 'coil_maps' in the file or pass --coil-maps")
    return np.ascontiguousarray(m, dtype=np.complex64)  # strides set the rounding of A


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
    high) at a fifth of its cost (320 x 320, 8 virtual coils: 0.48 vs 2.15 CPU-s)."""
    from diffrecon.recon.common import cg

    with torch.no_grad():
        x = cg(lambda v: physics.A_adjoint(physics.A(v)), physics.A_adjoint(y), iters=iters)
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
    """ESPIRiT maps for every slice of multi-coil k-space (slices, coils, kx, ky), on the
    coarse calibration grid (:func:`espirit_slice`); with the resolved parameters."""
    from diffrecon.operators.coils import espirit_params

    cal = calibration_params(kspace.shape, mask, path)
    params = espirit_params(kspace.shape, mask=mask, grid="auto", **cal)
    return np.stack([espirit_slice(k, mask, path, cal) for k in kspace]), params


def read_coil_maps(path, slice_shape, sel) -> np.ndarray:
    """Coil maps (len(sel), coils, kx, ky) of scan slices ``sel`` from a side file (dataset
    ``coil_maps``, checked against the scan's per-slice k-space shape (coils, kx, ky)). A
    partial side file (``diffrecon calib --slices``) also holds ``slices``, the scan slice
    of each map; without it map i is scan slice i."""
    from diffrecon.datasets.io import check_shape, open_h5_checked, read_array

    with open_h5_checked(path) as f:
        held = read_array(f, "slices", kinds="iu", ndim=1, required=False)
        if "coil_maps" not in f:
            read_array(f, "coil_maps", kinds="c", ndim=4)  # the missing-dataset error
        n = f["coil_maps"].shape[0]
        held = list(range(n)) if held is None else [int(i) for i in held]
        if len(held) != n:
            raise InputError(f"{path}: dataset 'slices' has {len(held)} entries but "
                             f"'coil_maps' {n} slices, expected one scan slice index per map")
        missing = sorted(set(sel) - set(held))
        if missing:
            raise InputError(f"{path}: dataset 'coil_maps' lacks scan slice(s) "
                             f"{', '.join(map(str, missing))} (it holds "
                             f"{_span(held)}); run diffrecon calib --slices for them")
        where = {k: i for i, k in enumerate(held)}
        rows = sorted({where[k] for k in sel})  # h5py reads increasing indices
        maps = read_array(f, "coil_maps", kinds="c", ndim=4, index=rows)
        maps = maps[[rows.index(where[k]) for k in sel]]
    check_shape(path, "coil_maps", maps.shape[1:], tuple(slice_shape),
                "(coils, kx, ky) of the scan's 'kspace'")
    from diffrecon.datasets.fastmri import check_coil_maps

    check_coil_maps(path, maps, sel)  # all-zero or absurdly scaled maps (issue 18)
    return maps.astype(np.complex64)


def _span(indices) -> str:
    return "no slices" if not indices else f"slices {', '.join(map(str, indices))}" \
        if len(indices) <= 8 else f"{len(indices)} slices {min(indices)}-{max(indices)}"
