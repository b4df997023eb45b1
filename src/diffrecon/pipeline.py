"""Scan file -> reconstruction file: the library behind ``diffrecon run``.

One input file is read and validated, each selected slice is normalised into the prior's
data range (:class:`Normaliser`, the only place where value ranges are converted), its
forward operator is built, the solver samples the posterior, the result is mapped back to
the scan's units and written atomically with its provenance.

Conventions:

* MRI: a fully sampled file gets a retrospective fastMRI mask (``acceleration``,
  ``mask_type``, ``center_fraction``) seeded from the file name as fastMRI does; an
  undersampled file keeps its ``mask``. Coil maps come from the file (``coil_maps``), a side
  file, or ESPIRiT on the sampled calibration lines (parameters recorded). The written
  ``reconstruction`` is the MAGNITUDE of the SENSE-combined image (coil maps normalised to
  sum |S|^2 = 1, so it is on the scale of ``reconstruction_rss``), centre-cropped to the
  header's reconSpace; the complex image is ``reconstruction_complex``; ``std`` is the
  pointwise standard deviation of the complex value, sqrt(std_re^2 + std_im^2).
* Normalisation: image = scale * prior-image. MRI: scale = 99th percentile of the
  zero-filled SENSE magnitude of the slice / ``MRI_TARGET`` (so the brightest tissue sits
  near the top of the prior's range, |x| <= 1). CT and image scans: a fixed scale, the
  file's ``intensity_scale`` attribute (image units per prior unit; default 1: the layouts
  store attenuation per pixel, resp. intensities, already in [0, 1]). Measurements and the
  noise level are divided by the same scale.
* Randomness: slice ``k`` of a file uses seed material ``(seed, k)``, and slices run one at
  a time (``batch_size`` bounds the posterior samples / particles per pass), so results do
  not depend on batching, slice selection order or the number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffrecon.errors import InputError
from diffrecon.recon.common import physics_in_dtype

DEFAULT_SOLVER = "dds"
DEFAULT_PRIORS = {"mri": "phantom-mri", "ct": "phantom-ct", "image": "phantom-ct"}
BASELINE_SOLVERS = {"mri": "tv", "ct": "tv", "image": "tv"}  # best classical on the phantoms
MRI_TARGET = 0.9  # 99th percentile of |x| of the MR phantoms the shipped prior trained on
MASK_TYPES = ("random", "equispaced", "equispaced_fraction")
SCAN_SUFFIXES = (".h5", ".hdf5")

Progress = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- normalisation

@dataclass(frozen=True)
class Normaliser:
    """image = scale * prior_image; measurements and noise levels scale the same way
    (every operator here is linear and offset-free). ``scale`` in image units per prior
    unit."""

    scale: float

    def to_prior(self, v):
        """Image, measurement or noise level (data units) -> prior units."""
        return v / self.scale

    def from_prior(self, v):
        """Prior units -> data units (images, std, samples)."""
        return v * self.scale


def mri_normaliser(zero_filled_magnitude: np.ndarray, target: float = MRI_TARGET) -> Normaliser:
    """Scale putting the 99th percentile of the zero-filled SENSE magnitude at ``target``."""
    p99 = float(np.percentile(np.asarray(zero_filled_magnitude), 99))
    return Normaliser(p99 / target if p99 > 0 else 1.0)


def fixed_normaliser(attrs: dict[str, Any], path) -> Normaliser:
    """CT / image scans: the documented fixed scale ``intensity_scale`` (default 1)."""
    scale = attrs.get("intensity_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not (
            math.isfinite(scale) and scale > 0):
        raise InputError(f"{path}: attribute 'intensity_scale' is {scale!r}, expected a "
                         f"positive number")
    return Normaliser(float(scale))


# --------------------------------------------------------------------------- small helpers

def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda (this process's LOCAL_RANK under torchrun) if available, else cpu."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"--device {device!r} is not valid; expected auto, cpu, cuda or "
                         f"cuda:INDEX") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {device!r} is not valid; expected auto, cpu, cuda or "
                         f"cuda:INDEX")
    return dev


def parse_slices(spec) -> list[int] | None:
    """'0,2,5-7' / [0, 2] / None -> sorted unique slice indices (None = all)."""
    if spec is None or spec == "" or spec == "all":
        return None
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, str):
        out = []
        try:
            for part in spec.split(","):
                part = part.strip()
                if "-" in part[1:]:
                    a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                    out.extend(range(int(a), int(b) + 1))
                else:
                    out.append(int(part))
        except ValueError:
            raise InputError(f"--slices {spec!r} is not valid; expected indices like "
                             f"'0,2,5-7'") from None
        spec = out
    idx = sorted({int(i) for i in spec})
    if not idx or min(idx) < 0:
        raise InputError(f"--slices {spec!r} is not valid; expected non-negative indices")
    return idx


def _emit(progress: Progress | None, **event) -> None:
    if progress is not None:
        progress(event)


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


# --------------------------------------------------------------------------- solver & prior

def default_solver(modality: str) -> str:
    """DEFAULT_SOLVER when the modality's shipped prior is installed, else the best classical
    baseline on the simulated phantoms (TV for every modality)."""
    from diffrecon import priors
    from diffrecon.recon import SOLVERS

    with contextlib.suppress(Exception):
        if DEFAULT_PRIORS[modality] in priors.available() and DEFAULT_SOLVER in SOLVERS:
            return DEFAULT_SOLVER
    return BASELINE_SOLVERS[modality]


def make_solver(name: str, steps: int | None, batch_size: int | None,
                options: dict[str, Any] | None):
    """Build a registered solver; unknown names or options raise ``InputError``."""
    from diffrecon.recon import SOLVERS, solver_class

    if name not in SOLVERS:
        raise InputError(f"--solver {name!r} is unknown; valid: {', '.join(SOLVERS)}")
    try:
        cls = solver_class(name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"--solver {name!r} is not available in this installation "
                         f"({exc})") from exc
    opts = dict(options or {})
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    if steps is not None:
        if "steps" not in fields:
            raise InputError(f"--steps does not apply to solver {name!r} "
                             f"(options: {', '.join(sorted(fields))})")
        opts["steps"] = int(steps)
    if batch_size is not None and "batch_size" in fields:
        opts["batch_size"] = int(batch_size)
    unknown = sorted(set(opts) - fields)
    if unknown:
        raise InputError(f"solver {name!r} has no option(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(sorted(fields))}")
    try:
        return cls(**opts)
    except (TypeError, ValueError) as exc:
        raise InputError(f"solver {name!r} options {opts}: {exc}") from exc


def load_prior(name, device: torch.device):
    """``diffrecon.priors.load`` (a local file is a diffrecon checkpoint) with errors naming
    ``--prior``; a ``Prior`` instance is used as it is."""
    from diffrecon import priors

    if isinstance(name, priors.Prior):
        return name.to(device).eval()
    try:
        local = Path(name).is_file() and name not in priors.available()
        prior = priors.load(name, kind="diffrecon") if local else priors.load(name)
    except InputError as exc:
        raise InputError(f"--prior {name!r}: {exc}") from exc
    except (KeyError, ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        avail = ""
        with contextlib.suppress(Exception):
            avail = f"; available: {', '.join(priors.available())}"
        raise InputError(f"--prior {name!r} cannot be loaded ({exc}){avail}") from exc
    return prior.to(device).eval()


# --------------------------------------------------------------------------- per-modality setup

@dataclass
class Problem:
    """One file ready to solve: per-slice measurements and physics in prior units."""

    modality: str
    slices: list[int]
    measurements: list[torch.Tensor]          # per slice, (1, ...) prior units
    physics: list[Any]                        # per slice deepinv physics (prior units)
    normalisers: list[Normaliser]
    channels: int
    crop: tuple[int, int] | None = None       # MRI reconSpace (H, W)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    per_slice_meta: list[dict] = dataclasses.field(default_factory=list)


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
    from diffrecon.recon.common import cg

    with torch.no_grad():
        y64 = y.to(torch.float64)
        phys64 = physics_in_dtype(physics, torch.float64)
        x = cg(lambda v: phys64.A_adjoint(phys64.A(v)), phys64.A_adjoint(y64), iters=iters)
        r = phys64.A(x) - y64
        sampled = (y64 != 0).sum().clamp_min(1)  # k-space is exactly 0 off the mask
        return float((r.pow(2).sum() / sampled).sqrt())


def _mri_mask(scan, path, acceleration, mask_type, center_fraction):
    """(mask (ky,) bool, mask info dict) for an MRI scan (see module docstring)."""
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


def _setup_mri(path, slices, device, *, acceleration, mask_type, center_fraction, coil_maps,
               progress) -> Problem:
    from diffrecon import operators
    from diffrecon.datasets.fastmri import read_mri_scan

    scan = read_mri_scan(path, slices=slices)
    sel = list(range(scan.n_slices)) if slices is None else list(slices)
    mask, mask_info = _mri_mask(scan, path, acceleration, mask_type, center_fraction)
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
            _emit(progress, event="message", text=f"{Path(path).name}: estimating coil maps "
                                                  f"(ESPIRiT)")
            maps, params = estimate_maps(kspace, mask, path)
            maps_info = {"coil_maps_source": "espirit", "espirit": params}
    sigma = scan.attrs.get("noise_sigma")
    if isinstance(sigma, int | float) and not isinstance(sigma, bool) and math.isfinite(
            sigma) and sigma >= 0:
        sigma_src = "file attribute noise_sigma"
    else:
        sigma, sigma_src = kspace_noise_sigma(kspace, mask), "estimated from outer k-space"
    from diffrecon.operators.mri import kspace_to_tensor

    ys, phys, norms = [], [], []
    mask_t = torch.as_tensor(mask, device=device)
    for j in range(len(sel)):
        s = None if maps is None else torch.as_tensor(maps[j], device=device)
        y = kspace_to_tensor(kspace[j][None], device=device)
        unit = operators.mri(mask_t, s, img_size=kspace.shape[-2:], noise_sigma=0.0,
                             device=device)
        zf = unit.A_adjoint(y)[0]
        norm = mri_normaliser(torch.linalg.vector_norm(zf, dim=0).cpu().numpy())
        norms.append(norm)
        ys.append(norm.to_prior(y))
        sigma_j = max(norm.to_prior(float(sigma)), model_mismatch_sigma(unit, ys[-1]))
        phys.append(operators.mri(mask_t, s, img_size=kspace.shape[-2:],
                                  noise_sigma=sigma_j, device=device))
    rx, ry = scan.recon_size
    crop = (rx, ry) if (rx, ry) != tuple(scan.kspace.shape[-2:]) else None
    meta = {**mask_info, **maps_info, "noise_sigma": float(sigma), "noise_sigma_source": sigma_src,
            "coils": int(scan.n_coils), "mask": mask.astype(np.uint8)}
    return Problem("mri", sel, ys, phys, norms, 2, crop, meta)


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


def _setup_ct(path, slices, device, progress) -> Problem:
    from diffrecon.datasets.ct import read_ct_scan

    scan = read_ct_scan(path, slices=slices)
    sel = list(range(scan.n_slices)) if slices is None else list(slices)
    norm = fixed_normaliser(scan.attrs, path)
    physics = scan.physics(device=device, noise_sigma=norm.to_prior(scan.noise_sigma))
    # file layout (angles, detectors) -> operator layout (1, 1, detectors, angles)
    ys = [norm.to_prior(torch.as_tensor(s.T.copy(), device=device)[None, None])
          for s in scan.sinogram]
    meta = {"views": int(scan.angles.size), "noise_sigma": scan.noise_sigma,
            "angle_range_deg": float(np.degrees(np.ptp(scan.angles)))}
    return Problem("ct", sel, ys, [physics] * len(sel), [norm] * len(sel), 1, None, meta)


def _setup_image(path, slices, device, progress) -> Problem:
    from diffrecon.datasets.images import read_image_scan

    scan = read_image_scan(path, slices=slices)
    sel = list(range(scan.n_slices)) if slices is None else list(slices)
    norm = fixed_normaliser(scan.attrs, path)
    physics = scan.physics(device=device, noise_sigma=norm.to_prior(scan.noise_sigma))
    ys = [norm.to_prior(torch.as_tensor(m, device=device)[None]) for m in scan.measurement]
    meta = {"operator": scan.operator, "noise_sigma": scan.noise_sigma,
            **{f"operator_{k}": v for k, v in scan.params.items()}}
    return Problem("image", sel, ys, [physics] * len(sel), [norm] * len(sel), scan.channels,
                   None, meta)


# --------------------------------------------------------------------------- core

def _solve_slice(solver, y, physics, prior, *, samples, seed, callback, progress, name):
    """Run the solver on one slice; on CUDA out-of-memory halve its batch_size and retry."""
    while True:
        try:
            return solver.solve(y, physics, prior, num_samples=samples, seed=seed,
                                callback=callback)
        except torch.OutOfMemoryError:
            bs = int(getattr(solver.options, "batch_size", 1))
            if bs <= 1:
                raise RuntimeError(f"{name}: CUDA out of memory even with --batch-size 1; "
                                   f"use fewer --samples or --device cpu") from None
            torch.cuda.empty_cache()
            solver.options = dataclasses.replace(solver.options, batch_size=max(1, bs // 2))
            _emit(progress, event="message", text=f"{name}: CUDA out of memory; retrying with "
                                                  f"--batch-size {solver.options.batch_size}")


@dataclass
class Plan:
    """A validated job: what will be run on which file, and its settings fingerprint."""

    input_path: Path
    output_path: Path
    modality: str
    solver: Any
    prior_name: str | None
    settings: dict[str, Any]
    digest: str
    options: dict[str, Any]


def plan_file(input_path, output_path, *, solver: str | None = None, prior: str | None = None,
              steps: int | None = None, samples: int = 1, seed: int = 0, slices=None,
              batch_size: int | None = None, acceleration: float | None = None,
              mask_type: str | None = None, center_fraction: float = 0.08, coil_maps=None,
              solver_options: dict[str, Any] | None = None, save_samples: bool = False,
              ) -> Plan:
    """Validate options and input (cheap checks, no reconstruction) and fingerprint them."""
    from diffrecon.datasets.io import detect_modality, sha256_file
    from diffrecon.recon import DIFFUSION_SOLVERS

    input_path, output_path = Path(input_path), Path(output_path)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"--samples {samples!r} is not valid; expected an integer >= 1")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size {batch_size} is not valid; expected an integer >= 1")
    if steps is not None and steps < 1:
        raise InputError(f"--steps {steps} is not valid; expected an integer >= 1")
    _check_output_path(output_path, input_path)
    modality = detect_modality(input_path)
    if modality == "result":
        raise InputError(f"{input_path}: is a diffrecon result file, expected a scan file")
    if modality != "mri" and (acceleration is not None or mask_type is not None):
        raise InputError(f"{input_path}: --acceleration/--mask-type apply to MRI scans only "
                         f"(this is a {modality} scan)")
    if coil_maps is not None and not Path(coil_maps).is_file():
        raise InputError(f"--coil-maps {coil_maps}: no such file")
    solver = solver or default_solver(modality)
    solver_obj = make_solver(solver, steps, batch_size, solver_options)
    slices = parse_slices(slices)
    prior_name = (prior or DEFAULT_PRIORS[modality]) if solver in DIFFUSION_SOLVERS else None
    if prior_name is not None and not isinstance(prior_name, str | os.PathLike):
        prior_label = getattr(prior_name, "name", type(prior_name).__name__)
    else:
        prior_label = None if prior_name is None else str(prior_name)
    # batch_size is a memory knob, not a result setting: it is left out of the fingerprint
    solver_opts = {k: v for k, v in solver_option_dict(solver_obj).items() if k != "batch_size"}
    settings = {"input_sha256": sha256_file(input_path), "solver": solver,
                "solver_options": solver_opts, "prior": prior_label,
                "samples": samples, "seed": int(seed), "slices": slices,
                "acceleration": acceleration, "mask_type": mask_type,
                "center_fraction": center_fraction if acceleration is not None else None,
                "coil_maps": None if coil_maps is None else sha256_file(coil_maps),
                "save_samples": bool(save_samples)}
    digest = hashlib.sha256(_json(settings).encode()).hexdigest()
    opts = {"samples": samples, "seed": int(seed), "slices": slices,
            "acceleration": acceleration, "mask_type": mask_type,
            "center_fraction": center_fraction, "coil_maps": coil_maps,
            "save_samples": save_samples}
    return Plan(input_path, output_path, modality, solver_obj, prior_name, settings, digest, opts)


def solver_option_dict(solver_obj) -> dict[str, Any]:
    """A solver's options as JSON-able values."""
    return {k: (v if isinstance(v, int | float | str | bool | type(None)) else str(v))
            for k, v in dataclasses.asdict(solver_obj.options).items()}


