"""SMC: weighted particle ensembles that target the exact posterior of the diffusion model.

One Feynman-Kac skeleton (algorithms.md, "SMC"), three proposals. N particles of ONE
measurement are the rows of a batch (N, *signal_shape); denoiser, operator and CG calls run
on chunks of ``chunk_size`` rows. Over a decreasing schedule sigma_T > ... > sigma_1 > 0:

    z_T ~ N(0, sigma_T^2 I),  log w = log G_T(z_T)     (G_T multiplied in: MCGdiff trap)
    per step t -> s:  resample (systematic) when ESS < ess_threshold * N, else CARRY weights;
                      z_s ~ r(. | z_t);
                      log w += log p(z_s | z_t) + log G_s(z_s) - log G_t(z_t) - log r(z_s | z_t)

in float64. The prior kernel is the DDIM Gaussian p(z_s | z_t) = N(m, v I) with
x0_hat = D(z_t, sigma_t), eps_hat = (z_t - x0_hat) / sigma_t, f = ddim_fresh_fraction(eta, ...),
m = x0_hat + sqrt(1 - f) sigma_s eps_hat and v = f sigma_s^2 + c^2 gamma_t
(``ddim_kernel_variance``; c = 1 - sqrt(1 - f) sigma_s / sigma_t). gamma_t = 0 is plain DDIM,
which treats x0_hat as certain: its chain shrinks the prior (100 Karras steps: unit
variance -> 0.86, a 2-3x floor error in the GMM sliced Wasserstein that no N removes).
``kernel_variance="analytic"`` sets gamma_t = prior.mmse(sigma_t), the Analytic-DPM
variance (Bao et al. 2022), exact for Gaussian priors; "auto" uses it when the prior
provides ``mmse``.

Tempered potential (``potential_schedule``, Gaussian proposal): c_t^2 = sigma_y^2 +
kappa sigma_t^2 (1 + sigma_t^2 / sigma_d^2), sigma_d^2 the prior's per-entry variance (from
``mmse``). MCGdiff's constant kappa makes N(y; A z, c_t^2) vary by O(1) nats between
particles at high noise, where the exact twist p(y | z_t) is nearly flat: the cloud then
resamples many times before the mixture components separate and reaches the split with few
lineages. sigma_t^2 / alpha_t (alpha_t = sigma_d^2 / (sigma_d^2 + sigma_t^2)) is the
z-space variance of the Gaussian-prior twist N(y; A E[x | z], .), so the tempered potential
is flat where that twist is and equals MCGdiff's for sigma_t << sigma_d.

Operator-shaped potential (``potential_covariance="operator"``, Gaussian proposal):
G_t(z) = N(y; A z, (sigma_y^2 + kappa sigma_t^4 / sigma_d^2) I + kappa sigma_t^2 A A^T). Since
y = A z_t - sigma_t A n + noise, sigma_y^2 I + sigma_t^2 A A^T is the exact covariance of
y | z_t under a locally flat prior; the isotropic c_t^2 I is that only when A A^T = I, and is
too flat by 1 / gain where A A^T ~ gain I (MRI 8 coils: 8x; GMM problem: up to 300x on
small singular values). Cost: one more measurement-space CG per step (log G_s at the new
particles; it needs sigma_y > 0 or A of full row rank). Off by default: on 40 held-out GMM
problems per cell it fixes the unimodal cases whose cloud lost its lineages at low noise
(RESULTS.md 1a-op) but is worse on the multimodal ones (d = 80, d_y = 2: SW 0.22 vs 0.14).

Final step (sigma_1 -> 0). The model's last kernel is p(x | z_1) = N(D(z_1, sigma_1),
sigma_1^2 I): the forward process z_1 = x + sigma_1 n, with the small-noise Tweedie covariance
sigma^2 dD/dz ~ sigma^2 I (error O(sigma_min^2)). Every proposal ends with the EXACT
locally optimal step for G_0(x) = N(y; A x, sigma_y^2 I) below (closed form because A is
linear), which keeps sigma_y = 0 usable: A x = y up to the CG tolerance.

Proposals / potentials (``proposal`` option):
  "gaussian" (Krylov SMC; MCGdiff/FPS family without an SVD, no network gradient):
      G_t(z) = N(y; A z, c_t^2 I), c_t^2 = sigma_y^2 + kappa sigma_t^2; proposal p(z_s|z_t) G_s,
      increment N(y; A m, S) / G_t(z_t) with S = c_s^2 I + v A A^T. Derivation (Woodbury,
      P = I/v + A^T A / c_s^2, P^-1 = v I - v^2 A^T S^-1 A): the perturb-and-solve draw
      P^-1 (x'/v + A^T y'/c_s^2) with x' = m + sqrt(v) xi1, y' = y + c_s xi2 equals
      x' + v A^T S^-1 (y' - A x')  (Matheron's rule), an exact N(P^-1 b, P^-1) sample; the
      predictive quadratic form is r^T S^-1 r, r = y - A m. Both right-hand sides go through
      ONE batched CG on S in measurement space (matrix-free: A, A_adjoint only; S stays
      well-posed at c_s = 0). log det S is shared by all particles and is dropped
      (``krylov=False`` solves S densely and keeps it). Exactness needs converged CG.
  "twisted" (TDS, Wu et al. arXiv 2306.17775): G_t(z) = N(y; A D(z, sigma_t), c_t^2 I), the
      same c_t^2 (isotropic version, r_t^2 = kappa sigma_t^2); proposal N(m + v grad log G_t,
      v I); one VJP through the denoiser per step.
  "bootstrap" (FK steering, arXiv 2501.06848): proposal = prior kernel, G_t as in "twisted",
      no gradients.
Because the potentials telescope and G_0 is the true likelihood, every variant targets
p_model(x) N(y; A x, sigma_y^2 I) exactly (p_model: the law of the DDIM chain); the choice
only changes the variance.

Physics: a LinearPhysics shared by all measurements that broadcasts over the particle batch
(y[b:b+1] against (n, ...) rows); per-measurement physics: call ``solve`` per measurement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from ..errors import InputError
from .base import (
    CountingPhysics,
    CountingPrior,
    Solver,
    mean_residual,
    measurement_entropy,
    noise_sigma,
    physics_in_dtype,
)
from .common import (
    bdot,
    cg,
    ddim_fresh_fraction,
    ddim_kernel_variance,
    effective_sample_size,
    make_generators,
    operator_gain,
    systematic_resample,
)
from .reconstruction import Reconstruction
from .schedules import solver_sigmas

PROPOSALS = ("gaussian", "twisted", "bootstrap")
KERNEL_VARIANCES = ("auto", "ddim", "analytic")
POTENTIAL_SCHEDULES = ("auto", "constant", "tempered")
POTENTIAL_COVARIANCES = ("isotropic", "operator")
_LOG_2PI = math.log(2 * math.pi)
_CG_TOL = 1e-13      # relative residual at which a CG row is frozen
_DENSE_MAX = 4096    # largest signal / measurement size of the dense path


@dataclass(frozen=True)
class SMCOptions:
    """SMC options (reference values in comments).

    num_particles: N per measurement. proposal: "gaussian" | "twisted" | "bootstrap" (module
    docstring). kappa: potential inflation c_t^2 = sigma_y^2 + kappa sigma_t^2 (> 0 when
    sigma_y = 0). eta: DDIM eta of the prior kernel (1 = DDPM ancestral). ess_threshold:
    resample when ESS < ess_threshold * N. cg_iters: CG iterations per S-solve (exactness
    needs convergence: about d_y for a small matrix, more for ill-conditioned images).
    krylov: False solves S with dense matrices (d, d_y <= 4096; for verification).
    chunk_size: particle rows per denoiser / operator / CG call. batch_size: unused by SMC
    (one measurement's cloud at a time, chunked by chunk_size); kept for the common contract.
    kernel_variance: "ddim" | "analytic" | "auto"; potential_schedule: "constant" | "tempered"
    | "auto" (module docstring; the non-reference values need a prior with ``mmse``, and
    "auto" uses them when it has one). operator_gain: multiply kappa by the operator's mean
    per-entry gain g = tr(A A^T) / m (``operator_gain``), so that kappa sigma_t^2 g is the
    per-entry variance of A(z_t - x0). Off by default (the references use kappa sigma_t^2
    in measurement units). On 8-coil MRI, where g ~ 1/8, the default potential pulls 8x
    too weakly toward the data (RESULTS.md section 2: MRI 4x SMC N=16 21.2 -> 25.5 dB);
    on the GMM protocol, where g ~ 1/3, it sharpens the potential before the mixture splits
    and raises the SW error (RESULTS.md 1b, session 4 diagnosis). potential_covariance:
    "isotropic" (c_t^2 I) | "operator" (sigma_y^2 I + kappa sigma_t^2 A A^T, tempered;
    Gaussian proposal only; module docstring).
    """

    steps: int = 50                 # MCGdiff / TDS references: 100 DDIM steps
    num_particles: int = 256        # reference protocol: N = 1000
    proposal: str = "gaussian"      # "Krylov SMC"; TDS: "twisted"; FK steering: "bootstrap"
    kappa: float = 1.0              # MCGdiff: 1 (c_t^2 = sigma_y^2 + sigma_t^2 on z)
    operator_gain: bool = False     # references: False (kappa in measurement units)
    potential_covariance: str = "isotropic"  # MCGdiff: "isotropic"
    kernel_variance: str = "auto"   # references: "ddim"
    potential_schedule: str = "auto"  # MCGdiff: "constant"
    eta: float = 1.0                # reference protocol: 0.85
    ess_threshold: float = 0.5      # standard N/2 rule
    cg_iters: int = 50
    krylov: bool = True
    chunk_size: int = 256
    schedule: str = "karras"
    sigma_max: float | None = None  # None -> prior.sigma_max
    sigma_min: float | None = None  # None -> prior.sigma_min
    batch_size: int = 16

    def __post_init__(self):
        if self.proposal not in PROPOSALS:
            raise InputError(f"smc: option proposal={self.proposal!r} is not one of "
                             f"{', '.join(PROPOSALS)}.")
        for name in ("operator_gain", "krylov"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"smc: option {name}={getattr(self, name)!r} must be true or "
                                 f"false.")
        if self.potential_covariance not in POTENTIAL_COVARIANCES:
            raise InputError(f"smc: option potential_covariance={self.potential_covariance!r} "
                             f"is not one of {', '.join(POTENTIAL_COVARIANCES)}.")
        if self.potential_covariance == "operator" and self.proposal != "gaussian":
            raise InputError("smc: option potential_covariance='operator' needs "
                             "proposal='gaussian'.")
        if self.kernel_variance not in KERNEL_VARIANCES:
            raise InputError(f"smc: option kernel_variance={self.kernel_variance!r} is not one "
                             f"of {', '.join(KERNEL_VARIANCES)}.")
        if self.potential_schedule not in POTENTIAL_SCHEDULES:
            raise InputError(f"smc: option potential_schedule={self.potential_schedule!r} is "
                             f"not one of {', '.join(POTENTIAL_SCHEDULES)}.")
        if self.steps < 1 or self.num_particles < 1 or self.chunk_size < 1 or self.cg_iters < 1:
            raise InputError("smc: options steps, num_particles, chunk_size and cg_iters must "
                             "be >= 1.")
        if not 0.0 <= self.ess_threshold <= 1.0 or self.kappa < 0 or not 0.0 <= self.eta <= 1:
            raise InputError("smc: options need 0 <= ess_threshold <= 1, kappa >= 0 and "
                             "0 <= eta <= 1.")


# ---------------------------------------------------------------------------- small pieces
def systematic_draws(log_weights: Tensor, m: int, uniform: Tensor) -> Tensor:
    """m ancestor indices by systematic resampling of (N,) log-weights (any m, so m > N
    draws with replacement); particle i is drawn floor(m w_i) or ceil(m w_i) times.
    Should move to common.py (generalises ``systematic_resample`` to m != N)."""
    w = torch.softmax(log_weights.to(torch.float64), 0)
    cdf = torch.cumsum(w, 0)
    cdf[-1] = 1.0
    pos = (uniform.to(torch.float64) + torch.arange(m, dtype=torch.float64, device=w.device)) / m
    return torch.searchsorted(cdf, pos).clamp_(max=w.shape[0] - 1)


def _chunked(fn: Callable[..., tuple[Tensor, ...]], size: int, *rows: Tensor
             ) -> tuple[Tensor, ...]:
    """Apply ``fn`` to row chunks of the (N, ...) tensors ``rows``; concatenate its outputs."""
    n = rows[0].shape[0]
    outs = [fn(*(r[i:i + size] for r in rows)) for i in range(0, n, size)]
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


class _Measurement:
    """One measurement y (1, *meas) with its operator and the S = c2 I + v A A^T solver."""

    def __init__(self, physics, y: Tensor, krylov: bool, cg_iters: int, signal_shape):
        self.physics, self.y, self.cg_iters = physics, y, cg_iters
        self.size = y[0].numel()
        self.dense = None
        if not krylov:
            d = math.prod(signal_shape)
            if max(d, self.size) > _DENSE_MAX:
                raise InputError(f"smc: option krylov=False needs signal and measurement sizes "
                                 f"<= {_DENSE_MAX}, got {d} and {self.size}.")
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

        Matheron / perturb-and-solve (module docstring): one CG on S for [r; y' - A x'];
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


# ---------------------------------------------------------------------------- solver
class SMCSolver(Solver):
    """Sequential Monte Carlo posterior sampler (Krylov / twisted / bootstrap proposals);
    needs a LinearPhysics. Returns weighted particles plus ``num_samples`` equally weighted
    draws by systematic resampling of the final cloud (with replacement if num_samples > N,
    so they are then not independent; they depend on num_samples, the cloud does not)."""

    name = "smc"
    Options = SMCOptions
    requires_linear = True

    def solve(self, y: Tensor, physics, prior, *, num_samples: int = 1,
              seed: int | Sequence[int] | None = None,
              callback: Callable[[dict], None] | None = None) -> Reconstruction:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self._check_physics(physics)
        o = self.options
        t0 = time.perf_counter()
        out_dtype = y.dtype
        if y.dtype != torch.float64:  # measurement-space CG at c_s ~ sigma_min needs float64
            y, physics = y.to(torch.float64), physics_in_dtype(physics, torch.float64)
        cphys, cprior = CountingPhysics(physics), CountingPrior(prior)
        sigma_y = noise_sigma(physics)
        if sigma_y == 0 and o.kappa == 0:
            raise InputError("smc: option kappa must be > 0 when physics.noise_model.sigma is 0.")
        sigmas = solver_sigmas(o.schedule, o.steps, prior, o.sigma_min, o.sigma_max)
        sigmas = sigmas.to(device=y.device, dtype=y.dtype)
        mmse = self._mmse(prior, sigmas)
        x0_var = mmse if o.kernel_variance != "ddim" else None
        data_var = self._data_variance(mmse, sigmas)
        entropy = measurement_entropy(seed, y.shape[0])
        runs = []
        with torch.no_grad():
            shape = tuple(physics.A_adjoint(y[:1]).shape[1:])
            kappa = o.kappa * (operator_gain(physics, shape, y) if o.operator_gain else 1.0)
            for b in range(y.shape[0]):
                gen = make_generators([entropy[b]], y.device)[0]
                meas = _Measurement(cphys, y[b:b + 1], o.krylov, o.cg_iters, shape)
                runs.append(self._run(meas, cprior, sigma_y, kappa, sigmas, x0_var, data_var,
                                      shape, gen, num_samples, callback, b))
        particles, log_w, samples, log_z, ess, resampled, final_ess, eves = zip(*runs, strict=True)
        n_vjp = o.steps - 1 if o.proposal == "twisted" else 0
        info = self._info(cphys, cprior, o.num_particles * y.shape[0], t0, {})
        info.update({
            "num_particles": o.num_particles,
            "ess": torch.stack(ess, 1).tolist(),               # (steps, B): ESS entering step
            "resampled": torch.stack(resampled, 1).tolist(),   # (steps, B) bools
            "resampling_steps": torch.stack(resampled, 1).sum(0).tolist(),
            "final_ess": torch.stack(final_ess).tolist(),
            "log_normalizer": torch.stack(log_z).tolist(),
            "eves": torch.stack(eves).tolist(),                # (B, N) time-0 ancestor ids
            # distinct time-0 ancestors in the final cloud; 1 = the cloud is one lineage and
            # its spread is not a posterior spread (weight degeneracy)
            "lineages": [int(torch.unique(e).numel()) for e in eves],
            "vjp": n_vjp,
            "kappa": kappa,                                    # after operator_gain
            "kernel_variance": "ddim" if x0_var is None else "analytic",
            "potential_schedule": "constant" if data_var is None else "tempered",
        })
        rec = Reconstruction.from_particles(torch.stack(particles, 1), torch.stack(log_w, 1),
                                            torch.stack(samples, 1), info)
        rec.info["residual"] = mean_residual(physics, rec.mean, y)
        for name in ("samples", "mean", "std", "particles"):
            setattr(rec, name, getattr(rec, name).to(out_dtype))
        return rec

    def _mmse(self, prior, sigmas: Tensor) -> Tensor | None:
        """prior.mmse at sigmas[:-1] when an option uses it, else None; one prior call
        before the step loop. Options that need it fail here when the prior has none."""
        o = self.options
        wanted = {"kernel_variance": (o.kernel_variance, "ddim"),
                  "potential_schedule": (o.potential_schedule if o.proposal == "gaussian"
                                         else "constant", "constant")}
        if all(mode == off for mode, off in wanted.values()):
            return None
        gamma = prior.mmse(sigmas[:-1])
        if gamma is None:
            for name, (mode, off) in wanted.items():
                if mode not in ("auto", off):
                    raise InputError(f"smc: option {name}={mode!r} needs a prior with mmse(); "
                                     f"{type(prior).__name__} has none (use {off!r}).")
            return None
        return torch.as_tensor(gamma).to(device=sigmas.device, dtype=sigmas.dtype)

    def _data_variance(self, mmse: Tensor | None, sigmas: Tensor) -> Tensor | None:
        """sigma_d^2 of the tempered potential: the per-entry variance of a Gaussian prior
        with the same mmse at sigma_T, 1 / (1 / mmse - 1 / sigma_T^2); None for the constant
        schedule (or when mmse(sigma_T) >= sigma_T^2: no information). One host sync, at
        set-up."""
        o = self.options
        if mmse is None or o.proposal != "gaussian" or o.potential_schedule == "constant":
            return None
        precision = 1 / mmse[0] - 1 / sigmas[0] ** 2
        return 1 / precision if bool(precision > 0) else None

    def _run(self, meas: _Measurement, prior, sigma_y: float, kappa: float, sigmas: Tensor,
             x0_var: Tensor | None, data_var: Tensor | None, shape, gen, num_samples: int,
             callback, b: int):
        """One measurement's particle cloud. Returns (particles, log_w, samples, log Z,
        ESS per step, resampled per step, final ESS, eve indices), all tensors (no host
        sync). Eve indices give the Chan & Lai / Lee & Whiteley variance estimate of any
        weighted average: sum_j (sum_{i: eve_i = j} w_i (phi_i - mean))^2."""
        o = self.options
        n, dt, dev = o.num_particles, sigmas.dtype, sigmas.device
        chunk, proposal = o.chunk_size, o.proposal

        def randn(*s):
            return torch.randn((n, *s), generator=gen, dtype=dt, device=dev)

        def potential(sigma):
            """(c2, k) of G_sigma = N(y; A ., c2 I + k A A^T); k None: isotropic."""
            if o.potential_covariance == "operator":
                c2 = torch.full_like(sigma, sigma_y ** 2)
                if data_var is not None:               # tempered: the isotropic excess
                    c2 = c2 + kappa * sigma ** 4 / data_var
                return c2, kappa * sigma ** 2
            if data_var is not None:                   # tempered (Gaussian proposal only)
                return sigma_y ** 2 + kappa * sigma ** 2 * (1 + sigma ** 2 / data_var), None
            return sigma_y ** 2 + kappa * sigma ** 2, None

        def evaluate(z: Tensor, sigma: Tensor):
            """x0_hat, eps_hat, log G and (twisted) grad log G at (z, sigma), chunked."""
            c2, k = potential(sigma)

            def one(zc):
                sig = sigma.expand(zc.shape[0])
                if proposal == "twisted":
                    with torch.enable_grad():
                        zg = zc.detach().requires_grad_(True)
                        x0 = prior.denoise(zg, sig)
                        lg = meas.log_gauss(x0, c2)
                        grad, = torch.autograd.grad(lg.sum(), zg)
                    x0, lg = x0.detach(), lg.detach()
                else:
                    x0 = prior.denoise(zc, sig)
                    lg = meas.log_gauss(zc if proposal == "gaussian" else x0, c2, k)
                    grad = torch.zeros_like(zc[:, :0])
                return x0, (zc - x0) / sigma, lg, grad

            return _chunked(one, chunk, z)

        z = sigmas[0] * randn(*shape)
        state = evaluate(z, sigmas[0])                 # x0, eps, log G_T, grad
        log_w = state[2].double()                      # gamma_T = N(0, sigma_T^2) G_T
        log_z = torch.zeros((), dtype=torch.float64, device=dev)
        eve = torch.arange(n, device=dev)              # time-0 ancestor of each particle
        ess_trace, resampled = [], []
        steps = sigmas.shape[0] - 1
        for i in range(steps):
            t, s = sigmas[i], sigmas[i + 1]
            # resample (systematic) or carry the weights, branch-free
            ess = effective_sample_size(log_w)
            do = ess < o.ess_threshold * n
            anc = torch.where(do, systematic_resample(log_w, torch.rand((), generator=gen,
                                                                           dtype=torch.float64,
                                                                           device=dev)),
                              torch.arange(n, device=dev))
            z, eve = z[anc], eve[anc]
            x0, eps, log_g, grad = (u[anc] for u in state)
            lse = torch.logsumexp(log_w, 0)
            log_z = log_z + torch.where(do, lse - math.log(n), torch.zeros_like(lse))
            log_w = torch.where(do, torch.zeros_like(log_w), log_w[anc])
            ess_trace.append(ess)
            resampled.append(do)
            if callback is not None:
                callback({"i": i, "sigma": t, "x": z, "denoised": x0, "log_weights": log_w,
                          "measurement": b})
            if i == steps - 1:                         # exact final step, any proposal
                v = t ** 2 if x0_var is None else x0_var[i]   # Var[x0 | z_1]
                c2 = torch.full_like(t, sigma_y ** 2)
                z, log_num = _chunked(partial(meas.gaussian_step, v=v, c2=c2), chunk, x0,
                                      randn(*shape), randn(*meas.y.shape[1:]))
                log_w = log_w + (log_num - log_g).double()
                break
            f = ddim_fresh_fraction(o.eta, t, s)
            m = x0 + (1 - f).sqrt() * s * eps
            v = ddim_kernel_variance(t, s, f, 0.0 if x0_var is None else x0_var[i])
            xi = randn(*shape)
            if proposal == "gaussian":
                c2, k = potential(s)
                extra = () if k is None else (randn(*shape),)
                z, log_num = _chunked(partial(meas.gaussian_step, v=v, c2=c2, k=k), chunk, m,
                                      xi, randn(*meas.y.shape[1:]), *extra)
                state = evaluate(z, s)
            else:
                if proposal == "twisted":              # shift by v grad log G_t(z_t)
                    z = m + v * grad + v.sqrt() * xi
                    log_pr = -(0.5 * v * bdot(grad, grad) + v.sqrt() * bdot(grad, xi))
                else:
                    z = m + v.sqrt() * xi
                    log_pr = torch.zeros_like(log_w)
                state = evaluate(z, s)
                log_num = log_pr + state[2]
            log_w = log_w + (log_num - log_g).double()
        final_ess = effective_sample_size(log_w)
        log_z = log_z + torch.logsumexp(log_w, 0) - math.log(n)
        pick = systematic_draws(log_w, num_samples, torch.rand((), generator=gen,
                                                               dtype=torch.float64, device=dev))
        return (z, log_w, z[pick], log_z, torch.stack(ess_trace), torch.stack(resampled),
                final_ess, eve)


__all__ = ["KERNEL_VARIANCES", "POTENTIAL_SCHEDULES", "PROPOSALS", "SMCOptions", "SMCSolver",
           "systematic_draws"]
