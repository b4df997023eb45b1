"""Small pieces shared by every solver: Tweedie step, DDIM renoising, batched conjugate
gradients, the normal operator, power iteration, the data residual, per-row random streams,
ESS and systematic resampling, and the solve-time readers of a physics (noise level, dtype).

All inner products are real and per batch row (sum over every non-batch dimension), so a
complex image stored as two real channels gets the Hermitian-correct inner product for free.
Nothing here synchronises with the host: loops have fixed length, and stopping tolerances
are applied by masking, never by ``.item()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor


def bdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row real inner product <a, b>; (B, ...) x (B, ...) -> (B,)."""
    return (a * b).flatten(1).sum(1)


def bview(v: Tensor, x: Tensor) -> Tensor:
    """(B,) -> broadcastable against x (B, ...)."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def tweedie(prior, z: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """One denoiser call: x0_hat = D(z, sigma) and eps_hat = (z - x0_hat) / sigma.

    ``sigma`` is a scalar tensor (the step's noise level); returns tensors in z's dtype.
    """
    x0 = prior.denoise(z, sigma.to(z.dtype).expand(z.shape[0]))
    eps = (z - x0) / sigma.to(z.dtype)
    return x0, eps


def ddim_fresh_fraction(eta: float, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """Fraction of fresh-noise variance in the DDIM step sigma -> sigma_next.

    Standard DDIM (Song et al. 2021, eq. 16) with parameter eta, written in sigma-space
    (z = x_t / a_t, sigma = s_t / a_t), gives variance eta^2 sigma_next^2 (1 - sigma_next^2 /
    sigma^2), i.e. the fraction eta^2 (1 - sigma_next^2 / sigma^2) whatever the VP/VE
    schedule. eta = 1 is the DDPM ancestral step; eta = 0 is deterministic DDIM.
    """
    return (eta ** 2 * (1 - (sigma_next / sigma) ** 2)).clamp(0.0, 1.0)


def renoise(x0: Tensor, eps: Tensor, sigma_next: Tensor, fresh_fraction: Tensor,
            noise: Tensor) -> Tensor:
    """z_next = x0 + sigma_next (sqrt(f) xi + sqrt(1 - f) eps_hat), f the fresh fraction.

    f = ddim_fresh_fraction(eta, ...) is standard DDIM; f = c^2 with a constant c is the
    DDS reference code's convention (its "eta" is c).
    """
    f = fresh_fraction.to(x0.dtype)
    return x0 + sigma_next.to(x0.dtype) * (f.sqrt() * noise + (1 - f).sqrt() * eps)


def ddim_kernel_variance(sigma: Tensor, sigma_next: Tensor, fresh_fraction: Tensor,
                         x0_variance: Tensor | float = 0.0) -> Tensor:
    """Isotropic variance of the DDIM transition z_next | z (``renoise``'s law):
    f sigma_next^2 + c^2 x0_variance, c = 1 - sqrt(1 - f) sigma_next / sigma the weight of
    x0_hat in its mean. x0_variance = 0 is plain DDIM (x0 treated as known); the prior's
    per-entry MMSE at sigma (``Prior.mmse``) gives the Analytic-DPM variance (Bao et al.
    2022), exact for a Gaussian prior. Without it 100 Karras steps shrink a unit-variance
    prior to variance 0.86 (eta 1)."""
    c = 1 - (1 - fresh_fraction).sqrt() * sigma_next / sigma
    return fresh_fraction * sigma_next ** 2 + c ** 2 * x0_variance


def measured_entries(physics, signal_shape: tuple[int, ...], like: Tensor) -> int:
    """Entries of one measurement that carry data: the nonzero entries of A(u) for a fixed
    pseudo-random u of shape (1, *signal_shape). Off-mask k-space or inpainting holes are
    structurally zero and do not count (a fully sampled operator counts every entry). One
    operator call and one host sync: call it at set-up, not inside a step loop."""
    u = torch.randn((1, *signal_shape), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64).to(like.device, like.dtype)
    with torch.no_grad():
        return int((physics.A(u) != 0).sum().item())


def operator_gain(physics, signal_shape: tuple[int, ...], like: Tensor, probes: int = 8
                  ) -> float:
    """Mean per-entry gain of A, tr(A A^T) / m = E||A u||^2 / m for u ~ N(0, I), m the
    measured entries (``measured_entries``), from ``probes`` fixed-seed Gaussian probes:
    sigma^2 times it is the per-entry variance of A(sigma n). 1 for a row-orthonormal A;
    multi-coil MRI with maps normalised to sum_c |S_c|^2 = 1: about 1 / coils. Host syncs:
    call it at set-up, not inside a step loop."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn((probes, *signal_shape), generator=g, dtype=torch.float64)
    with torch.no_grad():
        au = physics.A(u.to(like.device, like.dtype))
    m = measured_entries(physics, signal_shape, like)
    return float((au.double() ** 2).sum().item()) / (probes * m)


def cg(apply_A: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None = None,
       iters: int = 5, tol: float = 0.0, stop: Callable[[Tensor], Tensor] | None = None
       ) -> Tensor:
    """Conjugate gradients for a batch of SPD systems A x = b (one system per row).

    ``apply_A`` maps (B, ...) -> (B, ...) and must be symmetric positive (semi-)definite in
    the real inner product. Runs exactly ``iters`` iterations (no host sync); rows whose
    residual norm falls below ``tol * ||b||`` are frozen by masking, and so are rows where
    ``stop(x)`` ((B,) bool, called on every iterate) returned True once (e.g. the
    discrepancy principle, ``tuning.DiscrepancyStop``). Started at ``x0`` (zeros if None),
    so early stopping keeps x in x0 + Krylov(A, b - A x0).
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply_A(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = bdot(r, r)
    thresh = max(tol, 16 * torch.finfo(b.dtype).eps) ** 2 * bdot(b, b)
    tiny = torch.finfo(b.dtype).tiny
    frozen = torch.zeros_like(rs, dtype=torch.bool)
    for _ in range(iters):
        Ap = apply_A(p)
        pAp = bdot(p, Ap)
        active = (rs > thresh) & (pAp > tiny) & ~frozen
        alpha = torch.where(active, rs / torch.where(active, pAp, torch.ones_like(pAp)),
                            torch.zeros_like(rs))
        x = x + bview(alpha, x) * p
        r = r - bview(alpha, r) * Ap
        rs_new = bdot(r, r)
        beta = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)),
                           torch.zeros_like(rs))
        p = r + bview(beta, p) * p
        rs = torch.where(active, rs_new, rs)
        if stop is not None:
            frozen = frozen | stop(x)
    return x


def effective_sample_size(log_weights: Tensor, dim: int = 0) -> Tensor:
    """ESS = (sum w)^2 / sum w^2 computed in log space along ``dim``."""
    lw = log_weights.to(torch.float64)
    return torch.exp(2 * torch.logsumexp(lw, dim) - torch.logsumexp(2 * lw, dim))


def systematic_resample(log_weights: Tensor, uniform: Tensor, m: int | None = None) -> Tensor:
    """Systematic resampling: ``m`` (default N) ancestor indices for normalised or
    unnormalised log-weights (N,), from one U(0, 1) draw ``uniform`` (scalar tensor).

    Particle i is copied floor(m w_i) or ceil(m w_i) times (unbiased, lowest variance of the
    standard schemes; Douc & Cappe 2005); m > N draws with replacement.
    """
    n = log_weights.shape[0]
    m = n if m is None else m
    w = torch.softmax(log_weights.to(torch.float64), 0)
    cdf = torch.cumsum(w, 0)
    cdf[-1] = 1.0
    positions = (uniform.to(torch.float64) + torch.arange(m, dtype=torch.float64,
                                                          device=w.device)) / m
    return torch.searchsorted(cdf, positions).clamp_(max=n - 1)


def _row_seed(entropy: Sequence[int]) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> 1)


def make_generators(entropies: Sequence[Sequence[int]], device: torch.device | str) -> list[
        torch.Generator]:
    """One torch.Generator per row, seeded from an integer entropy tuple (e.g. (seed, b, i)),
    so row i draws the same numbers whatever batch or chunk it runs in."""
    gens = []
    for ent in entropies:
        g = torch.Generator(device=device)
        g.manual_seed(_row_seed(ent))
        gens.append(g)
    return gens


class RowNoise:
    """Per-row random streams: ``randn(shape)`` returns (R, *shape) with row r drawn from
    generator r only."""

    def __init__(self, generators: Sequence[torch.Generator], dtype: torch.dtype,
                 device: torch.device | str):
        self.generators = list(generators)
        self.dtype = dtype
        self.device = device

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, *shape: int) -> Tensor:
        return torch.stack([torch.randn(shape, generator=g, dtype=self.dtype, device=self.device)
                            for g in self.generators])

    def rand(self, *shape: int) -> Tensor:
        return torch.stack([torch.rand(shape, generator=g, dtype=self.dtype, device=self.device)
                            for g in self.generators])

    def subset(self, rows: slice) -> RowNoise:
        return RowNoise(self.generators[rows], self.dtype, self.device)


def power_iteration(apply: Callable[[Tensor], Tensor], x: Tensor, iters: int
                    ) -> tuple[Tensor, Tensor]:
    """Power method for the largest eigenvalue of a symmetric positive semi-definite
    ``apply``: ``iters`` applications from ``x``, each next iterate the last image scaled to
    unit norm. Returns (v, apply(v)) of the last application; the eigenvalue estimate is
    <v, A v> / <v, v> or ||A v|| / ||v||. Fixed count, no host sync."""
    av = apply(x)
    for _ in range(iters - 1):
        x = av / av.norm().clamp_min(torch.finfo(av.dtype).tiny)
        av = apply(x)
    return x, av


def base_physics(physics):
    """The physics behind the solver's counting proxy (``base.CountingPhysics``), or
    ``physics`` itself when it is not wrapped."""
    return getattr(physics, "physics", physics)


def operator_norm(physics, x_shape: tuple[int, ...], *, iters: int = 30, dtype=torch.float64,
                  device=None, seed: int = 0) -> float:
    """Largest singular value ||A|| of a linear physics by ``power_iteration`` on A^T A from a
    fixed random start (deterministic). Called once per solve, at the edge (one host sync).
    Nonlinear physics (no adjoint) return 1.0."""
    from deepinv.physics import LinearPhysics

    base = base_physics(physics)
    if not isinstance(base, LinearPhysics):
        return 1.0
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((1, *x_shape), generator=g, dtype=dtype).to(device)
    with torch.no_grad():
        v, av = power_iteration(lambda u: base.A_adjoint(base.A(u)).to(dtype),
                                x / x.norm().clamp_min(torch.finfo(dtype).tiny), iters)
        norm_sq = bdot(v, av)[0]
    return float(norm_sq.clamp_min(0).sqrt())


def normal_operator(physics) -> Callable[[Tensor], Tensor]:
    """x -> A^T A x: the physics' closed form when its class overrides ``A_adjoint_A``
    (deepinv's default is A_adjoint(A(x))), else A_adjoint(A(x)) through ``physics`` (so a
    counting proxy counts both applications)."""
    from deepinv.physics import LinearPhysics

    base = base_physics(physics)
    if type(base).A_adjoint_A is not LinearPhysics.A_adjoint_A:
        return base.A_adjoint_A
    return lambda x: physics.A_adjoint(physics.A(x))


# x_d refinements of approximate_normal: DDS 20 at 64 px vs the exact operator (PSNR, dB):
# 0 / 1 / 2 / 3 refinements -1.6 / +0.2 / +0.4 / +0.4 (parallel, MNI), -3.1 / -0.7 / -0.3 /
# -0.2 (fan, MNI), -4.7 / -1.8 / -1.0 / -0.7 (fan, coins)
DATA_REFINEMENTS = 3


def approximate_normal(physics, y: Tensor, dtype: torch.dtype | None = None
                       ) -> tuple[Callable[[Tensor], Tensor], Tensor] | None:
    """(K, K x_d): the physics' fast approximate x -> A^T A x when its ``normal`` option
    selects one (``operators.ct``: "toeplitz", an FFT convolution), and the right-hand side
    that stands for A^T y with it, else None. x_d = ``data_image(physics, y)``. K x_d, not
    A^T y: the exact A^T y is not consistent with K (K x != A^T A x at high frequencies), and
    CG amplifies that mismatch where K is small (100%+ image errors after 5 iterations); with
    K x_d the data term is ||x - x_d||_K^2, stable. For solvers that end on the exact
    operator or accept K's model (DDS; the normaliser's level, in float64 via ``dtype``:
    K x_d is then formed in that dtype); ``normal_operator`` stays exact."""
    if not fast_normal(physics):
        return None
    base = base_physics(physics)
    x_d = data_image(physics, y)
    return base.A_adjoint_A_approx, base.A_adjoint_A_approx(
        x_d if dtype is None else x_d.to(dtype))


def fast_normal(physics) -> bool:
    """Whether the physics' ``normal`` option selects its fast approximate A^T A."""
    return getattr(base_physics(physics), "normal", "exact") != "exact"


def data_image(physics, y: Tensor) -> Tensor:
    """x_d: A_dagger y refined ``DATA_REFINEMENTS`` times by x_d += A_dagger(y - A x_d) (one
    A and one A_dagger each), the least-squares-like image behind ``approximate_normal``.
    Computed once per measurement: a physics that carries it for y (``attach_data_image``:
    the CT loader, which computes it for the normaliser; rows of a stacked physics each
    their own slice's) returns it without operator calls, so a slice's solve gets the same
    bits alone or in a batch; the last computation is kept on the physics (its shallow
    copies made afterwards see it too) for the same y. One host sync."""
    base = base_physics(physics)
    known = base._buffers.get("data_measurement")  # (1 or B, ...): rows may repeat it
    if (known is not None and known.shape[1:] == y.shape[1:] and known.shape[0] in (1, len(y))
            and torch.equal(known.expand_as(y), y.to(known.dtype))):
        x_d = base._buffers["data_image"].to(y.dtype)
        return x_d.expand(len(y), *x_d.shape[1:])
    memo = base.__dict__.setdefault("_data_image_memo", [])
    if memo and memo[0][0].shape == y.shape and memo[0][0].dtype == y.dtype and torch.equal(
            memo[0][0], y):
        return memo[0][1]
    x_d = base.A_dagger(y)
    for _ in range(DATA_REFINEMENTS):
        x_d = x_d + base.A_dagger(y - base.A(x_d))
    memo[:] = [(y, x_d)]
    return x_d


def attach_data_image(physics, y: Tensor, x_d: Tensor):
    """Let ``data_image(physics, y)`` return ``x_d`` (buffers ``data_measurement`` and
    ``data_image``, which ``problems.stack_physics`` concatenates per slice); returns
    physics."""
    physics.register_buffer("data_measurement", y, persistent=False)
    physics.register_buffer("data_image", x_d, persistent=False)
    return physics


def relative_residual(physics, x: Tensor, y: Tensor) -> Tensor:
    """Data residual ||A(x_b) - y_b|| / ||y_b|| of each row, (B,) in y's dtype (no host
    sync). The one definition behind ``info["residual"]`` and the per-step diagnostics."""
    r = (physics.A(x.to(y.dtype)) - y).reshape(y.shape[0], -1)
    norm = y.reshape(y.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(y.dtype).tiny)
    return r.norm(dim=1) / norm


def noise_chi(relative: Tensor, y: Tensor, sigma: float | Sequence[float]) -> Tensor:
    """Prior-fit statistic chi = ||A(x_b) - y_b|| / (sigma sqrt(m_b)) of each row, (B,), from
    the row's ``relative_residual`` (so A is applied once for both), m_b the number of
    nonzero entries of y_b (the sampled ones for masked k-space). A posterior mean that fits
    the data as well as the truth does has chi <= ~1; chi >> 1 means no image the prior
    favours explains the measurements (or sigma is underestimated). NaN when sigma is 0.
    ``sigma``: one level, or one per row (``noise_sigma(physics, rows=True)``)."""
    flat = y.reshape(y.shape[0], -1)
    norm = flat.norm(dim=1).clamp_min(torch.finfo(y.dtype).tiny)  # as relative_residual
    m = (flat != 0).sum(dim=1).clamp_min(1).to(norm.dtype)
    if not isinstance(sigma, int | float):  # per row: each row as its own scalar
        return torch.cat([noise_chi(relative[b:b + 1], y[b:b + 1], float(s))
                          for b, s in enumerate(sigma)])
    scale = sigma * m.sqrt() if sigma > 0 else torch.full_like(m, float("nan"))
    return relative * norm / scale


def noise_sigma(physics, rows: bool = False) -> float | tuple[float, ...]:
    """Gaussian noise standard deviation of a deepinv physics (0.0 when noiseless). A
    per-measurement sigma (one entry per row of y, e.g. ``problems.Problem.stack`` of slices
    with their own levels) is returned as a tuple of floats when ``rows`` (solvers with
    ``Solver.row_noise``), else raises ValueError. Read once per solve, at the edge, so the
    step loop never touches the host."""
    model = getattr(physics, "noise_model", None)
    sigma = getattr(model, "sigma", None)
    if sigma is None:
        return 0.0
    if isinstance(sigma, Tensor):
        if sigma.numel() != 1:
            if rows:
                return tuple(float(s) for s in sigma.detach().cpu().reshape(-1))
            raise ValueError("per-measurement noise levels are not supported by this solver; "
                             "give physics.noise_model a scalar sigma")
        return float(sigma.detach().cpu())
    return float(sigma)


def physics_in_dtype(physics, dtype: torch.dtype):
    """A copy of ``physics`` whose buffers and parameters are in ``dtype`` (complex buffers
    in the matching complex dtype); the caller's object is left untouched. Solvers whose
    linear algebra is ill-conditioned in float32 (SMC's measurement-space CG at small
    sigma) run in float64 through this."""
    import copy

    clone = copy.deepcopy(physics)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    for module in clone.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is None:
                continue
            if buf.is_complex():
                module._buffers[name] = buf.to(complex_dtype)
            elif buf.is_floating_point():
                module._buffers[name] = buf.to(dtype)
        for name, par in list(module.named_parameters(recurse=False)):
            if par.is_floating_point():
                module._parameters[name] = torch.nn.Parameter(par.detach().to(dtype),
                                                              requires_grad=False)
    return clone


def measurement_entropy(seed: int | Sequence[int] | None, batch: int) -> list[tuple[int, ...]]:
    """Per-measurement seed material: an int seed gives (seed, b); a sequence gives one seed
    per measurement (the pipeline passes (seed, slice index) so results do not depend on
    how slices are batched); None draws a fresh seed."""
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    if isinstance(seed, int):
        return [(seed, b) for b in range(batch)]
    seeds = list(seed)
    if len(seeds) != batch:
        raise ValueError(f"seed has {len(seeds)} entries but y has batch size {batch}")
    return [tuple(s) if isinstance(s, tuple | list) else (int(s),) for s in seeds]
