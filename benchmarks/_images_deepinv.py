"""deepinv 0.5's samplers (DPS, DiffPIR, DDRM) on ``benchmarks.images`` problems (its private
helper): a diffrecon prior wrapped as a deepinv denoiser on [0, 1] images and the problem
mapped to those units."""

from __future__ import annotations

import numpy as np
import torch


class UnitDenoiser(torch.nn.Module):
    """A diffrecon prior as a deepinv denoiser ``forward(u, sigma)`` on [0, 1] images (the
    range deepinv's DPS and DiffPIR assume): with x = lo + span u, span = hi - lo,
    D_u(u, s) = (D_x(lo + span u, span s) - lo) / span."""

    def __init__(self, prior):
        super().__init__()
        self.prior = prior
        self.lo, hi = (float(v) for v in prior.data_range)
        self.span = hi - self.lo

    def forward(self, u, sigma, *args, **kwargs):
        s = torch.as_tensor(sigma, dtype=u.dtype, device=u.device).reshape(-1)
        s = s.expand(u.shape[0]) if s.numel() == 1 else s
        # deepinv's DDRM ends its schedule at sigma = 0, where an EDM network's log(sigma)
        # conditioning is -inf (NaN image): denoise at the prior's sigma_min instead (~identity)
        s_x = (self.span * s).float().clamp_min(float(self.prior.sigma_min))
        d = self.prior.denoise((self.lo + self.span * u).float(), s_x)
        return ((d - self.lo) / self.span).to(u.dtype)


def svd_physics(physics, sigma_u: float, img_size):
    """The deepinv ``DecomposablePhysics`` DDRM needs: ``BlurFFT`` with the same kernel for a
    circular blur of (C, H, W) images (equal to the task's operator to 1e-6), noise
    ``sigma_u``. Other operators (multi-coil MRI, CT, bicubic SR) have no cheap SVD here:
    ValueError."""
    import deepinv as dinv

    kernel = getattr(physics, "filter", None)
    if kernel is None or not isinstance(physics, dinv.physics.Blur):
        raise ValueError(f"DDRM needs an SVD (DecomposablePhysics); {type(physics).__name__} "
                         f"has none here")
    return dinv.physics.BlurFFT(img_size=tuple(img_size), filter=kernel,
                                noise_model=dinv.physics.GaussianNoise(sigma_u))


def run_deepinv(name: str, steps: int, y, physics, prior, seed: int, weight: float = 1.0):
    """One draw (1, C, H, W) in prior units from deepinv's ``name`` ("dps" | "diffpir" |
    "ddrm") on the problem mapped to [0, 1]: y_u = (y - A(lo 1)) / span, noise sigma_y /
    span."""
    import deepinv as dinv

    den = UnitDenoiser(prior)
    shape = physics.A_adjoint(y).shape
    y_u = (y - physics.A(torch.full(shape, den.lo, dtype=y.dtype, device=y.device))) / den.span
    sigma_u = float(physics.noise_model.sigma) / den.span
    phys = dinv.physics.LinearPhysics(A=physics.A, A_adjoint=physics.A_adjoint,
                                      noise_model=dinv.physics.GaussianNoise(sigma_u),
                                      max_iter=20)  # CG iterations of DiffPIR's prox
    torch.manual_seed(seed)
    if name == "ddrm":
        with torch.no_grad():
            model = dinv.sampling.DDRM(den, sigmas=np.linspace(1, 0, steps))
            u = model(y_u, svd_physics(physics, sigma_u, shape[1:]), seed=seed)
        return (den.lo + den.span * u).detach()
    if name == "dps":
        model = dinv.sampling.DPS(den, num_steps=steps, weight=weight, dtype=torch.float32,
                                  rng=torch.Generator().manual_seed(seed))
        u = model(y_u, phys, x_init=tuple(shape), seed=seed)
    else:
        with torch.no_grad():
            model = dinv.sampling.DiffPIR(den, dinv.optim.data_fidelity.L2(), max_iter=steps)
            u = model(y_u, phys, seed=seed)
    return (den.lo + den.span * u).detach()
