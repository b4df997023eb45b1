"""DDS (Krylov) solver: reproducibility, exact identities, closed-form posteriors, images."""

from __future__ import annotations

import math

import pytest
import torch
from deepinv.physics import LinearPhysics

import diffrecon.recon.dds as dds_mod
from diffrecon.operators import matrix
from diffrecon.priors import analytic
from diffrecon.priors.analytic import Gaussian
from diffrecon.priors.base import Prior, expand_like
from diffrecon.recon.common import ddim_fresh_fraction
from diffrecon.recon.dds import DDSSolver
from diffrecon.recon.dds3d import DDS3DSolver, dz, dz_adjoint
from diffrecon.recon.schedules import get_schedule

F64 = torch.float64


def gmm_problem():
    return analytic.mcgdiff_problem(8, 2, 0)


# ----------------------------------------------------------------------- reproducibility
class RowwiseMatrix(LinearPhysics):
    """Dense A computed row by row (elementwise products and sums), so results do not
    depend on the batch size (BLAS matmul differs at round-off between batch sizes)."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def A(self, x, **kw):
        return (x[:, None, :] * self.a).sum(-1)

    def A_adjoint(self, y, **kw):
        return (y[:, :, None] * self.a).sum(1)


def test_reproducible_per_sample():
    prior, phys, y, _ = gmm_problem()
    phys = RowwiseMatrix(phys.matrix)
    solver = DDSSolver(steps=10)
    a = solver.solve(y, phys, prior, num_samples=3, seed=7).samples
    b = solver.solve(y, phys, prior, num_samples=3, seed=7).samples
    one = solver.solve(y, phys, prior, num_samples=1, seed=7).samples
    other = solver.solve(y, phys, prior, num_samples=1, seed=8).samples
    assert a.shape == (3, 1, 8) and a.dtype == F64
    assert torch.equal(a, b)
    assert torch.equal(a[:1], one)
    assert not torch.allclose(one, other)
    # chunking (batch_size) does not change sample i either
    assert torch.equal(DDSSolver(steps=10, batch_size=2).solve(
        y, phys, prior, num_samples=3, seed=7).samples, a)
    # B > 1 path: row b of a 2-measurement batch equals the single-measurement run
    y2 = torch.cat([y, 2 * y])
    both = solver.solve(y2, phys, prior, num_samples=2, seed=7).samples
    assert torch.equal(both[:, :1], solver.solve(y, phys, prior, num_samples=2,
                                                 seed=[(7, 0)]).samples)


def test_invalid_noise_convention_and_nonlinear_physics():
    with pytest.raises(ValueError, match="noise_convention"):
        DDSSolver(noise_convention="ddpm")
    from deepinv.physics import Physics

    prior, _, y, _ = gmm_problem()
    with pytest.raises(TypeError, match="LinearPhysics"):
        DDSSolver(steps=2).solve(y, Physics(A=lambda x: x[:, :2]), prior)


# ----------------------------------------------------------------------- identities
def test_zero_cg_iterations_return_the_denoiser_output():
    """CG started at x0_hat with 0 iterations leaves x0_hat unchanged, at every step."""
    prior, phys, y, _ = gmm_problem()
    seen = []
    rec = DDSSolver(steps=6, cg_iters=0).solve(y, phys, prior, seed=0, callback=seen.append)
    assert len(seen) == 6
    for f in seen:
        assert torch.equal(f["denoised"], prior.denoise(f["x"], f["sigma"].expand(1)))
    assert torch.equal(rec.samples[0], seen[-1]["denoised"])


@pytest.mark.parametrize("convention,eta", [("ddim", 0.7), ("reference", 0.85)])
def test_fresh_fraction_passed_to_renoise(monkeypatch, convention, eta):
    received = []
    real = dds_mod.renoise

    def spy(x0, eps, sigma_next, f, noise):
        received.append((sigma_next, f))
        return real(x0, eps, sigma_next, f, noise)

    monkeypatch.setattr(dds_mod, "renoise", spy)
    prior, phys, y, _ = gmm_problem()
    DDSSolver(steps=8, eta=eta, noise_convention=convention).solve(y, phys, prior, seed=0)
    sig = get_schedule("karras", 8, sigma_min=prior.sigma_min, sigma_max=prior.sigma_max)
    assert len(received) == 7  # no renoising after the last step
    for i, (s_next, f) in enumerate(received):
        assert float(s_next) == float(sig[i + 1])
        if convention == "reference":
            expected = eta ** 2  # the reference code's c = eta: 0.85 -> 72% fresh variance
        else:
            expected = eta ** 2 * (1 - (sig[i + 1] / sig[i]) ** 2)
            assert float(f) == pytest.approx(float(ddim_fresh_fraction(eta, sig[i], sig[i + 1])))
        assert float(f) == pytest.approx(float(expected), rel=1e-12)


def test_noiseless_square_system_is_solved_exactly():
    """Gaussian prior N(0, I), noiseless well-posed square A: CG with d iterations from
    x0_hat solves A x = y, so every sample satisfies it to round-off."""
    g = torch.Generator().manual_seed(0)
    d = 6
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    a = q @ torch.diag(torch.linspace(1.0, 3.0, d, dtype=F64)) @ q.T  # cond 3
    phys = matrix(a, 0.0)
    x = torch.randn(1, d, generator=g, dtype=F64)
    y = phys.A(x)
    prior = Gaussian(torch.zeros(d, dtype=F64), 1.0)
    rec = DDSSolver(steps=10, cg_iters=2 * d).solve(y, phys, prior, num_samples=4, seed=1)
    assert (rec.samples[:, 0] @ a.T - y).abs().max() < 1e-8
    assert rec.info["data_residual"][-1] < 1e-8


def _dds_gaussian_variance(sigmas: torch.Tensor, eta: float) -> float:
    """Exact output variance of DDS's unconstrained coordinates under the prior N(0, 1):
    z' = c z + sigma' sqrt(f) xi with c = (1 + sigma' sqrt(1 - f) sigma) / (1 + sigma^2)."""
    v = sigmas[0] ** 2
    for i in range(len(sigmas) - 2):
        s, sn = sigmas[i], sigmas[i + 1]
        f = ddim_fresh_fraction(eta, s, sn)
        v = ((1 + sn * (1 - f).sqrt() * s) / (1 + s ** 2)) ** 2 * v + sn ** 2 * f
    return float(v / (1 + sigmas[-2] ** 2) ** 2)


def test_gaussian_prior_noiseless_posterior():
    """Prior N(0, I_d), noiseless y = A x with rank d_y < d: exact posterior N(A^+ y, I - P).
    DDS returns exactly A^+ y on the row space (converged CG from x0_hat is the orthogonal
    projection onto {A x = y}) and, on the null space, the unconditional sampler's
    variance, which the recursion above gives in closed form (its bias vs 1 is DDIM's
    discretisation error, not sampling noise)."""
    g = torch.Generator().manual_seed(3)
    d, d_y, n = 6, 2, 2000
    a = torch.randn(d_y, d, generator=g, dtype=F64)
    phys = matrix(a, 0.0)
    y = phys.A(torch.randn(1, d, generator=g, dtype=F64))
    prior = Gaussian(torch.zeros(d, dtype=F64), 1.0)
    steps = 20
    rec = DDSSolver(steps=steps, cg_iters=d_y, batch_size=n).solve(y, phys, prior,
                                                                   num_samples=n, seed=0)
    s = rec.samples[:, 0]
    pinv = torch.linalg.pinv(a)
    proj = pinv @ a
    assert ((s @ proj.T) - y @ pinv.T).abs().max() < 1e-8
    null = torch.linalg.svd(a, full_matrices=True).Vh[d_y:]  # (d - d_y, d) orthonormal
    c = s @ null.T
    sig = get_schedule("karras", steps, sigma_min=prior.sigma_min, sigma_max=prior.sigma_max)
    v_expected = _dds_gaussian_variance(sig, 1.0)
    assert 0.5 < v_expected < 0.95  # the known bias at 20 steps
    tol = 4 * math.sqrt(2 / n) * v_expected  # 4 standard errors of a sample variance
    assert (c.var(0) - v_expected).abs().max() < tol
    assert c.mean(0).abs().max() < 4 * math.sqrt(v_expected / n)


def test_gmm_posterior_mean():
    """GMM protocol, d = 8, d_y = 4, seed 0: the exact posterior puts > 0.99 of its mass on
    one mode. DDS is not exact (its proximal data step with gamma = 1 is not the likelihood
    and it does not weight modes by the evidence); on this problem its posterior-mean error
    is 0.5-0.6 over seeds (sampling error only ~0.1 = sqrt(tr Cov / 500)). Tolerance 1.0:
    1/8 of the mode spacing, and a tenth of the pseudo-inverse estimate's error (9.9)."""
    prior, phys, y, _ = analytic.mcgdiff_problem(8, 4, 0)
    post = prior.posterior(phys, y)
    assert float(post.weights.max()) > 0.99
    rec = DDSSolver(steps=50, batch_size=500).solve(y, phys, prior, num_samples=500, seed=0)
    err = float((rec.mean[0] - post.mean()).norm())
    pinv_err = float((y @ torch.linalg.pinv(phys.matrix).T - post.mean()).norm())
    assert err < min(1.0, 0.1 * pinv_err)


# ----------------------------------------------------------------------- 3D mode
def test_dz_adjoint():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=F64)
    d = torch.randn(4, 3, generator=g, dtype=F64)
    assert float((dz(x) * d).sum()) == pytest.approx(float((x * dz_adjoint(d)).sum()), rel=1e-12)


