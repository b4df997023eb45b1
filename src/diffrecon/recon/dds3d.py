"""DDS on slice stacks with TV along z (Chung, Lee & Ye, arXiv 2303.05754, section 4.3,
"DDS + DiffusionMBIR"): the DDS loop of ``dds.DDSSolver`` with its data-consistency step
replaced by one ADMM step that couples the slices of one volume."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import SolveContext
from .common import cg, measurement_entropy, normal_operator, tweedie
from .dds import DDSSolver, check_convention


def dz(x: Tensor) -> Tensor:
    """Forward difference along the slice (batch) axis: (S, ...) -> (S - 1, ...)."""
    return x[1:] - x[:-1]


def dz_adjoint(d: Tensor) -> Tensor:
    """Adjoint of ``dz``: (S - 1, ...) -> (S, ...)."""
    zero = torch.zeros_like(d[:1])
    return torch.cat([zero, d]) - torch.cat([d, zero])


def soft_threshold(x: Tensor, t: float) -> Tensor:
    return x.sign() * (x.abs() - t).clamp_min(0)


@dataclass(frozen=True)
class DDS3DOptions:
    """DDS on a slice stack with TV along z (paper section 4.3, "DDS + DiffusionMBIR").

    One ADMM step per diffusion step for min_x 1/2 ||A x - y||^2 + lam ||D_z x||_1:
    x-update by ``cg_iters`` CG steps on (A^T A + rho D_z^T D_z) x = A^T y + rho D_z^T (v - u)
    started at the stack of x0_hat slices, v = soft(D_z x + u, lam / rho), u += D_z x - v;
    v and u warm-started across diffusion steps. rho, lam are in the data's units
    (paper: CT images in [0, 1]). ``batch_size``: slices per denoiser pass.
    """

    steps: int = 50                 # paper: 50
    cg_iters: int = 5               # paper: 5
    rho: float = 10.0               # paper: 10
    lam: float = 0.04               # paper: 0.04 sparse-view, 0.4 limited-angle
    eta: float = 0.85               # paper: 0.85 (in the "reference" convention)
    noise_convention: str = "reference"  # paper: "reference"; "ddim" = standard DDIM eta
    schedule: str = "karras"
    sigma_max: float | None = None
    sigma_min: float | None = None
    batch_size: int = 16

    def __post_init__(self):
        check_convention("dds3d", self.noise_convention)


class DDS3DSolver(DDSSolver):
    """DDS for a stack of slices y (S, ...) of ONE volume, coupled by TV along the slice axis.

    Each sample is one whole volume (rows of y are slices, not independent measurements);
    slice s of sample i draws its noise from (seed, s, i).
    """

    name = "dds3d"
    Options = DDS3DOptions
    row_noise = False  # its rows are one volume's slices, coupled: never batched by the pipeline
    volume = True

    def _passes(self, y: Tensor, ctx: SolveContext, num_samples: int
                ) -> Iterator[tuple[Tensor, SolveContext]]:
        entropy = measurement_entropy(ctx.seed, y.shape[0])
        for i in range(num_samples):  # one volume per pass, whatever the number of slices
            yield y, ctx.with_noise([(*e, i) for e in entropy], y)

    def _sample(self, y: Tensor, ctx: SolveContext) -> Tensor:
        with torch.no_grad():
            return super()._sample(y, ctx)

    def _denoiser(self, ctx: SolveContext) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """The Tweedie step in chunks of ``batch_size`` slices."""
        def denoise(z, sigma):
            parts = [tweedie(ctx.prior, c, sigma) for c in z.split(max(1, self.options.batch_size))]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        return denoise

    def _consistency(self, y: Tensor, ctx: SolveContext) -> Callable[[Tensor, Tensor], Tensor]:
        """One ADMM step (options docstring); split variable and dual warm-started across
        the diffusion steps of this volume."""
        o, normal = self.options, normal_operator(ctx.physics)
        aty = ctx.physics.A_adjoint(y)
        v = u = torch.zeros_like(dz(aty))  # split variable D_z x and scaled dual

        def one(t: Tensor) -> Tensor:  # the volume as one CG "row": real inner product over all
            return t.unsqueeze(0)

        def admm(x0, sigma, final=True):  # final: DDS's flag; ADMM's A^T A is always exact
            nonlocal v, u
            rhs = aty + o.rho * dz_adjoint(v - u)
            x = cg(lambda t: one(normal(t[0]) + o.rho * dz_adjoint(dz(t[0]))), one(rhs), one(x0),
                   o.cg_iters)[0]
            if o.rho > 0:
                v = soft_threshold(dz(x) + u, o.lam / o.rho)
                u = u + dz(x) - v
            return x

        return admm