def output_status(plan: Plan) -> str:
    """'missing', 'complete' (a result with the same settings digest), 'different' (a result
    made with other settings or input) or 'unreadable' (not a diffrecon result)."""
    out = plan.output_path
    if not out.exists():
        return "missing"
    try:
        import h5py

        with h5py.File(out, "r") as f:
            if "reconstruction" not in f:
                return "unreadable"
            stored = f.attrs.get("settings_sha256")
    except (OSError, ValueError):
        return "unreadable"
    if isinstance(stored, bytes):
        stored = stored.decode()
    return "complete" if stored == plan.digest else "different"


def _skip_or_raise(plan: Plan, overwrite: bool, progress) -> dict[str, Any] | None:
    if overwrite:
        return None
    status = output_status(plan)
    if status == "complete":
        _emit(progress, event="skip", path=str(plan.input_path), output=str(plan.output_path))
        return {"input": str(plan.input_path), "output": str(plan.output_path),
                "status": "skipped", "modality": plan.modality,
                "solver": plan.settings["solver"]}
    if status != "missing":
        what = ("was made with different settings or input" if status == "different"
                else "exists and is not a diffrecon result file")
        raise InputError(f"{plan.output_path}: output {what}; pass --overwrite to replace it")
    return None


@dataclass
class Computed:
    """Per-slice results (data units, prior layout (C, H, W)) keyed by slice index."""

    problem: Problem
    means: dict[int, np.ndarray]
    stds: dict[int, np.ndarray]
    draws: dict[int, np.ndarray]
    infos: dict[int, dict[str, Any]]
    prior_checksum: str
    device: str


