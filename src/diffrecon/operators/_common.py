"""Shared helpers for the operator factories: noise model, device/dtype resolution."""

from __future__ import annotations

import torch
from deepinv.physics import GaussianNoise


class _GaussianNoise(GaussianNoise):
    """deepinv ``GaussianNoise`` that keeps the measurement's dtype whatever sigma's dtype."""

    def forward(self, x, sigma=None, seed=None, **kwargs):
        self.update_parameters(sigma=sigma, **kwargs)
        s = self.sigma.to(device=x.device, dtype=x.dtype)
        return x + self.randn_like(x, seed=seed) * s[(...,) + (None,) * (x.dim() - 1)]


def gaussian_noise(noise_sigma: float, name: str) -> GaussianNoise:
    """deepinv ``GaussianNoise`` whose ``sigma`` is a 0-d float64 tensor equal to ``noise_sigma``
    (``float(physics.noise_model.sigma) == noise_sigma`` exactly); noisy measurements keep
    the clean measurement's dtype."""
    sigma = float(noise_sigma)
    if not sigma >= 0.0:
        raise ValueError(f"{name}: noise_sigma must be a number >= 0, got {noise_sigma!r}.")
    return _GaussianNoise(sigma=torch.tensor(sigma, dtype=torch.float64))


def resolve_device(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def image_size(img_size, name: str, channels: int | None = None) -> tuple[int, int, int]:
    """Normalise an image size given as (H, W) or (C, H, W) to (C, H, W)."""
    msg = f"{name}: img_size must be (H, W) or (C, H, W), got {img_size!r}."
    try:
        size = tuple(int(s) for s in img_size)
    except TypeError:
        raise TypeError(msg) from None
    if len(size) == 2:
        size = (1 if channels is None else channels, *size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(msg)
    if channels is not None and size[0] != channels:
        raise ValueError(f"{name}: img_size must have {channels} channels, got {img_size!r}.")
    return size


def with_noise_sigma(physics, noise_sigma: float, name: str = "operator"):
    """A shallow copy of ``physics`` with its own ``gaussian_noise(noise_sigma)``: buffers and
    parameters (e.g. a CT projector's tables) are shared with the original, not copied."""
    import copy

    clone = copy.copy(physics)
    for attr in ("_modules", "_buffers", "_parameters"):
        if attr in vars(physics):
            setattr(clone, attr, dict(getattr(physics, attr)))
    clone.noise_model = gaussian_noise(noise_sigma, name)
    return clone
