"""Exact GMM priors against brute-force numerics (quadrature, autograd, Kalman formulas)."""

import time

import numpy as np
import pytest
import torch

from diffrecon.operators import matrix
from diffrecon.priors.analytic import (
    Gaussian,
    GaussianMixture,
    dense_matrix,
    mcgdiff_problem,
    mixture_weight_tv,
    sliced_wasserstein,
)


def _physics(a, sigma):
    return matrix(torch.as_tensor(a, dtype=torch.float64), sigma)


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_spd(rng, k, d, scale=1.0):
    m = rng.standard_normal((k, d, d))
    return scale * (m @ np.swapaxes(m, 1, 2) / d + 0.2 * np.eye(d))


def _mixtures_2d():
    rng = np.random.default_rng(0)
    means = rng.uniform(-3, 3, (3, 2))
    weights = np.array([0.5, 0.3, 0.2])
    return {
        "isotropic": GaussianMixture(means, weights, variance=[0.5, 1.0, 0.3]),
        "tied": GaussianMixture(means, weights, covariances=_random_spd(rng, 1, 2)[0]),
        "full": GaussianMixture(means, weights, covariances=_random_spd(rng, 3, 2)),
    }


def _grid_density(prior, lim=12.0, n=401):
    t = torch.linspace(-lim, lim, n, dtype=torch.float64)
    pts = torch.cartesian_prod(t, t)
    return pts, prior.log_prob(pts)


@pytest.mark.parametrize("kind", ["isotropic", "tied", "full"])
def test_denoiser_matches_2d_quadrature(kind):
    prior = _mixtures_2d()[kind]
    assert prior.kind == kind
    pts, logp = _grid_density(prior)
    x = torch.tensor([[0.3, -1.0], [2.0, 2.5], [-4.0, 1.0]], dtype=torch.float64)
    for sigma in (0.1, 0.7, 3.0):
        loglik = -0.5 * ((x[:, None, :] - pts[None]) ** 2).sum(-1) / sigma ** 2
        w = torch.softmax(logp[None] + loglik, 1)
        brute = w @ pts
        assert torch.allclose(prior.denoise(x, sigma), brute, atol=2e-4), sigma


def test_denoiser_matches_1d_quadrature():
    prior = GaussianMixture([[-2.0], [1.0], [5.0]], [0.2, 0.5, 0.3], variance=[0.3, 1.0, 2.0])
    t = torch.linspace(-25, 25, 40001, dtype=torch.float64)[:, None]
    logp = prior.log_prob(t)
    x = torch.tensor([[-3.0], [0.0], [2.2], [9.0]], dtype=torch.float64)
    for sigma in (0.05, 1.0, 4.0):
        w = torch.softmax(logp[None] - 0.5 * (x - t.T) ** 2 / sigma ** 2, 1)
        assert torch.allclose(prior.denoise(x, sigma), w @ t, atol=1e-6)


@pytest.mark.parametrize("kind", ["isotropic", "tied", "full"])
def test_tweedie_consistency(kind):
    rng = np.random.default_rng(1)
    d, k = 3, 4
    means = rng.uniform(-4, 4, (k, d))
    weights = rng.uniform(0.1, 1, k)
    cov = {"isotropic": None, "tied": _random_spd(rng, 1, d)[0],
           "full": _random_spd(rng, k, d)}[kind]
    prior = GaussianMixture(means, weights, covariances=cov, variance=0.7)
    x = torch.tensor(rng.standard_normal((6, d)) * 4, requires_grad=True)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 3.0, 30.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(prior.log_prob(x, sigma).sum(), x)
    expected = x + sigma[:, None] ** 2 * grad
    assert torch.allclose(prior.denoise(x.detach(), sigma), expected, rtol=1e-9, atol=1e-9)


