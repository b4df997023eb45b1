"""2D parallel-beam CT: raw line integrals of the image (deepinv ``Tomography``, bilinear
ray sampling via ``grid_sample``) with the EXACT adjoint (autograd VJP of A) and filtered
back-projection (ramp filter) as ``A_dagger``.

Geometry and units: square (B, 1, N, N) images, pixel size 1, so a sinogram value is a line
integral in pixel lengths (a disc of radius r px projects to 2 r through its centre; multiply
by the physical pixel size for physical units). Rotation centre is pixel (N//2, N//2).
Sinogram (B, 1, n_detectors, views) (deepinv layout), detector spacing 1 px, default
n_detectors = ceil(sqrt(2) N) (the whole image seen at every angle). ``physics.angles`` holds
the view angles in radians.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from deepinv.physics import Tomography
from deepinv.physics.forward import adjoint_function

from diffrecon.errors import InputError
from diffrecon.operators._common import gaussian_noise, image_size, resolve_device


def default_detectors(n: int) -> int:
    """deepinv's detector count for an n x n image: ceil(sqrt(2) n) in float32 arithmetic."""
    return int((torch.ones(1).mul(2).sqrt() * n).ceil())


class _ParallelBeamCT(Tomography):
    """deepinv ``Tomography`` with radians ``angles``, a detector count, a cached exact
    adjoint keyed on (shape, device, dtype) and ``A_dagger = fbp``."""

    def __init__(self, angles_rad: torch.Tensor, n: int, n_detectors: int, angle_step: float,
                 dtype, device, noise_model):
        super().__init__(angles=angles_rad * (180.0 / math.pi), img_width=n, circle=False,
                         adjoint_via_backprop=True, normalize=False, dtype=dtype,
                         device=device, noise_model=noise_model)
        self.angles = angles_rad.to(device)  # replaces deepinv's degrees buffer
        self.n_detectors = n_detectors
        self.angle_step = angle_step
        self._pad = (n_detectors - default_detectors(n)) // 2
        self._adjoint_key, self._adjoint_fn = None, None

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        y = super().A(x)
        return F.pad(y, (0, 0, self._pad, self._pad)) if self._pad else y

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        key = (tuple(y.shape), y.device, y.dtype)
        if key != self._adjoint_key:
            shape = (y.shape[0], y.shape[1], self.img_width, self.img_width)
            self._adjoint_fn = adjoint_function(self.A, shape, device=y.device, dtype=y.dtype)
            self._adjoint_key = key
        return self._adjoint_fn(y)

    def fbp(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Filtered back-projection: A^T(ramp * y) * dtheta / 2 (Ram-Lak filter along the
        detector axis, zero-padded; dtheta the view spacing)."""
        return self.A_adjoint(self.iradon.filter(y)) * (self.angle_step / 2)

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fbp(y)


def ct(img_size, *, views: int | None = None, angles=None, angle_range: float = np.pi,
       n_detectors: int | None = None, noise_sigma: float = 0.0, device=None,
       dtype=torch.float32) -> Tomography:
    """Parallel-beam CT operator (a deepinv ``Tomography``) on (B, 1, N, N) images.

    ``img_size``: N, (N, N) or (1, N, N). Angles: ``views`` equally spaced in
    [0, ``angle_range``) radians (sparse view: views=30 over pi; limited angle:
    angle_range=pi/2), or explicit ``angles`` in radians; default 180 views over pi.
    ``n_detectors`` (default ceil(sqrt(2) N)) must differ from the default by an even number
    (centred crop / zero extension). ``A_dagger`` is FBP weighting each view by dtheta =
    angle_range / views, or (max - min) / (n - 1) for n explicit angles (the same value for
    equally spaced views).
    """
    if isinstance(img_size, (int, np.integer)):
        img_size = (int(img_size), int(img_size))
    _, h, w = image_size(img_size, "ct", channels=1)
    if h != w:
        raise InputError(f"ct: images must be square, got img_size {img_size!r}.")
    if views is not None and angles is not None:
        raise InputError("ct: give either views or angles, not both.")
    if angles is not None:
        angles = torch.as_tensor(np.asarray(angles, dtype=np.float64))
        if angles.ndim != 1 or angles.numel() == 0:
            raise InputError("ct: angles must be a non-empty 1D array of radians.")
        n = angles.numel()
        step = math.pi if n == 1 else float(angles.max() - angles.min()) / (n - 1)
    else:
        views = 180 if views is None else int(views)
        if views < 1 or not angle_range > 0:
            raise InputError(f"ct: need views >= 1 and angle_range > 0, got {views}, "
                             f"{angle_range}.")
        angles = torch.arange(views, dtype=torch.float64) * (angle_range / views)
        step = angle_range / views
    n_det = default_detectors(h) if n_detectors is None else int(n_detectors)
    if n_det < 1 or (n_det - default_detectors(h)) % 2:
        raise InputError(f"ct: n_detectors must be positive and differ from "
                         f"{default_detectors(h)} by an even number, got {n_detectors}.")
    return _ParallelBeamCT(angles, h, n_det, step, dtype, resolve_device(device),
                           gaussian_noise(noise_sigma, "ct"))