def test_dds3d_tv_makes_constant_volume_more_constant():
    """Volume of 6 identical slices (GMM d = 8, d_y = 2 each, noiseless): slice-wise DDS
    samples each slice independently; TV along z (default rho, lam) pulls them together.
    With rho = 0 the ADMM step is plain CG, so DDS3D reduces to slice-wise DDS."""
    prior, _, _, _ = analytic.mcgdiff_problem(8, 2, 1)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 8, generator=g, dtype=F64)
    phys = matrix(a, 0.0)
    x = prior.sample(1, g).expand(6, 8)
    y = phys.A(x)
    opts = dict(steps=20, cg_iters=10)
    flat = DDSSolver(**opts).solve(y, phys, prior, num_samples=2, seed=0)
    tv = DDS3DSolver(**opts).solve(y, phys, prior, num_samples=2, seed=0)
    no_tv = DDS3DSolver(rho=0.0, **opts).solve(y, phys, prior, num_samples=2, seed=0)
    assert tv.samples.shape == (2, 6, 8)
    assert torch.allclose(no_tv.samples, flat.samples, atol=1e-8)

    def zvar(s):
        return float(dz(s.transpose(0, 1)).abs().sum())

    assert zvar(tv.samples) < 0.1 * zvar(flat.samples)
    assert (tv.samples @ a.T - y).abs().max() < 1e-2  # still data consistent
    again = DDS3DSolver(**opts).solve(y, phys, prior, num_samples=2, seed=0)
    assert torch.equal(again.samples, tv.samples)