def test_denoiser_limits_dtype_and_per_row_sigma():
    prior = _mixtures_2d()["full"]
    x = torch.randn(5, 2, dtype=torch.float64) * 3
    assert torch.equal(prior.denoise(x, 0.0), x)
    assert torch.allclose(prior.denoise(x, 1e-7), x, atol=1e-10)
    assert torch.allclose(prior.denoise(x, 1e7), prior.mean().expand(5, 2), atol=1e-6)
    assert torch.isfinite(prior.denoise(x, 1e30)).all()
    sig = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    rows = torch.cat([prior.denoise(x[i:i + 1], float(sig[i])) for i in range(5)])
    assert torch.allclose(prior.denoise(x, sig), rows, rtol=0, atol=1e-12)
    out32 = prior.denoise(x.float(), 0.5)
    assert out32.dtype == torch.float32
    assert prior.denoise(x, 0.5).dtype == torch.float64


def test_isotropic_denoiser_is_fast():
    g = torch.Generator().manual_seed(0)
    prior = GaussianMixture(torch.randn(25, 800, generator=g) * 8, torch.rand(25, generator=g))
    x = torch.randn(2000, 800, generator=g) * 8
    prior.denoise(x, 0.5)
    t0 = time.perf_counter()
    out = prior.denoise(x, torch.rand(2000, generator=g))
    assert time.perf_counter() - t0 < 2.0
    assert torch.isfinite(out).all()


def test_sampling_moments_and_log_prob():
    prior = _mixtures_2d()["full"]
    g = torch.Generator().manual_seed(0)
    s = prior.sample(40000, generator=g)
    assert s.shape == (40000, 2) and s.dtype == torch.float64
    assert torch.allclose(s.mean(0), prior.mean(), atol=0.05)
    assert torch.allclose(torch.cov(s.T), prior.cov(), atol=0.1)
    # log_prob normalises to one on a grid
    _, logp = _grid_density(prior, lim=15.0, n=501)
    cell = (30.0 / 500) ** 2
    assert abs(float(logp.exp().sum()) * cell - 1.0) < 1e-3


def test_gaussian_posterior_matches_information_form():
    rng = np.random.default_rng(2)
    d, dy = 4, 2
    mu = rng.standard_normal(d)
    sig = _random_spd(rng, 1, d)[0]
    a = rng.standard_normal((dy, d))
    sy = 0.3
    y = rng.standard_normal(dy)
    post = Gaussian(mu, sig).posterior(_physics(a, sy), torch.tensor(y)[None])
    prec = np.linalg.inv(sig) + a.T @ a / sy ** 2
    cov = np.linalg.inv(prec)
    mean = cov @ (np.linalg.solve(sig, mu) + a.T @ y / sy ** 2)
    np.testing.assert_allclose(post.means[0].numpy(), mean, atol=1e-10)
    np.testing.assert_allclose(post.covariances[0].numpy(), cov, atol=1e-10)
    # isotropic prior with scalar variance goes through the same formulas
    post_iso = Gaussian(mu, 2.0).posterior(_physics(a, sy), torch.tensor(y))
    cov_iso = np.linalg.inv(np.eye(d) / 2.0 + a.T @ a / sy ** 2)
    np.testing.assert_allclose(post_iso.cov().numpy(), cov_iso, atol=1e-10)


