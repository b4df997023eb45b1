"""Readout cropping of oversampled k-space (operators/readout.py) against the installed
``fastmri`` package's own transforms (ifft2c, complex_center_crop, fft2c, rss)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrecon.operators.readout import crop_readout

fastmri = pytest.importorskip("fastmri")
from fastmri.data import transforms as T  # noqa: E402


def _kspace(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


@pytest.mark.parametrize("kx, width", [(64, 32), (40, 40), (66, 31), (37, 20)])
def test_matches_fastmri_transforms(kx, width):
    k = _kspace((2, 4, kx, 24))
    got = crop_readout(k, width)
    assert got.shape == (2, 4, width, 24) and got.dtype == np.complex64
    image = T.complex_center_crop(fastmri.ifft2c(T.to_tensor(k)), (width, 24))
    want = fastmri.fft2c(image)  # fastMRI's k-space of the cropped field of view
    scale = float(want.abs().max())
    np.testing.assert_allclose(T.to_tensor(got).numpy(), want.numpy(), rtol=0,
                               atol=2e-6 * scale)
    # ... and the reconstruction_rss scale: RSS over coils of the cropped coil images
    ours = np.sqrt(np.sum(np.abs(np.fft.fftshift(np.fft.ifft2(
        np.fft.ifftshift(got, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))) ** 2, 1))
    ref = fastmri.rss(fastmri.complex_abs(image), dim=1).numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6 * ref.max())


def test_column_mask_and_noise_are_preserved():
    k = _kspace((3, 80, 32), seed=1)
    mask = np.zeros(32, bool)
    mask[::4] = True
    mask[14:18] = True
    got = crop_readout(k * mask, 40)
    assert np.all(got[..., ~mask] == 0)  # unsampled lines stay exactly zero
    np.testing.assert_allclose(got[..., mask], crop_readout(k, 40)[..., mask], rtol=0,
                               atol=1e-5)
    # white noise stays white with the same std (F unitary, crop of orthonormal samples)
    noise = crop_readout(_kspace((16, 256, 64), seed=2) / np.sqrt(2), 128)
    assert noise.real.std() == pytest.approx(0.5 ** 0.5, rel=0.02)
    assert noise.imag.std() == pytest.approx(0.5 ** 0.5, rel=0.02)


def test_torch_matches_numpy_and_validation():
    k = _kspace((4, 48, 20), seed=3)
    t = crop_readout(torch.from_numpy(k), 24)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.complex64
    want = crop_readout(k, 24)
    np.testing.assert_allclose(t.numpy(), want, rtol=0, atol=2e-6 * np.abs(want).max())
    assert crop_readout(k, 48) is k
    for bad in (0, 49, 2.5, True):
        with pytest.raises(ValueError, match="width"):
            crop_readout(k, bad)
    with pytest.raises(ValueError, match="complex"):
        crop_readout(k.real, 24)
