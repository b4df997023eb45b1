"""Cartesian MRI (SENSE) forward model y = M F S x (deepinv ``MRI`` / ``MultiCoilMRI``).

Conventions (fastMRI, sigpy and deepinv agree): F is the centred orthonormal 2D DFT,
``fftshift(fft2(ifftshift(x), norm="ortho"))``, so the k-space centre is index (H//2, W//2)
and F is unitary. Images are (B, 2, H, W): channels (real, imag). k-space tensors are
(B, 2, H, W) single coil and (B, 2, C, H, W) multi-coil (real/imag on axis 1, then coils),
zero where the mask is 0; noise is added at sampled locations only. The mask is (W,)
(phase-encode columns, fastMRI) or (H, W); ``physics.mask`` is (1, 2, H, W) float32.
Single coil is a DecomposablePhysics, so A^T A = F^H M F, A^+ and the prox are closed form.
Multi-coil is ``SenseMRI``, deepinv's ``MultiCoilMRI`` with a fused normal operator.
"""

from __future__ import annotations

import numpy as np
import torch
from deepinv.physics import MRI, LinearPhysics, MultiCoilMRI

from diffrecon.operators._common import gaussian_noise, resolve_device


def _as_tensor(a, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    try:
        return torch.as_tensor(np.asarray(a))
    except (TypeError, ValueError):
        raise TypeError(f"mri: {name} must be an array, got {type(a).__name__}.") from None


def mri(mask, coil_maps=None, *, img_size=None, noise_sigma: float = 0.0,
        device=None) -> LinearPhysics:
    """SENSE operator on (B, 2, H, W) images.

    ``mask``: (W,) column mask or (H, W) mask (bool or 0/1). ``coil_maps``: None (single
    coil, y (B, 2, H, W)) or complex maps (C, H, W) / (B, C, H, W) (multi-coil, y (B, 2, C, H,
    W)). ``img_size`` ((H, W) or (2, H, W)) is needed only when neither a 2D mask nor coil maps
    give H. Returns deepinv ``MRI`` (single coil) or ``SenseMRI`` (a ``MultiCoilMRI``).
    """
    device = resolve_device(device)
    mask = _as_tensor(mask, "mask")
    if mask.ndim not in (1, 2):
        raise ValueError(f"mri: mask must be (W,) or (H, W), got shape {tuple(mask.shape)}.")
    if coil_maps is not None:
        coil_maps = _as_tensor(coil_maps, "coil_maps")
        if not coil_maps.is_complex() or coil_maps.ndim not in (3, 4):
            raise ValueError("mri: coil_maps must be complex (C, H, W) or (B, C, H, W), got "
                             f"{coil_maps.dtype} {tuple(coil_maps.shape)}.")
    sizes = {}
    if mask.ndim == 2:
        sizes["mask"] = tuple(mask.shape)
    if coil_maps is not None:
        sizes["coil_maps"] = tuple(coil_maps.shape[-2:])
    if img_size is not None:
        if len(img_size) not in (2, 3) or (len(img_size) == 3 and img_size[0] != 2):
            raise ValueError(f"mri: img_size must be (H, W) or (2, H, W), got {img_size!r}.")
        sizes["img_size"] = tuple(int(s) for s in img_size[-2:])
    if not sizes:
        raise ValueError("mri: a 1D mask needs img_size=(H, W) or coil_maps to give H.")
    hw = next(iter(sizes.values()))
    if any(s != hw for s in sizes.values()) or mask.shape[-1] != hw[1]:
        raise ValueError(f"mri: mask {tuple(mask.shape)}, coil_maps and img_size disagree on "
                         f"(H, W): {sizes}.")
    mask2d = mask.to(torch.float32).expand(hw).contiguous().to(device)
    noise = gaussian_noise(noise_sigma, "mri")
    if coil_maps is None:
        return MRI(mask=mask2d, img_size=(2, *hw), device=device, noise_model=noise)
    phys = SenseMRI(mask=mask2d, coil_maps=coil_maps.to(torch.complex64).to(device),
                    img_size=(2, *hw), device=device, noise_model=noise)
    phys._normal_parts()  # its one host sync here, at set-up, not in a solver's step loop
    return phys


class SenseMRI(MultiCoilMRI):
    """deepinv ``MultiCoilMRI`` (2D) with A^T A x = sum_c conj(S_c) F^H M F (S_c x) computed
    in one pass on complex tensors: the centring shifts of F and F^H cancel between the two
    transforms, so x is shifted once, the coil maps (and their conjugates) and the mask enter
    pre-shifted (computed once and kept until the maps or the mask change), and the sum over
    coils is shifted back once. With a column mask (the same for every row: the fastMRI
    phase-encode masks) F^H M F = F_W^H M F_W, because the transform along the readout H is
    unitary and commutes with the mask, so only 1D transforms along W are taken. The same
    values as deepinv's A_adjoint(A(x)) to float rounding (relative 1e-6 in float32, the FFTs
    round differently; tests/test_mri_normal.py) at about a third of its cost (320 x 320,
    8 coils). The solvers' data consistency (``recon.common.normal_operator``) uses it."""

    def _normal_parts(self):
        """(maps, conj(maps), mask, dims), shifted along ``dims`` ((-1,) for a column mask,
        else (-2, -1)); cached against the identity and version of the coil maps and mask
        (``update``, ``to`` and ``physics_in_dtype`` give new tensors: rebuilt, with one
        host sync for the column test)."""
        maps, mask = self.coil_maps, self.mask
        key = (maps, mask, maps._version, mask._version)
        cache = getattr(self, "_normal_cache", None)
        if cache is not None and cache[0][0] is maps and cache[0][1] is mask \
                and cache[0][2:] == key[2:]:
            return cache[1]
        m = mask[:, 0]  # (1 or B, H, W)
        columns = bool((m == m[:, :1]).all())  # one host sync, once per maps / mask
        dims = (-1,) if columns else (-2, -1)
        shifted = torch.fft.ifftshift(maps, dim=dims)
        m = m[:, :1] if columns else m
        parts = (shifted, shifted.conj().resolve_conj(),
                 torch.fft.ifftshift(m, dim=dims)[:, None], dims)
        self._normal_cache = (key, parts)
        return parts

    def A_adjoint_A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.three_d or kwargs:
            return super().A_adjoint_A(x, **kwargs)
        maps, maps_conj, mask, dims = self._normal_parts()  # (1 or B, C, H or 1, W) etc.
        u = torch.fft.ifftshift(torch.view_as_complex(x.movedim(1, -1).contiguous()), dim=dims)
        k = torch.fft.fftn(maps * u[:, None], dim=dims, norm="ortho") * mask
        v = (maps_conj * torch.fft.ifftn(k, dim=dims, norm="ortho")).sum(1)
        return torch.view_as_real(torch.fft.fftshift(v, dim=dims)).movedim(-1, 1).contiguous()


def kspace_to_tensor(kspace, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Complex k-space (B, ...) -> real tensor (B, 2, ...) (real/imag inserted at axis 1).

    fastMRI multi-coil ``kspace`` (slices, coils, kx, ky) -> (slices, 2, coils, kx, ky), the
    ``MultiCoilMRI`` layout; single-coil (slices, kx, ky) -> (slices, 2, kx, ky). Axis 0 is
    always the batch: pass ``k[None]`` for one multi-coil slice (C, H, W); a 2D (H, W) array
    gets a batch axis of 1. Works for images (B, H, W) -> (B, 2, H, W) too.
    """
    k = _as_tensor(kspace, "kspace")
    if not k.is_complex():
        raise ValueError(f"kspace_to_tensor: k-space must be complex, got {k.dtype}.")
    if k.ndim == 2:
        k = k[None]
    real = torch.view_as_real(k.resolve_conj()).movedim(-1, 1)
    return real.to(device=resolve_device(device), dtype=dtype).contiguous()


def tensor_to_kspace(y: torch.Tensor) -> np.ndarray:
    """Inverse of ``kspace_to_tensor``: real (B, 2, ...) -> complex64 numpy (B, ...)."""
    if y.ndim < 3 or y.shape[1] != 2:
        raise ValueError(f"tensor_to_kspace: expected (B, 2, ...), got {tuple(y.shape)}.")
    z = torch.view_as_complex(y.detach().to(torch.float32).movedim(1, -1).contiguous())
    return z.cpu().numpy()



def _centred(x, torch_fft, numpy_fft):
    """``fftshift(fft(ifftshift(x), norm="ortho"))`` over the last two axes, torch or numpy."""
    if isinstance(x, torch.Tensor):
        return torch.fft.fftshift(torch_fft(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"),
                                  dim=(-2, -1))
    return np.fft.fftshift(numpy_fft(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"),
                           axes=(-2, -1))


def fft2c(x):
    """Centred orthonormal 2D DFT over the last two axes (the F of the module docstring;
    fastMRI ``fft2c``): numpy array or torch tensor in, the same kind out."""
    return _centred(x, torch.fft.fft2, np.fft.fft2)


def ifft2c(k):
    """Inverse of :func:`fft2c` (fastMRI ``ifft2c``): numpy array or torch tensor."""
    return _centred(k, torch.fft.ifft2, np.fft.ifft2)
