"""Scan units <-> prior units (problems.normalise): scales checked against scans whose true
image, hence true scale, is known; the scans are made here with numpy / sigpy, not with
diffrecon's simulators."""

from __future__ import annotations

from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import sigpy.mri
import torch
from scipy.ndimage import gaussian_filter

from diffrecon import operators
from diffrecon.errors import InputError
from diffrecon.operators.mri import kspace_to_tensor
from diffrecon.problems import load_problem, normalise

N = 96


def textured_body(seed: int, peak: float) -> np.ndarray:
    """An ellipse of smooth random texture, values in [0.4, 1] * peak."""
    yy, xx = np.mgrid[:N, :N] / N - 0.5
    tex = gaussian_filter(np.random.default_rng(seed).standard_normal((N, N)), 3)
    tex = (tex - tex.min()) / np.ptp(tex)
    return (xx ** 2 / 0.16 + yy ** 2 / 0.2 < 1) * (0.4 + 0.6 * tex) * peak


def test_normaliser_units_and_declared_reference():
    n = normalise.Normaliser(2.5, 5.0)
    assert n.to_prior(10.0) == 2.0 and n.from_prior(2.0) == 5.0
    assert normalise.Normaliser(2.5).to_prior(5.0) == 2.0
    assert normalise.reference_level(np.linspace(0, 10, 1001)) == pytest.approx(9.9)
    assert normalise.scale_for_level(1.8, None) == pytest.approx(1.8 / normalise.FALLBACK_REFERENCE)
    declared = SimpleNamespace(intensity_reference=0.5)  # the prior's declaration wins
    assert normalise.scale_for_level(1.8, declared) == pytest.approx(3.6)
    assert normalise.scale_for_level(0.0, declared) == 1.0
    fixed, rule = normalise.scan_normaliser({"intensity_scale": 0.02}, "f", None, None, None, 0.5)
    assert (fixed.scale, fixed.measurement_scale) == (0.02, 0.01) and "attribute" in rule
    for bad in (-1.0, 0.0, float("nan"), "x", True):
        with pytest.raises(InputError, match="f: attribute 'intensity_scale'"):
            normalise.scan_normaliser({"intensity_scale": bad}, "f", None, None, None)


@pytest.mark.parametrize("acceleration", [4, 8])
def test_mri_scale_matches_the_known_image(acceleration):
    """8 birdcage coils, random 1D mask with 8% centre, smooth phase: the scale puts the true
    image's p99 at the prior's reference to 3% (3 images)."""
    maps = sigpy.mri.birdcage_maps((8, N, N))
    maps /= np.sqrt((abs(maps) ** 2).sum(0))
    yy, xx = np.mgrid[:N, :N] / N - 0.5
    prior = SimpleNamespace(intensity_reference=0.9)
    for seed in range(3):
        x = textured_body(seed, 3.7) * np.exp(2j * np.pi * (0.3 * xx + 0.2 * yy))
        mask = np.random.default_rng(seed).random(N) < 1 / acceleration
        mask[N // 2 - 4:N // 2 + 4] = True
        k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(maps * x, axes=(-2, -1)), norm="ortho"),
                            axes=(-2, -1)) * mask
        phys = operators.mri(torch.as_tensor(mask), torch.as_tensor(maps), img_size=(N, N))
        norm, rule = normalise.mri_normaliser(phys, kspace_to_tensor(k[None].astype(np.complex64)),
                                              prior)
        true_scale = normalise.reference_level(abs(x)) / 0.9
        assert norm.scale == pytest.approx(true_scale, rel=0.03), (seed, acceleration)
        assert "least-squares SENSE" in rule and rule.endswith("/ 0.9")


@pytest.mark.parametrize("views, tol", [(30, 0.015), (8, 0.05)])
def test_ct_scale_matches_the_known_image_in_either_unit(tmp_path, views, tol):
    """One CT scan written twice, in 1/pixel and in 1/mm (same dimensionless sinogram, pixel
    0.5 mm): the same measurements in prior units, images in each file's units, and the
    image's p99 at the prior's reference (within ``tol``)."""
    x = textured_body(0, 0.05)  # attenuation per pixel
    angles = np.linspace(0, np.pi, views, endpoint=False)
    sino = operators.ct(N, angles=angles).A(torch.as_tensor(x, dtype=torch.float32)[None, None])
    sino = sino[0, 0].T.numpy()[None]  # file layout (slices, angles, detectors)
    problems = {}
    for units in ("1/pixel", "1/mm"):
        path = tmp_path / f"ct_{units.replace('/', '_')}.h5"
        with h5py.File(path, "w") as f:
            f["sinogram"], f["angles"] = sino, angles
            f.attrs.update({"units": units, "pixel_size": 0.5, "image_size": N})
        problems[units] = load_problem(path, prior=None)
    pix, mm = problems["1/pixel"], problems["1/mm"]
    assert torch.equal(pix.measurements[0], mm.measurements[0])
    assert mm.normalisers[0].scale == pytest.approx(pix.normalisers[0].scale / 0.5)
    true_scale = normalise.reference_level(x) / normalise.FALLBACK_REFERENCE
    assert pix.normalisers[0].scale == pytest.approx(true_scale, rel=tol)
    assert "no intensity_scale attribute" in pix.normalisation
