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

  "dds" (a STEERED ENSEMBLE of DDS chains, NOT an exact posterior sampler): the proposal is
      DDS's step (``dds`` module, same code): x0_hat = D(z_t, sigma_t), x0' = CG data
      consistency from x0_hat (gamma, cg_iters), z_s = x0' + sigma_s (sqrt(f) xi + sqrt(1-f)
      eps_hat) with DDS's fresh fraction f (eta, noise_convention); the last step returns x0'
      = consistency(D(z_1, sigma_1), sigma_1), as DDS does. Its law has no density to put in
      the weights, so the weights are FK steering's "difference" potentials (Singhal et al.
      arXiv 2501.06848) on the data fit of the prior's estimate:
          log G_t(z) = beta_t fit_t(z),  fit_t(z) = -||y - A D(z, sigma_t)||^2 / (2 c_t^2),
          c_t^2 = sigma_y^2 + kappa sigma_t^2,  G_T = 1,  increment log G_s(z_s) - log G_t(z_t),
      and no increment at the last step. beta_s is chosen per step (adaptive tempering,
      ``smc_cloud.steering_exponent``): the largest b in [0, steer_max] whose increment
      b fit_s(z_s) - log G_t(z_t) keeps the conditional ESS (sum W inc)^2 / sum W inc^2 (W the
      current normalised weights; Zhou, Johansen & Aston 2016) >= steer_ess; the usual ESS
      rule then resamples only when the weights have drifted below ess_threshold * N. The
      cloud thus takes in at most a bounded amount of data-fit information per step, and
      mostly where the fit differs between particles (low noise), so it keeps many
      lineages. What is exact: steer_max = 0 (or N = 1) gives N independent DDS chains, bit
      for bit DDS with the same noise; with no resampling the final log weights equal
      beta_1 fit_1(z_1) up to a constant (the potentials telescope); the target of the
      weighted cloud is (law of the DDS chain) x G_1, which is not p(x | y) (DDS's kernel is
      not the model's). The ensemble's spread is that of steered DDS chains, an uncertainty
      heuristic to be calibrated (``diffrecon.calibration``), not a posterior std. Runs in
      y's dtype like DDS (weights in float64); the other proposals run in float64.

Physics: a LinearPhysics shared by all measurements that broadcasts over the particle batch
(y[b:b+1] against (n, ...) rows); per-measurement physics: call ``solve`` per measurement.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import SolveContext, Solver
from .common import (
    effective_sample_size,
    make_generators,
    measurement_entropy,
    noise_sigma,
    operator_gain,
    systematic_resample,
)
from .dds import DDSOptions, check_convention
from .reconstruction import Reconstruction
from .smc_cloud import Cloud, Measurement, State
from .smc_spread import LOCAL, ParticleGroup

PROPOSALS = ("gaussian", "twisted", "bootstrap", "dds")
KERNEL_VARIANCES = ("auto", "ddim", "analytic")
POTENTIAL_SCHEDULES = ("auto", "constant", "tempered")
POTENTIAL_COVARIANCES = ("isotropic", "operator")


@dataclass(frozen=True)
class SMCOptions:
    """SMC options (reference values in comments).

    num_particles: N per measurement. proposal: "gaussian" | "twisted" | "bootstrap" | "dds"
    (module docstring). kappa: potential inflation c_t^2 = sigma_y^2 + kappa sigma_t^2 (> 0
    when sigma_y = 0). eta: DDIM eta of the prior kernel (1 = DDPM ancestral) in the
    ``noise_convention`` ("ddim" | "reference", as DDS's); None: 1.0 and "ddim", or DDS's
    defaults (0.85, "reference") for "dds". ess_threshold: resample when ESS <
    ess_threshold * N. cg_iters: CG iterations per S-solve (exactness needs convergence:
    about d_y for a small matrix, more for ill-conditioned images); for "dds" DDS's
    iterations M of its data-consistency step; None: 50, or DDS's 5 for "dds". gamma: DDS's
    data weight ("dds" only; ``DDSOptions``). steer_ess, steer_max ("dds" only): the
    conditional ESS each step's exponent keeps and the exponent's cap (module docstring;
    steer_max = 0: independent DDS chains).
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
    eta: float | None = None        # None: 1.0 (DDS's 0.85 for "dds"); reference protocol: 0.85
    noise_convention: str | None = None  # None: "ddim" ("reference" for "dds")
    ess_threshold: float = 0.5      # standard N/2 rule
    cg_iters: int | None = None     # None: 50 (DDS's M = 5 for "dds")
    gamma: float | str = "auto"     # "dds": DDS's data weight
    steer_ess: float = 0.9          # "dds": conditional ESS kept per step
    steer_max: float = 1.0          # "dds": cap of the exponent beta_t
    krylov: bool = True
    chunk_size: int = 256
    schedule: str = "karras"
    sigma_max: float | None = None  # None -> prior.sigma_max
    sigma_min: float | None = None  # None -> prior.sigma_min
    batch_size: int = 16

    def __post_init__(self):
        if self.proposal not in PROPOSALS:
            raise ValueError(f"smc: option proposal={self.proposal!r} is not one of "
                             f"{', '.join(PROPOSALS)}.")
        for name in ("operator_gain", "krylov"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"smc: option {name}={getattr(self, name)!r} must be true or "
                                 f"false.")
        if self.potential_covariance not in POTENTIAL_COVARIANCES:
            raise ValueError(f"smc: option potential_covariance={self.potential_covariance!r} "
                             f"is not one of {', '.join(POTENTIAL_COVARIANCES)}.")
        if self.noise_convention is not None:
            check_convention("smc", self.noise_convention)
        if isinstance(self.gamma, str) and self.gamma != "auto":
            raise ValueError(f"smc: option gamma={self.gamma!r} must be a number or 'auto'.")
        if not 0.0 <= self.steer_ess <= 1.0:
            raise ValueError(f"smc: option steer_ess={self.steer_ess!r} must be in [0, 1].")
        if not 0.0 <= self.steer_max < math.inf:
            raise ValueError(f"smc: option steer_max={self.steer_max!r} must be a finite "
                             f"number >= 0.")
        if self.potential_covariance == "operator" and self.proposal != "gaussian":
            raise ValueError("smc: option potential_covariance='operator' needs "
                             "proposal='gaussian'.")
        if self.kernel_variance not in KERNEL_VARIANCES:
            raise ValueError(f"smc: option kernel_variance={self.kernel_variance!r} is not one "
                             f"of {', '.join(KERNEL_VARIANCES)}.")
        if self.potential_schedule not in POTENTIAL_SCHEDULES:
            raise ValueError(f"smc: option potential_schedule={self.potential_schedule!r} is "
                             f"not one of {', '.join(POTENTIAL_SCHEDULES)}.")
        if self.steps < 1 or self.num_particles < 1 or self.chunk_size < 1 or \
                self.setting("cg_iters") < 1:
            raise ValueError("smc: options steps, num_particles, chunk_size and cg_iters must "
                             "be >= 1.")
        if not 0.0 <= self.ess_threshold <= 1.0 or self.kappa < 0 or \
                not 0.0 <= self.setting("eta") <= 1:
            raise ValueError("smc: options need 0 <= ess_threshold <= 1, kappa >= 0 and "
                             "0 <= eta <= 1.")

    def setting(self, name: str):
        """eta, cg_iters or noise_convention: the option's value, or for None the proposal's
        default (DDSOptions' for "dds": one source for DDS's defaults)."""
        value = getattr(self, name)
        if value is not None:
            return value
        if self.proposal == "dds":
            return getattr(DDSOptions, name)
        return {"eta": 1.0, "cg_iters": 50, "noise_convention": "ddim"}[name]


class SMCSolver(Solver):
    """Sequential Monte Carlo posterior sampler (Krylov / twisted / bootstrap proposals);
    needs a LinearPhysics. Returns weighted particles plus ``num_samples`` equally weighted
    draws by systematic resampling of the final cloud (with replacement if num_samples > N,
    so they are then not independent; they depend on num_samples, the cloud does not).
    Runs in float64 (measurement-space CG at c_s ~ sigma_min needs it), the "dds" proposal
    in y's dtype like DDS; results come back in y's dtype."""

    name = "smc"
    Options = SMCOptions
    requires_linear = True

    @property
    def working_dtype(self) -> torch.dtype | None:  # type: ignore[override]
        return None if self.options.proposal == "dds" else torch.float64
    group: ParticleGroup | None = None  # spread_over: particles over processes

    def _check(self, physics, prior) -> None:
        super()._check(physics, prior)
        if self.options.kappa == 0 and noise_sigma(physics) == 0:
            raise ValueError("smc: option kappa must be > 0 when physics.noise_model.sigma is "
                             "0.")

    def _passes(self, y: Tensor, ctx: SolveContext, num_samples: int
                ) -> Iterator[tuple[Tensor, Cloud]]:
        """One pass per measurement: its cloud, with the schedule, the kernel variances and
        the potential's constants computed once per solve."""
        o = self.options
        sigmas = self._sigmas(ctx.prior, y.device).to(y.dtype)
        mmse = self._mmse(ctx.prior.prior, sigmas)
        data_var = self._data_variance(mmse, sigmas)
        entropy = measurement_entropy(ctx.seed, y.shape[0])
        x0_var = mmse if o.kernel_variance != "ddim" else None
        with torch.no_grad():
            gain = operator_gain(ctx.physics.physics, ctx.signal_shape, y) if o.operator_gain \
                else 1.0
        ctx.diagnostics.update(kappa=o.kappa * gain,  # after operator_gain
                               kernel_variance="ddim" if x0_var is None else "analytic",
                               potential_schedule="constant" if data_var is None else "tempered")
        for b in range(y.shape[0]):
            with torch.no_grad():
                meas = Measurement(ctx.physics, y[b:b + 1], o.krylov, o.setting("cg_iters"),
                                   ctx.signal_shape)
            yield y[b:b + 1], Cloud(
                meas, ctx.prior, o, sigmas, ctx.sigma_y, o.kappa * gain, x0_var, data_var,
                ctx.signal_shape,
                make_generators([entropy[b]], y.device)[0], num_samples, ctx.callback, b,
                self.group)

    def _sample(self, y: Tensor, cloud: Cloud) -> tuple[Tensor, ...]:
        """One measurement's Feynman-Kac run (module docstring). Returns (particles, log_w,
        samples, log Z, ESS per step, resampled per step, final ESS, eve indices), all
        tensors (no host sync). Eve indices give the Chan & Lai / Lee & Whiteley variance
        estimate of any weighted average: sum_j (sum_{i: eve_i = j} w_i (phi_i - mean))^2.

        Spread over processes (``smc_spread``): the proposals run on this process's rows
        (``mine``); the weights, particles and states are gathered after each step, so the
        weights, resampling, lineages and results are the whole cloud's on every process."""
        n, sigmas, group = self.options.num_particles, cloud.sigmas, cloud.group or LOCAL
        dev, steps, mine = sigmas.device, sigmas.shape[0] - 1, group.rows(n)
        with torch.no_grad():
            z = sigmas[0] * cloud.randn(*cloud.shape)
            state = cloud.evaluate(z, sigmas[0])       # x0, eps, log G_T, grad
            log_w, z, *whole = group.gather(state.log_g.double(), z, *state)
            state = State(*whole)                      # gamma_T = N(0, sigma_T^2) G_T
            log_z = torch.zeros((), dtype=torch.float64, device=dev)
            eve = torch.arange(n, device=dev)          # time-0 ancestor of each particle
            ess_trace, resampled = [], []
            for i in range(steps):
                # resample (systematic) or carry the weights, branch-free
                ess = effective_sample_size(log_w)
                do = ess < self.options.ess_threshold * n
                anc = torch.where(do, systematic_resample(log_w, cloud.uniform()),
                                  torch.arange(n, device=dev))
                z, eve = z[anc], eve[anc]
                x0, eps, log_g, grad = (u[anc[mine]] for u in state)
                lse = torch.logsumexp(log_w, 0)
                log_z = log_z + torch.where(do, lse - math.log(n), torch.zeros_like(lse))
                log_w = torch.where(do, torch.zeros_like(log_w), log_w[anc])
                ess_trace.append(ess)
                resampled.append(do)
                if cloud.callback is not None:
                    cloud.report(i=i, sigma=sigmas[i], x=z, log_weights=log_w,
                                 denoised=x0 if group.world == 1 else state.x0[anc])
                if i == steps - 1:                     # exact final step, any proposal
                    z, log_num = cloud.final_step(i, x0, log_g)
                    increment, z = group.gather((log_num - log_g).double(), z)
                else:
                    z, state, log_num = cloud.propose(i, x0, eps, grad, log_g, log_w)
                    increment, z, *whole = group.gather((log_num - log_g).double(), z, *state)
                    state = State(*whole)
                log_w = log_w + increment
            final_ess = effective_sample_size(log_w)
            log_z = log_z + torch.logsumexp(log_w, 0) - math.log(n)
            pick = systematic_resample(log_w, cloud.uniform(), cloud.num_samples)
        return (z, log_w, z[pick], log_z, torch.stack(ess_trace), torch.stack(resampled),
                final_ess, eve)

    def _combine(self, draws: list[tuple[Tensor, ...]], ctx: SolveContext, batch: int
                 ) -> Reconstruction:
        o = self.options
        particles, log_w, samples, log_z, ess, resampled, final_ess, eves = zip(*draws,
                                                                              strict=True)
        info = {
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
            "vjp": o.steps - 1 if o.proposal == "twisted" else 0,
        }
        return Reconstruction.from_particles(torch.stack(particles, 1), torch.stack(log_w, 1),
                                             torch.stack(samples, 1), info)

    def _chains(self, num_samples: int, batch: int) -> int:
        return self.options.num_particles // (self.group or LOCAL).world * batch

    def spread_over(self, group: ParticleGroup) -> SMCSolver:
        """This solver with each cloud's particles spread over the processes of ``group``
        (``smc_spread``): call ``solve`` with the same arguments in every process; each
        returns the Reconstruction one process returns, bit for bit. ValueError unless
        num_particles splits into whole ``chunk_size`` chunks per process. Counts in
        ``info`` (denoiser rows, operator applications) are this process's; NFE is per
        particle as usual."""
        group.check(self.options.num_particles, self.options.chunk_size, self.name)
        spread = type(self)(self.options)
        spread.group = group if group.world > 1 else None
        return spread

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
                    raise ValueError(f"smc: option {name}={mode!r} needs a prior with mmse(); "
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


__all__ = ["KERNEL_VARIANCES", "POTENTIAL_SCHEDULES", "PROPOSALS", "SMCOptions", "SMCSolver"]
