"""Scan units <-> prior units: the only place where value ranges are converted.

image = scale * prior-image and measurement = measurement_scale * prior-measurement (every
operator here is linear and offset-free; the two scales differ only for CT sinograms of
images in 1/mm, by the pixel size). A prior whose networks expect another range (e.g. ADM's
[-1, 1]) maps its own input inside ``Prior.denoise``; the pipeline only matches intensities.

The intensity convention is the prior's own declaration ``intensity_reference``: the value of
``reference_level`` (99th percentile of |x|) on its training images, in prior units. A scan's
scale puts the same statistic of the scan's image at that value. The scan's image is not
known before reconstruction, so its level is read from a short least-squares estimate
(``least_squares_level``: 10 CG iterations on A^T A x = A^T y), which, unlike the zero-filled
image, does not shrink with the sampling density of an MRI mask or depend on the views of a
sinogram. A prior that declares nothing gets ``FALLBACK_REFERENCE``.

One scale per slice, as the priors were trained (every training image normalised by its own
level), so a slice's result does not depend on which other slices are selected. CT and image
files may instead declare ``intensity_scale`` (image units per prior unit), used for every
slice; CT sinograms of images in 1/mm are also divided by the pixel size
(``datasets.ct.prior_scales``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffrecon.errors import InputError

# Intensity reference of a prior that declares none: the reference level of the MR phantoms
# that the first shipped MRI prior (phantom-mri) was trained on.
FALLBACK_REFERENCE = 0.9
LEAST_SQUARES_ITERS = 10


@dataclass(frozen=True)
class Normaliser:
    """image = scale * prior_image (image units per prior unit); measurements likewise with
    ``measurement_scale`` (None: the same as ``scale``)."""

    scale: float
    measurement_scale: float | None = None

    def to_prior(self, v):
        """Measurement or measurement noise std (data units) -> prior units."""
        return v / (self.scale if self.measurement_scale is None else self.measurement_scale)

    def from_prior(self, v):
        """Prior units -> image units (images, std, samples)."""
        return v * self.scale


def reference_level(magnitude) -> float:
    """The intensity statistic images are matched by: the 99th percentile of ``magnitude``
    (|x| of an image, any shape). Priors declare its value on their training images as
    ``intensity_reference``."""
    return float(np.percentile(np.asarray(magnitude), 99))


def intensity_reference(prior) -> float:
    """The prior's declared ``intensity_reference``, else ``FALLBACK_REFERENCE``."""
    declared = getattr(prior, "intensity_reference", None)
    return FALLBACK_REFERENCE if declared is None else float(declared)


def least_squares_level(physics, y: torch.Tensor, complex_channels: bool = False,
                        iters: int = LEAST_SQUARES_ITERS) -> float:
    """``reference_level`` of a least-squares image of one measurement ``y`` (batch 1): ``iters``
    CG iterations on A^T A x = A^T y in float64 from zero (early stopping regularises it).
    Where the physics selects a fast approximate A^T A, K (``recon.common.fast_normal``: CT
    ``normal="toeplitz"``), the CG runs on K x = K x_d instead, x_d = ``recon.common.
    data_image`` (7 operator calls; the CT loader hands it to DDS), not on 2 ``iters`` + 1 exact
    calls: the level agrees with the exact one to 0.3% (VALIDATION MNI / dipy slices, 128
    px, 180 views; RESULTS.md). ``complex_channels``: the image's 2 channels are (real,
    imaginary) and the level is taken of the magnitude."""
    from diffrecon.recon.common import approximate_normal, cg, physics_in_dtype

    with torch.no_grad():
        fast = approximate_normal(physics, y, dtype=torch.float64)  # (K, K x_d) or None
        if fast is not None:
            x = cg(*fast, iters=iters)
        else:
            phys = physics_in_dtype(physics, torch.float64)
            y64 = y.to(torch.float64)
            x = cg(lambda v: phys.A_adjoint(phys.A(v)), phys.A_adjoint(y64), iters=iters)
        mag = torch.linalg.vector_norm(x, dim=1) if complex_channels else x.abs()
        return reference_level(mag.cpu().numpy())


def least_squares_rule(physics) -> str:
    """The provenance text of ``least_squares_level``'s image."""
    from diffrecon.recon.common import fast_normal

    operator = "; FFT normal operator" if fast_normal(physics) else ""
    return f"least-squares image, {LEAST_SQUARES_ITERS} CG iterations{operator}"


def scale_for_level(level: float, prior) -> float:
    """Image units per prior unit putting an image of reference level ``level`` at the
    prior's intensity reference (1 for an empty image)."""
    return level / intensity_reference(prior) if level > 0 and math.isfinite(level) else 1.0


def mri_normaliser(physics, y, prior=None) -> tuple[Normaliser, str]:
    """Per-slice MRI scale from the least-squares SENSE image of k-space ``y``; with the
    rule as provenance text."""
    level = least_squares_level(physics, y, complex_channels=True)
    rule = (f"scale = p99(|least-squares SENSE image, {LEAST_SQUARES_ITERS} CG iterations|) "
            f"/ {intensity_reference(prior)}")
    return Normaliser(scale_for_level(level, prior)), rule


def scan_normaliser(attrs: dict[str, Any], path, physics, y, prior=None,
                    per_pixel: float = 1.0) -> tuple[Normaliser, str]:
    """CT / image slices: the file's ``intensity_scale`` if declared, else the least-squares
    level of the slice's measurement ``y`` (batch 1, file units). ``per_pixel``: measurement
    units per image unit beyond the scale (the pixel size in mm for CT images in 1/mm)."""
    if "intensity_scale" in attrs:
        scale = attrs["intensity_scale"]
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not (
                math.isfinite(scale) and scale > 0):
            raise InputError(f"{path}: attribute 'intensity_scale' is {scale!r}, expected a "
                             f"positive number")
        return (Normaliser(float(scale), float(scale) * per_pixel),
                "scale = attribute intensity_scale")
    measurement_scale = scale_for_level(least_squares_level(physics, y), prior)
    rule = (f"scale = p99(|{least_squares_rule(physics)}|) / {intensity_reference(prior)} "
            f"(no intensity_scale attribute)")
    return Normaliser(measurement_scale / per_pixel, measurement_scale), rule
