"""CT scan files (2D parallel-beam or fan-beam, slice by slice).

Layout::

    sinogram      float32 (slices, angles, detectors): line integrals of the image (see
                  ``units``), one row per view
    angles        float64 (angles,): view angles in RADIANS (checked: finite, not all equal,
                  a span max - min of at most 2 pi + 0.1, not all integers; degrees are an
                  error naming 'angles'), measured as in ``operators.ct``
    ground_truth  optional float32 (slices, H, W) (simulated scans), in image units
    attrs         geometry        "parallel" (default) or "fan"
                  n_detectors     = detectors (sinogram columns)
                  image_size      N, the reconstruction is N x N (default: n_detectors)
                  pixel_size      reconstruction pixel size in mm (default 1; required for
                                  fan beam and for units "1/mm")
                  units           image units: "1/pixel" (default; attenuation per pixel
                                  length, so the sinogram is the line integral in pixel
                                  lengths) or "1/mm" (linear attenuation coefficient in
                                  1/mm; the sinogram is dimensionless, -log(I / I0))
                  intensity_scale image units per prior unit (default 1): the prior sees
                                  image / intensity_scale (e.g. 0.02 for "1/mm": water,
                                  mu ~ 0.019 /mm at 70 keV, maps to ~1)
                  noise_sigma     std of the additive Gaussian sinogram noise (sinogram
                                  units; default 0)
                  fan beam only (all required, as are image_size and pixel_size; distances
                  in mm, see ``operators.ct``):
                  source_to_isocentre_mm, source_to_detector_mm (> source_to_isocentre_mm),
                  detector_spacing_mm (at the detector; arc length on a curved detector),
                  detector_shape "flat" or "curved" (equiangular arc centred on the source)

Parallel beam: detectors 1 pixel apart (``operators.ct`` convention). Missing attributes get
the defaults above; present but invalid ones raise ``InputError`` naming the file and the
attribute, before any computation. ``scan.physics()`` builds the matching ``operators.ct``
(raw line integrals in pixel lengths on images in "1/pixel"), whose sinogram layout is
(slices, 1, detectors, angles): convert with :func:`sinogram_to_tensor` /
:func:`tensor_to_sinogram` (``scan.measurement()``). Unit conversion lives in one place,
:func:`prior_scales`: image = image_scale * x_prior and sinogram = sinogram_scale *
A(x_prior).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffrecon.datasets.io import (
    atomic_h5,
    attrs_to_dict,
    check_shape,
    open_h5_checked,
    read_array,
    slice_selection,
    write_attrs,
)
from diffrecon.errors import InputError
from diffrecon.operators.ct import check_angles, check_fan_distances

GEOMETRIES = ("parallel", "fan")
UNITS = ("1/pixel", "1/mm")
DETECTOR_SHAPES = ("flat", "curved")
FAN_ATTRS = ("source_to_isocentre_mm", "source_to_detector_mm", "detector_spacing_mm",
             "detector_shape")


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

    @property
    def geometry(self) -> str:
        return str(self.attrs.get("geometry", "parallel"))

    def physics(self, device=None, noise_sigma: float | None = None, dtype=None):
        """The operator of this scan, ``operators.ct(image_size, angles=angles,
        n_detectors=n_detectors, noise_sigma=noise_sigma, ...)`` with the fan-beam geometry
        attributes when ``geometry`` is "fan" (``noise_sigma`` overrides the file's). Its
        measurements are ``sinogram_to_tensor(scan.sinogram)``; its images are in
        "1/pixel" (see :func:`prior_scales`)."""
        import torch

        from diffrecon.operators.ct import ct

        sigma = self.noise_sigma if noise_sigma is None else float(noise_sigma)
        kwargs = {}
        if self.geometry == "fan":
            kwargs = {"geometry": "fan",
                      "source_to_isocentre_mm": float(self.attrs["source_to_isocentre_mm"]),
                      "source_to_detector_mm": float(self.attrs["source_to_detector_mm"]),
                      "detector_spacing_mm": float(self.attrs["detector_spacing_mm"]),
                      "detector": str(self.attrs["detector_shape"]),
                      "pixel_size_mm": float(self.attrs["pixel_size"])}
        try:
            return ct(self.image_size, angles=np.asarray(self.angles),
                      n_detectors=int(self.sinogram.shape[-1]), noise_sigma=sigma,
                      device=device, dtype=dtype or torch.float32, **kwargs)
        except ValueError as exc:  # the operator's checks (an InputError is one too)
            where = self.path if self.path is not None else "CT scan"
            raise InputError(f"{where}: attributes do not define a valid CT operator "
                             f"({exc})") from exc

    @property
    def scales(self) -> tuple[float, float]:
        """:func:`prior_scales` of this scan's attributes."""
        return prior_scales(self.attrs)

    def measurement(self, device=None, dtype=None):
        """The sinogram as the operator's measurement tensor (slices, 1, detectors, angles)."""
        return sinogram_to_tensor(self.sinogram, device=device, dtype=dtype)


def prior_scales(attrs: dict[str, Any]) -> tuple[float, float]:
    """(image_scale, sinogram_scale) of a CT layout's attributes: the one conversion between
    a prior's units and the file's. A reconstruction x_prior in the prior's units is the image
    ``image_scale * x_prior`` in the file's units (``intensity_scale``), and its sinogram is
    ``sinogram_scale * A(x_prior)`` with A = ``scan.physics()`` (line integrals in pixel
    lengths): sinogram_scale = intensity_scale, times ``pixel_size`` (mm) when ``units`` is
    "1/mm" (mu [1/mm] * pixel [mm] = attenuation per pixel length). So the measurement in
    the prior's units is sinogram / sinogram_scale. Assumes validated attributes (defaults
    as in the module docstring)."""
    image_scale = float(attrs.get("intensity_scale", 1.0))
    per_pixel = float(attrs.get("pixel_size", 1.0)) if attrs.get("units") == "1/mm" else 1.0
    return image_scale, image_scale * per_pixel


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
        index = slice_selection(f, "sinogram", slices)
        sino = read_array(f, "sinogram", kinds="f", ndim=3, index=index)
        angles = read_array(f, "angles", kinds="fiu", ndim=1)
        check_shape(path, "angles", angles.shape, (sino.shape[1],),
                    "one angle per row of 'sinogram' (slices, angles, detectors)")
        try:
            check_angles(angles, f"{path}: dataset 'angles'")
        except ValueError as exc:
            raise InputError(str(exc)) from None
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


def _number(path, attrs, key, want: str, ok) -> float | None:
    """The finite number attribute ``key`` (None if absent) passing ``ok``, else an error."""
    if key not in attrs:
        return None
    val = attrs[key]
    if not (isinstance(val, (int, float)) and not isinstance(val, bool) and np.isfinite(val)
            and ok(val)):
        raise InputError(f"{path}: attribute '{key}' is {val!r}, expected {want}")
    return float(val)


def _choice(path, attrs, key, choices, default) -> str:
    val = attrs.get(key, default)
    if val not in choices:
        raise InputError(f"{path}: attribute '{key}' is {val!r}, expected "
                         f"{' or '.join(repr(c) for c in choices)}")
    return val


def _check_attrs(path, attrs: dict[str, Any], n_det: int, gt) -> None:
    geom = _choice(path, attrs, "geometry", GEOMETRIES, "parallel")
    units = _choice(path, attrs, "units", UNITS, "1/pixel")
    if "n_detectors" in attrs and attrs["n_detectors"] != n_det:
        raise InputError(f"{path}: attribute 'n_detectors' is {attrs['n_detectors']!r} but "
                         f"dataset 'sinogram' has {n_det} detectors, expected them to match")
    size = _number(path, attrs, "image_size", "a positive integer",
                   lambda v: float(v) == int(v) and v >= 1)
    pixel = _number(path, attrs, "pixel_size", "a positive number (mm)", lambda v: v > 0)
    _number(path, attrs, "noise_sigma", "a number >= 0", lambda v: v >= 0)
    _number(path, attrs, "intensity_scale", "a positive number (image units per prior unit)",
            lambda v: v > 0)
    if pixel is None and (units == "1/mm" or geom == "fan"):
        why = "units '1/mm'" if units == "1/mm" else "geometry 'fan'"
        raise InputError(f"{path}: attribute 'pixel_size' is missing, expected the pixel size "
                         f"in mm (required by {why})")
    if geom == "fan":
        for key in ("image_size", *FAN_ATTRS):
            if key not in attrs:
                raise InputError(f"{path}: attribute '{key}' is missing, expected it for "
                                 f"geometry 'fan' (needs {', '.join(FAN_ATTRS)})")
        _choice(path, attrs, "detector_shape", DETECTOR_SHAPES, None)
        dso, dsd, _ = (_number(path, attrs, key, "a positive number (mm)", lambda v: v > 0)
                       for key in FAN_ATTRS[:3])
        try:
            check_fan_distances(int(size), dso, dsd, pixel, f"{path}: attribute")
        except ValueError as exc:
            raise InputError(str(exc)) from None
    if gt is not None and size is not None and gt.shape[1:] != (int(size),) * 2:
        raise InputError(f"{path}: dataset 'ground_truth' has shape {gt.shape}, expected "
                         f"(slices, {int(size)}, {int(size)}) (attribute 'image_size')")


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
