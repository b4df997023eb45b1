"""RED-diff: the RED-residual identity, the elementwise Adam, the pseudo-inverse start,
a closed-form Gaussian posterior, reproducibility and an image smoke test."""

from __future__ import annotations

import deepinv as dinv
import pytest
import torch

from diffrecon.operators import matrix
from diffrecon.priors.analytic import Gaussian, mcgdiff_problem
from diffrecon.recon.common import tweedie
from diffrecon.recon.reddiff import (
    REDDiffSolver,
    adam_step,
    paper_equivalent_lam,
    pseudo_inverse,
    reddiff_loss,
)

F64 = torch.float64


@pytest.mark.parametrize("sigma", [0.05, 1.0, 30.0])
def test_red_residual_identity(sigma):
    """lambda_t = lam sigma_t: grad_mu of lam sigma <sg(eps_hat - eps), mu> is exactly
    lam (mu - D(z, sigma)) for any mu and z (eps = (z - mu) / sigma)."""
    prior, physics, y, _ = mcgdiff_problem(8, 2, seed=0)
    g = torch.Generator().manual_seed(1)
    mu = 10 * torch.randn(4, 8, generator=g, dtype=F64)
    z = 10 * torch.randn(4, 8, generator=g, dtype=F64)
    s = torch.tensor(sigma, dtype=F64)
    eps = (z - mu) / s
    x0, eps_hat = tweedie(prior, z, s)
    lam = 0.25
    mu = mu.requires_grad_(True)
    _, reg = reddiff_loss(mu, y, physics, eps_hat, eps, lam * s, sigma_y=0.1)
    grad = torch.autograd.grad(reg.sum(), mu)[0]
    torch.testing.assert_close(grad, lam * (mu.detach() - x0), rtol=1e-12, atol=1e-12)


def test_adam_step_matches_torch_adam():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=F64)
    p = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=0.07, betas=(0.9, 0.99))
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    for k in range(1, 8):
        grad = torch.randn(3, 5, generator=g, dtype=F64)
        x, m, v = adam_step(x, grad, m, v, k, 0.07)
        p.grad = grad.clone()
        opt.step()
    torch.testing.assert_close(x, p.detach(), rtol=1e-13, atol=1e-13)


def test_pseudo_inverse_start():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 12, generator=g, dtype=F64)
    y = torch.randn(2, 5, generator=g, dtype=F64)
    x = pseudo_inverse(matrix(a, 0.1), y, (12,), iters=30)       # CG, 30 > rank: stays put
    torch.testing.assert_close(x, y @ torch.linalg.pinv(a).T, rtol=1e-9, atol=1e-9)
    mask = (torch.rand(1, 1, 8, 8, generator=g) > 0.5).to(F64)
    inp = dinv.physics.Inpainting(img_size=(1, 8, 8), mask=mask)  # own (exact) A_dagger
    yi = torch.randn(2, 1, 8, 8, generator=g, dtype=F64) * mask
    torch.testing.assert_close(pseudo_inverse(inp, yi, (1, 8, 8), iters=0), yi)


def test_gaussian_posterior_mean():
    """N(m, I_16), coordinates 0-7 observed (selection A, sigma_y = 0.05); m = 3 on the
    unobserved block, so the pseudo-inverse start is 3 away from the answer there.

    RED-diff's fixed point is not exactly the posterior mean: (a) observed coordinates: the
    prior gradient vanishes like sigma_t^2 at the end of the schedule, so RED-diff ends at
    the least-squares value y, off the posterior mean by sigma_y^2 / (1 + sigma_y^2) |y - m|
    <= 0.006 here; (b) unobserved coordinates see only the stochastic prior gradient, which
    Adam normalises, so they random-walk around m with an amplitude set by lr (0.24 RMS
    measured at lr 0.01). Tolerances: 0.015 (0.3 posterior std) observed, 0.4 RMS (0.4
    posterior std) unobserved; a solver ignoring the prior stays 3 away.
    """
    d, m, sy = 16, 8, 0.05
    mean = torch.cat([torch.linspace(-1, 1, m, dtype=F64), torch.full((d - m,), 3.0, dtype=F64)])
    prior = Gaussian(mean, 1.0)
    a = torch.eye(d, dtype=F64)[:m]
    physics = matrix(a, sy)
    g = torch.Generator().manual_seed(0)
    y = (mean + torch.randn(1, d, generator=g, dtype=F64)) @ a.T
    y = y + sy * torch.randn(1, m, generator=g, dtype=F64)
    pm = prior.posterior(physics, y).mean()
    rec = REDDiffSolver(steps=300, lr=0.01, lam=0.25).solve(y, physics, prior, num_samples=8,
                                                          seed=0)
    err = rec.samples[:, 0] - pm
    assert float(err[:, :m].abs().max()) < 0.015
    assert float(err[:, m:].pow(2).mean().sqrt()) < 0.4
    assert rec.info["note"].startswith("RED-diff returns a MAP-like point estimate")