# ----------------------------------------------------------------------- images
class StationaryGaussianPrior(Prior):
    """Gaussian image prior N(m, C) with C diagonal in the 2D DFT basis, power spectrum
    p(k) = v / (1 + (|k| / k0)^2); exact denoiser by FFT (a smooth-image prior)."""

    def __init__(self, shape, mean=0.3, v=0.05, k0=0.08):
        super().__init__()
        self.signal_shape = tuple(shape)
        h, w = shape[-2:]
        ky = torch.fft.fftfreq(h, dtype=F64)[:, None]
        kx = torch.fft.fftfreq(w, dtype=F64)[None, :]
        self.register_buffer("power", v / (1 + (ky ** 2 + kx ** 2) / k0 ** 2))
        self.m = mean

    def _denoise(self, x, sigma):
        s2 = expand_like(sigma, x).to(F64) ** 2
        zf = torch.fft.fft2(x.to(F64) - self.m, norm="ortho")
        wiener = self.power / (self.power + s2)
        return (torch.fft.ifft2(zf * wiener, norm="ortho").real + self.m).to(x.dtype)


def psnr(x, ref):
    return float(10 * torch.log10(ref.max() ** 2 / ((x - ref) ** 2).mean()))


def test_blur_smoke():
    from diffrecon.datasets.phantoms import phantom
    from diffrecon.operators.blur import blur

    x = torch.from_numpy(phantom("ellipses", 32, 0, "val")).to(F64)[None, None]
    phys = blur("gaussian", width=3.0, noise_sigma=0.01, dtype=F64)
    y = phys.A(x) + 0.01 * torch.randn(
        x.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    prior = StationaryGaussianPrior((1, 32, 32), v=0.03, k0=0.05)
    rec = DDSSolver(steps=20, gamma=100.0).solve(y, phys, prior, num_samples=4, seed=0)
    assert rec.samples.shape == (4, 1, 1, 32, 32) and rec.samples.dtype == F64
    assert torch.isfinite(rec.samples).all()
    assert psnr(rec.mean, x) > psnr(y, x) + 1.0  # measured: 24.5 vs 22.6 dB
    assert min(psnr(s, x) for s in rec.samples[:, 0]) > psnr(y, x) + 0.5
    assert rec.info["nfe"] == 20


def test_multicoil_mri_smoke():
    mri_mod = pytest.importorskip("diffrecon.operators.mri")
    from diffrecon.datasets.phantoms import phantom

    n, coils = 32, 4
    img = torch.from_numpy(phantom("mri", n, 0, "val"))
    x = torch.stack([img.real, img.imag])[None].to(F64)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    maps = torch.stack([torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2)).to(torch.complex64)
                        for cy, cx in [(-1, -1), (-1, 1), (1, -1), (1, 1)]][:coils])
    maps = maps / (maps.abs() ** 2).sum(0).sqrt()
    mask = torch.zeros(n)
    mask[::2] = 1
    mask[n // 2 - 4:n // 2 + 4] = 1
    phys = mri_mod.mri(mask, maps)
    y = phys.A(x)
    prior = StationaryGaussianPrior((2, n, n), mean=0.0, v=0.1)
    rec = DDSSolver(steps=10, cg_iters=5).solve(y, phys, prior, seed=0)
    assert rec.samples.shape == (1, 1, 2, n, n) and torch.isfinite(rec.samples).all()
    zero_filled = phys.A_adjoint(y)
    assert psnr(rec.mean, x) > psnr(zero_filled, x) + 1.0
