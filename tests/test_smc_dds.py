"""SMC's "dds" proposal (a steered ensemble of DDS chains; ``smc`` docstring): with steering
off it is DDS bit for bit given the same noise, its weights are the telescoped potential,
the adaptive exponent keeps the conditional ESS it is asked to keep, reruns are bit-identical
and chunk-invariant, and its options are validated."""

from __future__ import annotations

import pytest
import torch

from diffrecon.operators import blur, matrix
from diffrecon.priors.analytic import Gaussian
from diffrecon.recon import common
from diffrecon.recon.dds import DDSOptions, DDSSolver
from diffrecon.recon.smc import SMCOptions, SMCSolver
from diffrecon.recon.smc_cloud import Cloud, conditional_ess, steering_exponent

pytestmark = pytest.mark.usefixtures("one_thread")


def _blur_problem(sigma_y=0.05):
    g = torch.Generator().manual_seed(0)
    prior = Gaussian(torch.full((64,), 0.5), 0.1)          # 8 x 8 i.i.d. pixels, flattened
    x = 0.5 + 0.3 * torch.randn(1, 64, generator=g, dtype=torch.float64)
    a = torch.randn(24, 64, generator=g, dtype=torch.float64) / 8
    physics = matrix(a, sigma_y)
    y = physics.A(x) + sigma_y * torch.randn(1, 24, generator=g, dtype=torch.float64)
    return prior, physics, y


@pytest.mark.parametrize(("sigma_y", "n", "steer"), [(0.05, 3, 0.0), (0.05, 1, 1.0),
                                                     (0.0, 2, 0.0)])
def test_unsteered_cloud_is_dds_bit_for_bit_with_the_same_noise(monkeypatch, sigma_y, n,
                                                                 steer):
    """steer_max = 0 (or one particle): every particle is a DDS chain. DDS's noise is
    recorded and replayed through Cloud.randn; the particles equal DDS's draws exactly
    (noisy gamma = "auto" and the noiseless system; DDS's default eta / convention / M)."""
    prior, physics, y = _blur_problem(sigma_y)
    drawn = []
    randn = common.RowNoise.randn

    def record(self, *shape):
        drawn.append(randn(self, *shape))
        return drawn[-1]

    monkeypatch.setattr(common.RowNoise, "randn", record)
    dds = DDSSolver(steps=12, batch_size=n).solve(y, physics, prior, num_samples=n, seed=7)
    monkeypatch.setattr(Cloud, "randn", lambda self, *shape: drawn.pop(0))
    smc = SMCSolver(proposal="dds", num_particles=n, steps=12, chunk_size=n,
                    steer_max=steer).solve(y, physics, prior, num_samples=n, seed=99)
    assert not drawn                                        # the same number of draws
    assert torch.equal(smc.particles[:, 0], dds.samples[:, 0])
    assert smc.info["lineages"] == [n] and sum(smc.info["resampling_steps"]) == 0
    assert smc.info["nfe"] == dds.info["nfe"] == 12


def test_weights_are_the_last_potential_when_nothing_is_resampled():
    """ess_threshold = 0: the difference potentials telescope, so the final log weights are
    beta_1 fit_1(z_1) + const, fit_1 = -||y - A D(z_1, sigma_1)||^2 / (2 (sigma_y^2 + kappa
    sigma_1^2)), with one beta_1 in [0, steer_max] for all particles."""
    prior, physics, y = _blur_problem()
    seen = {}

    def callback(info):
        seen[info["i"]] = info

    solver = SMCSolver(proposal="dds", num_particles=16, steps=10, ess_threshold=0.0,
                       steer_ess=0.5)
    rec = solver.solve(y, physics, prior, seed=1, callback=callback)
    last = seen[9]
    sigma = last["sigma"]
    r = y - physics.A(last["denoised"])
    fit = -0.5 * (r ** 2).sum(1) / (0.05 ** 2 + sigma ** 2)
    log_w = rec.log_weights[:, 0]                           # normalised
    assert torch.allclose(log_w, last["log_weights"].log_softmax(0), atol=1e-12, rtol=0)
    lw, f = log_w - log_w.mean(), fit - fit.mean()          # no increment at the last step
    beta = (lw @ f) / (f @ f)
    assert 0 < beta <= 1.0
    assert torch.allclose(beta * f, lw, atol=1e-9, rtol=0)
    assert lw.std() > 0.1                                   # the check is not vacuous


