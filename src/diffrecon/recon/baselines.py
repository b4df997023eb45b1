"""Classical (prior-free, deterministic) reconstructions behind the same Solver surface.

Every baseline returns a Reconstruction with ONE sample whatever ``num_samples`` (std zero)
and ``info["iterations"]``; ``prior`` and ``seed`` are accepted and ignored.

- "zero-filled": A^T y. For multi-coil MRI with coil maps this is the SENSE coil-combined
  image sum_c conj(S_c) F^H M y_c; fastMRI's "zero-filled" is instead the RSS of the
  coil images, computed from raw k-space by ``rss_zero_filled``.
- "cg-sense" (alias "cg"): CG on (A^T A + lam I) x = A^T y from zero.
- "fbp": filtered back-projection (``physics.fbp`` / the CT ``A_dagger``), CT only.
- "l1-wavelet", "tv": sigpy ``L1WaveletRecon`` / ``TotalVariationRecon`` for deepinv
  ``MRI`` / ``MultiCoilMRI``; "tv" also runs FISTA with deepinv's ``TVPrior`` prox on any
  other linear physics of images (B, C, H, W).
Regularisation weights are for images of magnitude about 1 (the phantoms; scans are
normalised into the prior's range first), chosen by a PSNR sweep on "val" phantoms
phantom("mri", 64, i, "val"), i < 4, 8 normalised birdcage coils, fastMRI random 4x masks
(8% centre), noiseless (means: zero-filled 17.0, CG-SENSE 22.4, L1-wavelet 26.0, TV 32.1 dB).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..operators.coils import rss
from ..operators.mri import ifft2c
from .base import SolveContext, Solver
from .common import cg, normal_operator, power_iteration


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
            x, iterations = self._reconstruct(y, ctx.physics)
        ctx.diagnostics["iterations"] = iterations
        return x

    def _reconstruct(self, y: Tensor, physics) -> tuple[Tensor, int]:  # pragma: no cover
        raise NotImplementedError


# ------------------------------------------------------------------------ zero-filled
@dataclass(frozen=True)
class ZeroFilledOptions:
    batch_size: int = 16  # unused (one pass)


class ZeroFilledSolver(_Deterministic):
    """x = A^T y (coil-combined for multi-coil MRI)."""

    name = "zero-filled"
    Options = ZeroFilledOptions

    def _reconstruct(self, y, physics):
        return physics.A_adjoint(y), 0


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
    iters: int = 30       # CG iterations (fixed count, no host sync)
    lam: float = 0.0      # Tikhonov weight; 0 = plain CG-SENSE (Pruessmann et al. 2001)
    batch_size: int = 16  # unused (one pass)


class CGSolver(_Deterministic):
    """CG on (A^T A + lam I) x = A^T y from x = 0 (early stopping regularises when lam = 0)."""

    name = "cg-sense"
    Options = CGOptions

    def _reconstruct(self, y, physics):
        o = self.options
        normal = normal_operator(physics)
        op = normal if o.lam == 0 else (lambda x: normal(x) + o.lam * x)
        return cg(op, physics.A_adjoint(y), iters=o.iters), o.iters


# ------------------------------------------------------------------------ FBP
@dataclass(frozen=True)
class FBPOptions:
    batch_size: int = 16  # unused (one pass)


class FBPSolver(_Deterministic):
    """Filtered back-projection for CT (``diffrecon.operators.ct`` or deepinv Tomography)."""

    name = "fbp"
    Options = FBPOptions

    def _reconstruct(self, y, physics):
        from deepinv.physics import Tomography

        base = physics.physics
        if hasattr(base, "fbp"):
            return base.fbp(y), 0
        if isinstance(base, Tomography):
            return base.A_dagger(y), 0
        raise TypeError(f"fbp: physics must be CT (diffrecon.operators.ct or deepinv "
                        f"Tomography), got {type(base).__name__}.")


# ------------------------------------------------------------------------ sparsity (sigpy)
def _mri_parts(physics) -> tuple[np.ndarray, np.ndarray] | None:
    """(mask (B|1, H, W) float, coil maps (B|1, C, H, W) complex) of a deepinv MRI physics,
    or None when the physics is not Cartesian MRI."""
    from deepinv.physics import MRI, MultiCoilMRI

    base = getattr(physics, "physics", physics)
    if not isinstance(base, MRI | MultiCoilMRI):
        return None
    mask = base.mask[:, 0].detach().cpu().numpy()  # (B|1, H, W) (channel 0 = channel 1)
    if isinstance(base, MultiCoilMRI):
        maps = base.coil_maps.detach().cpu().numpy()
    else:
        maps = np.ones((1, 1, *mask.shape[-2:]), dtype=np.complex64)
    return mask, maps


def _sigpy_mri(app_cls, y: Tensor, physics, lamda: float, max_iter: int, **kw) -> Tensor:
    """Run a sigpy MRI app per measurement: real (B, 2, [C,] H, W) k-space -> (B, 2, H, W)."""
    mask, maps = _mri_parts(physics)
    k = torch.view_as_complex(y.detach().movedim(1, -1).contiguous()).cpu().numpy()
    if k.ndim == 3:  # single coil (B, H, W)
        k = k[:, None]
    ctype = k.dtype
    out = []
    for b in range(k.shape[0]):
        mps = maps[b if maps.shape[0] > 1 else 0].astype(ctype)
        w = mask[b if mask.shape[0] > 1 else 0].astype(k.real.dtype)
        img = app_cls(k[b], mps, lamda, weights=w, max_iter=max_iter, show_pbar=False,
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


def _fista_tv(y: Tensor, physics, lam: float, iters: int) -> Tensor:
    """FISTA on 1/2 ||A x - y||^2 + lam TV(x), TV prox by deepinv's ``TVPrior`` (Chambolle-
    Pock inner loop); any linear physics on images (B, C, H, W)."""
    from deepinv.optim import TVPrior

    tv = TVPrior(n_it_max=20)
    normal = normal_operator(physics)
    aty = physics.A_adjoint(y)
    step = 1.0 / _power_norm(normal, aty)
    x = aty.clone() * step
    v, t = x, 1.0
    for _ in range(iters):
        x_new = tv.prox(v - step * (normal(v) - aty), gamma=lam * step)
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        v = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x


@dataclass(frozen=True)
class L1WaveletOptions:
    lam: float = 1e-4       # sigpy lamda (val sweep 3e-5..3e-3: 1e-4 stable at 300 iterations)
    iters: int = 300        # sigpy FISTA iterations (max_iter)
    wavelet: str = "db4"    # sigpy / pywt wavelet name
    batch_size: int = 16    # unused (measurements run one by one)


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
        return _sigpy_mri(L1WaveletRecon, y, physics, o.lam, o.iters,
                          wave_name=o.wavelet), o.iters


@dataclass(frozen=True)
class TVOptions:
    lam: float = 1e-3       # TV weight (val sweep 3e-4..1e-2, best 1e-3)
    iters: int = 50         # ADMM iterations (MRI) or FISTA iterations (other physics)
    rho: float = 0.03       # ADMM penalty for sigpy (val sweep 0.01..1; PDHG was far slower)
    batch_size: int = 16    # unused


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

            return _sigpy_mri(TotalVariationRecon, y, physics, o.lam, o.iters, solver="ADMM",
                              rho=o.rho, max_cg_iter=10), o.iters
        shape = physics.A_adjoint(y).shape
        if len(shape) != 4:
            raise ValueError(f"tv: physics must act on images (B, C, H, W), got signals "
                             f"{tuple(shape)}.")
        return _fista_tv(y, physics, o.lam, o.iters), o.iters
