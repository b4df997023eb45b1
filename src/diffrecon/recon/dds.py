"""DDS: decomposed diffusion sampling with Krylov data consistency (Chung, Lee & Ye,
arXiv 2303.05754, Algorithm 1; official code HJ-harry/DDS, re-derived, not copied).

Per step on a decreasing sigma schedule: x0_hat = D(z, sigma) (one denoiser call, no
autograd); M conjugate-gradient steps STARTED AT x0_hat on

    noisy (sigma_y > 0):  (I + gamma A^T A) x = x0_hat + gamma A^T y
    noiseless:            A^T A x = A^T y

so the update stays in x0_hat + Krylov(A^T A, r0) (the paper's point: no network Jacobian);
then DDIM renoising z' = x0' + sigma' (sqrt(f) xi + sqrt(1 - f) eps_hat) with eps_hat from
the step's denoiser output (not recomputed from x0'). The last step returns x0'.
``DDSSolver._sample`` is that loop; ``dds3d`` extends it through two hooks (the denoiser
call and the data-consistency step).

Fast normal operator: where the physics offers an approximate A^T A, K (``operators.ct``
``normal="toeplitz"``, an FFT convolution, ~1% operator error on images), CG uses K with
the consistent right-hand side K x_d (``recon.common.approximate_normal``) on every step
but the last ``EXACT_LAST`` (none: on the last step gamma is small and an exact step
changed nothing, module constant), and the exact A^T A with A^T y on those; the per-step
data residual (one exact A) is then recorded every ``RESIDUAL_EVERY`` steps and on the last
(``info["data_residual_steps"]``).

Fresh-noise fraction f (variance share of new noise in the step sigma -> sigma'):
    noise_convention="ddim":      f = eta^2 (1 - sigma'^2 / sigma^2)  (standard DDIM eta,
                                  Song et al. 2021 eq. 16; eta = 1 is DDPM-ancestral)
    noise_convention="reference": f = eta^2, constant (the DDS code's c = eta; its default
                                  eta = 0.85 gives 72% fresh variance at every step, while
                                  standard DDIM eta = 0.85 gives about 13-24%).
Signals are real (complex images as 2 channels), so CG uses the real inner product and is
Hermitian-correct by construction (avoids the reference code's complex CG traps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from .base import SolveContext, Solver, record
from .common import (
    approximate_normal,
    bview,
    cg,
    ddim_fresh_fraction,
    fast_normal,
    normal_operator,
    relative_residual,
    renoise,
    tweedie,
)

NOISE_CONVENTIONS = ("ddim", "reference")
# Steps between exact data residuals when CG runs an approximate A^T A: one exact A costs
# 0.5 s at CT 512 x 512, 720 views (2 CPU threads), most of a bf16 network call (0.7 s).
RESIDUAL_EVERY = 50
# Final steps whose CG runs the exact A^T A when the physics has a fast one. 0: DDS 50 on
# four VALIDATION anatomy slices (256 px, parallel 360 views) gave the same PSNR to 0.001 dB
# and the same data residual with 1 exact last step (its gamma is min(sigma_min, sd)^2 /
# sigma_y^2, small), and it cost 12 exact operator calls (7 s at 512 px, 720 views).
EXACT_LAST = 0


def check_convention(name: str, value: str) -> None:
    """ValueError unless ``value`` is a known noise convention (option validation)."""
    if value not in NOISE_CONVENTIONS:
        raise ValueError(f"{name}: option noise_convention={value!r} is not one of "
                         f"{', '.join(NOISE_CONVENTIONS)}.")


def fresh_fraction(eta: float, convention: str, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """Fresh-noise variance fraction of one DDS renoising step (module docstring)."""
    if convention == "reference":
        return torch.full_like(sigma, min(eta ** 2, 1.0))
    return ddim_fresh_fraction(eta, sigma, sigma_next)


def data_consistency(physics, y: Tensor, sigma_y: float | tuple[float, ...],
                     sigma_data: float, gamma: float | str, cg_iters: int, name: str,
                     fast: bool = False) -> Callable[..., Tensor]:
    """DDS's data-consistency step (module docstring) as (x0_hat, sigma, final=True) -> x0':
    CG started at x0_hat on (I + gamma A^T A) x = x0_hat + gamma A^T y (noisy) or on A^T A
    x = A^T y (noiseless), ``cg_iters`` iterations; A^T A is exact when ``final``, else the
    physics' approximate one with its consistent right-hand side (``approximate_normal``,
    built here when ``fast``; without it every call is exact). gamma: a number or "auto" =
    min(sigma, sigma_data)^2 / sigma_y^2 (``DDSOptions``). sigma_y: one float, or a tuple
    with one noise level per row of y (each row then gets the scalar weight a solve of
    it alone would use). y (B, ...) or (1, ...), which broadcasts over the rows of x0_hat.
    Shared by DDS (``DDSSolver._consistency``) and SMC's "dds" proposal; ``name`` prefixes
    its errors."""
    aty: list[Tensor] = []  # A^T y, on the first exact use (none on the fast path)

    def exact_pair():  # (A^T A, A^T y)
        if not aty:
            aty.append(physics.A_adjoint(y))
        return normal_operator(physics), aty[0]

    levels = sigma_y if isinstance(sigma_y, tuple) else None  # one per row
    noiseless = [s == 0 for s in levels] if levels is not None else [sigma_y == 0]
    if any(noiseless) != all(noiseless):
        raise ValueError(f"{name}: a batch mixes noiseless and noisy measurements; solve them "
                         f"separately")
    approx = approximate_normal(physics, y) if fast else None
    pair = (lambda final: exact_pair() if final or approx is None else approx)  # noqa: E731
    if noiseless[0]:
        return lambda x0, sigma, final=True: cg(*pair(final), x0, cg_iters)

    def weight(sigma, level):
        if gamma == "auto":
            return torch.clamp(sigma, max=sigma_data).to(y.dtype) ** 2 / level ** 2
        return gamma

    def consistency(x0, sigma, final=True):
        normal, b = pair(final)
        if levels is None:
            g = weight(sigma, sigma_y)
        else:  # row b gets exactly the scalar weight a solve of it alone would use
            g = bview(torch.stack([torch.as_tensor(weight(sigma, s), dtype=y.dtype,
                                                   device=y.device) for s in levels]), x0)
        return cg(lambda x: x + g * normal(x), x0 + g * b, x0, cg_iters)

    return consistency


@dataclass(frozen=True)
class DDSOptions:
    """DDS options (paper values in comments).

    steps: denoiser calls (paper 50; 19-99 tested). cg_iters: CG steps per diffusion step
    (paper M = 5; M = 10 was worse in their ablation). gamma: data weight of the noisy
    system (paper 1.0; in units of the data, so it scales with 1 / ||A||^2), or "auto":
    gamma_t = min(sigma_t, sigma_data)^2 / sigma_y^2, the weight that makes the CG system the
    Gaussian posterior of x given x0_hat ~ N(x, r_t^2 I) (Tweedie error r_t ~ sigma_t, capped
    by the data's own spread) and y ~ N(A x, sigma_y^2 I); it tends to the noiseless system as
    sigma_y -> 0. eta and
    noise_convention: fresh-noise fraction (module docstring); the default is the paper's
    (eta = 0.85, "reference": 72% fresh variance per step). On held-out validation phantoms
    (64 px, DDS 50) it beat standard DDIM eta = 1.0 by +0.5 dB on MRI 4x, +0.6 dB on MRI
    Poisson 8x, +0.5 dB on CT 8 views, +0.1 dB on SR x4 and deblur; smaller DDIM eta (0.5, 0)
    was worse still (-1.6 / -2.4 dB on MRI 4x).
    """

    steps: int = 50                 # paper: 50 NFE
    cg_iters: int = 5               # paper: M = 5
    gamma: float | str = "auto"     # paper: 1.0 (fixed); "auto" = min(sigma_t, sd)^2 / sigma_y^2
    eta: float = 0.85               # paper: 0.85 (in the "reference" convention)
    noise_convention: str = "reference"  # paper: "reference"; "ddim" = standard DDIM eta
    schedule: str = "karras"        # paper: VP DDIM respacing ("vp")
    sigma_max: float | None = None  # None -> prior.sigma_max
    sigma_min: float | None = None  # None -> prior.sigma_min
    batch_size: int = 16            # chains per pass

    def __post_init__(self):
        check_convention("dds", self.noise_convention)
        if isinstance(self.gamma, str) and self.gamma != "auto":
            raise ValueError(f"dds: option gamma={self.gamma!r} must be a number or 'auto'.")


class DDSSolver(Solver):
    """Decomposed diffusion sampler (Krylov data consistency); needs a LinearPhysics."""

    name = "dds"
    Options = DDSOptions
    requires_linear = True
    row_noise = True  # measurements of a batch may have their own sigma_y (gamma per row)

    def _sample(self, y: Tensor, ctx: SolveContext) -> Tensor:
        """Algorithm 1: per step Tweedie, data consistency from x0_hat, DDIM renoising."""
        o, shape = self.options, ctx.signal_shape
        sigmas = self._sigmas(ctx.prior, y.device)
        denoise = self._denoiser(ctx)            # (z, sigma) -> (x0_hat, eps_hat)
        consistency = self._consistency(y, ctx)  # (x0_hat, sigma, final) -> x0'
        every = RESIDUAL_EVERY if fast_normal(ctx.physics) else 1
        residuals: list[Tensor] = []
        z = sigmas[0].to(y.dtype) * ctx.noise.randn(*shape)
        n = sigmas.shape[0] - 1
        for i in range(n):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            x0, eps = denoise(z, sigma)
            x0 = consistency(x0, sigma, i >= n - EXACT_LAST)
            if i % every == 0 or i == n - 1:
                residuals.append(relative_residual(ctx.physics, x0, y).mean())
            ctx.report(i=i, sigma=sigma, x=z, denoised=x0)
            if i == n - 1:
                break
            f = fresh_fraction(o.eta, o.noise_convention, sigma, sigma_next)
            z = renoise(x0, eps, sigma_next, f, ctx.noise.randn(*shape))
        record(ctx.diagnostics, "data_residual", residuals)
        if every > 1:
            steps = [*range(0, n - 1, every), n - 1]
            ctx.diagnostics.setdefault("data_residual_steps", []).extend(steps)
        return x0

    def _denoiser(self, ctx: SolveContext) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """(z, sigma) -> (x0_hat, eps_hat): the Tweedie step on all rows at once."""
        return partial(tweedie, ctx.prior)

    def _consistency(self, y: Tensor, ctx: SolveContext) -> Callable[..., Tensor]:
        """(x0_hat, sigma, final) -> x0': ``data_consistency`` with this solver's gamma and
        cg_iters."""
        o = self.options
        return data_consistency(ctx.physics, y, ctx.sigma_y,
                                float(getattr(ctx.prior, "sigma_data", 0.5)), o.gamma,
                                o.cg_iters, "dds", fast=True)
