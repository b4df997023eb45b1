"""SMC on the Gaussian-mixture exactness protocol (algorithms.md): sliced W1 to exact
posterior samples against the exact-vs-exact floor, mixture weights, the evidence estimate.
GMM tests use 100 steps and sigma_max = 500 (see test_smc.py's tolerances)."""

from __future__ import annotations

import pytest
import torch

from diffrecon.priors.analytic import (
    mcgdiff_problem,
    mixture_weight_tv,
    sliced_wasserstein,
)
from diffrecon.recon.smc import SMCSolver

GMM = dict(steps=100, sigma_max=500.0, cg_iters=8, chunk_size=1000)


pytestmark = pytest.mark.usefixtures("one_thread")


def _gmm_scores(n: int, proposal: str, seeds=(0, 1, 2), d: int = 8, d_y: int = 2,
                runs: int = 1):
    """Mean (SW, floor, TV, mean error) over problem seeds; ``runs`` independent clouds
    pooled into the 2000 points (the benchmark protocol), else 2000 draws from one cloud."""
    out = []
    for seed in seeds:
        prior, physics, y, _ = mcgdiff_problem(d, d_y, seed)
        post = prior.posterior(physics, y)
        g = torch.Generator().manual_seed(100 + seed)
        ref, ref2 = post.sample(2000, g), post.sample(2000, g)
        rec = SMCSolver(num_particles=n, proposal=proposal, **GMM).solve(
            y.expand(runs, -1).contiguous(), physics, prior, num_samples=2000 // runs,
            seed=seed)
        draws = rec.samples.transpose(0, 1).reshape(-1, d)
        sw = sliced_wasserstein(draws, ref, 200, torch.Generator().manual_seed(1))
        floor = sliced_wasserstein(ref2, ref, 200, torch.Generator().manual_seed(1))
        tv = mixture_weight_tv(draws, post)
        err = (rec.mean.mean(0) - post.mean()).norm()
        out.append(torch.stack([sw, floor, tv, err]))
    return torch.stack(out).mean(0)


@pytest.mark.parametrize("proposal", ["gaussian",
                                      pytest.param("twisted", marks=pytest.mark.slow),
                                      pytest.param("bootstrap", marks=pytest.mark.slow)])
def test_gmm_d8_dy2_matches_exact_posterior(proposal):
    # Same criteria for all proposals: on this cell every variant keeps ESS/N > 0.5 at the
    # end, so the looser tolerance the brief allows for twisted / bootstrap is not needed.
    sw, floor, tv, _ = _gmm_scores(1000, proposal)
    assert sw < 2 * floor + 0.1, (sw, floor)
    assert tv < 0.05


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="per-problem SW is heavy-tailed at d = 80: on test seeds "
                   "3 and 4 the Gaussian proposal's mixture weights are off by 0.07-0.15 at "
                   "N = 1000 (chain bias + allocation at the split), so the 5-problem mean is "
                   "0.47 vs the 0.24 bound; the 40-problem mean meets it (next test, RESULTS.md "
                   "1a-40)")
def test_gmm_d80_dy2_matches_exact_posterior():
    sw, floor, tv, _ = _gmm_scores(1000, "gaussian", seeds=(0, 1, 2, 3, 4), d=80, runs=2)
    assert sw < 2 * floor + 0.1, (sw, floor)
    assert tv < 0.05


@pytest.mark.slow
def test_gmm_d80_dy2_meets_the_criterion_on_the_mean_over_40_problems():
    # The criterion is a mean over problems; 5 problems are too few at d = 80 (the
    # per-problem SW is heavy-tailed: the xfail above). 40 problems as in RESULTS.md 1a-40
    # (there on held-out seeds 1000-1390: 0.14 vs 0.24); here seeds 0-39: 0.254 vs 0.263,
    # TV 0.026 (session 5). ~100 s.
    sw, floor, tv, _ = _gmm_scores(1000, "gaussian", seeds=range(40), d=80, runs=2)
    assert sw < 2 * floor + 0.1, (sw, floor)
    assert tv < 0.05


@pytest.mark.slow
def test_gmm_posterior_mean_error_falls_with_particles():
    err_100 = _gmm_scores(100, "gaussian", seeds=(0, 1, 2, 3))[3]
    err_1000 = _gmm_scores(1000, "gaussian", seeds=(0, 1, 2, 3))[3]
    # N^-1/2 predicts a ratio of sqrt(10) = 3.2; mode-weight noise lowers it
    assert err_100 / err_1000 > 1.8, (err_100, err_1000)


def test_log_normalizer_estimates_the_evidence():
    prior, physics, y, _ = mcgdiff_problem(8, 2, 1)
    a, sy = physics.matrix, float(physics.noise_model.sigma)
    cov = sy ** 2 * torch.eye(2, dtype=torch.float64) + a @ a.T       # identity components
    comp = torch.distributions.MultivariateNormal(prior.means @ a.T, cov)
    log_py = torch.logsumexp(prior.log_weights + comp.log_prob(y), 0)
    # dense path: it keeps the log det S terms the Krylov path drops
    for proposal in ("gaussian", "bootstrap", "twisted"):
        rec = SMCSolver(num_particles=1000, proposal=proposal, krylov=False, **GMM).solve(
            y, physics, prior, seed=0)
        assert abs(rec.info["log_normalizer"][0] - float(log_py)) < 0.3, proposal
    # the operator-shaped potential is noisier on this problem (sd 0.24 vs 0.11 over 8
    # seeds): mean of 4 runs
    rec = SMCSolver(num_particles=1000, potential_covariance="operator", krylov=False,
                    **GMM).solve(y.expand(4, -1).contiguous(), physics, prior, seed=0)
    log_z = torch.tensor(rec.info["log_normalizer"]).mean()
    assert abs(float(log_z) - float(log_py)) < 0.3, rec.info["log_normalizer"]
