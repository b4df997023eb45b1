"""Regularisation weights chosen from the data, for the classical baselines.

The rule is Morozov's discrepancy principle (Engl, Hanke & Neubauer 1996, sec. 4.3): pick the
weight lam whose solution explains the data down to the noise,

    ||A x_lam - y|| = tau * sqrt(m) * sigma_eff,

m the measured entries of y (``common.measured_entries``: off-mask k-space does not count),
sigma_eff the per-entry noise std (``physics.noise_model.sigma``, the units of y) with a
floor ``rel_floor * ||y|| / sqrt(m)``. The floor stands in for the noise when the data are
(nearly) noiseless or the operator is inexact (estimated coil maps, discretisation): there the
discrepancy principle alone asks for lam -> 0, the unregularised solution. Where a
least-squares fit measures that misfit (``kappa``; more measured entries than unknowns, e.g.
multi-coil MRI at 4x), the measured misfit replaces the floor. The residual is
increasing in lam, so a secant search on (log lam, log residual) with bracketing finds it in
a few solves (:func:`discrepancy_search`). Each solve starts cold, so the auto result is
exactly the fixed-weight solution at the reported lam (a warm start would add iterations,
which regularise too, and make the image depend on the search path).
Early-stopped CG regularises by its iteration count; :func:`discrepancy_stop` freezes each
row at its first iterate inside the same target.

Everything is scale-equivariant: multiplying y and sigma by c multiplies the chosen lam (for
1-homogeneous regularisers: TV, L1) and the solution by c. Constants (tau, rel_floor, the
starting weights) were chosen on the VALIDATION images of ``benchmarks/baselines_auto.py``
(MNI / dipy slices, scikit-image photographs), never on its test images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .common import cg, measured_entries, noise_sigma, normal_operator, relative_residual


@dataclass
class Target:
    """Relative residual target per measurement (lists of length B) and how it was set."""

    rel: list[float]                 # ||A x - y|| / ||y|| to aim at
    rule: list[str]                  # 'noise', 'mismatch' or 'floor': the term that set it
    sigma: list[float]               # noise std used (units of y)
    ls_residual: list[float] = field(default_factory=list)  # relative, of the CG LS fit


def residual_target(physics, y: Tensor, *, tau: float, rel_floor: float = 0.0,
                    kappa: float | None = None, kappa_measured: float | None = None,
                    noise_with_misfit: bool = True, ls_iters: int = 30,
                    sigma: float | None = None) -> Target:
    """The residual target of the discrepancy principle for each row of y,

        ||A x - y|| = max(tau sqrt(m) sigma_used, (1 + kappa) ||A x_ls - y||, rel_floor ||y||),

    m = ``measured_entries``, sigma = ``physics.noise_model.sigma`` (or ``sigma``); the
    ``rel_floor`` term only where the misfit is not measurable (below).

    With ``kappa`` given, a least-squares fit x_ls (``ls_iters`` CG steps on A^T A x = A^T y)
    measures the misfit no image explains (noise off the range of A, model mismatch): the
    target stays a factor 1 + kappa above it (1 + ``kappa_measured`` where the misfit is
    measurable, below: there x_ls is a converged fit, not an early-stopped one, and a
    misfit-dominated target needs less margin), and the noise level is capped by the
    residual estimate sigma_hat^2 = ||A x_ls - y||^2 / (m - d), d = <b, A x_b> the degrees
    of freedom of the same fit for a fixed-seed white probe b on the measured entries
    (Hutchinson's trace estimate), used where the misfit is measurable: m >= 1.5 n (more
    measured entries than image entries, e.g. multi-coil MRI; a square or underdetermined
    fit still moving after ``ls_iters`` steps says little) and m - d >= m / 10. An
    overestimated sigma (e.g. from signal in outer k-space) then no longer over-regularises,
    and neither does the floor, which is dropped there: it stands in for a misfit that is
    now measured (VALIDATION, 256 px MNI slices, 16 -> 8 coils, 4x equispaced: a floor of 1%
    of ||y|| sat 1.5x over the misfit and cost TV 3 dB).
    With ``noise_with_misfit=False`` the misfit term alone sets the target where it is
    measurable (early-stopped CG, whose best iterate fits the data closer than sqrt(m)
    sigma there). Costs 2 CG fits.
    """
    sigma = noise_sigma(physics) if sigma is None else float(sigma)
    batch = y.shape[0]
    flat = y.reshape(batch, -1)
    with torch.no_grad():
        aty = physics.A_adjoint(y)
        m = measured_entries(physics, tuple(aty.shape[1:]), y)
        norms = flat.double().norm(dim=1).clamp_min(1e-300)
        sig = torch.full((batch,), sigma, dtype=torch.float64)
        ls_rel = ls_fit = torch.zeros(batch, dtype=torch.float64)
        measurable = torch.zeros(batch, dtype=torch.bool)
        if kappa is not None:
            normal = normal_operator(physics)
            r_ls = relative_residual(physics, cg(normal, aty, iters=ls_iters), y).double().cpu()
            g = torch.Generator().manual_seed(0)
            probe = torch.randn(y.shape[1:], generator=g, dtype=torch.float64)
            u = torch.randn((1, *aty.shape[1:]), generator=g, dtype=torch.float64)
            probe = probe.to(y.device, y.dtype) * (physics.A(u.to(y.device, y.dtype)) != 0)[0]
            probe = probe.expand_as(y).contiguous()
            fit = physics.A(cg(normal, physics.A_adjoint(probe), iters=ls_iters))
            dof = m - (fit * probe).reshape(batch, -1).double().sum(1).cpu()
            measurable = (dof >= m / 10) & (m >= 1.5 * aty[0].numel())
            sigma_hat = torch.where(measurable, r_ls * norms.cpu() / dof.clamp_min(1).sqrt(),
                                    torch.full_like(r_ls, math.inf))
            sig = torch.minimum(sig, sigma_hat)
            margin = kappa if kappa_measured is None else kappa_measured
            ls_rel = (1 + torch.where(measurable, torch.tensor(margin, dtype=torch.float64),
                                      torch.tensor(kappa, dtype=torch.float64))) * r_ls
            ls_fit = r_ls
        noise_rel = tau * math.sqrt(m) * sig / norms.cpu()
        if not noise_with_misfit:
            noise_rel = torch.where(measurable, torch.zeros_like(noise_rel), noise_rel)
        noise_rel, measured = noise_rel.tolist(), measurable.tolist()
    rel, rule = [], []
    for b in range(batch):
        terms = {"noise": noise_rel[b], "mismatch": float(ls_rel[b]),
                 "floor": 0.0 if measured[b] else rel_floor}
        name = max(terms, key=terms.get)
        rel.append(max(terms[name], 1e-12))
        rule.append(name)
    return Target(rel, rule, sig.tolist(), ls_fit.tolist() if kappa is not None else [])


@dataclass
class SearchResult:
    """Outcome of :func:`discrepancy_search` (per measurement: lists of length B)."""

    x: Tensor
    lam: list[float]
    residual: list[float]            # ||A x - y|| / ||y|| at the chosen lam
    target: list[float]
    solves: int
    status: list[str] = field(default_factory=list)  # 'hit', 'budget', 'lam->0', 'lam->inf'


def _next_lam(points: list[tuple[float, float]], log_t: float, slope0: float
              ) -> tuple[float | None, str]:
    """Next log lam from tried (log lam, log residual) points of one row, or None with a
    status when the target cannot be reached (residual flat in lam)."""
    below = [p for p in points if p[1] < log_t]
    above = [p for p in points if p[1] >= log_t]
    if below and above:
        lo = max(below)  # largest lam still under the target
        hi = min(above)  # smallest lam over it
        if hi[0] > lo[0]:
            slope = (hi[1] - lo[1]) / (hi[0] - lo[0])
            guess = lo[0] + (log_t - lo[1]) / slope if slope > 0 else 0.5 * (lo[0] + hi[0])
            span = hi[0] - lo[0]
            return min(max(guess, lo[0] + 0.1 * span), hi[0] - 0.1 * span), ""
    pts = sorted(points)
    slope = slope0
    if len(pts) >= 2:
        (l1, r1), (l2, r2) = (pts[-2], pts[-1]) if not above else (pts[0], pts[1])
        if l2 > l1:
            slope = (r2 - r1) / (l2 - l1)
    if not above:  # all under the target: raise lam
        if len(pts) >= 2 and slope < 0.01:
            return None, "lam->inf"
        ref = pts[-1]
        step = (log_t - ref[1]) / max(slope, 0.2)
        return ref[0] + min(max(step, math.log(2)), math.log(100)), ""
    ref = pts[0]  # all over the target: lower lam
    if len(pts) >= 2 and slope < 0.01:
        return None, "lam->0"
    step = (ref[1] - log_t) / max(slope, 0.2)
    return ref[0] - min(max(step, math.log(2)), math.log(100)), ""


def discrepancy_search(solve: Callable[[Tensor], Tensor], physics, y: Tensor,
                       target: list[float], lam0: Tensor, *, max_solves: int = 6,
                       rtol: float = 0.05, slope0: float = 0.5) -> SearchResult:
    """Find lam per measurement with ||A x_lam - y|| / ||y|| = target (relative).

    ``solve(lam)`` returns the regularised solutions (B, ...) for per-row weights ``lam``
    (B,). Secant on (log lam, log residual) from ``lam0`` (B,), assuming slope
    ``slope0`` until two points exist; steps are kept within a factor 2..100 until the target
    is bracketed, then interpolated inside the bracket. Stops when every row is within
    ``rtol`` of its target, after ``max_solves`` solves, or when the residual no longer moves
    with lam (the target is out of reach: the extreme weight tried is kept). Returns, per
    row, the tried solution whose residual is closest to the target (log scale).
    """
    batch = y.shape[0]
    log_t = [math.log(t) for t in target]
    points: list[list[tuple[float, float]]] = [[] for _ in range(batch)]
    best: list[tuple[float, Tensor, float, float] | None] = [None] * batch
    status = ["budget"] * batch
    done = [False] * batch
    lam = lam0.detach().to(torch.float64).cpu().clone()
    solves = 0
    while solves < max_solves:
        x = solve(lam.to(y.device))
        solves += 1
        with torch.no_grad():
            res = relative_residual(physics, x, y).tolist()
        for b in range(batch):
            if done[b]:
                continue
            lr = math.log(max(res[b], 1e-300))
            ll = math.log(float(lam[b]))
            points[b].append((ll, lr))
            err = abs(lr - log_t[b])
            if best[b] is None or err < best[b][0]:
                best[b] = (err, x[b].detach().clone(), float(lam[b]), res[b])
            if err <= math.log1p(rtol):
                done[b], status[b] = True, "hit"
                continue
            nxt, why = _next_lam(points[b], log_t[b], slope0)
            if nxt is None:
                done[b], status[b] = True, why
            else:
                lam[b] = math.exp(nxt)
        if all(done):
            break
        for b in range(batch):  # rows already settled are re-solved at their best weight
            if done[b]:
                lam[b] = best[b][2]
    xs = torch.stack([bt[1] for bt in best])
    return SearchResult(xs, [bt[2] for bt in best], [bt[3] for bt in best], list(target),
                        solves, status)


class DiscrepancyStop:
    """A ``common.cg`` stop rule: a row is frozen at its first iterate with
    ||A x_k - y|| <= target_b ||y_b|| (the discrepancy principle) or, with ``plateau`` > 0,
    whose residual fell by less than ``plateau`` x the previous one in that step (the
    residual has levelled off and further steps mostly amplify noise and mismatch: an
    L-curve-corner rule for data whose target is out of reach, e.g. noiseless CT or
    estimated coil maps). After the loop ``stopped_at`` (B,) int64 holds each row's last
    iteration (-1: never stopped, the cap applied) and ``reason`` (B,) 1 = discrepancy,
    2 = plateau. No host sync: the rule is a mask."""

    def __init__(self, physics, y: Tensor, target: list[float], plateau: float = 0.0):
        flat = y.reshape(y.shape[0], -1)
        self.physics, self.y, self.plateau = physics, y, plateau
        self.thresh = torch.as_tensor(target, dtype=flat.dtype, device=y.device) * flat.norm(dim=1)
        self.prev = flat.norm(dim=1)
        self.k = 0
        self.stopped_at = torch.full((y.shape[0],), -1, dtype=torch.int64, device=y.device)
        self.reason = torch.zeros(y.shape[0], dtype=torch.int64, device=y.device)

    def __call__(self, x: Tensor) -> Tensor:
        self.k += 1
        r = (self.physics.A(x) - self.y).reshape(self.y.shape[0], -1).norm(dim=1)
        dp = r <= self.thresh
        flat = torch.zeros_like(dp)
        if self.plateau > 0 and self.k > 1:
            flat = self.prev - r < self.plateau * self.prev
        self.prev = r
        new = (dp | flat) & (self.stopped_at < 0)
        self.stopped_at = torch.where(new, self.k, self.stopped_at)
        self.reason = torch.where(new, torch.where(dp, 1, 2), self.reason)
        return self.stopped_at >= 0


def tune(run: Callable[[Tensor | float], Tensor], physics, y: Tensor, lam, *, tau: float,
         kappa: float | None, rel_floor: float, rtol: float, max_solves: int,
         kappa_measured: float | None = None,
         lam0_factor: float = 3e-3, search: Callable[[Tensor], Tensor] | None = None
         ) -> tuple[Tensor, dict]:
    """Solve with a user weight ``lam`` (a number: one ``run``, exactly as given) or, for
    ``lam == "auto"``, with the discrepancy-principle weight of :func:`residual_target`
    (``tau``, ``kappa``, ``kappa_measured``, ``rel_floor``) found by
    :func:`discrepancy_search` (to ``rtol``) from lam0 = ``lam0_factor`` x max |A^T y| per
    row. ``run(lam)`` is the baseline's solver (lam
    a float or (B,)); ``search(lam)``, if given, a cheaper one for the search (the same
    algorithm stopped earlier, once its residual has settled), after which ``run`` makes
    the image at the chosen lam (one more solve). Returns (x, info) with info ``lam``,
    ``lam_rule``, ``inner_solves`` and, for auto, ``lam_search`` (hit / budget / lam->0 /
    lam->inf), ``residual_target``, ``sigma_used`` and ``ls_residual`` (of the
    least-squares fit, when measured)."""
    batch = y.shape[0]
    if not (isinstance(lam, str) and lam == "auto"):
        x = run(float(lam))
        return x, {"lam": [float(lam)] * batch, "lam_rule": ["user"] * batch,
                   "inner_solves": 1}
    target = residual_target(physics, y, tau=tau, kappa=kappa, kappa_measured=kappa_measured,
                             rel_floor=rel_floor)
    with torch.no_grad():
        scale = physics.A_adjoint(y).abs().reshape(batch, -1).amax(1).double().cpu()
    lam0 = lam0_factor * torch.where(scale > 0, scale, torch.ones_like(scale))
    found = discrepancy_search(search or run, physics, y, target.rel, lam0,
                               max_solves=max_solves, rtol=rtol)
    x, solves = found.x, found.solves
    if search is not None:
        x = run(torch.tensor(found.lam, dtype=torch.float64))
        solves += 1
    return x, {"lam": found.lam, "lam_rule": [f"discrepancy/{r}" for r in target.rule],
               "inner_solves": solves, "lam_search": found.status,
               "residual_target": target.rel, "sigma_used": target.sigma,
               "ls_residual": target.ls_residual}


# Rule constants per solver family, from the VALIDATION scans of benchmarks/baselines_auto.py
# (oracle residual / least-squares misfit, MNI slice, 8-coil 4x MRI with ESPIRiT maps):
# MRI (sigpy ADMM-TV, L1-wavelet): 1.0 noiseless, 1.03-1.07 at noise 0.01, 1.09-1.10 at
# 0.03; the residual spans a few % there, hence the tight rtol. FISTA-TV on other physics
# (CT, deblurring, SR): 50 FISTA steps regularise by themselves; the oracle sits at 0.9-1.8 x
# 1.1 sqrt(m) sigma with noise, and at 1-4.6% of ||y|| on noiseless or nearly noiseless
# photographs / CT (the floor). CG-SENSE: best iterate at 1.0-1.07 x the misfit of its own
# 30-step fit (MRI), at 0.9-1.15 sqrt(m) sigma (CT).
# kappa_measured (session 10, VALIDATION scans of the independent simulator: MNI ax80 /
# cor120, piesno 7, aniso 12; 16 -> 8 coils 4x equispaced at 128 and 256 px, 8 coils 4x
# random at 128 px): where the misfit is measured (m >= 1.5 n) it is mostly ESPIRiT
# mismatch, the TV / L1 oracle sits at 1.00-1.02 x it, and 0.03 instead of 0.07 moved the
# auto weight from -0.84 / -0.69 dB of the oracle (TV / L1, 256 px, 4x equispaced) to +0.18 /
# +0.18, and TV at 128 px from -0.66 / -0.62 (4x equispaced / random) to -0.32 / -0.30.
# Where it is not measured (8x, 8 virtual coils) 0.03 lost 1.2-1.9 dB: 0.07 stays there.
MRI_RULE = {"tau": 0.9, "kappa": 0.07, "kappa_measured": 0.03, "rel_floor": 0.01,
            "rtol": 0.01}
FISTA_RULE = {"tau": 1.1, "kappa": None, "rel_floor": 0.025, "rtol": 0.05}
# FISTA-TV on CT full scans, started from the FBP (session 11; VALIDATION: MNI ax80 / cor120,
# piesno 7, aniso 12 at 128 px, skimage-radon parallel beam, noise 0.02 and 0): the FBP
# start makes the fit reach the noise level, and FISTA_RULE's 2.5% floor then sat far above
# it; where the least-squares misfit is measured (m >= 1.5 n) it replaces the floor (kappa,
# as MRI_RULE): 180 views 34.87 dB (best lam 34.85, FBP 33.76; before 24.82), noiseless
# 36.99. The 1% floor applies to full scans with fewer views (< 1.06 N per pi at N px).
CT_RULE = {"tau": 1.1, "kappa": 0.07, "kappa_measured": 0.03, "rel_floor": 0.01, "rtol": 0.05}
CG_KAPPA = 0.05
