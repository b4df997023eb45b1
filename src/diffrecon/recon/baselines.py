"""Classical (prior-free, deterministic) reconstructions behind the same Solver surface.

Every baseline returns a Reconstruction with ONE sample whatever ``num_samples`` (std zero)
and ``info["iterations"]``; ``prior`` and ``seed`` are accepted and ignored.

- "zero-filled": A^T y. For multi-coil MRI with coil maps this is the SENSE coil-combined
  image sum_c conj(S_c) F^H M y_c; fastMRI's "zero-filled" is instead the RSS of the
  coil images, computed from raw k-space by ``rss_zero_filled``.
- "cg-sense" (alias "cg"): CG on (A^T A + lam I) x = A^T y from zero, stopped early by the
  discrepancy principle (or a residual plateau), ``iters`` the cap.
- "fbp": filtered back-projection (``physics.fbp`` / the CT ``A_dagger``), CT only.
- "l1-wavelet", "tv": sigpy ``L1WaveletRecon`` / ``TotalVariationRecon`` for deepinv
  ``MRI`` / ``MultiCoilMRI``; "tv" also runs FISTA with deepinv's ``TVPrior`` prox on any
  other linear physics of images (B, C, H, W).
Regularisation weights are chosen from the data (``lam="auto"``, the default): the
discrepancy principle of ``recon.tuning`` (residual = noise level, with a model-mismatch and a
relative floor), found by a secant search over a few solves; ``info`` reports
``lam``, ``lam_rule`` and ``inner_solves``. A number for ``lam`` is used exactly as given.
Units: y's own (the rules are scale-equivariant).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..operators.coils import rss
from ..operators.mri import ifft2c
from . import tuning
from .base import SolveContext, Solver
from .common import base_physics, cg, normal_operator, power_iteration


class _Deterministic(Solver):
    """A prior-free baseline: ``_reconstruct(y, physics) -> (x, iterations)``, one pass,
    one sample whatever ``num_samples``."""

    requires_linear = True
    requires_prior = False

    def _passes(self, y: Tensor, ctx: SolveContext, num_samples: int
                ) -> Iterator[tuple[Tensor, SolveContext]]:
        yield y, ctx

    def _sample(self, y: Tensor, ctx: SolveContext) -> Tensor:
        with torch.no_grad():
            x, info = self._reconstruct(y, ctx.physics)
        ctx.diagnostics.update(info)
        return x

    def _reconstruct(self, y: Tensor, physics) -> tuple[Tensor, dict]:  # pragma: no cover
        """(x, info): info has at least ``iterations``."""
        raise NotImplementedError


def _check_lam(name: str, lam) -> float | str:
    """'auto' or a weight >= 0 (numbers given as text, e.g. by YAML, are converted)."""
    if isinstance(lam, str) and lam.strip().lower() == "auto":
        return "auto"
    try:
        value = float(lam)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(lam, bool) or not value >= 0:
        raise ValueError(f"{name}: option lam={lam!r} is not valid; expected 'auto' or a "
                         f"number >= 0")
    return value


@dataclass(frozen=True)
class OnePassOptions:
    """Options of the one-pass baselines (zero-filled, FBP): none that change the result."""

    batch_size: int = 16  # unused (one pass)


# ------------------------------------------------------------------------ zero-filled
class ZeroFilledSolver(_Deterministic):
    """x = A^T y (coil-combined for multi-coil MRI)."""

    name = "zero-filled"
    Options = OnePassOptions

    def _reconstruct(self, y, physics):
        return physics.A_adjoint(y), {"iterations": 0}


def rss_zero_filled(kspace, mask=None, coil_axis: int = -3) -> Tensor:
    """fastMRI zero-filled image: RSS over coils of the centred orthonormal inverse DFT of
    the (masked) k-space.

    ``kspace``: complex array or tensor (..., coils, kx, ky) (fastMRI (slices, coils, kx, ky)
    or one slice (coils, kx, ky)); ``mask``: None (k-space already zero-filled) or a 0/1
    array broadcastable to (kx, ky) such as a (ky,) column mask. Returns a real tensor
    (..., kx, ky) (float32 for complex64 input).
    """
    k = kspace if isinstance(kspace, Tensor) else torch.from_numpy(np.asarray(kspace))
    if not k.is_complex() or k.ndim < 3:
        raise ValueError(f"rss_zero_filled: kspace must be complex (..., coils, kx, ky), got "
                         f"{k.dtype} {tuple(k.shape)}.")
    if mask is not None:
        m = mask if isinstance(mask, Tensor) else torch.from_numpy(np.asarray(mask))
        k = k * m.to(device=k.device, dtype=k.real.dtype)
    return rss(ifft2c(k), coil_axis)


# ------------------------------------------------------------------------ CG-SENSE
@dataclass(frozen=True)
class CGOptions:
    """cg-sense: ``iters`` cap (30); ``lam`` Tikhonov weight (0); ``stop`` 'discrepancy'
    (stop at the discrepancy target of tuning.residual_target or a residual plateau) or
    'iters'; ``tau`` (1.1); ``plateau`` (0.01)."""

    iters: int = 30         # CG iteration cap
    lam: float = 0.0        # Tikhonov weight; 0 = plain CG-SENSE (Pruessmann et al. 2001)
    stop: str = "discrepancy"  # 'discrepancy': first iterate with ||A x - y|| <= tau sqrt(m)
    #                         sigma (or, where the least-squares misfit is measurable, e.g.
    #                         multi-coil MRI, <= 1.05 x that misfit), or whose residual fell
    #                         < plateau x in one step; 'iters': all ``iters`` steps
    tau: float = 1.1        # discrepancy factor on sqrt(m) sigma (validation CT, 1% noise:
    #                         the best iterate sits at 0.9-1.15 sqrt(m) sigma)
    plateau: float = 0.01   # relative residual decrease per step below which CG stops (0: off)
    batch_size: int = 16    # unused (one pass)

    def __post_init__(self):
        if self.stop not in ("discrepancy", "iters"):
            raise ValueError(f"cg-sense: option stop={self.stop!r} is not 'discrepancy' or "
                             f"'iters'")
        if not (self.tau > 0 and self.plateau >= 0 and self.iters >= 1):
            raise ValueError(f"cg-sense: options need tau > 0, plateau >= 0, iters >= 1; got "
                             f"tau={self.tau}, plateau={self.plateau}, iters={self.iters}")


class CGSolver(_Deterministic):
    """CG on (A^T A + lam I) x = A^T y from x = 0; early stopping (``stop``) regularises.
    ``info``: ``iterations`` (the most any row ran), ``stop_iteration`` per measurement (-1:
    the cap), ``stop_rule`` per measurement ('discrepancy', 'plateau' or 'iters')."""

    name = "cg-sense"
    Options = CGOptions

    def _reconstruct(self, y, physics):
        o = self.options
        normal = normal_operator(physics)
        op = normal if o.lam == 0 else (lambda x: normal(x) + o.lam * x)
        if o.stop == "iters":
            return cg(op, physics.A_adjoint(y), iters=o.iters), {"iterations": o.iters}
        target = tuning.residual_target(physics, y, tau=o.tau, kappa=tuning.CG_KAPPA,
                                        noise_with_misfit=False)
        rule = tuning.DiscrepancyStop(physics, y, target.rel, o.plateau)
        x = cg(op, physics.A_adjoint(y), iters=o.iters, stop=rule)
        at = [k if k > 0 else o.iters for k in rule.stopped_at.tolist()]
        why = [("iters", "discrepancy", "plateau")[r] for r in rule.reason.tolist()]
        return x, {"iterations": max(at), "stop_iteration": at, "stop_rule": why,
                   "residual_target": target.rel, "sigma_used": target.sigma}


# ------------------------------------------------------------------------ FBP
class FBPSolver(_Deterministic):
    """Filtered back-projection for CT (``diffrecon.operators.ct`` or deepinv Tomography)."""

    name = "fbp"
    Options = OnePassOptions

    def _reconstruct(self, y, physics):
        from deepinv.physics import Tomography

        base = physics.physics
        if hasattr(base, "fbp"):
            return base.fbp(y), {"iterations": 0}
        if isinstance(base, Tomography):
            return base.A_dagger(y), {"iterations": 0}
        raise TypeError(f"fbp: physics must be CT (diffrecon.operators.ct or deepinv "
                        f"Tomography), got {type(base).__name__}.")


# ------------------------------------------------------------------------ sparsity (sigpy)
def _mri_parts(physics) -> tuple[np.ndarray, np.ndarray] | None:
    """(mask (B|1, H, W) float, coil maps (B|1, C, H, W) complex) of a deepinv MRI physics,
    or None when the physics is not Cartesian MRI."""
    from deepinv.physics import MRI, MultiCoilMRI

    base = base_physics(physics)
    if not isinstance(base, MRI | MultiCoilMRI):
        return None
    mask = base.mask[:, 0].detach().cpu().numpy()  # (B|1, H, W) (channel 0 = channel 1)
    if isinstance(base, MultiCoilMRI):
        maps = base.coil_maps.detach().cpu().numpy()
    else:
        maps = np.ones((1, 1, *mask.shape[-2:]), dtype=np.complex64)
    return mask, maps


def _sigpy_mri(app_cls, y: Tensor, physics, lamda, max_iter: int, **kw) -> Tensor:
    """Run a sigpy MRI app per measurement: real (B, 2, [C,] H, W) k-space -> (B, 2, H, W);
    ``lamda`` a float or one per measurement."""
    mask, maps = _mri_parts(physics)
    lams = [lamda] * y.shape[0] if isinstance(lamda, float | int) else [float(v) for v in lamda]
    k = torch.view_as_complex(y.detach().movedim(1, -1).contiguous()).cpu().numpy()
    if k.ndim == 3:  # single coil (B, H, W)
        k = k[:, None]
    ctype = k.dtype
    out = []
    for b in range(k.shape[0]):
        mps = maps[b if maps.shape[0] > 1 else 0].astype(ctype)
        w = mask[b if mask.shape[0] > 1 else 0].astype(k.real.dtype)
        img = app_cls(k[b], mps, lams[b], weights=w, max_iter=max_iter, show_pbar=False,
                      **kw).run()
        out.append(torch.view_as_real(torch.from_numpy(np.asarray(img))).movedim(-1, 0))
    return torch.stack(out).to(device=y.device, dtype=y.dtype)


def _power_norm(normal: Callable[[Tensor], Tensor], like: Tensor, iters: int = 20) -> Tensor:
    """Largest eigenvalue of A^T A (``power_iteration`` from a fixed random start), scalar
    tensor."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(like.shape, generator=g, dtype=like.dtype).to(like.device)
    v, w = power_iteration(normal, v, iters)
    return w.flatten().norm() / v.flatten().norm()


