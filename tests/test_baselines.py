"""Classical baselines: zero-filled, CG-SENSE, FBP, L1-wavelet, TV."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrecon.datasets.phantoms import phantom
from diffrecon.operators import birdcage_maps, blur, ct, fastmri_mask, kspace_to_tensor, mri
from diffrecon.recon.baselines import (
    CGSolver,
    FBPSolver,
    L1WaveletSolver,
    TVSolver,
    ZeroFilledSolver,
    rss_zero_filled,
)

F64 = torch.float64


def magnitude_psnr(x, ref):
    """PSNR of |x| against |ref| for (1, 2, H, W) complex-as-2-channel images."""
    a = x[0].square().sum(0).sqrt()
    r = ref[0].square().sum(0).sqrt()
    return float(10 * torch.log10(r.max() ** 2 / ((a - r) ** 2).mean()))


def psnr(x, ref):
    return float(10 * torch.log10(ref.max() ** 2 / ((x - ref) ** 2).mean()))


@pytest.fixture(scope="module")
def mri_problem():
    """64 px val phantom, 8 normalised birdcage coils, fastMRI random 4x mask (8% centre)."""
    img = phantom("mri", 64, 0, "val")
    x = torch.stack([torch.from_numpy(img.real), torch.from_numpy(img.imag)])[None].to(F64)
    maps = birdcage_maps(8, 64)
    mask = fastmri_mask((64, 64), 0.08, 4, seed=0)
    phys = mri(mask, maps)
    return x, phys, phys.A(x), maps, mask


def test_zero_filled_is_adjoint(mri_problem):
    _, phys, y, _, _ = mri_problem
    rec = ZeroFilledSolver().solve(y, phys, None, num_samples=3)
    assert rec.samples.shape == (1, 1, 2, 64, 64)
    assert torch.equal(rec.mean, phys.A_adjoint(y))
    assert torch.equal(rec.std, torch.zeros_like(rec.mean))
    assert rec.info["iterations"] == 0 and rec.info["adjoint_applications"] == 1


def test_rss_zero_filled_matches_coil_images(mri_problem):
    """RSS of the centred inverse-DFT coil images; with normalised maps and full sampling it
    equals the magnitude image."""
    x, _, _, maps, mask = mri_problem
    full = mri(np.ones(64), maps)
    k = torch.view_as_complex(full.A(x).movedim(1, -1).contiguous())[0]  # (C, H, W)
    img = torch.view_as_complex(x[0].movedim(0, -1).contiguous())
    assert torch.allclose(rss_zero_filled(k), img.abs(), atol=1e-5)
    masked = rss_zero_filled(k.numpy(), mask)
    coil_images = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(
        k * torch.from_numpy(mask.astype(np.float64)), dim=(-2, -1)), norm="ortho"),
        dim=(-2, -1))
    assert torch.allclose(masked, coil_images.abs().square().sum(0).sqrt(), atol=1e-12)
    assert kspace_to_tensor(k.numpy()[None]).shape == (1, 2, 8, 64, 64)
    with pytest.raises(ValueError, match="rss_zero_filled"):
        rss_zero_filled(np.ones((8, 4, 4)))


def test_cg_sense_fully_sampled_is_exact(mri_problem):
    x, _, _, maps, _ = mri_problem
    phys = mri(np.ones(64), maps)
    rec = CGSolver(iters=10).solve(phys.A(x), phys)
    assert (rec.mean - x).abs().max() < 1e-6
    assert rec.info["iterations"] == 10


def test_undersampled_mri_ordering(mri_problem):
    """4x undersampled phantom: zero-filled < CG-SENSE < L1-wavelet and TV (PSNR on |x|).
    Iterations cut for speed (L1 150, TV 20). Measured on this fixture: 16.4, 20.9, 23.6,
    32.1 dB."""
    x, phys, y, _, _ = mri_problem
    zf = magnitude_psnr(ZeroFilledSolver().solve(y, phys).mean, x)
    cgs = magnitude_psnr(CGSolver().solve(y, phys).mean, x)
    l1 = magnitude_psnr(L1WaveletSolver(iters=150).solve(y, phys).mean, x)
    tv = magnitude_psnr(TVSolver(iters=20).solve(y, phys).mean, x)
    assert cgs > zf + 2.0
    assert l1 > cgs + 1.5
    assert tv > cgs + 5.0


def test_single_coil_tv_beats_zero_filled():
    """Single coil (deepinv MRI, unit coil map), 2x: A^T A is a projection, so CG-SENSE
    equals zero-filled; TV must add information (measured 28.4 vs 18.9 dB)."""
    img = phantom("mri", 32, 1, "val")
    x = torch.stack([torch.from_numpy(img.real), torch.from_numpy(img.imag)])[None].to(F64)
    phys = mri(fastmri_mask((32, 32), 0.16, 2, seed=1), img_size=(32, 32))
    y = phys.A(x)
    zf = magnitude_psnr(ZeroFilledSolver().solve(y, phys).mean, x)
    rec = TVSolver(iters=20).solve(y, phys)
    assert rec.mean.shape == x.shape and rec.mean.dtype == F64
    assert magnitude_psnr(rec.mean, x) > zf + 5.0


def test_fbp_beats_back_projection():
    x = torch.from_numpy(phantom("ellipses", 32, 0, "val"))[None, None]
    phys = ct(32, views=60)
    y = phys.A(x)
    bp = phys.A_adjoint(y)
    bp = bp * (bp * x).sum() / (bp * bp).sum()  # best scalar rescaling of the back-projection
    fbp = FBPSolver().solve(y, phys).mean
    assert fbp.shape == x.shape
    assert psnr(fbp, x) > psnr(bp, x) + 3.0


def test_fbp_rejects_non_ct_and_sparsity_rejects_non_mri():
    phys = blur("gaussian", width=1.0)
    y = torch.zeros(1, 1, 16, 16)
    with pytest.raises(TypeError, match="fbp"):
        FBPSolver().solve(y, phys)
    with pytest.raises(TypeError, match="l1-wavelet"):
        L1WaveletSolver().solve(y, phys)


def test_tv_on_deblurring_beats_measurement():
    """Non-MRI TV (FISTA + deepinv TV prox) on a piecewise-constant phantom, Gaussian blur
    (std 2 px) + 1% noise: measured 25.6 dB vs 24.1 dB for the blurred image."""
    x = torch.from_numpy(phantom("ellipses", 32, 0, "val")).to(F64)[None, None]
    phys = blur("gaussian", width=2.0, dtype=F64)
    y = phys.A(x) + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0),
                                       dtype=F64)
    rec = TVSolver(lam=1e-3, iters=30).solve(y, phys)
    assert psnr(rec.mean, x) > psnr(y, x) + 1.0
