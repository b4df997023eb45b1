"""SMC exactness proofs on closed-form posteriors (algorithms.md, "SMC"; the GMM protocol is in
test_smc_gmm.py).

Tolerances. Every variant targets p_model(x) N(y; A x, sigma_y^2) exactly, p_model being the
law of the DDIM chain; its discretisation error is the one bias besides Monte Carlo noise
(the analytic kernel variance, on by default for these priors, removes most of it).
On the GMM with sigma_max = 80 and 50 steps the chain alone misplaces about 0.04 of mixture
weight (exact-sample floor 0.015), so GMM tests use 100 steps and sigma_max = 500 (the
initial N(0, sigma_T^2) must dominate the prior's spread of ~11), like the reference protocol.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from diffrecon.operators import blur, matrix
from diffrecon.priors.analytic import (
    Gaussian,
    GaussianMixture,
    mcgdiff_problem,
)
from diffrecon.priors.base import Prior, expand_like
from diffrecon.recon.common import systematic_resample
from diffrecon.recon.schedules import solver_sigmas
from diffrecon.recon.smc import SMCSolver
from diffrecon.recon.smc_cloud import Measurement

GMM = dict(steps=100, sigma_max=500.0, cg_iters=8, chunk_size=1000)


pytestmark = pytest.mark.usefixtures("one_thread")


def _weighted_moments(rec):
    w = torch.softmax(rec.log_weights[:, 0], 0)
    x = rec.particles[:, 0]
    mean = w @ x
    cov = (w[:, None] * (x - mean)).T @ (x - mean)
    return mean, cov


# ---------------------------------------------------------------------------- Gaussian cases
def test_noiseless_coordinate_is_exact_and_free_coordinate_is_prior():
    prior = Gaussian(torch.zeros(2), 1.0)
    physics = matrix(torch.tensor([[1.0, 0.0]], dtype=torch.float64), 0.0)
    y = torch.zeros(1, 1, dtype=torch.float64)
    rec = SMCSolver(num_particles=1000, steps=30, cg_iters=3).solve(y, physics, prior,
                                                                    num_samples=1000, seed=3)
    assert rec.particles[..., 0].abs().max() < 1e-6
    assert rec.samples[..., 0].abs().max() < 1e-6
    # KS needs independent draws, and one cloud's particles share ancestors: take one draw
    # from each of 120 independent runs (rows of y are independent measurements).
    runs = SMCSolver(num_particles=64, steps=15, cg_iters=3).solve(y.expand(120, 1), physics,
                                                                  prior, seed=4)
    assert runs.samples[..., 0].abs().max() < 1e-6
    assert stats.kstest(runs.samples[0, :, 1].numpy(), "norm").pvalue > 0.01


def _lineage_n_eff(rec, exact_var):
    """N_eff = exact variance / SMC variance of the weighted mean, the latter by the
    Chan & Lai / Lee & Whiteley estimator over time-0 ancestors (eves). The final ESS alone
    overstates N_eff: resampled particles share ancestors."""
    w = torch.softmax(rec.log_weights[:, 0], 0)
    x = rec.particles[:, 0]
    eve = torch.tensor(rec.info["eves"][0])
    groups = torch.zeros_like(x).index_add_(0, eve, w[:, None] * (x - w @ x))
    return float((exact_var / (groups ** 2).sum(0)).min())


@pytest.mark.parametrize("covariance", ["isotropic", "operator"])
def test_single_gaussian_noisy_moments_within_monte_carlo_error(covariance):
    g = torch.Generator().manual_seed(0)
    root = torch.randn(3, 3, generator=g, dtype=torch.float64)
    prior = Gaussian(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64),
                     root @ root.T + 0.5 * torch.eye(3, dtype=torch.float64))
    a = torch.randn(2, 3, generator=g, dtype=torch.float64)
    physics = matrix(a / torch.linalg.svdvals(a)[0], 0.3)  # ||A|| = 1 suits kappa = 1
    y = torch.tensor([[0.8, -0.4]], dtype=torch.float64)
    post = prior.posterior(physics, y)
    # 200 steps: the DDPM kernel chain under-disperses with coarse steps (covariance -20 %
    # at 50 Karras steps, <= 0.02 absolute at 200, measured over 8 seeds); 0.03 allows it.
    rec = SMCSolver(num_particles=1000, steps=200, cg_iters=4,
                    potential_covariance=covariance).solve(y, physics, prior, seed=1)
    mean, cov = _weighted_moments(rec)
    c = post.cov()
    n_eff = _lineage_n_eff(rec, c.diagonal())
    assert n_eff > 100
    assert ((mean - post.mean()).abs() < 3 * c.diagonal().sqrt() / math.sqrt(n_eff)).all()
    cov_sd = ((c.diagonal()[:, None] * c.diagonal()[None, :] + c ** 2) / n_eff).sqrt()
    assert ((cov - c).abs() < 3 * cov_sd + 0.03).all()


@pytest.mark.parametrize("covariance", ["isotropic", "operator"])
def test_gaussian_step_draws_the_normalised_product_and_its_evidence(covariance):
    # r(x) ∝ N(x; m, v I) N(y; A x, G), G = c2 I + k A A^T (k = 0: isotropic), and
    # log N(y; A m, G + v A A^T): checked against the dense closed forms
    g = torch.Generator().manual_seed(3)
    d, d_y, n = 5, 3, 200_000
    a = torch.randn(d_y, d, generator=g, dtype=torch.float64)
    y = torch.randn(1, d_y, generator=g, dtype=torch.float64)
    m = torch.randn(1, d, generator=g, dtype=torch.float64)
    v, c2 = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    k = torch.tensor(0.9, dtype=torch.float64) if covariance == "operator" else None
    gam = c2 * torch.eye(d_y, dtype=torch.float64) + (0 if k is None else k) * a @ a.T
    prec = torch.eye(d, dtype=torch.float64) / v + a.T @ torch.linalg.solve(gam, a)
    cov = torch.linalg.inv(prec)
    mean = cov @ (m[0] / v + a.T @ torch.linalg.solve(gam, y[0]))
    evidence = torch.distributions.MultivariateNormal(a @ m[0], gam + v * a @ a.T).log_prob(y[0])
    draws = []
    for krylov in (True, False):
        meas = Measurement(matrix(a, 0.1), y, krylov, 20, (d,))
        noise = [torch.randn(n, *s, generator=g, dtype=torch.float64) for s in ((d,), (d_y,))]
        extra = () if k is None else (torch.randn(n, d, generator=g, dtype=torch.float64),)
        x, log_pred = meas.gaussian_step(m.expand(n, d), *noise, *extra, v=v, c2=c2, k=k)
        draws.append(x)
    assert torch.allclose(log_pred, evidence.expand(n), rtol=0, atol=1e-10)   # dense path
    for x in draws:
        se = (cov.diagonal() / n).sqrt()
        assert ((x.mean(0) - mean).abs() < 4.5 * se).all()
        emp = torch.cov(x.T)
        cov_sd = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov ** 2) / n).sqrt()
        assert ((emp - cov).abs() < 4.5 * cov_sd).all()


def test_analytic_kernel_variance_is_exact_at_six_steps_on_isotropic_gaussian():
    """With gamma_t = prior.mmse(sigma_t) the DDIM kernel is the exact reverse transition
    of an isotropic Gaussian prior, so even 6 steps give the exact posterior; plain DDIM
    shrinks it (the contrast shows the test can fail)."""
    prior = Gaussian(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 2.0)
    a = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.3, 0.9]], dtype=torch.float64)
    physics = matrix(a, 0.5)
    y = torch.tensor([[1.0, 0.2]], dtype=torch.float64)
    post = prior.posterior(physics, y)
    c = post.cov()
    opts = dict(num_particles=2000, steps=6, cg_iters=3, sigma_max=200.0)
    rec = SMCSolver(kernel_variance="analytic", **opts).solve(y, physics, prior, seed=2)
    assert rec.info["kernel_variance"] == "analytic"
    mean, cov = _weighted_moments(rec)
    n_eff = _lineage_n_eff(rec, c.diagonal())
    assert n_eff > 300
    assert ((mean - post.mean()).abs() < 3 * c.diagonal().sqrt() / math.sqrt(n_eff)).all()
    cov_sd = ((c.diagonal()[:, None] * c.diagonal()[None, :] + c ** 2) / n_eff).sqrt()
    assert ((cov - c).abs() < 3 * cov_sd).all()
    plain = SMCSolver(kernel_variance="ddim", **opts).solve(y, physics, prior, seed=2)
    assert torch.trace(_weighted_moments(plain)[1]) < 0.8 * torch.trace(c)


def test_tempered_potential_keeps_the_cloud_unresampled_at_high_noise():
    """The constant-kappa potential N(y; A z, sigma_y^2 + sigma^2) jitters the weights by O(1)
    nat at sigma >> the prior's spread and forces resampling there; the tempered one is flat
    where the exact twist is."""
    sig = solver_sigmas("karras", 100, mcgdiff_problem(8, 2, 0)[0], None, 500.0)
    high = [i for i in range(100) if sig[i] > 20]
    counts, min_ess = {}, {}
    for schedule in ("constant", "tempered"):
        counts[schedule], min_ess[schedule] = 0, 1.0
        for seed in (0, 2):
            prior, physics, y, _ = mcgdiff_problem(8, 2, seed)
            rec = SMCSolver(num_particles=1000, potential_schedule=schedule, **GMM).solve(
                y, physics, prior, seed=0)
            assert rec.info["potential_schedule"] == schedule
            counts[schedule] += sum(rec.info["resampled"][i][0] for i in high)
            min_ess[schedule] = min(min_ess[schedule], *(rec.info["ess"][i][0] / 1000
                                                         for i in high))
    assert counts["tempered"] == 0 and counts["constant"] >= 2, counts
    assert min_ess["tempered"] > 0.8 > min_ess["constant"], min_ess


def test_mmse_closed_form_and_monte_carlo_agree():
    sig = torch.tensor([0.0, 0.1, 1.0, 10.0], dtype=torch.float64)
    exact = Gaussian(torch.zeros(4), 2.0).mmse(sig)
    assert torch.allclose(exact, 2 * sig ** 2 / (2 + sig ** 2), rtol=1e-12, atol=0)
    # two coincident components are the same Gaussian; the mixture path is Monte Carlo
    twin = GaussianMixture(torch.zeros(2, 4), torch.tensor([0.3, 0.7]), variance=2.0)
    assert torch.allclose(twin.mmse(sig), exact, rtol=0.05, atol=0)  # 4096 x 4 draws: 1.1 %
    prior, *_ = mcgdiff_problem(8, 2, 0)
    gamma = prior.mmse(sig)
    assert gamma[0] == 0 and bool((gamma[1:] > 0).all())
    assert torch.equal(gamma, prior.mmse(sig))  # fixed-seed draws: deterministic


def test_uniform_weights_when_measurement_is_uninformative():
    prior, physics, y, _ = mcgdiff_problem(8, 2, 0)
    vague = matrix(physics.matrix, 1e6)
    rec = SMCSolver(num_particles=200, steps=20).solve(y, vague, prior, seed=0)
    assert min(min(e) for e in rec.info["ess"]) > 0.999 * 200
    assert rec.info["final_ess"][0] > 0.999 * 200
    assert rec.info["resampling_steps"] == [0]


# ---------------------------------------------------------------------------- resampling
def test_systematic_resampling_counts_are_floor_or_ceil_and_unbiased():
    g = torch.Generator().manual_seed(0)
    logw = 3 * torch.randn(50, generator=g, dtype=torch.float64)
    w = torch.softmax(logw, 0)
    grid = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000
    for m, fn in ((50, lambda u: systematic_resample(logw, u)),
                  (50, lambda u: systematic_resample(logw, u, 50)),
                  (137, lambda u: systematic_resample(logw, u, 137))):
        counts = torch.stack([torch.bincount(fn(u), minlength=50) for u in grid]).double()
        assert ((counts >= torch.floor(m * w) - 1e-9) & (counts <= torch.ceil(m * w) + 1e-9)).all()
        assert torch.allclose(counts.mean(0), m * w, atol=2e-3)  # E over u, by quadrature


# ---------------------------------------------------------------------------- identities
@pytest.mark.parametrize("covariance", ["isotropic", "operator"])
def test_krylov_path_equals_dense_path(covariance):
    prior, physics, y, _ = mcgdiff_problem(8, 4, 3)
    kw = dict(num_particles=300, steps=20, sigma_max=500.0, potential_covariance=covariance)
    kry = SMCSolver(krylov=True, cg_iters=30, **kw).solve(y, physics, prior, seed=5)
    den = SMCSolver(krylov=False, **kw).solve(y, physics, prior, seed=5)
    assert torch.allclose(kry.particles, den.particles, rtol=0, atol=1e-8)
    assert torch.allclose(kry.log_weights, den.log_weights, rtol=0, atol=1e-8)


def test_reproducible_and_chunk_invariant():
    prior, physics, y2, _ = mcgdiff_problem(8, 2, 0)
    y = torch.cat([y2, y2 + 0.5])
    kw = dict(num_particles=60, steps=15, proposal="twisted")
    a = SMCSolver(chunk_size=1000, **kw).solve(y, physics, prior, num_samples=3, seed=7)
    b = SMCSolver(chunk_size=1000, **kw).solve(y, physics, prior, num_samples=3, seed=7)
    c = SMCSolver(chunk_size=7, **kw).solve(y, physics, prior, num_samples=3, seed=7)
    one = SMCSolver(chunk_size=1000, **kw).solve(y, physics, prior, num_samples=1, seed=7)
    alone = SMCSolver(chunk_size=1000, **kw).solve(y[1:], physics, prior, seed=[(7, 1)])
    other = SMCSolver(chunk_size=1000, **kw).solve(y, physics, prior, num_samples=3, seed=8)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.log_weights, b.log_weights)
    # chunking changes the row count of A's batched matmul, so BLAS may block it differently
    assert torch.allclose(a.particles, c.particles, rtol=0, atol=1e-10)
    assert torch.allclose(a.log_weights, c.log_weights, rtol=0, atol=1e-10)
    assert torch.equal(a.particles, one.particles)          # the cloud ignores num_samples
    assert torch.equal(a.particles[:, 1], alone.particles[:, 0])
    assert not torch.equal(a.particles, other.particles)
    assert a.samples.shape == (3, 2, 8) and a.info["nfe"] == 15


@pytest.mark.parametrize("proposal", ["gaussian", "twisted", "bootstrap", "gaussian-operator"])
def test_chunking_invariance_all_proposals(proposal):
    prior, physics, y, _ = mcgdiff_problem(8, 2, 1)
    covariance = "operator" if proposal.endswith("-operator") else "isotropic"
    kw = dict(num_particles=50, steps=10, proposal=proposal.removesuffix("-operator"),
              potential_covariance=covariance)
    a = SMCSolver(chunk_size=1000, **kw).solve(y, physics, prior, num_samples=4, seed=2)
    b = SMCSolver(chunk_size=7, **kw).solve(y, physics, prior, num_samples=4, seed=2)
    # bit-identical except for BLAS blocking of the batched matmul in A (row count differs)
    assert torch.allclose(a.particles, b.particles, rtol=0, atol=1e-10)
    assert torch.allclose(a.log_weights, b.log_weights, rtol=0, atol=1e-10)


def test_options_are_validated():
    with pytest.raises(ValueError, match="proposal"):
        SMCSolver(proposal="optimal")
    prior, physics, y, _ = mcgdiff_problem(8, 2, 0)
    with pytest.raises(ValueError, match="kappa"):
        SMCSolver(kappa=0.0).solve(y, matrix(physics.matrix, 0.0), prior)
    with pytest.raises(ValueError, match="kernel_variance"):
        SMCSolver(kernel_variance="tweedie")
    x = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    box = blur("gaussian", width=1.0, noise_sigma=0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match="kernel_variance='analytic' needs a prior with mmse"):
        SMCSolver(kernel_variance="analytic", steps=3).solve(box.A(x), box, _PixelGaussian())
    with pytest.raises(ValueError, match="potential_schedule='tempered' needs a prior with"):
        SMCSolver(potential_schedule="tempered", steps=3).solve(box.A(x), box, _PixelGaussian())
    with pytest.raises(ValueError, match="potential_schedule"):
        SMCSolver(potential_schedule="annealed")
    with pytest.raises(ValueError, match="potential_covariance='full' is not one of"):
        SMCSolver(potential_covariance="full")
    with pytest.raises(ValueError, match="potential_covariance='operator' needs proposal"):
        SMCSolver(potential_covariance="operator", proposal="twisted")
    auto = SMCSolver(steps=3, num_particles=4).solve(box.A(x), box, _PixelGaussian())
    assert auto.info["kernel_variance"] == "ddim"
    assert auto.info["potential_schedule"] == "constant"


# ---------------------------------------------------------------------------- image smoke
class _PixelGaussian(Prior):
    """i.i.d. N(mu, s^2) pixels: D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)."""

    channels, mu, s2, sigma_max = 1, 0.5, 0.1, 20.0

    def _denoise(self, x, sigma):
        sig2 = expand_like(sigma, x) ** 2
        return (self.s2 * x + sig2 * self.mu) / (self.s2 + sig2)


@pytest.mark.parametrize("proposal", ["gaussian", "twisted", "bootstrap"])
def test_image_blur_smoke(proposal):
    g = torch.Generator().manual_seed(0)
    x = 0.5 + 0.3 * torch.randn(1, 1, 16, 16, generator=g, dtype=torch.float64)
    physics = blur("gaussian", width=1.0, noise_sigma=0.05, dtype=torch.float64)
    y = physics.A(x) + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    rec = SMCSolver(num_particles=24, steps=15, chunk_size=10, proposal=proposal,
                    cg_iters=20).solve(y, physics, _PixelGaussian(), num_samples=2, seed=0)
    assert rec.samples.shape == (2, 1, 1, 16, 16) and rec.samples.dtype == torch.float64
    assert rec.particles.shape == (24, 1, 1, 16, 16) and torch.isfinite(rec.particles).all()
    assert 1 <= rec.info["final_ess"][0] <= 24 and len(rec.info["ess"]) == 15

    def psnr(a):
        return float(-10 * torch.log10(((a - x) ** 2).mean()))

    # 256 constrained pixels: the cloud degenerates to few lineages (expected, reported by
    # ESS), so the mean is about one posterior draw of i.i.d. pixels, whose squared error is
    # twice the posterior variance: about 9 dB here (prior mean: 10.4 dB); floor 8 dB.
    assert psnr(rec.mean) > 8.0
    resid = (physics.A(rec.mean) - y).norm() / y.norm()
    assert resid < 0.3  # the noise alone is 0.1 of ||y||; a posterior draw leaves ~0.15


# --------------------------------------------------------------------- operator gain
def test_operator_gain_of_scaled_identity_and_normalised_multicoil_mri():
    from diffrecon.operators import mri
    from diffrecon.recon.common import operator_gain

    like = torch.zeros(1, dtype=torch.float64)
    d = 256
    g = operator_gain(matrix(3.0 * torch.eye(d, dtype=torch.float64), 0.1), (d,), like)
    assert abs(g / 9.0 - 1) < 0.05, g          # chi2 with 8 * 256 dof: sd 3 %
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(8, 32, 32, dtype=torch.complex128, generator=gen)
    maps = maps / maps.abs().pow(2).sum(0).sqrt()       # sum_c |S_c|^2 = 1
    mask = torch.zeros(32)
    mask[::2] = 1
    g = operator_gain(mri(mask, maps, noise_sigma=0.01), (2, 32, 32), like)
    assert abs(g * 8 - 1) < 0.1, g                     # per-entry gain 1 / coils


def test_operator_gain_option_equals_rescaled_kappa():
    from diffrecon.recon.common import operator_gain

    prior, physics, y, _ = mcgdiff_problem(8, 2, 3)
    g = operator_gain(physics, (8,), y)
    kw = dict(num_particles=200, steps=10, sigma_max=500.0, cg_iters=6)
    on = SMCSolver(operator_gain=True, **kw).solve(y, physics, prior, seed=2)
    ref = SMCSolver(kappa=g, **kw).solve(y, physics, prior, seed=2)
    assert on.info["kappa"] == pytest.approx(g) and ref.info["kappa"] == g
    assert torch.equal(on.particles, ref.particles)
    assert torch.equal(on.log_weights, ref.log_weights)
    with pytest.raises(ValueError, match="operator_gain='maybe' must be true or false"):
        SMCSolver(operator_gain="maybe")