def _fista_tv(y: Tensor, physics, lam, iters: int, from_fbp: bool = False) -> Tensor:
    """FISTA on 1/2 ||A x - y||^2 + lam TV(x), TV prox by deepinv's ``TVPrior`` (Chambolle-
    Pock inner loop); any linear physics on images (B, C, H, W). ``lam``: a float or (B,)
    tensor. Starts from A^T y / ||A^T A||, or with ``from_fbp`` from the physics' filtered
    back-projection (CT full scans: A^T A's spectrum falls as 1 / |frequency|, so 50
    gradient steps from A^T y leave the fine detail unresolved whatever lam; VALIDATION,
    128 px, 180 views: TV 24.9 dB at every lam against FBP 33.8, from the FBP 34.9 at the
    best lam)."""
    from deepinv.optim import TVPrior

    tv = TVPrior(n_it_max=20)
    normal = normal_operator(physics)
    aty = physics.A_adjoint(y)
    step = 1.0 / _power_norm(normal, aty)
    x = base_physics(physics).fbp(y) if from_fbp else aty.clone() * step
    if isinstance(lam, Tensor):
        lam = lam.to(device=aty.device, dtype=aty.dtype)
    v, t = x, 1.0
    for _ in range(iters):
        x_new = tv.prox(v - step * (normal(v) - aty), gamma=lam * step)
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        v = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x


