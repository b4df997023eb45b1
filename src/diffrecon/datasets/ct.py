"""CT scan files (2D parallel-beam, slice by slice).

Layout::

    sinogram      float32 (slices, angles, detectors): line integrals in units of
                  (attenuation per pixel) x pixels, i.e. the Radon transform of an image
                  with pixel size 1 (multiply by ``pixel_size`` for physical units)
    angles        float64 (angles,): projection angles in radians
    ground_truth  optional float32 (slices, H, W) (simulated scans)
    attrs         geometry = "parallel" (the only one supported), n_detectors (= detectors),
                  image_size (H = W of the reconstruction), pixel_size (mm, metadata only),
                  noise_sigma (std of the additive Gaussian sinogram noise, sinogram units)

Missing attributes default to geometry "parallel", image_size = n_detectors, pixel_size 1,
noise_sigma 0; present but inconsistent ones raise ``InputError``. ``scan.physics()`` builds
the matching ``operators.ct(image_size, angles=angles, n_detectors=n_detectors,
noise_sigma=noise_sigma)``, whose sinogram layout is (slices, 1, detectors, angles):
convert with :func:`sinogram_to_tensor` / :func:`tensor_to_sinogram` (``scan.measurement()``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from diffrecon.datasets.io import (
    atomic_h5,
    attrs_to_dict,
    check_shape,
    open_h5_checked,
    read_array,
    slice_index,
    write_attrs,
)
from diffrecon.errors import InputError

GEOMETRIES = ("parallel",)


@dataclass
class CTScan:
    """A CT scan in memory (see module docstring for shapes and units)."""

    sinogram: np.ndarray
    angles: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    ground_truth: np.ndarray | None = None
    path: Path | None = None

    def __post_init__(self):
        self.attrs = {"geometry": "parallel", "n_detectors": int(self.sinogram.shape[-1]),
                      "image_size": int(self.sinogram.shape[-1]), "pixel_size": 1.0,
                      "noise_sigma": 0.0, **self.attrs}

    @property
    def n_slices(self) -> int:
        return self.sinogram.shape[0]

    @property
    def image_size(self) -> int:
        return int(self.attrs["image_size"])

    @property
    def noise_sigma(self) -> float:
        return float(self.attrs["noise_sigma"])

    def physics(self, device=None, noise_sigma: float | None = None):
        """The parallel-beam operator of this scan, ``operators.ct(image_size, angles=angles,
        n_detectors=n_detectors, noise_sigma=noise_sigma)`` (``noise_sigma`` overrides the
        file's). Its measurements are ``sinogram_to_tensor(scan.sinogram)``."""
        from diffrecon.operators.ct import ct

        sigma = self.noise_sigma if noise_sigma is None else float(noise_sigma)
        try:
            return ct(self.image_size, angles=np.asarray(self.angles),
                      n_detectors=int(self.sinogram.shape[-1]), noise_sigma=sigma,
                      device=device)
        except InputError as exc:
            where = self.path if self.path is not None else "CT scan"
            raise InputError(f"{where}: attributes do not define a valid CT operator "
                             f"({exc})") from exc

    def measurement(self, device=None, dtype=None):
        """The sinogram as the operator's measurement tensor (slices, 1, detectors, angles)."""
        return sinogram_to_tensor(self.sinogram, device=device, dtype=dtype)


def sinogram_to_tensor(sinogram: np.ndarray, device=None, dtype=None):
    """File layout (slices, angles, detectors) -> operator layout (slices, 1, detectors,
    angles) float32 tensor (deepinv ``Tomography``)."""
    import torch

    t = torch.as_tensor(np.ascontiguousarray(np.swapaxes(np.asarray(sinogram), -1, -2)))
    return t[:, None].to(device=device, dtype=dtype or torch.float32)


def tensor_to_sinogram(y) -> np.ndarray:
    """Operator layout (B, 1, detectors, angles) -> file layout (B, angles, detectors)."""
    y = y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)
    return np.ascontiguousarray(np.swapaxes(y[:, 0], -1, -2)).astype(np.float32)


