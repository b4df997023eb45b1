"""Noise-level schedules as pure functions returning a decreasing sigma sequence.

Every solver walks a 1-D float64 tensor ``sigmas`` (length steps + 1, last entry 0 unless
stated) and never knows which schedule made it. VP/VE/EDM differences live here and in the
prior adapters only.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor


def _append_zero(s: Tensor) -> Tensor:
    return torch.cat([s, s.new_zeros(1)])


def karras(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
           append_zero: bool = True) -> Tensor:
    """EDM schedule (Karras et al. 2022, eq. 5): sigma_i = (max^(1/rho) + i/(n-1) *
    (min^(1/rho) - max^(1/rho)))^rho, i = 0..n-1."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return _append_zero(s) if append_zero else s


def geometric(steps: int, sigma_min: float = 0.01, sigma_max: float = 50.0,
              append_zero: bool = True) -> Tensor:
    """VE / score-SDE schedule: sigmas geometric from sigma_max down to sigma_min."""
    s = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps,
                                 dtype=torch.float64))
    return _append_zero(s) if append_zero else s


def vp_betas(num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2,
             kind: str = "linear") -> Tensor:
    """Discrete DDPM betas ("linear" as in DDPM/ADM, or "cosine" as in improved DDPM)."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_train_steps, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        t = torch.arange(num_train_steps + 1, dtype=torch.float64) / num_train_steps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; valid: 'linear', 'cosine'")


def vp_sigmas_from_betas(betas: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for every training step t (increasing in t)."""
    abar = torch.cumprod(1 - betas.to(torch.float64), 0)
    return ((1 - abar) / abar).sqrt()


def vp_discrete(steps: int, num_train_steps: int = 1000, beta_start: float = 1e-4,
                beta_end: float = 2e-2, kind: str = "linear", append_zero: bool = True) -> Tensor:
    """Respaced VP schedule (DDIM 'uniform' respacing): timesteps
    round(linspace(T-1, 0, steps)) of the training chain, as sigmas, decreasing."""
    train_sigmas = vp_sigmas_from_betas(vp_betas(num_train_steps, beta_start, beta_end, kind))
    idx = torch.linspace(num_train_steps - 1, 0, steps, dtype=torch.float64).round().long()
    s = train_sigmas[idx]
    return _append_zero(s) if append_zero else s


def vp_alpha(sigma: Tensor) -> Tensor:
    """a_t = sqrt(abar_t) = 1 / sqrt(1 + sigma^2): scale between sigma-space and VP x_t-space."""
    return 1 / torch.sqrt(1 + sigma ** 2)


SCHEDULES = {"karras": karras, "geometric": geometric, "vp": vp_discrete}


def get_schedule(name: str, steps: int, **kwargs) -> Tensor:
    """Registry lookup; unknown names raise a ValueError listing the valid ones."""
    try:
        fn = SCHEDULES[name]
    except KeyError:
        valid = ", ".join(sorted(SCHEDULES))
        raise ValueError(f"unknown schedule {name!r}; valid: {valid}") from None
    return fn(steps, **kwargs)


def check_schedule(schedule: str, sigma_min: float | None = None,
                   sigma_max: float | None = None) -> bool:
    """ValueError unless ``schedule`` is registered and takes the sigma bounds it is given;
    returns whether it takes bounds (karras, geometric; "vp" is fixed by its training chain)."""
    fn = SCHEDULES.get(schedule) if isinstance(schedule, str) else None
    if fn is None:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(sorted(SCHEDULES))}")
    if "sigma_max" in inspect.signature(fn).parameters:
        return True
    if sigma_min is not None or sigma_max is not None:
        raise ValueError(f"schedule {schedule!r} is fixed by its training chain; "
                         "sigma_min / sigma_max apply only to karras and geometric")
    return False


def solver_sigmas(schedule: str, steps: int, prior, sigma_min: float | None,
                  sigma_max: float | None) -> Tensor:
    """Decreasing float64 sigmas (last 0) for a solver's options.

    Bounds default to the prior's trained range for schedules that take them (karras,
    geometric); the "vp" schedule is fixed by the discrete training chain and refuses them.
    """
    if not check_schedule(schedule, sigma_min, sigma_max):
        return get_schedule(schedule, steps)
    return get_schedule(schedule, steps,
                        sigma_min=prior.sigma_min if sigma_min is None else sigma_min,
                        sigma_max=prior.sigma_max if sigma_max is None else sigma_max)
