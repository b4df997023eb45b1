"""Coil sensitivity maps and coil compression: simulated birdcage maps and ESPIRiT
estimation (both sigpy; ESPIRiT optionally on a coarse grid and interpolated), SVD coil
compression, and root-sum-of-squares combination.

k-space is centred (the orthonormal centred DFT of the coil images, fastMRI convention),
coils on axis -3: (C, H, W) for one slice, (S, C, H, W) for S slices.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


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
        raise ValueError(f"birdcage_maps: need n_coils >= 1 and a positive size, got "
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


def espirit_params(shape, *, mask=None, calib_width: int = 24, kernel_width: int = 6,
                   threshold: float = 0.02, crop: float = 0.95, max_iter: int = 100,
                   grid: int | str | None = None) -> dict:
    """The resolved ESPIRiT calibration parameters for k-space of size ``shape`` (..., H, W),
    as a JSON-ready dict; :func:`estimate_coil_maps` computes exactly these and returns them,
    so a coil-map cache can be keyed on this dict (plus the input's checksum and the coil
    compression settings) before any computation.

    ``calib_width``: side of the centred calibration square, shrunk to the fully sampled
    centre of ``mask`` ((W,) or (H, W)) when one is given; ``kernel_width``: ESPIRiT kernel
    side; ``threshold``: kernels kept where the calibration singular value exceeds
    ``threshold`` times the largest; ``crop``: maps are zero where the top eigenvalue of the
    image-space kernel operator is <= ``crop`` (1 inside the object); ``max_iter``: power
    iterations per pixel. ``grid``: None (maps computed on the full H x W grid), an int g
    (computed on the centred min(g, H) x min(g, W) k-space crop, at least ``calib_width``,
    then interpolated, see :func:`estimate_coil_maps`) or ``"auto"`` (g = ``AUTO_GRID``).
    Raises ``ValueError`` if the calibration square is narrower than ``kernel_width``.
    """
    import sigpy as sp

    h, w = (int(s) for s in tuple(shape)[-2:])
    width = min(int(calib_width), h, w)
    if mask is not None:
        width = calibration_width(mask, (h, w), width)
    if width < kernel_width:
        raise ValueError(f"estimate_coil_maps: the fully sampled k-space centre is {width} "
                         f"wide, fewer than kernel_width={kernel_width}.")
    if grid is not None:
        g = AUTO_GRID if grid == "auto" else grid
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
            raise ValueError(f"estimate_coil_maps: grid must be None, 'auto' or a positive "
                             f"integer, got {grid!r}.")
        g = max(int(g), width)
        grid = [min(g, h), min(g, w)]
        if grid == [h, w]:
            grid = None
    return {"method": "espirit", "implementation": f"sigpy {sp.__version__} EspiritCalib",
            "calib_width": int(width), "kernel_width": int(kernel_width),
            "threshold": float(threshold), "crop": float(crop), "max_iter": int(max_iter),
            "grid": grid, "interpolation": None if grid is None else "periodic cubic (Keys)"}


AUTO_GRID = 48  # coarse ESPIRiT grid side for grid="auto" (see estimate_coil_maps)


def estimate_coil_maps(kspace, calib_width: int = 24, kernel_width: int = 6,
                       threshold: float = 0.02, crop: float = 0.95, device=None, *,
                       mask=None, max_iter: int = 100,
                       grid: int | str | None = None) -> tuple[np.ndarray, dict]:
    """ESPIRiT maps (Uecker et al. 2014) from centred complex k-space via
    ``sigpy.mri.app.EspiritCalib``.

    ``kspace`` (C, H, W), or (S, C, H, W) for S slices calibrated one by one. Returns
    complex64 maps of the same shape (unit norm over coils, zero where the top eigenvalue is
    <= ``crop``, phase relative to coil 0 as sigpy sets it) and :func:`espirit_params` (the
    parameters, for provenance and cache keys). ``device``: None / -1 for CPU or a sigpy
    device id (GPU needs cupy).

    ``grid`` (None = full resolution): the maps and the top eigenvalue are computed on the
    centred g x g crop of k-space, i.e. the same field of view sampled on a coarse g x g grid
    (sigpy's image-space kernel operator is a trigonometric polynomial of the kernel width
    whose scale does not depend on the grid, so the coarse maps and eigenvalues are samples
    of the full-resolution ones), then interpolated to H x W with a periodic cubic (Keys)
    kernel on the centred-DFT pixel positions; the eigenvalue is thresholded at ``crop``
    AFTER interpolation and the maps are renormalised to unit norm. Maps are smooth, so g of
    a few times the kernel width suffices; the cost no longer grows with H x W.
    """
    import sigpy as sp
    from sigpy.mri.app import EspiritCalib

    if isinstance(kspace, torch.Tensor):
        kspace = kspace.detach().cpu().numpy()
    k = np.asarray(kspace)
    if not np.iscomplexobj(k) or k.ndim not in (3, 4):
        raise ValueError(f"estimate_coil_maps: kspace must be complex (C, H, W) or "
                         f"(S, C, H, W), got {k.dtype} {k.shape}.")
    params = espirit_params(k.shape, mask=mask, calib_width=calib_width,
                            kernel_width=kernel_width, threshold=threshold, crop=crop,
                            max_iter=max_iter, grid=grid)
    dev = sp.Device(-1 if device is None else device)
    h, w = k.shape[-2:]

    def calibrate(ks: np.ndarray) -> np.ndarray:
        coarse = params["grid"] is not None
        if coarse:
            ks = _centre_crop(ks, params["grid"])
        out = EspiritCalib(ks.astype(np.complex64), calib_width=params["calib_width"],
                           thresh=threshold, kernel_width=kernel_width,
                           crop=-1.0 if coarse else crop, max_iter=max_iter, device=dev,
                           output_eigenvalue=coarse, show_pbar=False).run()
        if not coarse:
            return sp.to_device(out, sp.cpu_device)
        maps, eig = (np.asarray(sp.to_device(a, sp.cpu_device)) for a in out)
        mh, mw = _cubic_matrix(params["grid"][0], h), _cubic_matrix(params["grid"][1], w)
        eig = mh @ np.real(eig).reshape(maps.shape[-2:]) @ mw.T
        maps = mh @ maps.astype(np.complex128) @ mw.T
        norm = rss(maps, 0)
        return np.where(eig > crop, maps / np.maximum(norm, 1e-30), 0)

    slices = k[None] if k.ndim == 3 else k
    maps = np.stack([calibrate(ks) for ks in slices]).astype(np.complex64)
    return (maps[0] if k.ndim == 3 else maps), params


def _centre_crop(x, size):
    """Centred crop of the last two axes of a numpy array or tensor to ``size`` (sigpy
    ``resize`` convention: start n // 2 - s // 2)."""
    (h, w), (sh, sw) = x.shape[-2:], size
    r0, c0 = h // 2 - sh // 2, w // 2 - sw // 2
    return x[..., r0:r0 + sh, c0:c0 + sw]


def _cubic_matrix(g: int, n: int) -> np.ndarray:
    """(n, g) periodic cubic-convolution (Keys 1981, a = -0.5) interpolation from a g-point to
    an n-point centred-DFT grid of the same field of view: fine pixel j sits at coarse
    position g // 2 + (j - n // 2) * g / n."""
    p = g // 2 + (np.arange(n) - n // 2) * (g / n)
    i0 = np.floor(p).astype(int)
    t = p - i0
    m = np.zeros((n, g))
    for off in (-1, 0, 1, 2):
        d = np.abs(t - off)
        wgt = np.where(d <= 1, 1.5 * d**3 - 2.5 * d**2 + 1,
                       np.where(d < 2, -0.5 * d**3 + 2.5 * d**2 - 4 * d + 2, 0.0))
        np.add.at(m, (np.arange(n), (i0 + off) % g), wgt)
    return m


class CoilCompression(NamedTuple):
    """Result of :func:`compress_coils` (input's array type, device and dtype)."""

    kspace: np.ndarray | torch.Tensor  # (K, H, W) or (S, K, H, W) virtual-coil k-space
    matrix: np.ndarray | torch.Tensor  # (K, C) or (S, K, C): virtual = matrix @ physical
    energy: np.ndarray | torch.Tensor  # () or (S,): fraction of the samples' energy kept


def compress_coils(kspace, n_coils: int | str = "auto", *, energy: float = 0.999,
                   min_coils: int = 1, calib_width: int | None = None) -> CoilCompression:
    """SVD (PCA) coil compression (Buehrer et al. 2007, Huang et al. 2008): the C physical
    coils are projected on the K leading left singular vectors of the C x samples matrix.

    ``kspace``: complex (C, H, W) or (S, C, H, W), numpy or torch on any device; each slice
    gets its own matrix, all with the same K. Samples: the whole k-space (unsampled zeros add
    nothing, so these are the acquired samples) or, with ``calib_width``, the centred
    ``calib_width`` x ``calib_width`` square (sigpy ``resize`` crop, ESPIRiT's calibration
    region). ``n_coils``: K, or ``"auto"``: the smallest K that keeps at least ``energy``
    (fraction of sum |k|^2 over the samples) on every slice, and at least ``min_coils``
    (capped at C). The energy is dominated by the k-space centre, so SENSE needs a margin:
    on a 16-coil birdcage 640 x 320 4x slice (benchmarks/realsize.py) 2 virtual coils keep
    99.88% but raise the CG-SENSE error from 0.044 to 0.051, 3 coils (99.98%) match all 16;
    keep K well above the acceleration (e.g. ``min_coils=8``). The rows of ``matrix`` are
    orthonormal (matrix @ matrix^H = I_K), so white coil noise of std sigma stays white with
    std sigma, K = C is a lossless unitary change of coil basis, and ``apply_coil_matrix``
    compresses coil maps or coil images the same way. The phase of each row is fixed (its
    largest-magnitude entry real positive), so results are reproducible. Computed in
    complex128 (C x C covariance and its eigendecomposition); output in the input's dtype.
    """
    is_numpy = not isinstance(kspace, torch.Tensor)
    k = torch.from_numpy(np.asarray(kspace)) if is_numpy else kspace
    if not k.is_complex() or k.ndim not in (3, 4):
        raise ValueError(f"compress_coils: kspace must be complex (C, H, W) or (S, C, H, W), "
                         f"got {k.dtype} {tuple(k.shape)}.")
    if not 0 < energy <= 1:
        raise ValueError(f"compress_coils: energy must be in (0, 1], got {energy!r}.")
    batch = k if k.ndim == 4 else k[None]
    s, c, h, w = batch.shape
    region = batch if calib_width is None else _centre_crop(
        batch, (min(int(calib_width), h), min(int(calib_width), w)))
    x = region.reshape(s, c, -1).to(torch.complex128)
    evals, evecs = torch.linalg.eigh(x @ x.conj().transpose(-1, -2))  # ascending
    evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
    kept = evals.cumsum(-1) / evals.sum(-1, keepdim=True).clamp_min(torch.finfo(
        torch.float64).tiny)
    if n_coils == "auto":
        n = max(int((kept < energy * (1 - 1e-12)).sum(-1).max()) + 1, min(int(min_coils), c))
    elif isinstance(n_coils, (int, np.integer)) and not isinstance(n_coils, bool):
        n = int(n_coils)
    else:
        raise TypeError(f"compress_coils: n_coils must be 'auto' or an integer, got "
                         f"{n_coils!r}.")
    if not 1 <= n <= c:
        raise ValueError(f"compress_coils: n_coils must be in [1, {c}] (the coil count), got "
                         f"{n_coils!r}.")
    v = evecs[..., :n]  # (S, C, K)
    top = v.gather(-2, v.abs().argmax(-2, keepdim=True))
    v = v * (top.conj() / top.abs().clamp_min(torch.finfo(torch.float64).tiny))
    mat = v.conj().transpose(-1, -2)  # (S, K, C)
    out = (mat @ batch.reshape(s, c, -1).to(torch.complex128)).reshape(s, n, h, w)
    out, mat, frac = out.to(k.dtype), mat.to(k.dtype), kept[:, n - 1]
    if k.ndim == 3:
        out, mat, frac = out[0], mat[0], frac[0]
    if is_numpy:
        out, mat, frac = out.numpy(), mat.numpy(), frac.numpy()
    return CoilCompression(out, mat, frac)


def apply_coil_matrix(x, matrix):
    """Apply a compression ``matrix`` (K, C) or (S, K, C) to coil-resolved data ``x``
    (C, H, W) or (S, C, H, W) (k-space, coil images or coil maps): sum_c matrix[k, c] x[c].
    numpy or torch (same type as ``x``)."""
    if isinstance(x, torch.Tensor):
        m = torch.as_tensor(matrix).to(device=x.device, dtype=x.dtype)
        return torch.einsum("...kc,...chw->...khw", m, x)
    return np.einsum("...kc,...chw->...khw", np.asarray(matrix), np.asarray(x))
