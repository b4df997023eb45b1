"""Shift-invariant blur y = k * x (true convolution, deepinv ``Blur``) with a Gaussian,
linear-motion, uniform or user kernel, normalised to sum 1.

Boundaries: ``"circular"`` (periodic; closed-form normal A^T A = F^-1 |F k|^2 F),
``"reflect"`` (symmetric padding, output the image's size) and ``"valid"`` (no padding,
output smaller by kernel size - 1). Every mode's adjoint is the exact transpose (deepinv's
``conv_transpose2d`` folds the padding back). Signals (B, C, H, W); the same kernel blurs
every channel. Kernel centre: pixel (h // 2, w // 2) for odd sizes (deepinv convention).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from deepinv.physics import Blur
from deepinv.physics.functional import gaussian_blur

from diffrecon.operators._common import gaussian_noise, resolve_device

BOUNDARIES = ("circular", "reflect", "valid")
KERNELS = ("gaussian", "motion", "uniform")


class _CircularBlur(Blur):
    """deepinv ``Blur`` with periodic padding plus the closed-form normal operator."""

    def A_adjoint_A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        # A^T A is circular autocorrelation of k: its transfer function |F k|^2 does not
        # depend on where the kernel is centred, so zero-padding k to (H, W) suffices.
        h, w = x.shape[-2:]
        gain = torch.fft.rfft2(self.filter.to(x.dtype), s=(h, w)).abs().square()
        return torch.fft.irfft2(gain * torch.fft.rfft2(x), s=(h, w))


def gaussian_kernel(width: float, size: int | None = None, dtype=torch.float64) -> torch.Tensor:
    """Isotropic Gaussian, std ``width`` px, (size, size) (default 2 ceil(3 width) + 1), sum 1."""
    size = 2 * math.ceil(3 * width) + 1 if size is None else int(size)
    k = gaussian_blur(psf_size=(size, size), sigma=(float(width), float(width)), dtype=dtype)
    k = k.reshape(size, size)
    return k / k.sum()


def motion_kernel(length: float, angle: float = 0.0, size: int | None = None,
                  dtype=torch.float64) -> torch.Tensor:
    """Linear motion blur: a segment of ``length`` px through the centre at ``angle`` degrees
    (counter-clockwise from the column axis), rasterised by bilinear splatting of 4 points per
    pixel of length; (size, size), default the smallest odd size holding it; sum 1."""
    half = int(math.floor(length / 2)) + 1
    size = 2 * half + 1 if size is None else int(size)
    c = (size - 1) / 2
    t = np.linspace(-length / 2, length / 2, max(int(math.ceil(4 * length)), 1) + 1)
    a = math.radians(angle)
    rows, cols = c - t * math.sin(a), c + t * math.cos(a)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    fr, fc = rows - r0, cols - c0
    k = np.zeros((size + 1, size + 1))
    for dr, dc, wgt in ((0, 0, (1 - fr) * (1 - fc)), (1, 0, fr * (1 - fc)),
                        (0, 1, (1 - fr) * fc), (1, 1, fr * fc)):
        if (r0 + dr).min() < 0 or (c0 + dc).min() < 0:
            raise ValueError(f"blur: kernel size {size} is too small for motion length {length}.")
        np.add.at(k, (r0 + dr, c0 + dc), wgt)
    if k[size].any() or k[:, size].any():
        raise ValueError(f"blur: kernel size {size} is too small for motion length {length}.")
    k = torch.as_tensor(k[:size, :size], dtype=dtype)
    return k / k.sum()


def make_kernel(kernel="gaussian", *, width: float = 1.0, size: int | None = None,
                angle: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """The 2D blur kernel (h, w) that ``blur`` uses, normalised to sum 1."""
    if isinstance(kernel, (torch.Tensor, np.ndarray)):
        k = torch.as_tensor(kernel).to(torch.float64)
        if k.ndim != 2 or k.numel() == 0:
            raise ValueError(f"blur: a kernel array must be 2D, got shape {tuple(k.shape)}.")
    elif kernel == "gaussian":
        if not width > 0:
            raise ValueError(f"blur: gaussian width (std in px) must be > 0, got {width!r}.")
        k = gaussian_kernel(width, size)
    elif kernel == "motion":
        if not width >= 0:
            raise ValueError(f"blur: motion width (length in px) must be >= 0, got {width!r}.")
        k = motion_kernel(width, angle, size)
    elif kernel == "uniform":
        if width != int(width) or width < 1:
            raise ValueError(f"blur: uniform width must be a positive integer, got {width!r}.")
        k = torch.ones(int(width), int(width), dtype=torch.float64)
    else:
        raise ValueError(f"blur: unknown kernel {kernel!r}; valid: {', '.join(KERNELS)} "
                         "or a 2D array.")
    total = k.sum()
    if not torch.isfinite(total) or total == 0:
        raise ValueError("blur: kernel must have a finite non-zero sum.")
    return (k / total).to(dtype)


def blur(kernel="gaussian", *, width: float = 1.0, size: int | None = None, angle: float = 0.0,
         boundary: str = "circular", noise_sigma: float = 0.0, device=None,
         dtype=torch.float32) -> Blur:
    """Blur operator y = k * x + noise, a deepinv ``Blur`` (LinearPhysics).

    ``kernel``: "gaussian" (std ``width`` px), "motion" (length ``width`` px at ``angle``
    degrees), "uniform" (``width`` x ``width`` box) or a 2D array; ``size`` the kernel side
    (defaults per kind); ``boundary`` one of circular / reflect / valid. Signals (B, C, H, W)
    in ``dtype`` (the kernel's dtype; convert with ``.to(dtype)``).
    """
    if boundary not in BOUNDARIES:
        raise ValueError(f"blur: unknown boundary {boundary!r}; valid: {', '.join(BOUNDARIES)}.")
    k = make_kernel(kernel, width=width, size=size, angle=angle, dtype=dtype)
    cls = _CircularBlur if boundary == "circular" else Blur
    return cls(filter=k[None, None].to(resolve_device(device)), padding=boundary,
               noise_model=gaussian_noise(noise_sigma, "blur"), device=resolve_device(device))
