"""Scan simulation: ground-truth consistency, masks, noise levels, operator agreement,
determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrecon.datasets import (
    mask_seed_from_filename,
    read_ct_scan,
    read_image_scan,
    read_mri_scan,
    sha256_file,
    simulate_ct,
    simulate_image,
    simulate_mri,
)
from diffrecon.datasets.ct import tensor_to_sinogram
from diffrecon.datasets.simulate import MRI_SCALE
from diffrecon.errors import InputError
from diffrecon.operators.coils import rss
from diffrecon.operators.mri import fft2c, ifft2c, kspace_to_tensor


@pytest.fixture(scope="module")
def mri_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("mri")
    kw = dict(size=40, slices=2, coils=4, acceleration=4, noise=0.02, seed=3)
    full = read_mri_scan(simulate_mri(d / "full.h5", fully_sampled=True, **kw))
    under = read_mri_scan(simulate_mri(d / "under.h5", **kw))
    return full, under


def test_fully_sampled_rss_is_reconstruction_rss(mri_pair):
    full, _ = mri_pair
    assert full.mask is None and full.kspace.shape == (2, 4, 40, 40)
    got = rss(ifft2c(full.kspace.astype(np.complex128)), axis=1)
    np.testing.assert_allclose(got, full.rss, rtol=0, atol=1e-5 * full.rss.max())
    assert full.attrs["max"] == pytest.approx(float(full.rss.max()))
    # magnitudes at the documented scale (phantom max 1 -> MRI_SCALE)
    assert 0.8 * MRI_SCALE < np.abs(full.ground_truth).max() <= MRI_SCALE * 1.0001


def test_undersampled_kspace_is_masked_full_kspace(mri_pair):
    full, under = mri_pair
    assert under.mask.shape == (40,) and under.mask.dtype == bool
    off = under.kspace[..., ~under.mask]
    assert off.size > 0 and np.all(off == 0)
    np.testing.assert_array_equal(under.kspace[..., under.mask], full.kspace[..., under.mask])
    np.testing.assert_array_equal(under.rss, full.rss)  # ground truth from full data
    assert under.attrs["acceleration"] == 4.0
    assert under.attrs["num_low_frequency"] == round(0.08 * 40)


def test_noise_level_and_noise_free_rss_equals_ground_truth_magnitude(tmp_path, mri_pair):
    full, _ = mri_pair
    clean = read_mri_scan(simulate_mri(tmp_path / "c.h5", size=40, slices=2, coils=4,
                                       noise=0.0, seed=3, fully_sampled=True))
    # normalised birdcage maps: RSS of the clean coil images is |x| exactly
    np.testing.assert_allclose(clean.rss, np.abs(clean.ground_truth), rtol=0,
                               atol=1e-5 * MRI_SCALE)
    diff = (full.kspace - clean.kspace).astype(np.complex128)
    sigma = 0.02 * MRI_SCALE
    assert full.attrs["noise_sigma"] == pytest.approx(sigma)
    assert diff.real.std() == pytest.approx(sigma, rel=0.05)
    assert diff.imag.std() == pytest.approx(sigma, rel=0.05)
    np.testing.assert_array_equal(full.ground_truth, clean.ground_truth)


def test_kspace_matches_mri_operator(tmp_path):
    from diffrecon.operators.mri import mri, tensor_to_kspace

    scan = read_mri_scan(simulate_mri(tmp_path / "m.h5", size=32, slices=1, coils=3,
                                      seed=1, with_coil_maps=True))
    physics = mri(scan.mask, scan.coil_maps[0])
    y = physics.A(kspace_to_tensor(scan.ground_truth))
    np.testing.assert_allclose(tensor_to_kspace(y), scan.kspace, rtol=0,
                               atol=1e-5 * np.abs(scan.kspace).max())
    # the scan's own helpers build the same operator and measurement
    torch.testing.assert_close(scan.physics().A(kspace_to_tensor(scan.ground_truth)), y)
    torch.testing.assert_close(scan.measurement(), kspace_to_tensor(scan.kspace))
    # and the centred FFT helpers are each other's inverse
    np.testing.assert_allclose(ifft2c(fft2c(scan.ground_truth)), scan.ground_truth,
                               atol=1e-6 * MRI_SCALE)


@pytest.mark.parametrize("mask_type", ["equispaced", "equispaced_fraction", "poisson"])
def test_mask_has_requested_acceleration(tmp_path, mask_type):
    size = 96 if mask_type != "poisson" else 64
    scan = read_mri_scan(simulate_mri(tmp_path / "m.h5", size=size, slices=1, coils=1,
                                      acceleration=4, mask_type=mask_type, seed=2))
    assert scan.kspace.shape == (1, size, size)  # single coil layout
    mask2d = np.broadcast_to(scan.mask, (size, size))
    assert np.all(scan.kspace[..., ~mask2d] == 0)
    centre = size // 2
    assert mask2d[centre, centre - 1:centre + 2].all()  # calibration lines
    if mask_type == "equispaced":
        # fastMRI EquiSpacedMaskFunc: every 4th line PLUS the round(0.08 W) centre lines
        n_low = round(0.08 * size)
        low = np.zeros(size, bool)
        low[(size - n_low + 1) // 2:][:n_low] = True
        outer = np.flatnonzero(scan.mask & ~low)
        assert np.unique(outer % 4).size == 1
        lines = set(range(outer[0] % 4, size, 4)) | set(np.flatnonzero(low))
        assert scan.mask.sum() == len(lines)
    else:  # exact (fraction) or within sigpy's 10 % (Poisson)
        assert scan.acceleration == pytest.approx(4.0, rel=0.1)


def test_fastmri_random_mask_acceleration_over_seeds(tmp_path):
    accs = [read_mri_scan(simulate_mri(tmp_path / f"m{s}.h5", size=64, slices=1, coils=1,
                                       acceleration=4, seed=s)).acceleration for s in range(6)]
    assert np.mean([1 / a for a in accs]) == pytest.approx(0.25, abs=0.03)
    assert len({round(a, 6) for a in accs}) > 1  # seeds change the mask


def test_fully_sampled_file_needs_mask_seeded_from_name(tmp_path):
    from diffrecon.operators.masks import fastmri_mask

    assert mask_seed_from_filename("/data/knee/file1000.h5") == tuple(map(ord, "file1000.h5"))
    scan = read_mri_scan(simulate_mri(tmp_path / "file1000.h5", size=32, slices=1, coils=1,
                                      fully_sampled=True))
    with pytest.raises(InputError, match="file1000.h5.*'mask'"):
        scan.physics()
    mask = fastmri_mask((32, 32), [0.08], [4], seed=mask_seed_from_filename(scan.path))
    y = scan.measurement(mask=mask)
    assert torch.all(y[..., ~torch.from_numpy(mask)] == 0)
    torch.testing.assert_close(scan.physics(mask=mask).A(kspace_to_tensor(scan.ground_truth)),
                               y, atol=1e-5 * MRI_SCALE, rtol=0)


def test_ct_sinogram_is_operator_applied_to_ground_truth(tmp_path):
    clean = read_ct_scan(simulate_ct(tmp_path / "c.h5", size=32, slices=2, views=12, seed=4))
    assert clean.sinogram.shape == (2, 12, clean.attrs["n_detectors"])
    np.testing.assert_allclose(clean.angles, np.arange(12) * np.pi / 12)
    physics = clean.physics()
    with torch.no_grad():
        y = tensor_to_sinogram(physics.A(torch.from_numpy(clean.ground_truth)[:, None]))
    np.testing.assert_allclose(y, clean.sinogram, rtol=0, atol=1e-6 * clean.sinogram.max())
    torch.testing.assert_close(clean.measurement(), torch.from_numpy(y).mT[:, None])

    noisy = read_ct_scan(simulate_ct(tmp_path / "n.h5", size=32, slices=2, views=12, seed=4,
                                     noise=0.05, n_detectors=48))
    assert noisy.sinogram.shape[-1] == 48 and noisy.physics().n_detectors == 48
    sigma = 0.05 * clean.sinogram.max()
    assert noisy.noise_sigma == pytest.approx(sigma, rel=1e-5)
    clean48 = read_ct_scan(simulate_ct(tmp_path / "c48.h5", size=32, slices=2, views=12,
                                       seed=4, n_detectors=48))
    assert (noisy.sinogram - clean48.sinogram).std() == pytest.approx(sigma, rel=0.1)


@pytest.mark.parametrize("operator", ["blur", "superres", "inpaint"])
def test_image_measurement_is_physics_of_image(tmp_path, operator):
    scan = read_image_scan(simulate_image(tmp_path / "i.h5", operator=operator, size=32,
                                          slices=2, noise=0.0, seed=5, factor=2))
    with torch.no_grad():
        y = scan.physics().A(torch.from_numpy(scan.image)).numpy()
    np.testing.assert_allclose(y, scan.measurement, rtol=0, atol=1e-6)
    expect = (2, 1, 16, 16) if operator == "superres" else (2, 1, 32, 32)
    assert scan.measurement.shape == expect and scan.image.shape == (2, 1, 32, 32)
    assert 0 <= scan.image.min() and scan.image.max() == pytest.approx(1.0)

    noisy = read_image_scan(simulate_image(tmp_path / "n.h5", operator=operator, size=32,
                                           slices=2, noise=0.1, seed=5, factor=2))
    r = noisy.measurement - scan.measurement
    if operator == "inpaint":
        assert np.all(r[:, :, ~scan.mask] == 0)
        r = r[:, :, scan.mask]
    assert r.std() == pytest.approx(0.1, rel=0.15) and noisy.noise_sigma == 0.1


def test_simulators_are_deterministic(tmp_path):
    runs = {
        "mri": lambda p, s: simulate_mri(p, size=24, slices=2, coils=2, noise=0.1, seed=s),
        "ct": lambda p, s: simulate_ct(p, size=24, slices=1, views=8, noise=0.1, seed=s),
        "img": lambda p, s: simulate_image(p, size=24, slices=1, noise=0.1, seed=s),
    }
    for name, run in runs.items():
        a, b, c = (run(tmp_path / f"{name}{i}.h5", s) for i, s in enumerate((0, 0, 1)))
        assert sha256_file(a) == sha256_file(b), name  # byte-identical rerun
        assert sha256_file(a) != sha256_file(c), name
    m0, m1 = read_mri_scan(tmp_path / "mri0.h5"), read_mri_scan(tmp_path / "mri2.h5")
    assert not np.array_equal(m0.ground_truth, m1.ground_truth)  # new seed, new anatomy
    assert not np.array_equal(m0.ground_truth[0], m0.ground_truth[1])  # slices differ


def test_simulator_arguments_are_validated(tmp_path):
    with pytest.raises(InputError, match="mask_type"):
        simulate_mri(tmp_path / "x.h5", mask_type="spiral")
    with pytest.raises(InputError, match="noise"):
        simulate_ct(tmp_path / "x.h5", noise=-1.0)
    with pytest.raises(InputError, match="operator"):
        simulate_image(tmp_path / "x.h5", operator="warp")
    assert list(tmp_path.iterdir()) == []