def compute(plan: Plan, *, device="auto", progress: Progress | None = None,
            shard: tuple[int, int] = (0, 1)) -> Computed:
    """Read the scan, normalise, solve slices ``shard[0]::shard[1]`` of the selection."""
    o = plan.options
    dev = resolve_device(device)
    prior_obj = load_prior(plan.prior_name, dev) if plan.prior_name is not None else None
    if plan.modality == "mri":
        problem = _setup_mri(plan.input_path, o["slices"], dev, acceleration=o["acceleration"],
                             mask_type=o["mask_type"], center_fraction=o["center_fraction"],
                             coil_maps=o["coil_maps"], progress=progress)
    else:
        setup = _setup_ct if plan.modality == "ct" else _setup_image
        problem = setup(plan.input_path, o["slices"], dev, progress)
    if prior_obj is not None and prior_obj.channels not in (None, problem.channels):
        raise InputError(f"--prior {plan.settings['prior']!r} has {prior_obj.channels} "
                         f"channel(s) but this {plan.modality} scan needs {problem.channels}")
    todo = list(range(len(problem.slices)))[shard[0]::shard[1]]
    _emit(progress, event="file", path=str(plan.input_path), slices=len(todo),
          steps=getattr(plan.solver.options, "steps", None), samples=o["samples"])
    out = Computed(problem, {}, {}, {}, {},
                   prior_obj.checksum if prior_obj is not None else "none", str(dev))
    host = lambda t, norm: norm.from_prior(t.detach().to("cpu", torch.float64)).numpy()
    for j in todo:
        k = problem.slices[j]
        cb = None
        if progress is not None:
            cb = lambda fields, k=k: progress({"event": "step", "slice": k, **fields})
        rec = _solve_slice(plan.solver, problem.measurements[j], problem.physics[j], prior_obj,
                           samples=o["samples"], seed=[(o["seed"], int(k))], callback=cb,
                           progress=progress, name=plan.input_path.name)
        norm = problem.normalisers[j]
        out.means[k], out.stds[k] = host(rec.mean[0], norm), host(rec.std[0], norm)
        if o["save_samples"]:
            out.draws[k] = host(rec.samples[:, 0], norm)
        out.infos[k] = {"nfe": int(rec.info.get("nfe", 0)),
                        "wall_time_s": float(rec.info.get("wall_time_s", 0.0)),
                        "scale": float(norm.scale)}
        if "residual" in rec.info:
            out.infos[k]["residual"] = float(rec.info["residual"][0])
        if "lineages" in rec.info:
            out.infos[k].update(lineages=int(rec.info["lineages"][0]),
                                particles=int(rec.info["num_particles"]))
        _emit(progress, event="slice", slice=k)
    return out


