"""The prior-fit statistic noise_chi = ||A x - y|| / (sigma sqrt(m)) (issue 15, section 4): its
closed-form value at the truth, and the warning of a run whose prior does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrecon import operators, pipeline
from diffrecon.datasets.io import read_result
from diffrecon.datasets.simulate import simulate_ct
from diffrecon.priors.base import Prior
from diffrecon.recon.common import noise_chi, relative_residual


def test_chi_at_the_truth_is_one_and_counts_only_sampled_entries():
    """chi^2 at the truth is chi^2_m / m: mean 1, sd sqrt(2/m). Masked k-space: the zero
    (unsampled) entries are not counted, so the same sigma gives the same chi."""
    g = torch.Generator().manual_seed(0)
    n = 64
    mask = torch.zeros(n, dtype=torch.bool)
    mask[::3] = True
    phys = operators.mri(mask, None, img_size=(n, n))
    x = torch.randn(4, 2, n, n, generator=g, dtype=torch.float64)
    y = phys.A(x)
    sigma = 0.05
    noisy = y + sigma * torch.randn(y.shape, generator=g, dtype=y.dtype) * (y != 0)
    chi = noise_chi(relative_residual(phys, x, noisy), noisy, sigma)
    m = int((noisy[0] != 0).sum())
    assert m == 2 * n * int(mask.sum())
    assert torch.allclose(chi, torch.ones(4, dtype=chi.dtype), atol=4 * (2 / m) ** 0.5), chi
    assert torch.allclose(noise_chi(relative_residual(phys, x, noisy), noisy, 2 * sigma), chi / 2)
    assert torch.isnan(noise_chi(relative_residual(phys, x, y), y, 0.0)).all()


class Flat(Prior):
    """A prior that believes every image is flat grey 0.5: D(x, sigma) = 0.5."""

    name, channels, data_range, sigma_min, sigma_max = "flat", 1, (0.0, 1.0), 0.01, 5.0

    def _denoise(self, x, sigma):
        return 0.5 + 0.0 * x  # (differentiable, for DPS)


def test_a_prior_that_does_not_fit_is_reported(tmp_path):
    scan = simulate_ct(tmp_path / "ct.h5", size=32, slices=2, views=30, noise=0.01, seed=4)
    good = pipeline.reconstruct_file(scan, tmp_path / "tv.h5", solver="tv", device="cpu",
                                     solver_options={"lam": 1e-4, "iters": 500})  # fits the data
    chi_tv = read_result(tmp_path / "tv.h5").attrs["noise_chi_per_slice"]
    assert good["warnings"] == [] and np.all((chi_tv > 0.3) & (chi_tv < 1.0)), chi_tv
    bad = pipeline.reconstruct_file(scan, tmp_path / "flat.h5", solver="dps", prior=Flat(),
                                    steps=10, device="cpu")
    chi = read_result(tmp_path / "flat.h5").attrs["noise_chi_per_slice"]
    assert np.all(chi > pipeline.run.MISFIT_WARN_CHI), chi
    assert len(bad["warnings"]) == 1 and "slices 0-1" in bad["warnings"][0], bad["warnings"]
    assert "noise_chi" in bad["warnings"][0]


@pytest.mark.parametrize("solver", ["dds", "tv"])
def test_info_shows_the_statistic(tmp_path, solver):
    from diffrecon.problems.info import describe_file

    scan = simulate_ct(tmp_path / "ct.h5", size=32, slices=1, views=30, noise=0.01, seed=5)
    kw = {"prior": Flat(), "steps": 3} if solver == "dds" else {}
    pipeline.reconstruct_file(scan, tmp_path / "r.h5", solver=solver, device="cpu", **kw)
    prov = describe_file(tmp_path / "r.h5")["provenance"]
    assert float(prov["noise_chi_per_slice"].strip("[]")) > 0


def test_pixels_the_coil_maps_do_not_see_are_zero(tmp_path):
    """Where every coil map vanishes (ESPIRiT's zero region: no signal) the data say nothing
    and only the prior would speak; the written images are zero there, and the data fit is
    the same (A ignores those pixels)."""
    import h5py

    from diffrecon.datasets.simulate import simulate_mri

    scan = simulate_mri(tmp_path / "mri.h5", size=32, slices=1, coils=4, acceleration=4,
                        center_fraction=0.16, noise=0.002, seed=1, with_coil_maps=True)
    with h5py.File(scan) as f:
        maps = f["coil_maps"][()] if "coil_maps" in f else None
    assert maps is not None
    maps[..., :6, :] = 0  # the top 6 rows: no coil sees them
    side = tmp_path / "maps.h5"
    with h5py.File(side, "w") as f:
        f["coil_maps"] = maps
    out = tmp_path / "r.h5"

    class Busy(Prior):  # a prior that paints 1 everywhere
        name, channels, data_range, sigma_min, sigma_max = "busy", 2, (-1.0, 1.0), 0.01, 5.0

        def _denoise(self, x, sigma):
            return 0.5 * x + 0.5

    pipeline.reconstruct_file(scan, out, solver="dds", prior=Busy(), steps=3, coil_maps=side,
                              device="cpu", save_samples=True)
    r = read_result(out)
    assert np.all(r.reconstruction[:, :6] == 0) and np.all(r.std[:, :6] == 0)
    assert np.all(r.samples[:, :, :6] == 0)
    assert np.abs(r.reconstruction[:, 6:]).min() > 0