def test_noiseless_posterior_pins_observed_coordinate():
    prior = Gaussian(torch.zeros(2), torch.eye(2, dtype=torch.float64))
    post = prior.posterior(_physics([[1.0, 0.0]], 0.0), torch.tensor([0.7], dtype=torch.float64))
    assert post.means[0, 0] == pytest.approx(0.7, abs=1e-12)
    np.testing.assert_allclose(post.cov().numpy(), np.diag([0.0, 1.0]), atol=1e-12)
    s = post.sample(2000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(s[:, 0], torch.full((2000,), 0.7, dtype=torch.float64), atol=1e-12)
    assert abs(float(s[:, 1].std()) - 1.0) < 0.05
    assert torch.isfinite(post.denoise(s, 0.01)).all()


@pytest.mark.parametrize("kind", ["isotropic", "tied", "full"])
def test_gmm_posterior_matches_quadrature(kind):
    prior = _mixtures_2d()[kind]
    a = np.array([[0.8, -0.5]])
    sy, y = 0.4, np.array([0.9])
    post = prior.posterior(_physics(a, sy), torch.tensor(y))
    pts, logp = _grid_density(prior)
    loglik = -0.5 * ((pts @ torch.tensor(a.T))[:, 0] - y[0]) ** 2 / sy ** 2
    w = torch.softmax(logp + loglik, 0)
    mean = w @ pts
    cov = (pts - mean).T @ ((pts - mean) * w[:, None])
    assert torch.allclose(post.mean(), mean, atol=1e-5)
    assert torch.allclose(post.cov(), cov, atol=1e-4)
    # component weights: integral of w_k N_k(x) N(y; A x) over the grid
    comp = prior.responsibilities(pts)
    assert torch.allclose(post.weights, (w[:, None] * comp).sum(0), atol=1e-5)
    # posterior density equals prior x likelihood up to a constant
    ratio = post.log_prob(pts[:5]) - (logp[:5] + loglik[:5])
    assert torch.allclose(ratio, ratio[0].expand(5), atol=1e-9)


def test_posterior_weights_uniform_for_huge_noise():
    prior, physics, y, _ = mcgdiff_problem(8, 2, seed=3)
    big = _physics(dense_matrix(physics, 8), 1e6)
    post = prior.posterior(big, y)
    assert torch.allclose(post.weights, prior.weights, atol=1e-8)


def test_mcgdiff_problem_protocol():
    prior, physics, y, x = mcgdiff_problem(8, 2, seed=0)
    again = mcgdiff_problem(8, 2, seed=0)
    assert torch.equal(again[2], y) and torch.equal(again[3], x)
    assert prior.num_components == 25 and prior.kind == "isotropic"
    assert float(prior.weights.sum()) == pytest.approx(1.0)
    assert set(prior.means[:, 0].tolist()) == {-16.0, -8.0, 0.0, 8.0, 16.0}
    assert torch.equal(prior.means[:, 0::2], prior.means[:, :1].expand(25, 4))
    assert torch.equal(prior.means[:, 1::2], prior.means[:, 1:2].expand(25, 4))
    a = dense_matrix(physics, 8)
    s = torch.linalg.svdvals(a)
    assert a.shape == (2, 8) and bool((s <= 1).all()) and bool((s > 0).all())
    sy = float(physics.noise_model.sigma)
    assert 0 <= sy <= float(s.max())
    assert y.shape == (1, 2) and x.shape == (1, 8)
    assert float((y - x @ a.T).abs().max()) <= 6 * sy
    post = prior.posterior(physics, y)
    assert post.num_components == 25 and post.kind == "tied"
    assert float(post.weights.sum()) == pytest.approx(1.0)
    assert not torch.equal(mcgdiff_problem(8, 2, seed=1)[2], y)


def test_sliced_wasserstein_and_weight_tv():
    prior, physics, y, _ = mcgdiff_problem(8, 2, seed=0)
    post = prior.posterior(physics, y)
    g = torch.Generator().manual_seed(0)
    s1, s2 = post.sample(2000, generator=g), post.sample(2000, generator=g)
    floor = sliced_wasserstein(s1, s2, generator=torch.Generator().manual_seed(1))
    assert 0 < float(floor) < 0.3
    far = sliced_wasserstein(s1, s2 + 2.0, generator=torch.Generator().manual_seed(1))
    assert float(far) > 1.0  # 2 E|sum theta_j| = 1.6 for unit theta in d = 8
    assert float(mixture_weight_tv(s1, post)) < 0.05
    prior_draws = prior.sample(2000, generator=g)
    assert float(mixture_weight_tv(prior_draws, post)) > 0.2
    with pytest.raises(ValueError):
        sliced_wasserstein(s1, s2[:10])