def reconstruct_file(input_path, output_path, *, solver: str | None = None,
                     prior: str | None = None, steps: int | None = None, samples: int = 1,
                     seed: int = 0, device: str = "auto", slices=None,
                     batch_size: int | None = None, acceleration: float | None = None,
                     mask_type: str | None = None, center_fraction: float = 0.08,
                     coil_maps=None, solver_options: dict[str, Any] | None = None,
                     save_samples: bool = False, overwrite: bool = False,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Reconstruct one scan file into ``output_path`` (see module docstring).

    Args:
        input_path: MRI (fastMRI layout), CT or image scan file (never modified).
        output_path: result file, written atomically. A complete result with the same
            settings is skipped (``overwrite`` redoes it); one made with other settings or
            from another input raises ``InputError``.
        solver, solver_options, steps: solver name (``diffrecon.recon.SOLVERS``; default
            :func:`default_solver`), option overrides (its ``Options`` fields), number of
            diffusion steps.
        prior: prior name, checkpoint path or ``Prior`` instance; default by modality
            (``DEFAULT_PRIORS``); not loaded for the classical baselines.
        samples: posterior samples per slice; seed: slice k uses seed material (seed, k).
        device: 'auto', 'cpu', 'cuda' or 'cuda:i'.
        slices: slice indices (list or '0,2,5-7'; None = all).
        batch_size: posterior samples / particles per pass (halved on CUDA out-of-memory).
        acceleration, mask_type, center_fraction: retrospective fastMRI undersampling of a
            fully sampled MRI file (required for those, refused for undersampled ones).
        coil_maps: optional side file with ``coil_maps`` (default: the scan's, else ESPIRiT).
        save_samples: also store the posterior draws (slices, samples, ...).
        progress: callback receiving event dicts: {'event': 'file' | 'step' | 'slice' |
            'skip' | 'message', ...}.

    Returns a summary dict (input, output, status 'done' | 'skipped', solver, nfe, ...).
    """
    t0 = time.perf_counter()
    plan = plan_file(input_path, output_path, solver=solver, prior=prior, steps=steps,
                     samples=samples, seed=seed, slices=slices, batch_size=batch_size,
                     acceleration=acceleration, mask_type=mask_type,
                     center_fraction=center_fraction, coil_maps=coil_maps,
                     solver_options=solver_options, save_samples=save_samples)
    skipped = _skip_or_raise(plan, overwrite, progress)
    if skipped is not None:
        return skipped
    summary = write(plan, compute(plan, device=device, progress=progress), t0)
    remove_stale_temporaries(plan.output_path)
    _emit(progress, event="done", path=str(plan.input_path), output=str(plan.output_path))
    return summary


def remove_stale_temporaries(output: Path) -> list[Path]:
    """Delete ``<output>.tmp-<pid>`` files left by killed runs (their pid is not alive)."""
    removed = []
    for tmp in output.parent.glob(f"{output.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        alive = False
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
        if not alive:
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _check_output_path(output: Path, input_path: Path) -> None:
    if output.exists() and input_path.exists() and output.resolve() == input_path.resolve():
        raise InputError(f"-o/--output {output} is the input file; inputs are never modified")
    if output.is_dir():
        raise InputError(f"-o/--output {output} is a directory, expected a result file name")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"-o/--output {output}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"-o/--output {output}: directory {parent} is not writable")


def _to_output(problem: Problem, arr: np.ndarray, std: bool = False):
    """Per-slice prior-layout array (C, H, W) -> (image as written, complex image or None).

    MRI: magnitude of the complex image (for ``std``: sqrt(sd_re^2 + sd_im^2)), cropped to
    reconSpace; CT: (H, W); images: (C, H, W)."""
    if problem.modality == "mri":
        c = arr[0] + 1j * arr[1]
        mag = np.sqrt(arr[0] ** 2 + arr[1] ** 2)
        if problem.crop is not None:
            from diffrecon.datasets.fastmri import center_crop

            mag, c = center_crop(mag, problem.crop), center_crop(c, problem.crop)
        return mag, (None if std else c)
    if problem.modality == "ct":
        return arr[0], None
    return arr, None


def write(plan: Plan, computed: Computed, t0: float) -> dict[str, Any]:
    """Write the result file of ``plan`` atomically with its provenance; return a summary."""
    from diffrecon import __version__
    from diffrecon.datasets.io import write_result

    problem = computed.problem
    order = problem.slices
    rec, cplx, sd, smp = [], [], [], []
    for k in order:
        m, c = _to_output(problem, computed.means[k])
        rec.append(m)
        cplx.append(c)
        sd.append(_to_output(problem, computed.stds[k], std=True)[0])
        if computed.draws:
            smp.append(np.stack([_to_output(problem, d)[0] for d in computed.draws[k]]))
    nfe = [computed.infos[k]["nfe"] for k in order]
    wall = time.perf_counter() - t0
    st = plan.settings
    attrs = {
        "diffrecon_version": __version__, "torch_version": str(torch.__version__),
        "input": plan.input_path.name, "input_sha256": st["input_sha256"],
        "modality": problem.modality, "solver": st["solver"],
        "solver_options": solver_option_dict(plan.solver), "prior": st["prior"] or "none",
        "prior_sha256": computed.prior_checksum, "seed": st["seed"],
        "seed_convention": "slice k draws from seed material (seed, k)",
        "num_samples": st["samples"], "slices": np.asarray(order, dtype=np.int64),
        "device": computed.device, "nfe": int(max(nfe)) if nfe else 0,
        "nfe_per_slice": np.asarray(nfe, dtype=np.int64),
        "solve_time_s": float(sum(computed.infos[k]["wall_time_s"] for k in order)),
        "wall_time_s": float(wall),
        "normalisation": "image = scale * prior image; " + (
            f"scale = p99(|zero-filled SENSE image|) / {MRI_TARGET}"
            if problem.modality == "mri" else "scale = attribute intensity_scale (default 1)"),
        "scale_per_slice": np.asarray([computed.infos[k]["scale"] for k in order]),
        "settings": st, "settings_sha256": plan.digest, **problem.meta,
    }
    if all("residual" in computed.infos[k] for k in order) and order:
        attrs["data_residual_per_slice"] = np.asarray(
            [computed.infos[k]["residual"] for k in order], dtype=np.float64)
    warnings = []
    if all("lineages" in computed.infos[k] for k in order) and order:
        lineages = [computed.infos[k]["lineages"] for k in order]
        attrs["smc_lineages_per_slice"] = np.asarray(lineages, dtype=np.int64)
        n = computed.infos[order[0]]["particles"]
        weak = [(k, c) for k, c in zip(order, lineages, strict=True) if c < degenerate_below(n)]
        if weak:
            lo, hi = min(c for _, c in weak), max(c for _, c in weak)
            warnings.append(
                f"{plan.input_path.name}: SMC slices {_ranges([k for k, _ in weak])}: the {n} "
                f"particles descend from {lo if lo == hi else f'{lo}-{hi}'} initial particle(s) "
                f"(weight degeneracy), so std is not a posterior std; use more particles, or an "
                f"ensemble (--solver dds --samples K).")
    write_result(plan.output_path, np.stack(rec), np.stack(sd),
                 samples=np.stack(smp) if smp else None,
                 complex=np.stack(cplx) if problem.modality == "mri" else None, attrs=attrs)
    return {"input": str(plan.input_path), "output": str(plan.output_path), "status": "done",
            "modality": problem.modality, "solver": st["solver"], "prior": st["prior"],
            "slices": len(order), "nfe": attrs["nfe"], "wall_time_s": round(wall, 3),
            "device": computed.device, "warnings": warnings}


def degenerate_below(num_particles: int) -> int:
    """An SMC cloud with fewer distinct time-0 ancestors than this is reported as
    degenerate: max(3, N / 10)."""
    return max(3, num_particles // 10)


def _ranges(indices: Sequence[int]) -> str:
    """'0-3, 7' for [0, 1, 2, 3, 7]."""
    parts, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            parts.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ", ".join(parts)


# --------------------------------------------------------------------------- batches

def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files and directories (their ``*.h5`` / ``*.hdf5`` files, sorted, not recursive),
    de-duplicated in order."""
    if not inputs:
        raise InputError("no INPUT given; expected scan files or directories")
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix in SCAN_SUFFIXES and q.is_file())
            if not found:
                raise InputError(f"{p}: directory holds no .h5/.hdf5 scan files")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or directory")
    seen, out = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


def output_path_for(input_path: Path, output: Path, many: bool) -> Path:
    """Result path: ``output`` itself for one input file, else ``output/<stem>_recon.h5``."""
    return output / f"{input_path.stem}_recon.h5" if many else output


def init_distributed() -> tuple[int, int, bool]:
    """Initialise torch.distributed under torchrun (``WORLD_SIZE`` > 1): gloo on CPU, nccl
    on CUDA. Returns (rank, world size, whether this call initialised it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available():
        return 0, 1, False
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(backend=backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), True


def _guard(fn, *args, **kwargs):
    """Run fn; turn exceptions into a picklable ('error', kind, message) record so that every
    rank can learn about a failure instead of deadlocking in a collective."""
    try:
        return ("ok", fn(*args, **kwargs))
    except InputError as exc:
        return ("error", "input", str(exc))
    except Exception as exc:  # noqa: BLE001 - re-raised after the collective
        return ("error", "internal", f"{type(exc).__name__}: {exc}")


def reconstruct_many(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                     progress: Progress | None = None, **options) -> list[dict[str, Any]]:
    """Reconstruct files and directories; resumable (complete outputs are skipped, each
    output is written atomically, a killed run leaves no partial result).

    One input file: ``output`` is the result file (or an existing directory to hold
    ``<stem>_recon.h5``); several inputs or a directory: ``output`` is a directory
    (created). A file that fails does not stop the others; at the end the first failure is
    raised (``InputError`` for input problems). Under torchrun (``WORLD_SIZE`` > 1) files
    are sharded round-robin across ranks, or for a single file its slices; every rank
    returns all summaries in input order. ``options`` as in :func:`reconstruct_file`.
    """
    files = collect_inputs(inputs)
    output = Path(output)
    many = len(files) > 1 or Path(inputs[0]).is_dir() or output.is_dir()
    if many:
        if output.exists() and not output.is_dir():
            raise InputError(f"-o/--output {output} is a file, but several inputs need a "
                             f"directory")
        parent = output.parent if str(output.parent) else Path(".")
        if not parent.is_dir():
            raise InputError(f"-o/--output {output}: directory {parent} does not exist")
        if not output.exists():
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(f"-o/--output {output}: directory {parent} is not writable")
            output.mkdir(exist_ok=True)
    rank, world, owned = init_distributed()
    try:
        if world > 1 and len(files) == 1:
            records = [_sharded_file(files[0], output_path_for(files[0], output, many), rank,
                                     world, progress, options)]
        else:
            local = [(i, _guard(reconstruct_file, f, output_path_for(f, output, many),
                                progress=progress, **options))
                     for i, f in enumerate(files) if i % world == rank]
            if world > 1:
                gathered: list = [None] * world
                torch.distributed.all_gather_object(gathered, local)
                local = [item for part in gathered for item in part]
            records = [r for _, r in sorted(local, key=lambda t: t[0])]
    finally:
        if owned:  # barrier first: a rank tearing gloo down while its peer is still inside
            torch.distributed.barrier()  # the last collective aborts the peer (SIGABRT)
            torch.distributed.destroy_process_group()
    errors = [r for r in records if r[0] == "error"]
    if errors:
        n = f" ({len(errors)} of {len(records)} inputs failed)" if len(records) > 1 else ""
        kind, msg = errors[0][1], errors[0][2]
        raise (InputError if kind == "input" else RuntimeError)(msg + n)
    return [r[1] for r in records]


def _sharded_file(path: Path, out: Path, rank: int, world: int, progress,
                  options: dict[str, Any]):
    """One file under torchrun: rank r solves slices r::world, rank 0 writes the result."""
    t0 = time.perf_counter()
    opts = dict(options)
    overwrite = opts.pop("overwrite", False)
    device = opts.pop("device", "auto")

    def local():
        plan = plan_file(path, out, **opts)
        skipped = _skip_or_raise(plan, overwrite, progress)
        if skipped is not None:
            return plan, skipped
        return plan, compute(plan, device=device, progress=progress, shard=(rank, world))

    status = _guard(local)
    payload = status
    if status[0] == "ok" and isinstance(status[1][1], Computed):
        c = status[1][1]
        payload = ("ok", (c.means, c.stds, c.draws, c.infos))
    elif status[0] == "ok":
        payload = ("ok", status[1][1])
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, payload)
    bad = next((g for g in gathered if g[0] == "error"), None)
    if bad is not None:
        return bad
    if isinstance(gathered[0][1], dict):  # every rank skipped
        return ("ok", gathered[0][1])
    result = None
    if rank == 0:
        plan, c = status[1]
        for _, (means, stds, draws, infos) in gathered:
            c.means.update(means)
            c.stds.update(stds)
            c.draws.update(draws)
            c.infos.update(infos)
        result = _guard(write, plan, c, t0)
    box = [result]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- info & calib

def _shape_of(f, name):
    ds = f.get(name)
    return None if ds is None or not hasattr(ds, "shape") else list(ds.shape)


def describe_file(path) -> dict[str, Any]:
    """What a scan or result file holds: modality, datasets (shape, dtype), and per
    modality coils / mask and acceleration / noise estimate / views / operator, or a
    result's provenance. Invalid scans raise ``InputError`` (validated like ``run``)."""
    from diffrecon.datasets.io import detect_modality, open_h5_checked

    path = Path(path)
    modality = detect_modality(path)
    with open_h5_checked(path) as f:
        datasets = {}

        def visit(name, obj):
            if hasattr(obj, "shape"):
                datasets[name] = {"shape": list(obj.shape), "dtype": str(obj.dtype)}

        f.visititems(visit)
    out: dict[str, Any] = {"file": str(path), "modality": modality, "datasets": datasets,
                           "size_bytes": path.stat().st_size}
    if modality == "mri":
        from diffrecon.datasets.fastmri import read_mri_scan

        scan = read_mri_scan(path)
        sigma = scan.attrs.get("noise_sigma")
        out.update({
            "slices": scan.n_slices, "coils": scan.n_coils, "multicoil": scan.multicoil,
            "kspace_shape": list(scan.kspace.shape), "recon_size": list(scan.recon_size),
            "fully_sampled": scan.mask is None,
            "acceleration": None if scan.mask is None else round(scan.acceleration, 4),
            "sampled_lines": None if scan.mask is None else int(scan.mask.sum()),
            "acs_lines": None if scan.mask is None else acs_width(scan.mask),
            "coil_maps": scan.coil_maps is not None,
            "noise_sigma": float(sigma) if isinstance(sigma, int | float) else None,
            "noise_sigma_estimate": kspace_noise_sigma(scan.kspace, scan.mask),
            "ground_truth": [k for k in ("reconstruction_rss", "reconstruction_esc",
                                         "ground_truth_complex") if k in datasets],
            "attrs": {k: v for k, v in scan.attrs.items() if k != "simulation"},
        })
    elif modality == "ct":
        from diffrecon.datasets.ct import read_ct_scan

        scan = read_ct_scan(path)
        out.update({"slices": scan.n_slices, "views": int(scan.angles.size),
                    "detectors": int(scan.sinogram.shape[-1]), "image_size": scan.image_size,
                    "angle_range_deg": float(np.degrees(np.ptp(scan.angles))),
                    "noise_sigma": scan.noise_sigma,
                    "ground_truth": scan.ground_truth is not None})
    elif modality == "image":
        from diffrecon.datasets.images import read_image_scan

        scan = read_image_scan(path)
        out.update({"slices": scan.n_slices, "operator": scan.operator,
                    "parameters": scan.params, "image_shape": list(scan.image_shape),
                    "noise_sigma": scan.noise_sigma, "ground_truth": scan.image is not None})
    else:
        from diffrecon.datasets.io import read_result

        res = read_result(path)
        keep = ("input", "input_sha256", "modality", "solver", "solver_options", "prior",
                "prior_sha256", "seed", "num_samples", "device", "nfe", "wall_time_s",
                "diffrecon_version", "torch_version", "acceleration", "mask_source",
                "coil_maps_source", "slices", "data_residual_per_slice",
                "smc_lineages_per_slice")
        out.update({"slices": int(res.reconstruction.shape[0]),
                    "reconstruction_shape": list(res.reconstruction.shape),
                    "samples": None if res.samples is None else int(res.samples.shape[1]),
                    "provenance": {k: res.attrs[k] for k in keep if k in res.attrs}})
    return json.loads(_json(out))


def calibrate_file(scan_path, output=None, *, overwrite: bool = False) -> dict[str, Any]:
    """ESPIRiT coil maps for every slice of a multi-coil MRI scan.

    ``output`` None: the maps are added to the scan itself as ``coil_maps`` (rewritten
    atomically: copy, add, fsync, rename; nothing else in the file changes). Otherwise they
    go to the side file ``output`` (dataset ``coil_maps`` plus the calibration parameters),
    usable with ``diffrecon run --coil-maps``. Returns a summary.
    """
    import shutil

    import h5py

    from diffrecon.datasets.fastmri import read_mri_scan
    from diffrecon.datasets.io import atomic_h5, detect_modality, sha256_file, write_attrs

    scan_path = Path(scan_path)
    if detect_modality(scan_path) != "mri":
        raise InputError(f"{scan_path}: not an MRI scan (no 'kspace'); calib needs multi-coil "
                         f"k-space")
    scan = read_mri_scan(scan_path)
    if not scan.multicoil:
        raise InputError(f"{scan_path}: single-coil k-space (slices, kx, ky) needs no coil maps")
    if output is None and scan.coil_maps is not None and not overwrite:
        raise InputError(f"{scan_path}: already holds 'coil_maps'; pass --overwrite to replace "
                         f"them")
    if output is not None:
        _check_output_path(Path(output), scan_path)
        if Path(output).exists() and not overwrite:
            raise InputError(f"-o/--output {output} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    maps, params = estimate_maps(scan.kspace, scan.mask, scan_path)
    attrs = {"coil_maps_method": "espirit", "coil_maps_params": params,
             "coil_maps_input_sha256": sha256_file(scan_path)}
    if output is not None:
        with atomic_h5(output) as f:
            f.create_dataset("coil_maps", data=maps)
            write_attrs(f, attrs)
        target = Path(output)
    else:
        tmp = scan_path.with_name(f"{scan_path.name}.tmp-{os.getpid()}")
        try:
            shutil.copyfile(scan_path, tmp)
            with h5py.File(tmp, "a") as f:
                if "coil_maps" in f:
                    del f["coil_maps"]
                f.create_dataset("coil_maps", data=maps)
                write_attrs(f, attrs)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, scan_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        target = scan_path
    return {"scan": str(scan_path), "coil_maps": str(target), "shape": list(maps.shape),
            "params": params, "wall_time_s": round(time.perf_counter() - t0, 3)}
