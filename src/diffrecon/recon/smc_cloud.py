"""The pieces of one SMC particle cloud (``smc.SMCSolver``): the measurement-space Gaussian
solves (``Measurement``: S = c2 I + v A A^T, Matheron's rule) and the per-step kernel,
potential and proposals of one measurement's run (``Cloud``), and the adaptive exponent of
the "dds" proposal's steering potential (``steering_exponent``). Formulas: ``smc``
docstring."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .common import bdot, cg, ddim_kernel_variance, renoise
from .dds import data_consistency, fresh_fraction

_LOG_2PI = math.log(2 * math.pi)
_CG_TOL = 1e-13      # relative residual at which a CG row is frozen
DENSE_MAX = 4096     # largest signal / measurement size of the dense path
STEER_GRID = 97      # steering exponents tried per step: steer_max * 10^(-k / 8), k < 96, and 0
STEER_ITERS = 30     # bisection steps between the two grid points that bracket the answer


def chunked(fn: Callable[..., tuple[Tensor, ...]], size: int, *rows: Tensor
            ) -> tuple[Tensor, ...]:
    """Apply ``fn`` to row chunks of the (N, ...) tensors ``rows``; concatenate its outputs."""
    n = rows[0].shape[0]
    outs = [fn(*(r[i:i + size] for r in rows)) for i in range(0, n, size)]
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


def conditional_ess(log_w: Tensor, log_inc: Tensor) -> Tensor:
    """Conditional ESS fraction (Zhou, Johansen & Aston 2016) of increments ``log_inc``
    (..., N) under the weights ``log_w`` (N,): (sum W inc)^2 / sum W inc^2, W = normalised
    exp(log_w); in (0, 1], 1 when the increment is constant. Float64, log space."""
    lw = log_w.double() - torch.logsumexp(log_w.double(), 0)
    li = log_inc.double()
    return torch.exp(2 * torch.logsumexp(lw + li, -1) - torch.logsumexp(lw + 2 * li, -1))


def steering_exponent(log_w: Tensor, log_g: Tensor, fit: Tensor, target: float, high: float
                      ) -> Tensor:
    """Adaptive exponent b of the "dds" proposal's potential log G_s = b fit (``smc``
    docstring): the largest b in [0, high] whose increment b fit - log_g (log_g = log G_t of
    the same particles) keeps ``conditional_ess`` >= target, or, when no b does, the b with
    the largest conditional ESS. A grid high * 10^(-k / 8) (k < STEER_GRID - 1) and 0 finds
    the bracket, STEER_ITERS bisection steps refine it (scalar float64 tensor, no host sync;
    the feasible set need not be an interval: the largest feasible grid point is kept)."""
    fit, log_g = fit.double(), log_g.double()
    k = torch.arange(STEER_GRID - 1, dtype=torch.float64, device=fit.device)
    grid = torch.cat([high * 10.0 ** (-k / 8), torch.zeros_like(k[:1])])      # decreasing
    cess = conditional_ess(log_w, grid[:, None] * fit - log_g)
    ok = cess >= target
    first = torch.argmax(ok.to(torch.uint8))                 # largest feasible grid point
    lo, hi = grid[first], grid[(first - 1).clamp(min=0)]
    for _ in range(STEER_ITERS):                             # keeps cess(lo) >= target
        mid = 0.5 * (lo + hi)
        good = conditional_ess(log_w, mid * fit - log_g) >= target
        lo, hi = torch.where(good, mid, lo), torch.where(good, hi, mid)
    return torch.where(ok.any(), lo, grid[torch.argmax(cess)])


class Measurement:
    """One measurement y (1, *meas) with its operator and the S = c2 I + v A A^T solver."""

    def __init__(self, physics, y: Tensor, krylov: bool, cg_iters: int, signal_shape):
        self.physics, self.y, self.cg_iters = physics, y, cg_iters
        self.size = y[0].numel()
        self.dense = None
        if not krylov:
            d = math.prod(signal_shape)
            if max(d, self.size) > DENSE_MAX:
                raise ValueError(f"smc: option krylov=False needs signal and measurement sizes "
                                 f"<= {DENSE_MAX}, got {d} and {self.size}.")
            eye = torch.eye(d, dtype=y.dtype, device=y.device).reshape(d, *signal_shape)
            a = physics.A(eye).reshape(d, -1).T                        # (d_y, d)
            self.dense = a @ a.T

    def A(self, x: Tensor) -> Tensor:
        return self.physics.A(x)

    def At(self, u: Tensor) -> Tensor:
        return self.physics.A_adjoint(u)

    def log_gauss(self, x: Tensor, c2: Tensor, k: Tensor | None = None) -> Tensor:
        """log N(y; A x, c2 I + k A A^T) per row (full constant; the Krylov path drops the
        log det, which is shared by all rows). k None: closed form, no CG."""
        r = self.y - self.A(x)
        if k is None:
            return -0.5 * bdot(r, r) / c2 - 0.5 * self.size * (_LOG_2PI + torch.log(c2))
        u, logdet = self.solve_s(r, c2, k)
        return -0.5 * (bdot(r, u) + logdet + self.size * _LOG_2PI)

    def solve_s(self, rhs: Tensor, c2: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """u = S^-1 rhs and log det S (0 in the Krylov path, where it is dropped)."""
        if self.dense is None:
            return cg(lambda u: c2 * u + v * self.A(self.At(u)), rhs, None, self.cg_iters,
                      _CG_TOL), torch.zeros((), dtype=rhs.dtype, device=rhs.device)
        s = c2 * torch.eye(self.size, dtype=rhs.dtype, device=rhs.device) + v * self.dense
        chol = torch.linalg.cholesky(s)
        u = torch.cholesky_solve(rhs.reshape(rhs.shape[0], -1).T, chol).T.reshape(rhs.shape)
        return u, 2 * torch.log(torch.diagonal(chol)).sum()

    def gaussian_step(self, m: Tensor, xi1: Tensor, xi2: Tensor, xi3: Tensor | None = None,
                      *, v: Tensor, c2: Tensor, k: Tensor | None = None
                      ) -> tuple[Tensor, Tensor]:
        """Exact draw from N(m, v I) N(y; A x, G) (normalised), G = c2 I + k A A^T, and
        log N(y; A m, S), S = G + v A A^T.

        Matheron / perturb-and-solve (``smc`` docstring): one CG on S for [r; y' - A x'];
        the draw of N(0, G) is sqrt(c2) xi2 + sqrt(k) A xi3 (xi3 signal-shaped)."""
        n = m.shape[0]
        xp = m + v.sqrt() * xi1
        xpp = xp if k is None else xp + k.sqrt() * xi3
        am = self.A(torch.cat([m, xpp]))
        rhs = torch.cat([self.y - am[:n], self.y + c2.sqrt() * xi2 - am[n:]])
        u, logdet = self.solve_s(rhs, c2, v if k is None else v + k)
        x = xp + v * self.At(u[n:])
        log_pred = -0.5 * (bdot(rhs[:n], u[:n]) + logdet + self.size * _LOG_2PI)
        return x, log_pred


class State(NamedTuple):
    """The particles' denoiser evaluation at one noise level (rows = particles)."""

    x0: Tensor      # D(z, sigma)
    eps: Tensor     # (z - x0) / sigma
    log_g: Tensor   # log G_sigma(z)
    grad: Tensor    # grad_z log G_sigma(z) (twisted proposal; empty otherwise)