def test_reproducible_per_sample_and_noiseless_guard():
    prior, physics, y, _ = mcgdiff_problem(8, 2, seed=1)
    solver = REDDiffSolver(steps=20, lr=0.05)
    three = solver.solve(y, physics, prior, num_samples=3, seed=5).samples
    assert torch.equal(three, solver.solve(y, physics, prior, num_samples=3, seed=5).samples)
    one_by_one = REDDiffSolver(steps=20, lr=0.05, batch_size=1).solve(
        y, physics, prior, num_samples=3, seed=5).samples
    torch.testing.assert_close(one_by_one, three, rtol=0, atol=1e-12)
    single = solver.solve(y, physics, prior, num_samples=1, seed=5).samples
    torch.testing.assert_close(single[0], three[0], rtol=0, atol=1e-12)
    other = solver.solve(y, physics, prior, num_samples=3, seed=6).samples
    assert (other - three).abs().min() > 0
    # sigma_y = 0: the floor keeps the data weight finite
    noiseless = matrix(physics.matrix, 0.0)
    rec = solver.solve(y, noiseless, prior, num_samples=2, seed=0)
    assert torch.isfinite(rec.samples).all() and rec.info["nfe"] == 20
    with pytest.raises(ValueError, match="weighting"):
        REDDiffSolver(steps=3, weighting="cubic").solve(y, physics, prior, seed=0)


def test_paper_equivalent_lam_reproduces_reference_objective_direction():
    """The summed objective with paper_equivalent_lam is a positive multiple of the
    reference's averaged one, so their gradients are parallel (Adam: identical steps)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 6, generator=g, dtype=F64)
    physics = matrix(a, 0.2)
    mu = torch.randn(1, 6, generator=g, dtype=F64, requires_grad=True)
    y = torch.randn(1, 3, generator=g, dtype=F64)
    e, e_hat, sigma = (torch.randn(1, 6, generator=g, dtype=F64) for _ in range(3))
    lam = paper_equivalent_lam(0.25, 3, 6, 0.2)
    data, reg = reddiff_loss(mu, y, physics, e_hat, e, lam * sigma.abs()[0, 0], 0.2)
    ours = torch.autograd.grad((data + reg).sum(), mu)[0]
    ref_loss = ((y - physics.A(mu)) ** 2).mean() / 2 + 0.25 * sigma.abs()[0, 0] * (
        (e_hat - e) * mu).mean()
    ref = torch.autograd.grad(ref_loss, mu)[0]
    torch.testing.assert_close(ours, ref * (3 / 0.2 ** 2), rtol=1e-12, atol=1e-12)


def test_image_smoke_blur(ellipse_gmm):
    from diffrecon.metrics import psnr
    from diffrecon.operators import blur

    imgs, prior = ellipse_gmm
    sy = 0.05
    physics = blur("gaussian", width=2.0, noise_sigma=sy, dtype=F64)
    g = torch.Generator().manual_seed(0)
    x_true = imgs[2:3] + 0.03 * torch.randn(imgs[2:3].shape, generator=g, dtype=F64)
    y = physics.A(x_true) + sy * torch.randn(x_true.shape, generator=g, dtype=F64)
    lam = paper_equivalent_lam(0.25, y.numel(), x_true.numel(), sy)     # = 100
    rec = REDDiffSolver(lam=lam).solve(y, physics, prior, num_samples=2, seed=0)
    assert rec.samples.shape == (2, 1, 1, 32, 32) and rec.samples.dtype == F64
    assert torch.isfinite(rec.samples).all()
    p_meas = psnr(x_true[0, 0].numpy(), y[0, 0].numpy(), maxval=1.0)
    p_rec = psnr(x_true[0, 0].numpy(), rec.mean[0, 0].numpy(), maxval=1.0)
    assert p_rec > p_meas + 5.0, (p_meas, p_rec)


def test_measured_entries_counts_only_sampled_kspace():
    """lam's m counts entries that carry data: 8-coil k-space on 16 of 32 columns -> 8 * 2 *
    32 * 16 (real, imag), not the stored 8 * 2 * 32 * 32; a blur counts every entry."""
    from diffrecon import operators
    from diffrecon.recon.common import measured_entries

    mask = torch.zeros(32, dtype=torch.bool)
    mask[::2] = True
    g = torch.Generator().manual_seed(3)
    maps = torch.complex(torch.randn(8, 32, 32, generator=g), torch.randn(8, 32, 32, generator=g))
    physics = operators.mri(mask, maps, img_size=(32, 32))
    like = torch.zeros(1, dtype=torch.float32)
    assert measured_entries(physics, (2, 32, 32), like) == 8 * 2 * 32 * 16
    blur = dinv.physics.BlurFFT(img_size=(1, 16, 16), filter=torch.ones(1, 1, 3, 3) / 9)
    assert measured_entries(blur, (1, 16, 16), like) == 16 * 16
