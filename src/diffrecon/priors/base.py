"""The prior contract: a denoiser D(x, sigma) = E[x0 | x0 + sigma * n = x].

``sigma`` is in the data's own units (the EDM / k-diffusion / deepinv convention). Every
parameterisation (VP eps-prediction, VE score, EDM, v-prediction) is adapted to this one
contract by a small subclass that only defines ``_denoise``.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def sigma_batch(sigma: float | Tensor, x: Tensor) -> Tensor:
    """Return sigma as a (B,) tensor on x's device and dtype."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a (B,) tensor to broadcast against x of shape (B, ...)."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class Prior(torch.nn.Module):
    """A denoiser with the metadata a reconstruction pipeline needs.

    Attributes:
        name: registry name or file name.
        channels: number of image channels accepted (1 real, 2 = real/imag complex), or None
            for vector priors with a fixed ``signal_shape``.
        signal_shape: fixed signal shape without batch (e.g. ``(d,)`` for a GMM), or None when
            any spatial size that is a multiple of ``size_multiple`` is accepted.
        data_range: (low, high) of the training data; the pipeline normalises scans into it.
        intensity_reference: the value, in prior units, of the intensity statistic
            ``diffrecon.problems.normalise.reference_level`` on the prior's training images
            (its intensity convention), or None when the prior does not declare one.
        sigma_min, sigma_max: the noise-level range the denoiser was trained on.
    """

    name: str = "prior"
    channels: int | None = None
    signal_shape: tuple[int, ...] | None = None
    size_multiple: int = 1
    data_range: tuple[float, float] = (0.0, 1.0)
    intensity_reference: float | None = None
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def denoise(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """E[x0 | x0 + sigma n = x]; x (B, *signal_shape), sigma a float or (B,) tensor.

        The network runs in its own dtype; the result comes back in x's dtype, so callers
        may keep float64 solver state.
        """
        sigma = sigma_batch(sigma, x)
        return self._denoise(x, sigma).to(x.dtype)

    def forward(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        return self.denoise(x, sigma)

    def eps(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Noise prediction (x - D(x, sigma)) / sigma."""
        sigma = sigma_batch(sigma, x)
        return (x - self.denoise(x, sigma)) / expand_like(sigma, x)

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (Tweedie)."""
        sigma = sigma_batch(sigma, x)
        return (self.denoise(x, sigma) - x) / expand_like(sigma, x) ** 2

    def mmse(self, sigmas: Tensor) -> Tensor | None:
        """Per-entry denoising error E||x0 - D(x0 + sigma n, sigma)||^2 / numel(x0) under the
        prior, for each sigma of the 1-D tensor ``sigmas`` (float64, same shape), or None
        when the prior cannot say. It is the isotropic part of Cov[x0 | z_sigma] that the
        DDIM kernel leaves out (Analytic-DPM, Bao et al. 2022, arXiv 2201.06503); samplers
        that add it back (SMC ``kernel_variance``) need it."""
        return None

    @property
    def checksum(self) -> str:
        """sha256 of the parameters and buffers (hex); identifies the prior in provenance."""
        h = hashlib.sha256(self.name.encode())
        for key, value in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
