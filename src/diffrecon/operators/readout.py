"""Readout (frequency-encoding) cropping of readout-oversampled Cartesian k-space.

fastMRI brain and knee files store k-space with the readout oversampled 2x (e.g. kx = 640
for a reconSpace of 320 x 320): the image field of view along x is twice the one of the
reference reconstruction, whose outer half is empty. :func:`crop_readout` removes it before
reconstruction, so the prior sees the reconSpace field of view (half the pixels):

    k_crop = F( crop_x( F^-1(k) ) )

with F the centred orthonormal 2D DFT (``operators.mri.fft2c`` / ``ifft2c``, fastMRI's
``fft2c`` / ``ifft2c``) and crop_x fastMRI's centre crop along x (start (kx - width) // 2).
So ``ifft2c(k_crop)`` equals fastMRI's ``complex_center_crop(ifft2c(k), (width, ky))``,
and the RSS of it is on the ``reconstruction_rss`` scale.

Why k-space and not hybrid (x, ky) space: the result is ordinary centred k-space of a
width x ky image, so the SENSE operator, the column mask (ky,), coil compression, ESPIRiT
and the noise level (F is unitary and the crop keeps a subset of orthonormal readout
samples: white noise of std sigma stays white with std sigma) all apply unchanged. The
extra transform along ky happens once per file (milliseconds); a hybrid-space operator
would save one 1D FFT per operator application, a few percent of a diffusion step.

Only the readout is cropped: the phase-encoding (ky) axis carries the undersampling, so a
reconSpace narrower than ky is a centre crop of the reconstructed image, not of k-space.
"""

from __future__ import annotations

import numpy as np
import torch

from diffrecon.operators.mri import fft2c, ifft2c


def crop_readout(kspace, width: int):
    """Crop the readout (axis -2, kx) of centred k-space (..., kx, ky) to ``width`` in image
    space: returns (..., width, ky) k-space of the centre ``width`` image rows, same array
    type (numpy or torch, any device) and dtype; unchanged if kx == width.

    Columns (ky lines) that are zero in every coil and readout sample stay exactly zero
    (the round trip through the ky transform would otherwise leave ~1e-8 residue on
    unsampled lines). The sampling pattern must be a column (ky) mask: the readout is
    fully sampled."""
    is_tensor = isinstance(kspace, torch.Tensor)
    k = kspace if is_tensor else np.asarray(kspace)
    if not (k.is_complex() if is_tensor else np.iscomplexobj(k)) or k.ndim < 2:
        raise ValueError(f"crop_readout: kspace must be complex (..., kx, ky), got "
                         f"{k.dtype} {tuple(k.shape)}.")
    kx = k.shape[-2]
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not (
            1 <= width <= kx):
        raise ValueError(f"crop_readout: width must be an integer in [1, {kx}] (the readout "
                         f"size kx), got {width!r}.")
    if width == kx:
        return kspace
    lead = tuple(range(k.ndim - 1))
    sampled = (k != 0).any(dim=lead) if is_tensor else np.any(k != 0, axis=lead)
    top = (kx - width) // 2
    out = fft2c(ifft2c(k)[..., top:top + width, :])
    return out * sampled if is_tensor else (out * sampled).astype(k.dtype, copy=False)