@dataclass(frozen=True)
class L1WaveletOptions:
    """l1-wavelet: ``lam`` 'auto' (discrepancy principle, recon/tuning.py) or a weight >= 0;
    ``iters`` (100); ``wavelet`` ('db4'); ``tau`` (None: tuning.MRI_RULE); ``max_solves``
    (5); ``search_iters`` (50: FISTA iterations of the search solves)."""

    lam: float | str = "auto"  # sigpy lamda, or 'auto': discrepancy principle (tuning.tune)
    iters: int = 100        # sigpy FISTA iterations (max_iter; 128 px val slice, lam 3e-4 and
    #                         1e-3: 100 iterations as good as 300, +0.05 / +0.25 dB)
    wavelet: str = "db4"    # sigpy / pywt wavelet name
    tau: float | None = None  # discrepancy factor of lam='auto' (None: the rule's, tuning.py)
    max_solves: int = 5     # lam='auto': most solves in the search (each from cold)
    search_iters: int = 50  # lam='auto': FISTA iterations of each search solve (residual
    #                         within 0.5% of 300 iterations' on the val slice)
    batch_size: int = 16    # unused (measurements run one by one)

    def __post_init__(self):
        object.__setattr__(self, "lam", _check_lam("l1-wavelet", self.lam))


class L1WaveletSolver(_Deterministic):
    """min_x 1/2 ||A x - y||^2 + lam ||W x||_1 (Lustig et al. 2007) via sigpy; MRI only."""

    name = "l1-wavelet"
    Options = L1WaveletOptions

    def _reconstruct(self, y, physics):
        from sigpy.mri.app import L1WaveletRecon

        o = self.options
        if _mri_parts(physics) is None:
            raise TypeError(f"l1-wavelet: physics must be Cartesian MRI (deepinv MRI or "
                            f"MultiCoilMRI, diffrecon.operators.mri), got "
                            f"{type(physics.physics).__name__}.")
        def fista(iters):
            return lambda lam: _sigpy_mri(L1WaveletRecon, y, physics, lam, iters,
                                          wave_name=o.wavelet)

        search = fista(o.search_iters) if 0 < o.search_iters < o.iters else None
        rule = tuning.MRI_RULE if o.tau is None else {**tuning.MRI_RULE, "tau": o.tau}
        x, info = tuning.tune(fista(o.iters), physics, y, o.lam, **rule,
                              max_solves=o.max_solves, search=search)
        return x, {"iterations": o.iters, **info}  # of the returned image's solve