def test_steering_exponent_is_the_largest_that_keeps_the_conditional_ess():
    g = torch.Generator().manual_seed(3)
    log_w = torch.randn(200, generator=g, dtype=torch.float64)
    log_g = 0.03 * torch.randn(200, generator=g, dtype=torch.float64)
    fit = -50 * torch.rand(200, generator=g, dtype=torch.float64)
    for target in (0.5, 0.9, 0.99):
        b = steering_exponent(log_w, log_g, fit, target, 1.0)
        assert 0 < b < 1.0
        assert conditional_ess(log_w, b * fit - log_g) >= target
        assert conditional_ess(log_w, b * (1 + 1e-6) * fit - log_g) < target
    # no exponent keeps 0.999 (the old potential alone costs more): the least costly one
    b = steering_exponent(log_w, 10 * log_g, fit, 0.999, 1.0)
    grid = torch.cat([torch.logspace(0, -12, 97, dtype=torch.float64), torch.zeros(1)])
    best = conditional_ess(log_w, grid[:, None] * fit - 10 * log_g).max()
    assert best < 0.999 and conditional_ess(log_w, b * fit - 10 * log_g) >= best - 1e-12
    # a constant fit costs nothing: the cap; the cap 0: no steering
    assert steering_exponent(log_w, 0 * log_g, torch.full_like(fit, -7.0), 0.9, 2.5) == 2.5
    assert steering_exponent(log_w, log_g, fit, 0.9, 0.0) == 0.0
    # conditional ESS: 1 for a constant increment, 1 / (1 + CV^2) in general
    assert torch.allclose(conditional_ess(log_w, torch.full_like(fit, 3.0)),
                          torch.ones((), dtype=torch.float64))
    inc, w = torch.exp(fit / 50), torch.softmax(log_w, 0)
    mean = (w * inc).sum()
    assert torch.allclose(conditional_ess(log_w, fit / 50),
                          mean ** 2 / (w * inc ** 2).sum())


def test_same_seed_same_bits_and_chunk_invariance_on_an_image():
    """16 x 16 blur, N = 12, a steering that binds: equal bits for equal seeds whatever the
    chunk size; another seed gives another cloud. The weights move (ESS < N) but the cloud
    keeps its lineages, where the bootstrap proposal's (FK steering with fixed potentials)
    collapses to one or two."""
    g = torch.Generator().manual_seed(0)
    x = 0.5 + 0.3 * torch.randn(1, 1, 16, 16, generator=g, dtype=torch.float64)
    physics = blur("gaussian", width=1.0, noise_sigma=0.02, dtype=torch.float64)
    y = physics.A(x) + 0.02 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    prior = _pixel_prior()
    kw = dict(proposal="dds", num_particles=12, steps=12, steer_ess=0.8)
    a = SMCSolver(chunk_size=12, **kw).solve(y, physics, prior, num_samples=3, seed=5)
    b = SMCSolver(chunk_size=5, **kw).solve(y, physics, prior, num_samples=3, seed=5)
    c = SMCSolver(chunk_size=12, **kw).solve(y, physics, prior, num_samples=3, seed=6)
    for name in ("particles", "log_weights", "samples"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.particles, c.particles)
    assert a.info["ess"] == b.info["ess"] and a.info["lineages"] == b.info["lineages"]
    assert a.info["nfe"] == 12 and a.samples.dtype == torch.float64
    assert torch.isfinite(a.particles).all()
    assert min(e[0] for e in a.info["ess"]) < 8 and a.info["lineages"][0] >= 10
    boot = SMCSolver(proposal="bootstrap", num_particles=12, steps=12).solve(
        y, physics, prior, seed=5)
    assert boot.info["lineages"][0] <= 2
    # steered DDS chains fit the data as DDS does: residual of the mean near the noise
    resid = (physics.A(a.mean) - y).norm() / y.norm()
    assert resid < 0.1, resid


def _pixel_prior():
    from diffrecon.priors.base import Prior, expand_like

    class PixelGaussian(Prior):
        """i.i.d. N(0.5, 0.1) pixels (closed-form denoiser)."""

        channels, sigma_max = 1, 20.0

        def _denoise(self, x, sigma):
            sig2 = expand_like(sigma, x) ** 2
            return (0.1 * x + sig2 * 0.5) / (0.1 + sig2)

    return PixelGaussian()


def test_dds_proposal_runs_in_the_measurement_dtype():
    prior, physics, y = _blur_problem()
    rec = SMCSolver(proposal="dds", num_particles=4, steps=5).solve(
        y.float(), matrix(physics.matrix.float(), 0.05), prior, seed=0)
    assert rec.particles.dtype == torch.float32 and rec.log_weights.dtype == torch.float64
    assert SMCSolver().working_dtype == torch.float64


def test_options_defaults_and_validation():
    o = SMCOptions(proposal="dds")
    assert (o.setting("eta"), o.setting("cg_iters"), o.setting("noise_convention")) == (
        DDSOptions.eta, DDSOptions.cg_iters, DDSOptions.noise_convention)
    assert (SMCOptions().setting("eta"), SMCOptions().setting("cg_iters"),
            SMCOptions().setting("noise_convention")) == (1.0, 50, "ddim")
    assert SMCOptions(proposal="dds", cg_iters=9).setting("cg_iters") == 9
    for bad, name in [({"steer_ess": 1.5}, "steer_ess"), ({"steer_max": -1.0}, "steer_max"),
                      ({"gamma": "big"}, "gamma"), ({"noise_convention": "x"},
                                                    "noise_convention"),
                      ({"gamma": 0.0}, "gamma"), ({"eta": 2.0}, "eta")]:
        with pytest.raises(ValueError, match=name) as exc:
            SMCSolver(proposal="dds", **bad)
        assert "\n" not in str(exc.value)
