"""CT scan -> Problem: the scan's operator, ``normalise.scan_normaliser`` (the file's
``intensity_scale``, else one scale per slice from its least-squares image) and the file's
noise level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffrecon.operators._common import with_noise_sigma
from diffrecon.recon.common import attach_data_image, data_image, fast_normal

from .normalise import scan_normaliser
from .problem import Problem


def load_ct(path, prior=None, slices=None, *, device="cpu") -> Problem:
    """The Problem of a CT scan; ``slices`` a sorted index list or None (all). Measurements
    are in the operator's layout (1, 1, detectors, angles)."""
    from diffrecon.datasets.ct import read_ct_scan

    scan = read_ct_scan(path, slices=slices)
    sel = list(range(scan.n_slices)) if slices is None else list(slices)
    physics = scan.physics(device=device, noise_sigma=0.0)
    raw = [torch.as_tensor(s.T.copy(), device=device)[None, None] for s in scan.sinogram]
    image_scale, sinogram_scale = scan.scales
    per_pixel = sinogram_scale / image_scale  # the pixel size for images in 1/mm, else 1
    norms, phys, ys, rule = [], [], [], ""
    for y in raw:
        norm, rule = scan_normaliser(scan.attrs, path, physics, y, prior, per_pixel)
        norms.append(norm)
        phys.append(with_noise_sigma(physics, norm.to_prior(scan.noise_sigma), "ct"))
        ys.append(norm.to_prior(y))
        if fast_normal(physics):  # DDS's x_d, computed once (the normaliser's, if it ran)
            attach_data_image(phys[-1], ys[-1], norm.to_prior(data_image(physics, y)))
    meta = {"views": int(scan.angles.size), "noise_sigma": scan.noise_sigma,
            "angle_range_deg": float(np.degrees(np.ptp(scan.angles)))}
    return Problem(Path(path), "ct", sel, ys, phys, norms, 1, rule, None, meta)
