"""CT scan -> Problem: the scan's parallel-beam operator, the fixed ``intensity_scale``
normalisation and the file's noise level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .normalise import fixed_normaliser
from .problem import Problem


def load_ct(path, prior=None, slices=None, *, device="cpu") -> Problem:
    """The Problem of a CT scan; ``slices`` a sorted index list or None (all). Measurements
    are in the operator's layout (1, 1, detectors, angles)."""
    from diffrecon.datasets.ct import read_ct_scan

    scan = read_ct_scan(path, slices=slices)
    sel = list(range(scan.n_slices)) if slices is None else list(slices)
    norm, rule = fixed_normaliser(scan.attrs, path)
    physics = scan.physics(device=device, noise_sigma=norm.to_prior(scan.noise_sigma))
    ys = [norm.to_prior(torch.as_tensor(s.T.copy(), device=device)[None, None])
          for s in scan.sinogram]
    meta = {"views": int(scan.angles.size), "noise_sigma": scan.noise_sigma,
            "angle_range_deg": float(np.degrees(np.ptp(scan.angles)))}
    return Problem(Path(path), "ct", sel, ys, [physics] * len(sel), [norm] * len(sel), 1, rule,
                   None, meta)
