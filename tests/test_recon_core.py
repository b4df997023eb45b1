"""Shared solver pieces: schedules, CG, DDIM fresh-noise fraction, per-row streams,
Reconstruction statistics, registry errors."""

import math

import pytest
import torch

from diffrecon.recon import DIFFUSION_SOLVERS, SOLVERS, get_solver, schedules
from diffrecon.recon.common import (
    RowNoise,
    cg,
    ddim_fresh_fraction,
    effective_sample_size,
    make_generators,
    renoise,
)
from diffrecon.recon.reconstruction import Reconstruction

F64 = torch.float64


def test_karras_endpoints_and_monotone():
    s = schedules.karras(10, sigma_min=0.01, sigma_max=50.0)
    assert s.shape == (11,) and s.dtype == F64
    assert math.isclose(float(s[0]), 50.0, rel_tol=1e-12)
    assert math.isclose(float(s[9]), 0.01, rel_tol=1e-12)
    assert float(s[-1]) == 0.0 and bool((s[:-1] > s[1:]).all())


def test_vp_discrete_matches_training_chain():
    betas = schedules.vp_betas(1000)
    abar = torch.cumprod(1 - betas, 0)
    s = schedules.vp_discrete(50)
    assert math.isclose(float(s[0]), float(((1 - abar[-1]) / abar[-1]).sqrt()), rel_tol=1e-12)
    assert math.isclose(float(s[-2]), float(((1 - abar[0]) / abar[0]).sqrt()), rel_tol=1e-12)
    # a_t from sigma recovers sqrt(abar)
    torch.testing.assert_close(schedules.vp_alpha(s[:-1]), abar.sqrt().flip(0)[
        torch.linspace(0, 999, 50, dtype=F64).round().long()])


def test_unknown_schedule_and_solver_list_valid_names():
    with pytest.raises(ValueError, match="valid: geometric, karras, vp"):
        schedules.get_schedule("cosine-ish", 10)
    with pytest.raises(ValueError, match="valid: dps, reddiff, dds"):
        get_solver("ddpm")
    with pytest.raises(ValueError, match="unknown option"):
        get_solver("dds", stepz=3)


def test_cg_solves_batched_spd_and_stays_finite_after_convergence():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 6, 6, generator=g, dtype=F64)
    spd = m @ m.transpose(1, 2) + 0.5 * torch.eye(6, dtype=F64)
    b = torch.randn(3, 6, generator=g, dtype=F64)
    apply = lambda x: torch.einsum("bij,bj->bi", spd, x)
    x = cg(apply, b, iters=6)
    torch.testing.assert_close(x, torch.linalg.solve(spd, b), rtol=1e-8, atol=1e-8)
    x_more = cg(apply, b, iters=60)  # far past convergence: no 0/0 blow-up
    torch.testing.assert_close(x_more, torch.linalg.solve(spd, b), rtol=1e-9, atol=1e-9)
    x0 = torch.randn(3, 6, generator=g, dtype=F64)
    assert torch.equal(cg(apply, b, x0=x0, iters=0), x0)


def test_ddim_fraction_eta1_is_ddpm_posterior_variance():
    """eta = 1 in sigma-space equals the DDPM posterior variance beta_tilde / abar_{t-1}."""
    betas = schedules.vp_betas(1000)
    abar = torch.cumprod(1 - betas, 0)
    t, s = 600, 599
    sig = lambda k: ((1 - abar[k]) / abar[k]).sqrt()
    beta_tilde = (1 - abar[s]) / (1 - abar[t]) * betas[t]
    f = ddim_fresh_fraction(1.0, sig(t), sig(s))
    torch.testing.assert_close(f * sig(s) ** 2, beta_tilde / abar[s], rtol=1e-10, atol=0)
    assert float(ddim_fresh_fraction(0.0, sig(t), sig(s))) == 0.0
    x0, eps, xi = torch.ones(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64), torch.ones(2, 3,
                                                                                      dtype=F64)
    out = renoise(x0, eps, torch.tensor(2.0, dtype=F64), torch.tensor(0.25, dtype=F64), xi)
    torch.testing.assert_close(out, x0 + 2.0 * 0.5)


def test_row_noise_depends_only_on_row_entropy():
    a = RowNoise(make_generators([(7, 0, 0), (7, 0, 1)], "cpu"), F64, "cpu").randn(4)
    b = RowNoise(make_generators([(7, 0, 1)], "cpu"), F64, "cpu").randn(4)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])


def test_reconstruction_statistics():
    samples = torch.tensor([[[1.0]], [[3.0]]], dtype=F64)
    rec = Reconstruction.from_samples(samples)
    assert float(rec.mean) == 2.0 and math.isclose(float(rec.std), math.sqrt(2.0))
    particles = torch.tensor([[[0.0]], [[10.0]]], dtype=F64)
    lw = torch.log(torch.tensor([[0.75], [0.25]], dtype=F64))
    rec = Reconstruction.from_particles(particles, lw, particles[:1])
    assert math.isclose(float(rec.mean), 2.5) and math.isclose(float(rec.std),
                                                                 math.sqrt(0.75 * 0.25) * 10)
    assert math.isclose(float(effective_sample_size(lw[:, 0])), 1 / (0.75 ** 2 + 0.25 ** 2))


def test_operator_norm_power_iteration():
    from diffrecon.operators import matrix
    from diffrecon.recon.common import operator_norm

    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=F64))
    a = u @ torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.1], dtype=F64)) @ v[:4]
    assert math.isclose(operator_norm(matrix(a), (9,), iters=200), 3.0, rel_tol=1e-6)


IMAGE_ONLY = {"dds3d", "fbp", "l1-wavelet", "tv"}   # need slice stacks / CT / MRI / images


@pytest.mark.parametrize("solver", sorted(set(SOLVERS) - IMAGE_ONLY) + ["tv"])
def test_every_solver_reports_the_data_residual_of_its_mean(solver):
    from diffrecon.operators import blur
    from diffrecon.priors.analytic import mcgdiff_problem

    if solver == "tv":
        physics = blur("gaussian", width=1.0, noise_sigma=0.01, dtype=torch.float64)
        g = torch.Generator().manual_seed(0)
        y = physics.A(torch.rand(2, 1, 16, 16, generator=g, dtype=torch.float64))
        prior = None
    else:
        prior, physics, y1, _ = mcgdiff_problem(6, 6, seed=2)
        y = torch.cat([y1, 2 * y1])
    kw = {"steps": 4} if solver in DIFFUSION_SOLVERS else {}
    if solver == "smc":
        kw["num_particles"] = 8
    rec = get_solver(solver, **kw).solve(y, physics, prior, seed=0, num_samples=2)
    r = (physics.A(rec.mean) - y).flatten(1)
    expected = (r.norm(dim=1) / y.flatten(1).norm(dim=1)).tolist()
    assert rec.info["residual"] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert len(rec.info["residual"]) == 2


@pytest.mark.parametrize("solver", ["dds", "dps", "reddiff", "smc"])
def test_every_solver_accepts_every_schedule(solver):
    from diffrecon.priors.analytic import mcgdiff_problem

    prior, physics, y, _ = mcgdiff_problem(4, 1, seed=3)
    for schedule in ("karras", "geometric", "vp"):
        extra = {"num_particles": 8} if solver == "smc" else {}
        rec = get_solver(solver, steps=4, schedule=schedule, **extra).solve(y, physics, prior,
                                                                          seed=0)
        assert torch.isfinite(rec.mean).all()
    with pytest.raises(ValueError, match="fixed by its training chain"):
        schedules.solver_sigmas("vp", 4, prior, 0.1, None)
