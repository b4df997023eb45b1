"""Slices of one volume solved together (``problems.Problem.stack``, solvers with
``row_noise``): the same results as slice by slice, per-slice coil maps and noise levels.

With an elementwise prior (no convolution) batching is exact: a DDS solve of the stacked
slices gives every slice bit for bit what its single-slice solve gives, so the stacked
operators, the per-row noise levels and the per-slice seeds are exactly the slices' own."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from diffrecon.datasets.simulate import simulate_ct, simulate_mri
from diffrecon.priors.base import Prior
from diffrecon.problems import load_problem
from diffrecon.recon import get_solver
from diffrecon.recon.common import noise_sigma
from diffrecon.recon.dds import DDSSolver

pytestmark = pytest.mark.usefixtures("one_thread")


class Elementwise(Prior):
    """Exact denoiser of x ~ N(0, s0^2 I) (no convolution: batch-invariant arithmetic)."""

    def __init__(self, channels=2, s0=0.5):
        super().__init__()
        self.name, self.channels, self.s0 = "elementwise", channels, s0
        self.data_range, self.sigma_min, self.sigma_max = (-1.0, 1.0), 0.01, 5.0

    def _denoise(self, x, sigma):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return x * self.s0 ** 2 / (self.s0 ** 2 + s ** 2)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    d = tmp_path_factory.mktemp("volumes")
    mri = simulate_mri(d / "mri.h5", size=32, slices=3, coils=4, acceleration=4,
                       center_fraction=0.16, noise=0.002, seed=5)
    with h5py.File(mri, "a") as f:  # ESPIRiT per slice: every slice gets its own maps
        if "coil_maps" in f:
            del f["coil_maps"]
    return {"mri": mri, "ct": simulate_ct(d / "ct.h5", size=32, slices=2, views=30, seed=6)}


def test_stacked_operator_is_the_slices_operators(volumes):
    problem = load_problem(volumes["mri"], Elementwise(), device="cpu")
    maps = [p.coil_maps for p in problem.physics]
    assert not torch.equal(maps[0], maps[1])  # per-slice coil maps ...
    levels = [noise_sigma(p) for p in problem.physics]
    assert len(set(levels)) == 3  # ... and per-slice noise levels (prior units)
    assert problem.batches([0, 1, 2], 2) == [[0, 1], [2]]
    y, phys = problem.stack([0, 1, 2])
    assert noise_sigma(phys, rows=True) == tuple(levels)
    with pytest.raises(ValueError, match="per-measurement"):
        noise_sigma(phys)
    x = torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    for j in range(3):
        assert torch.equal(y[j:j + 1], problem.measurements[j])
        assert torch.equal(phys.A(x)[j:j + 1], problem.physics[j].A(x[j:j + 1]))
        assert torch.equal(phys.A_adjoint(y)[j:j + 1], problem.physics[j].A_adjoint(y[j:j + 1]))


@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_dds_on_stacked_slices_is_the_single_slice_solves(volumes, modality):
    prior = Elementwise(channels=2 if modality == "mri" else 1)
    problem = load_problem(volumes[modality], prior, device="cpu")
    n = len(problem.slices)
    solver = DDSSolver(steps=5)
    y, phys = problem.stack(list(range(n)))
    both = solver.solve(y, phys, prior, num_samples=2, seed=[(4, k) for k in range(n)])
    for j in range(n):
        one = solver.solve(problem.measurements[j], problem.physics[j], prior, num_samples=2,
                           seed=[(4, j)])
        assert torch.equal(both.samples[:, j], one.samples[:, 0])
        np.testing.assert_equal(both.info["noise_chi"][j], one.info["noise_chi"][0])  # NaN:
        np.testing.assert_equal(both.info["residual"][j], one.info["residual"][0])  # noiseless
    assert both.info["nfe"] == 5
    with pytest.raises(ValueError, match="per-measurement"):  # solvers without row_noise
        get_solver("reddiff", steps=2).solve(y, phys, prior)
