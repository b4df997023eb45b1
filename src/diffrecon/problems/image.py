"""Image scan (deblurring, super-resolution, inpainting) -> Problem: the operator the file's
attributes describe, ``normalise.scan_normaliser`` and the file's noise level."""

from __future__ import annotations

from pathlib import Path

import torch

from diffrecon.operators._common import with_noise_sigma

from .normalise import scan_normaliser
from .problem import Problem


def load_image(path, prior=None, slices=None, *, device="cpu") -> Problem:
    """The Problem of an image scan; ``slices`` a sorted index list or None (all)."""
    from diffrecon.datasets.images import read_image_scan

    scan = read_image_scan(path, slices=slices)
    sel = list(range(scan.n_slices)) if slices is None else list(slices)
    physics = scan.physics(device=device, noise_sigma=0.0)
    raw = [torch.as_tensor(m, device=device)[None] for m in scan.measurement]
    norms, phys, ys, rule = [], [], [], ""
    for y in raw:
        norm, rule = scan_normaliser(scan.attrs, path, physics, y, prior)
        norms.append(norm)
        phys.append(with_noise_sigma(physics, norm.to_prior(scan.noise_sigma), "image"))
        ys.append(norm.to_prior(y))
    meta = {"operator": scan.operator, "noise_sigma": scan.noise_sigma,
            **{f"operator_{k}": v for k, v in scan.params.items()}}
    return Problem(Path(path), "image", sel, ys, phys, norms, scan.channels, rule, None, meta)
