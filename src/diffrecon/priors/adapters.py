"""Adapters: every diffusion parameterisation to the one contract D(x, sigma).

Each adapter only defines the scalings (the k-diffusion ``external.py`` idea). In sigma-space
a VP state x_t = a_t x0 + s_t n is z = x_t / a_t with sigma = s_t / a_t, so a_t = 1 /
sqrt(1 + sigma^2) (Karras et al. 2022, arXiv 2206.00364, Table 1):

    VP eps-prediction   D = z - sigma eps(a z, t(sigma))
    VP v-prediction     D = a^2 z - sigma a v(a z, t(sigma))      (x0 = a x_t - s v)
    VE score            D = z + sigma^2 score(z, c_noise(sigma))
    EDM                 D = c_skip z + c_out F(c_in z, log(sigma) / 4)

Networks run in their own dtype; the scalings are applied in the input's dtype, so float64
solver state stays float64. File formats and architectures (how a published checkpoint
becomes one of these) live in ``checkpoints/``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Prior, expand_like


def _dtype_of(net: nn.Module, default: torch.dtype) -> torch.dtype:
    """The network's parameter dtype (``default`` for parameter-free callables)."""
    p = next(iter(net.parameters()), None)
    return default if p is None else p.dtype


# --------------------------------------------------------------------- VP (discrete time)
def vp_betas(num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
             schedule: str = "linear") -> Tensor:
    """DDPM beta schedule (float64): "linear" (Ho et al. 2020; ADM, DPS, DDS),
    "scaled_linear" (latent diffusion) or "cosine" (Nichol & Dhariwal 2021)."""
    t = num_train_steps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, t, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, t, dtype=torch.float64) ** 2
    if schedule == "cosine":
        s = torch.arange(t + 1, dtype=torch.float64) / t
        abar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown VP schedule {schedule!r}; expected one of "
                     "'linear', 'scaled_linear', 'cosine'.")


_TO_X0 = {
    "epsilon": lambda z, sigma, a, out: z - sigma * out,
    "v_prediction": lambda z, sigma, a, out: a * a * z - sigma * a * out,
    "sample": lambda z, sigma, a, out: out,
}


class _DiscreteVP(Prior):
    """Discrete-time VP network ``net(x_t, t)`` (t in [0, T-1], float) as a sigma-space prior.

    sigma -> t: piecewise-linear interpolation of t in log sigma over the training table
    sigma_t = sqrt((1 - abar_t) / abar_t) (fractional t, as k-diffusion), or the nearest
    timestep with ``timestep="nearest"``. At a training sigma both give that integer t
    exactly. sigma outside [sigma_0, sigma_{T-1}] uses t = 0 or T-1 (the scaling a stays
    exact). Only the first C output channels are used (learned-sigma nets output 2C).
    """

    prediction = "epsilon"

    def __init__(self, net: nn.Module, betas: Tensor | None = None, *,
                 num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 schedule: str = "linear", timestep: str = "interpolate",
                 data_range: tuple[float, float] = (-1.0, 1.0), channels: int | None = None):
        super().__init__()
        if timestep not in ("interpolate", "nearest"):
            raise ValueError(f"timestep must be 'interpolate' or 'nearest', got {timestep!r}.")
        if betas is None:
            betas = vp_betas(num_train_steps, beta_start, beta_end, schedule)
        betas = torch.as_tensor(betas, dtype=torch.float64)
        abar = torch.cumprod(1 - betas, 0)
        sigmas = ((1 - abar) / abar).sqrt()
        self.net = net
        self.register_buffer("log_sigmas", sigmas.log())
        self.timestep = timestep
        self.data_range = tuple(data_range)
        self.channels = channels
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])

    @property
    def train_sigmas(self) -> Tensor:
        """(T,) training noise levels sigma_t = s_t / a_t, float64."""
        return self.log_sigmas.exp()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """(B,) sigma -> (B,) float64 timestep (fractional unless ``timestep='nearest'``)."""
        ls = self.log_sigmas
        log_s = sigma.to(torch.float64).log().clamp(ls[0], ls[-1])
        hi = torch.searchsorted(ls, log_s).clamp(1, ls.shape[0] - 1)
        lo = hi - 1
        t = lo + (log_s - ls[lo]) / (ls[hi] - ls[lo])
        return t.round() if self.timestep == "nearest" else t

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        dtype = _dtype_of(self.net, x.dtype)
        t = self.sigma_to_t(sigma)
        a = expand_like(1 / (1 + sigma ** 2).sqrt(), x)
        out = self.net((a * x).to(dtype), t.to(dtype)).to(x.dtype)[:, :x.shape[1]]
        return _TO_X0[self.prediction](x, expand_like(sigma, x), a, out)


class VPEpsPrior(_DiscreteVP):
    """DDPM eps-prediction network net(x_t, t) (ADM / guided-diffusion: DPS, DDS, RED-diff
    checkpoints): D(z, sigma) = z - sigma eps(a z, t). See ``_DiscreteVP`` for t(sigma)."""

    name = "vp_eps"
    prediction = "epsilon"