@dataclass(frozen=True)
class TVOptions:
    """tv: ``lam`` 'auto' (discrepancy principle, recon/tuning.py) or a weight >= 0; ``iters``
    (50); ``rho`` (0.03, ADMM); ``tau`` (None: tuning.MRI_RULE / CT_RULE / FISTA_RULE);
    ``max_solves`` (5); ``search_iters`` (15: ADMM iterations of the search solves, MRI)."""

    lam: float | str = "auto"  # TV weight, or 'auto': discrepancy principle (tuning.tune)
    iters: int = 50         # ADMM iterations (MRI) or FISTA iterations (other physics)
    rho: float = 0.03       # ADMM penalty for sigpy (val sweep 0.01..1; PDHG was far slower)
    tau: float | None = None  # discrepancy factor of lam='auto' (None: the rule's, tuning.py)
    max_solves: int = 5     # lam='auto': most solves in the search (each from cold)
    search_iters: int = 15  # lam='auto', MRI: ADMM iterations of each search solve (the
    #                         residual has settled by then: 128 px val slice, 15 vs 50
    #                         iterations 0.3%); the image is one more solve with ``iters``
    batch_size: int = 16    # unused

    def __post_init__(self):
        object.__setattr__(self, "lam", _check_lam("tv", self.lam))
        if not self.rho > 0:  # the ADMM penalty divides (base.OPTION_RANGES allows 0)
            raise ValueError(f"tv: option rho={self.rho!r} is not valid; expected a number > 0")


class TVSolver(_Deterministic):
    """min_x 1/2 ||A x - y||^2 + lam TV(x): sigpy ADMM (MRI, anisotropic TV of the complex
    image, 10 inner CG steps) or FISTA with deepinv's isotropic TV prox (any other linear
    physics on images)."""

    name = "tv"
    Options = TVOptions

    def _reconstruct(self, y, physics):
        o = self.options
        if _mri_parts(physics) is not None:
            from sigpy.mri.app import TotalVariationRecon

            def admm(iters):
                return lambda lam: _sigpy_mri(TotalVariationRecon, y, physics, lam, iters,
                                              solver="ADMM", rho=o.rho, max_cg_iter=10)
            run, rule = admm(o.iters), tuning.MRI_RULE
            search = admm(o.search_iters) if 0 < o.search_iters < o.iters else None
        else:
            shape = physics.A_adjoint(y).shape
            if len(shape) != 4:
                raise ValueError(f"tv: physics must act on images (B, C, H, W), got signals "
                                 f"{tuple(shape)}.")

            # CT full scans (``operators.ct``: full range, >= N / 2 views per pi): from the
            # FBP, with CT_RULE (RESULTS.md 0a3; sparse and limited-angle scans keep A^T y
            # and FISTA_RULE: at 256 px the FBP start lost SSIM there)
            full_ct = bool(getattr(base_physics(physics), "full_scan", False))

            def run(lam):
                return _fista_tv(y, physics, lam, o.iters, from_fbp=full_ct)
            rule = tuning.CT_RULE if full_ct else tuning.FISTA_RULE
            search = None  # FISTA's residual settles late
        rule = rule if o.tau is None else {**rule, "tau": o.tau}
        x, info = tuning.tune(run, physics, y, o.lam, **rule, max_solves=o.max_solves,
                              search=search)
        return x, {"iterations": o.iters, **info}  # of the returned image's solve