@dataclass
class Cloud:
    """What one measurement's Feynman-Kac run needs besides its loop: the measurement, the
    counted prior, the schedule and its per-step variances, the potential's constants and
    the cloud's random stream."""

    meas: Measurement
    prior: Any                       # counted prior (D(x, sigma))
    options: Any                     # SMCOptions
    sigmas: Tensor                   # (steps + 1,) decreasing, float64
    sigma_y: float
    kappa: float                     # after operator_gain
    x0_var: Tensor | None            # per-step Var[x0 | z] (analytic kernel) or None (DDIM)
    data_var: Tensor | None          # sigma_d^2 of the tempered potential, or None
    shape: tuple[int, ...]
    gen: torch.Generator
    num_samples: int
    callback: Callable[[dict], None] | None
    index: int                       # the measurement's row in y
    group: Any = None                # smc_spread.ParticleGroup: particles over processes

    def randn(self, *shape: int) -> Tensor:
        """(R, *shape) standard normal draws from the cloud's stream: R = N, or this
        process's R rows of the whole cloud's (N, *shape) draw when the particles are spread
        over processes (``smc_spread``: every process draws all N rows, so the streams stay
        in step). Proposals draw all their noise here and size by R, not N."""
        n = self.options.num_particles
        draw = torch.randn((n, *shape), generator=self.gen, dtype=self.sigmas.dtype,
                           device=self.sigmas.device)
        return draw if self.group is None else draw[self.group.rows(n)]

    def uniform(self) -> Tensor:
        """One U(0, 1) draw (scalar, float64) from the cloud's stream (the same in every
        process of a spread cloud)."""
        return torch.rand((), generator=self.gen, dtype=torch.float64, device=self.sigmas.device)

    def report(self, **fields) -> None:
        if self.callback is not None:
            self.callback({**fields, "measurement": self.index})

    def potential(self, sigma: Tensor) -> tuple[Tensor, Tensor | None]:
        """(c2, k) of G_sigma = N(y; A ., c2 I + k A A^T); k None: isotropic."""
        kappa, sigma_y, data_var = self.kappa, self.sigma_y, self.data_var
        if self.options.potential_covariance == "operator":
            c2 = torch.full_like(sigma, sigma_y ** 2)
            if data_var is not None:               # tempered: the isotropic excess
                c2 = c2 + kappa * sigma ** 4 / data_var
            return c2, kappa * sigma ** 2
        if data_var is not None:                   # tempered (Gaussian proposal only)
            return sigma_y ** 2 + kappa * sigma ** 2 * (1 + sigma ** 2 / data_var), None
        return sigma_y ** 2 + kappa * sigma ** 2, None

    @cached_property
    def consistency(self) -> Callable[[Tensor, Tensor], Tensor]:
        """DDS's data-consistency step (x0_hat, sigma) -> x0' for this measurement, with the
        options' gamma and cg_iters ("dds" proposal; ``dds.data_consistency``)."""
        o = self.options
        with torch.no_grad():
            return data_consistency(self.meas.physics, self.meas.y, self.sigma_y,
                                    float(getattr(self.prior, "sigma_data", 0.5)), o.gamma,
                                    o.setting("cg_iters"), "smc")

    def fit(self, x0: Tensor, sigma: Tensor) -> Tensor:
        """-||y - A x0||^2 / (2 c^2) per row (float64), c^2 of the isotropic potential at
        sigma: the untempered "dds" potential of particles whose denoised estimate is x0."""
        c2, _ = self.potential(sigma)

        def rows(x):
            r = (self.meas.y - self.meas.A(x)).double()
            return (-0.5 * bdot(r, r) / c2,)

        return chunked(rows, self.options.chunk_size, x0)[0]

    def evaluate(self, z: Tensor, sigma: Tensor) -> State:
        """x0_hat, eps_hat, log G and (twisted) grad log G at (z, sigma), in chunks of
        ``chunk_size`` particles ("dds": log G = 0 here; ``propose`` sets it)."""
        proposal, (c2, k) = self.options.proposal, self.potential(sigma)
        parts = []
        for zc in z.split(self.options.chunk_size):
            sig = sigma.expand(zc.shape[0])
            if proposal == "twisted":
                with torch.enable_grad():
                    zg = zc.detach().requires_grad_(True)
                    x0 = self.prior.denoise(zg, sig)
                    lg = self.meas.log_gauss(x0, c2)
                    grad, = torch.autograd.grad(lg.sum(), zg)
                x0, lg = x0.detach(), lg.detach()
            else:
                x0 = self.prior.denoise(zc, sig)
                lg = torch.zeros(zc.shape[0], dtype=torch.float64, device=zc.device) \
                    if proposal == "dds" else \
                    self.meas.log_gauss(zc if proposal == "gaussian" else x0, c2, k)
                grad = torch.zeros_like(zc[:, :0])
            parts.append((x0, (zc - x0) / sigma, lg, grad))
        return State(*(torch.cat(p) for p in zip(*parts, strict=True)))

    def propose(self, i: int, x0: Tensor, eps: Tensor, grad: Tensor, log_g: Tensor,
                log_w: Tensor) -> tuple[Tensor, State, Tensor]:
        """Step sigmas[i] -> sigmas[i + 1] (not the last): the new particles, their state and
        the numerator log p(z_s | z_t) + log G_s(z_s) - log r(z_s | z_t) of the increment.
        log_g: log G_t of these rows; log_w: the whole cloud's weights ("dds" only)."""
        o, t, s = self.options, self.sigmas[i], self.sigmas[i + 1]
        f = fresh_fraction(o.setting("eta"), o.setting("noise_convention"), t, s)
        if o.proposal == "dds":
            return self.dds_step(t, s, f, x0, eps, log_g, log_w)
        m = x0 + (1 - f).sqrt() * s * eps
        v = ddim_kernel_variance(t, s, f, 0.0 if self.x0_var is None else self.x0_var[i])
        xi = self.randn(*self.shape)
        if o.proposal == "gaussian":
            c2, k = self.potential(s)
            extra = () if k is None else (self.randn(*self.shape),)
            z, log_num = chunked(partial(self.meas.gaussian_step, v=v, c2=c2, k=k),
                                 o.chunk_size, m, xi, self.randn(*self.meas.y.shape[1:]),
                                 *extra)
            return z, self.evaluate(z, s), log_num
        if o.proposal == "twisted":                # shift by v grad log G_t(z_t)
            z = m + v * grad + v.sqrt() * xi
            log_pr = -(0.5 * v * bdot(grad, grad) + v.sqrt() * bdot(grad, xi))
        else:
            z = m + v.sqrt() * xi
            log_pr = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
        state = self.evaluate(z, s)
        return z, state, log_pr + state.log_g

    def dds_step(self, t: Tensor, s: Tensor, f: Tensor, x0: Tensor, eps: Tensor,
                 log_g: Tensor, log_w: Tensor) -> tuple[Tensor, State, Tensor]:
        """The "dds" proposal t -> s (``smc`` docstring): DDS's data consistency from x0_hat,
        its renoising with eps_hat, then the adaptive exponent of the new potential (over the
        whole cloud: a spread cloud gathers fit and log G first)."""
        x = chunked(lambda a: (self.consistency(a, t),), self.options.chunk_size, x0)[0]
        z = renoise(x, eps, s, f, self.randn(*self.shape))
        state = self.evaluate(z, s)
        fit = self.fit(state.x0, s)
        whole = (fit, log_g) if self.group is None else self.group.gather(fit, log_g.double())
        beta = steering_exponent(log_w, whole[1], whole[0], self.options.steer_ess,
                                 self.options.steer_max)
        return z, state._replace(log_g=beta * fit), beta * fit

    def final_step(self, i: int, x0: Tensor, log_g: Tensor) -> tuple[Tensor, Tensor]:
        """The exact last step (any proposal but "dds") from N(x0_hat, Var[x0 | z_1]) to G_0 =
        N(y; A x, sigma_y^2 I): the samples and the log numerator of their increment. "dds":
        DDS's last step x0' = consistency(x0_hat, sigma_1), weights kept (numerator log_g)."""
        t = self.sigmas[i]
        if self.options.proposal == "dds":
            return chunked(lambda a: (self.consistency(a, t),), self.options.chunk_size,
                           x0)[0], log_g
        v = t ** 2 if self.x0_var is None else self.x0_var[i]   # Var[x0 | z_1]
        c2 = torch.full_like(t, self.sigma_y ** 2)
        return chunked(partial(self.meas.gaussian_step, v=v, c2=c2), self.options.chunk_size,
                       x0, self.randn(*self.shape), self.randn(*self.meas.y.shape[1:]))
