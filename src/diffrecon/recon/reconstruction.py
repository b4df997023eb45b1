"""The one return type of every solver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Reconstruction:
    """Result of ``solver.solve``.

    Attributes:
        samples: (num_samples, B, *signal_shape) equally weighted posterior draws (for
            RED-diff: independent point estimates from different seeds).
        mean: (B, *signal_shape) posterior mean estimate (weighted over particles for SMC).
        std: (B, *signal_shape) pointwise posterior standard deviation estimate (zero when
            only one sample is available).
        log_weights: (N, B) normalised log-weights of SMC particles, else None.
        particles: (N, B, *signal_shape) weighted SMC particles, else None.
        info: NFE, operator applications, wall time (s), ``residual`` (per measurement,
            ||A(mean) - y|| / ||y||), per-step diagnostics (lists).
    """

    samples: Tensor
    mean: Tensor
    std: Tensor
    log_weights: Tensor | None = None
    particles: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_samples(cls, samples: Tensor, info: dict[str, Any] | None = None) -> Reconstruction:
        """Equally weighted samples (S, B, ...) -> mean and (unbiased) std."""
        mean = samples.mean(0)
        if samples.shape[0] > 1:
            std = samples.std(0, unbiased=True)
        else:
            std = torch.zeros_like(mean)
        return cls(samples=samples, mean=mean, std=std, info=dict(info or {}))

    @classmethod
    def from_particles(
        cls, particles: Tensor, log_weights: Tensor, samples: Tensor,
        info: dict[str, Any] | None = None,
    ) -> Reconstruction:
        """Weighted particles (N, B, ...) with log-weights (N, B) -> weighted mean and std."""
        w = torch.softmax(log_weights.to(torch.float64), dim=0)
        w = w.reshape(*w.shape, *([1] * (particles.ndim - 2))).to(particles.dtype)
        mean = (w * particles).sum(0)
        var = (w * (particles - mean) ** 2).sum(0)
        return cls(
            samples=samples, mean=mean, std=var.clamp_min(0).sqrt(),
            log_weights=log_weights - torch.logsumexp(log_weights, dim=0, keepdim=True),
            particles=particles, info=dict(info or {}),
        )
