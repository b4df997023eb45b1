"""DPS: diffusion posterior sampling (Chung et al., ICLR 2023, arXiv 2209.14687).

Per step, in sigma-space (z = x_t / a_t, sigma = s_t / a_t, a_t = 1 / sqrt(1 + sigma^2)):

    x0   = D(z, sigma_t)                          with autograd on z
    z'   = renoise(x0, eps_hat, sigma_{t-1}, eta)  the unconditional DDIM/DDPM step
    z    = z' - step_t * grad_z sum_b ||y_b - A(x0_b)||      (plain norm, not squared)

Step size: the paper's ``zeta`` acts in VP x_t-space. Since x_t = a_t z and
d/dx_t = (1/a_t) d/dz, the official update x_{t-1} = x'_{t-1} - zeta grad_{x_t} ||r|| is
exactly z_{t-1} = z' - zeta / (a_t a_{t-1}) grad_z ||r|| (``step_scale="vp"``, a_t from
``schedules.vp_alpha``); ``step_scale="none"`` uses step_t = zeta in sigma-space.

Deviations from the reference code, on purpose: norms are per sample (the reference takes
one norm over the whole batch, which couples samples); the last step returns the final
denoised estimate x0 = D(z_1, sigma_1) without the reference's extra gradient nudge after
it. With ``schedule="vp"``, ``eta=1`` and ``step_scale="vp"`` every earlier step is the
official update for a VP model with fixed posterior variance ("fixedsmall"); this is tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import SolveContext, Solver, record
from .common import ddim_fresh_fraction, operator_norm, renoise, tweedie
from .schedules import vp_alpha

STEP_SCALES = ("vp", "none")


@dataclass(frozen=True)
class DPSOptions:
    """DPS options. Units: sigma-space of the prior's data; ``zeta`` in VP x_t-space units
    when ``step_scale="vp"`` (the paper's convention, images in [-1, 1]). The paper's
    operators have ||A|| <= 1; for larger ones (CT line integrals) the step is divided by
    ||A|| (power iteration once per solve), since grad ||y - A x|| scales with ||A||."""

    steps: int = 1000             # paper: 1000 DDPM steps
    zeta: float = 1.0             # paper: 0.3 SR x4 / blur, 0.5 inpainting, 1.0 phase retrieval
    step_scale: str = "vp"        # "vp": zeta / (a_t a_{t-1}) (official); "none": zeta
    normalize_by_operator_norm: bool = True  # zeta / max(1, ||A||): no-op for ||A|| <= 1
    eta: float = 1.0              # paper: DDPM ancestral step (= DDIM eta 1)
    clip_denoised: bool = False   # paper: True (clips x0 to [-1, 1]; zeroes its gradient there)
    schedule: str = "vp"          # paper: linear-beta 1000-step VP chain
    sigma_max: float | None = None
    sigma_min: float | None = None
    batch_size: int = 16          # rows per pass (memory: one backward per pass)

    def __post_init__(self):
        if self.step_scale not in STEP_SCALES:
            raise ValueError(f"dps: option step_scale={self.step_scale!r} is not one of "
                             f"{', '.join(STEP_SCALES)}.")


class DPSSolver(Solver):
    """Diffusion posterior sampling for any differentiable deepinv Physics.

    ``clip_denoised=True`` clamps x0 to ``prior.data_range`` before the residual and the
    renoising (eps_hat is then recomputed from the clipped x0, as the reference's DDPM
    posterior mean does); clamping zeroes the likelihood gradient through clipped pixels.
    The start is z_T = sqrt(1 + sigma_T^2) n, i.e. x_T ~ N(0, I) in VP units (= sigma_T n
    up to O(sigma_T^-2) for VE schedules). Cost: one network forward and backward per
    step; memory holds one autograd graph for ``batch_size`` rows.
    """

    name = "dps"
    Options = DPSOptions
    requires_linear = False

    def _sample(self, y: Tensor, ctx: SolveContext) -> Tensor:
        o = self.options
        sigmas = self._sigmas(ctx.prior, y.device)
        a = vp_alpha(sigmas) if o.step_scale == "vp" else torch.ones_like(sigmas)
        zeta = o.zeta
        if o.normalize_by_operator_norm:  # the guidance gradient scales with ||A||
            zeta = zeta / max(1.0, operator_norm(ctx.physics, ctx.signal_shape, dtype=y.dtype,
                                                   device=y.device))
        step_sizes = (zeta / (a[:-1] * a[1:])).to(y.dtype)
        lo, hi = ctx.prior.data_range
        residuals = []
        z = (1 + sigmas[0] ** 2).sqrt().to(y.dtype) * ctx.noise.randn(*ctx.signal_shape)
        n = len(sigmas) - 1
        for i in range(n):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            last = i == n - 1
            with torch.set_grad_enabled(not last):
                z = z.detach().requires_grad_(not last)
                x0, eps = tweedie(ctx.prior, z, sigma)
                if o.clip_denoised:
                    x0 = x0.clamp(lo, hi)
                    eps = (z - x0) / sigma.to(z.dtype)
                norms = (y - ctx.physics.A(x0)).flatten(1).norm(dim=1)  # per sample
                grad = None if last else torch.autograd.grad(norms.sum(), z)[0]
            x0, eps = x0.detach(), eps.detach()
            residuals.append(norms.detach().mean())
            ctx.report(i=i, sigma=sigma, x=z.detach(), denoised=x0)
            if last:
                break
            fresh = ddim_fresh_fraction(o.eta, sigma, sigma_next)
            z = renoise(x0, eps, sigma_next, fresh, ctx.noise.randn(*ctx.signal_shape))
            z = z - step_sizes[i] * grad
        record(ctx.diagnostics, "residual_norm", residuals)
        return x0
