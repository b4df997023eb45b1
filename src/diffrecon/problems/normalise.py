"""Scan units <-> prior units: the only place where value ranges are converted.

image = scale * prior-image; measurements and noise levels are divided by the same scale
(every operator here is linear and offset-free).

* MRI: scale = reference_level(|zero-filled SENSE image of the slice|) / the prior's
  ``intensity_reference`` (its declaration: the same statistic on its training images, in
  prior units), so the scan's bright tissue lands where the prior's training images had it.
  A prior that declares nothing gets ``FALLBACK_REFERENCE``.
* CT and image scans: a fixed scale, the file's ``intensity_scale`` attribute (image units
  per prior unit; default 1: those layouts store attenuation per pixel, resp. intensities,
  already in [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffrecon.errors import InputError

# Intensity reference of a prior that declares none: the reference level of the MR phantoms
# that the first shipped MRI prior (phantom-mri) was trained on.
FALLBACK_REFERENCE = 0.9


@dataclass(frozen=True)
class Normaliser:
    """image = scale * prior_image; ``scale`` in image units per prior unit."""

    scale: float

    def to_prior(self, v):
        """Image, measurement or noise level (data units) -> prior units."""
        return v / self.scale

    def from_prior(self, v):
        """Prior units -> data units (images, std, samples)."""
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


def mri_normaliser(zero_filled_magnitude, prior=None) -> tuple[Normaliser, str]:
    """Scale putting the reference level of the zero-filled SENSE magnitude at the prior's
    intensity reference; with the rule as provenance text."""
    reference = intensity_reference(prior)
    level = reference_level(zero_filled_magnitude)
    rule = f"scale = p99(|zero-filled SENSE image|) / {reference}"
    return Normaliser(level / reference if level > 0 else 1.0), rule


def fixed_normaliser(attrs: dict[str, Any], path) -> tuple[Normaliser, str]:
    """CT / image scans: the documented fixed scale ``intensity_scale`` (default 1)."""
    scale = attrs.get("intensity_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not (
            math.isfinite(scale) and scale > 0):
        raise InputError(f"{path}: attribute 'intensity_scale' is {scale!r}, expected a "
                         f"positive number")
    return Normaliser(float(scale)), "scale = attribute intensity_scale (default 1)"