def read_ct_scan(path: str | os.PathLike, slices=None) -> CTScan:
    """Read and validate a CT scan file (read-only); ``slices`` as in ``read_mri_scan``."""
    path = Path(path)
    with open_h5_checked(path) as f:
        ds = f.get("sinogram")
        index = (slice_index(slices, ds.shape[0], path)
                 if isinstance(ds, h5py.Dataset) and ds.ndim > 0 else None)
        sino = read_array(f, "sinogram", kinds="f", ndim=3, index=index)
        angles = read_array(f, "angles", kinds="fiu", ndim=1)
        check_shape(path, "angles", angles.shape, (sino.shape[1],),
                    "one angle per row of 'sinogram' (slices, angles, detectors)")
        gt = read_array(f, "ground_truth", kinds="f", ndim=3, required=False, index=index)
        attrs = attrs_to_dict(f.attrs)
    if gt is not None:
        check_shape(path, "ground_truth", gt.shape[:1], sino.shape[:1],
                    "same number of slices as 'sinogram'")
    _check_attrs(path, attrs, sino.shape[2], gt)
    return CTScan(sinogram=sino.astype(np.float32, copy=False),
                  angles=angles.astype(np.float64), attrs=attrs,
                  ground_truth=None if gt is None else gt.astype(np.float32, copy=False),
                  path=path)


def _check_attrs(path, attrs: dict[str, Any], n_det: int, gt) -> None:
    geom = attrs.get("geometry", "parallel")
    if geom not in GEOMETRIES:
        raise InputError(f"{path}: attribute 'geometry' is {geom!r}, expected 'parallel'")
    if "n_detectors" in attrs and attrs["n_detectors"] != n_det:
        raise InputError(f"{path}: attribute 'n_detectors' is {attrs['n_detectors']!r} but "
                         f"dataset 'sinogram' has {n_det} detectors, expected them to match")
    for key in ("image_size", "pixel_size", "noise_sigma"):
        if key not in attrs:
            continue
        val = attrs[key]
        ok = isinstance(val, (int, float)) and not isinstance(val, bool) and np.isfinite(val)
        if key == "image_size":
            ok = ok and float(val) == int(val) and val >= 1
        elif key == "pixel_size":
            ok = ok and val > 0
        else:
            ok = ok and val >= 0
        if not ok:
            want = {"image_size": "a positive integer", "pixel_size": "a positive number",
                    "noise_sigma": "a number >= 0"}[key]
            raise InputError(f"{path}: attribute '{key}' is {val!r}, expected {want}")
    if gt is not None and "image_size" in attrs and gt.shape[1:] != (int(attrs["image_size"]),) * 2:
        raise InputError(f"{path}: dataset 'ground_truth' has shape {gt.shape}, expected "
                         f"(slices, {attrs['image_size']}, {attrs['image_size']}) "
                         f"(attribute 'image_size')")


def write_ct_scan(path: str | os.PathLike, scan: CTScan) -> Path:
    """Write ``scan`` atomically in the CT layout. Returns the path."""
    path = Path(path)
    sino = np.asarray(scan.sinogram, dtype=np.float32)
    angles = np.asarray(scan.angles, dtype=np.float64).reshape(-1)
    if sino.ndim != 3 or angles.shape != (sino.shape[1],):
        raise InputError(f"sinogram for {path} has shape {sino.shape} and angles "
                         f"{angles.shape}, expected (slices, angles, detectors) and (angles,)")
    attrs = {**scan.attrs, "n_detectors": int(sino.shape[2])}
    with atomic_h5(path) as f:
        f.create_dataset("sinogram", data=sino)
        f.create_dataset("angles", data=angles)
        if scan.ground_truth is not None:
            f.create_dataset("ground_truth", data=np.asarray(scan.ground_truth, np.float32))
        write_attrs(f, attrs)
    return path
