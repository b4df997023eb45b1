"""Image scan (deblurring, super-resolution, inpainting) -> Problem: the operator the file's
attributes describe, the fixed ``intensity_scale`` normalisation and the file's noise level."""

from __future__ import annotations

from pathlib import Path

import torch

from .normalise import fixed_normaliser
from .problem import Problem


def load_image(path, prior=None, slices=None, *, device="cpu") -> Problem:
    """The Problem of an image scan; ``slices`` a sorted index list or None (all)."""
    from diffrecon.datasets.images import read_image_scan

    scan = read_image_scan(path, slices=slices)
    sel = list(range(scan.n_slices)) if slices is None else list(slices)
    norm, rule = fixed_normaliser(scan.attrs, path)
    physics = scan.physics(device=device, noise_sigma=norm.to_prior(scan.noise_sigma))
    ys = [norm.to_prior(torch.as_tensor(m, device=device)[None]) for m in scan.measurement]
    meta = {"operator": scan.operator, "noise_sigma": scan.noise_sigma,
            **{f"operator_{k}": v for k, v in scan.params.items()}}
    return Problem(Path(path), "image", sel, ys, [physics] * len(sel), [norm] * len(sel),
                   scan.channels, rule, None, meta)
