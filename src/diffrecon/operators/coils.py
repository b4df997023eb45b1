"""Coil sensitivity maps: simulated birdcage maps and ESPIRiT estimation (both sigpy), and
root-sum-of-squares combination."""

from __future__ import annotations

import numpy as np
import torch

from diffrecon.errors import InputError


def rss(images, axis: int = 0):
    """Root-sum-of-squares sqrt(sum |x|^2) over ``axis`` (numpy or torch, real or complex)."""
    if isinstance(images, torch.Tensor):
        return images.abs().square().sum(axis).sqrt()
    return np.sqrt(np.sum(np.abs(np.asarray(images)) ** 2, axis=axis))


def birdcage_maps(n_coils: int, size, *, normalize: bool = True) -> np.ndarray:
    """Simulated birdcage coil maps, complex64 (n_coils, H, W), ``size`` int or (H, W)
    (``sigpy.mri.birdcage_maps``, radius 1.5). With ``normalize`` each pixel is divided by
    the RSS over coils, so sum_c |S_c|^2 = 1 everywhere (then the fully sampled SENSE
    operator is an isometry)."""
    from sigpy.mri import birdcage_maps as sp_birdcage

    h, w = (size, size) if np.isscalar(size) else size
    if n_coils < 1 or h < 1 or w < 1:
        raise InputError(f"birdcage_maps: need n_coils >= 1 and a positive size, got "
                         f"{n_coils}, {size}.")
    maps = sp_birdcage((int(n_coils), int(h), int(w)), dtype=np.complex128)
    if normalize:
        maps = maps / rss(maps, 0)
    return maps.astype(np.complex64)


def calibration_width(mask, shape: tuple[int, int], calib_width: int) -> int:
    """Largest s <= ``calib_width`` whose centred s x s k-space square (sigpy's ``resize``
    crop, start n // 2 - s // 2) is fully sampled by ``mask`` ((W,) or (H, W), broadcast to
    ``shape``)."""
    m = np.broadcast_to(np.asarray(mask).astype(bool), shape)
    for s in range(min(calib_width, *shape), 0, -1):
        r0, c0 = shape[0] // 2 - s // 2, shape[1] // 2 - s // 2
        if m[r0:r0 + s, c0:c0 + s].all():
            return s
    return 0


def estimate_coil_maps(kspace, calib_width: int = 24, kernel_width: int = 6,
                       threshold: float = 0.02, crop: float = 0.95, device=None, *,
                       mask=None, max_iter: int = 100) -> tuple[np.ndarray, dict]:
    """ESPIRiT maps (Uecker et al. 2014) from centred complex k-space via
    ``sigpy.mri.app.EspiritCalib``.

    ``kspace`` (C, H, W), or (S, C, H, W) for S slices calibrated one by one. Returns
    complex64 maps of the same shape (zero where the top eigenvalue is below ``crop``) and a
    dict of the calibration parameters for provenance. With ``mask`` ((W,) or (H, W)) the
    calibration square shrinks to the fully sampled centre if that is narrower than
    ``calib_width`` (recorded as ``calib_width``). ``device``: None / -1 for CPU or a sigpy
    device id (GPU needs cupy).
    """
    import sigpy as sp
    from sigpy.mri.app import EspiritCalib

    if isinstance(kspace, torch.Tensor):
        kspace = kspace.detach().cpu().numpy()
    k = np.asarray(kspace)
    if not np.iscomplexobj(k) or k.ndim not in (3, 4):
        raise InputError(f"estimate_coil_maps: kspace must be complex (C, H, W) or "
                         f"(S, C, H, W), got {k.dtype} {k.shape}.")
    width = min(int(calib_width), *k.shape[-2:])
    if mask is not None:
        width = calibration_width(mask, k.shape[-2:], width)
    if width < kernel_width:
        raise InputError(f"estimate_coil_maps: the fully sampled k-space centre is {width} "
                         f"wide, fewer than kernel_width={kernel_width}.")
    dev = sp.Device(-1 if device is None else device)
    slices = k[None] if k.ndim == 3 else k
    maps = np.stack([
        sp.to_device(EspiritCalib(ks.astype(np.complex64), calib_width=width,
                                  thresh=threshold, kernel_width=kernel_width, crop=crop,
                                  max_iter=max_iter, device=dev, show_pbar=False).run(),
                     sp.cpu_device)
        for ks in slices]).astype(np.complex64)
    params = {"method": "espirit", "implementation": f"sigpy {sp.__version__} EspiritCalib",
              "calib_width": int(width), "kernel_width": int(kernel_width),
              "threshold": float(threshold), "crop": float(crop), "max_iter": int(max_iter)}
    return (maps[0] if k.ndim == 3 else maps), params