class VPredictionPrior(_DiscreteVP):
    """v-prediction network (Salimans & Ho 2022, v = a eps - s x0): x0 = a x_t - s v, i.e.
    D(z, sigma) = a^2 z - sigma a v(a z, t)."""

    name = "vp_v"
    prediction = "v_prediction"


class VEScorePrior(Prior):
    """VE network net(z, c_noise) (score-SDE NCSN++, Song et al. 2021): D = z + sigma^2 score.

    Args:
        output: "score" (score-SDE convention, the net returns grad log p_sigma with
            ``scale_by_sigma``) or "scaled_score" (net returns sigma * score = -eps: EDM's
            VE baseline; deepinv ``NCSNpp.forward_unet`` with ``precondition_type='ve-baseline'``).
        noise_input: "sigma" (score-SDE) or "log_half_sigma" (c_noise = log(sigma / 2), EDM VE).
    """

    name = "ve_score"

    def __init__(self, net: nn.Module, output: str = "score", noise_input: str = "sigma",
                 sigma_min: float = 0.01, sigma_max: float = 50.0,
                 data_range: tuple[float, float] = (0.0, 1.0), channels: int | None = None):
        super().__init__()
        if output not in ("score", "scaled_score"):
            raise ValueError(f"output must be 'score' or 'scaled_score', got {output!r}.")
        if noise_input not in ("sigma", "log_half_sigma"):
            raise ValueError(f"noise_input must be 'sigma' or 'log_half_sigma', "
                             f"got {noise_input!r}.")
        self.net, self.output, self.noise_input = net, output, noise_input
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.data_range, self.channels = tuple(data_range), channels

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        dtype = _dtype_of(self.net, x.dtype)
        c_noise = sigma if self.noise_input == "sigma" else (sigma / 2).log()
        out = self.net(x.to(dtype), c_noise.to(dtype)).to(x.dtype)
        s = expand_like(sigma, x)
        return x + (s * s * out if self.output == "score" else s * out)


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM (c_skip, c_out, c_in, c_noise) for a (B,) sigma tensor (Karras et al. 2022, Table 1):
    c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
    c_noise = log(s) / 4; sd = sigma_data."""
    s2, sd2 = sigma**2, sigma_data**2
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data / (s2 + sd2).sqrt()
    c_in = 1 / (s2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrior(Prior):
    """EDM raw network F(c_in z, c_noise) with Karras et al. 2022 preconditioning
    (``edm_scalings``): D = c_skip z + c_out F(c_in z, log(sigma) / 4)."""

    name = "edm"

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, data_range: tuple[float, float] = (-1.0, 1.0),
                 channels: int | None = None):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.data_range, self.channels = tuple(data_range), channels

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        dtype = _dtype_of(self.net, x.dtype)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        c_skip, c_out, c_in = (expand_like(c, x) for c in (c_skip, c_out, c_in))
        out = self.net((c_in * x).to(dtype), c_noise.to(dtype)).to(x.dtype)
        return c_skip * x + c_out * out


class DeepinvDenoiserPrior(Prior):
    """Any ``deepinv.models.Denoiser`` (already D(x, sigma) in data units)."""

    name = "deepinv"

    def __init__(self, denoiser: nn.Module, data_range: tuple[float, float] = (0.0, 1.0),
                 sigma_min: float = 0.0, sigma_max: float = 1.0, channels: int | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.data_range, self.channels = tuple(data_range), channels

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        dtype = _dtype_of(self.denoiser, x.dtype)
        return self.denoiser(x.to(dtype), sigma.to(dtype))


class PerChannel(Prior):
    """A one-channel prior applied to each of ``channels`` channels on its own (the channels
    become batch entries): how score-MRI denoises complex MR images with a real-valued prior,
    real and imaginary parts separately (Chung & Ye 2022, arXiv 2110.05243)."""

    def __init__(self, inner: Prior, channels: int = 2):
        super().__init__()
        self.inner, self.channels = inner, int(channels)
        self.name, self.size_multiple = inner.name, inner.size_multiple
        self.data_range = inner.data_range
        self.sigma_min, self.sigma_max = inner.sigma_min, inner.sigma_max
        self.intensity_reference = inner.intensity_reference

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        b, c = x.shape[:2]
        out = self.inner.denoise(x.reshape(b * c, 1, *x.shape[2:]), sigma.repeat_interleave(c))
        return out.reshape(x.shape)


class _DiffusersUNet(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t).sample


class DiffusersPrior(_DiscreteVP):
    """A diffusers ``UNet2DModel`` with its DDPM/DDIM scheduler config (extra ``diffusers``);
    the prediction type ("epsilon", "v_prediction", "sample") comes from the scheduler."""

    name = "diffusers"

    def __init__(self, unet: nn.Module, betas: Tensor, prediction: str = "epsilon", **kw):
        if prediction not in _TO_X0:
            raise ValueError(f"unsupported diffusers prediction_type {prediction!r}; expected "
                             f"one of {sorted(_TO_X0)}.")
        super().__init__(_DiffusersUNet(unet), betas, **kw)
        self.prediction = prediction
