"""Adapters: every diffusion parameterisation to the one contract D(x, sigma).

Each adapter only defines the scalings (the k-diffusion ``external.py`` idea). In sigma-space
a VP state x_t = a_t x0 + s_t n is z = x_t / a_t with sigma = s_t / a_t, so a_t = 1 /
sqrt(1 + sigma^2) (Karras et al. 2022, arXiv 2206.00364, Table 1):

    VP eps-prediction   D = z - sigma eps(a z, t(sigma))
    VP v-prediction     D = a^2 z - sigma a v(a z, t(sigma))      (x0 = a x_t - s v)
    VE score            D = z + sigma^2 score(z, c_noise(sigma))
    EDM                 D = c_skip z + c_out F(c_in z, log(sigma) / 4)

Networks run in their own dtype; the scalings are applied in the input's dtype, so float64
solver state stays float64. The loaders at the bottom build the networks from configs and a
LOCAL checkpoint; nothing here downloads.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import torch
from deepinv.models import ADMUNet, NCSNpp
from deepinv.models.base import Denoiser
from deepinv.models.diffunet import (
    AttentionBlock,
    DiffUNet,
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    normalization,
    zero_module,
)
from torch import Tensor, nn

from ..errors import InputError
from .base import Prior, expand_like


def _dtype_of(net: nn.Module, default: torch.dtype) -> torch.dtype:
    """The network's parameter dtype (``default`` for parameter-free callables)."""
    p = next(iter(net.parameters()), None)
    return default if p is None else p.dtype


class _Method(nn.Module):
    """Calls ``net.<method>(*args)``, e.g. ``NCSNpp.forward_unet``, keeping ``net`` registered."""

    def __init__(self, net: nn.Module, method: str = "forward"):
        super().__init__()
        self.net, self.method = net, method

    def forward(self, *args):
        return getattr(self.net, self.method)(*args)


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
    raise InputError(f"unknown VP schedule {schedule!r}; expected one of "
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
            raise InputError(f"timestep must be 'interpolate' or 'nearest', got {timestep!r}.")
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
            raise InputError(f"output must be 'score' or 'scaled_score', got {output!r}.")
        if noise_input not in ("sigma", "log_half_sigma"):
            raise InputError(f"noise_input must be 'sigma' or 'log_half_sigma', "
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


class EDMPrior(Prior):
    """EDM raw network F(c_in z, c_noise) with Karras et al. 2022 preconditioning:
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = log(sigma) / 4; sd = sigma_data."""

    name = "edm"

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, data_range: tuple[float, float] = (-1.0, 1.0),
                 channels: int | None = None):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.data_range, self.channels = tuple(data_range), channels

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        dtype, sd = _dtype_of(self.net, x.dtype), self.sigma_data
        s = expand_like(sigma, x)
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        out = self.net((c_in * x).to(dtype), (sigma.log() / 4).to(dtype)).to(x.dtype)
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
            raise InputError(f"unsupported diffusers prediction_type {prediction!r}; expected "
                             f"one of {sorted(_TO_X0)}.")
        super().__init__(_DiffusersUNet(unet), betas, **kw)
        self.prediction = prediction

    @classmethod
    def from_pretrained(cls, local_dir: str | os.PathLike, **kw) -> DiffusersPrior:
        """Load ``<local_dir>/unet`` (or ``local_dir``) and ``<local_dir>/scheduler``; never
        downloads (``local_files_only=True``)."""
        try:
            from diffusers import DDPMScheduler, UNet2DModel
        except ImportError as err:
            raise InputError("loading a diffusers model needs the 'diffusers' extra "
                             "(pip install 'diffrecon[diffusers]').") from err
        root = Path(local_dir)
        if not root.is_dir():
            raise InputError(f"diffusers model directory {str(root)!r} does not exist.")
        unet_dir = root / "unet" if (root / "unet").is_dir() else root
        sched_dir = root / "scheduler" if (root / "scheduler").is_dir() else root
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
        sched = DDPMScheduler.from_pretrained(sched_dir, local_files_only=True)
        kw.setdefault("channels", unet.config.in_channels)
        return cls(unet.eval(), sched.betas.to(torch.float64),
                   sched.config.prediction_type, **kw)


# --------------------------------------------------------------------- guided-diffusion UNet
def _channel_mult(channel_mult, image_size: int) -> tuple[float, ...]:
    if channel_mult not in ("", None):
        if isinstance(channel_mult, str):
            return tuple(float(c) for c in channel_mult.split(","))
        return tuple(channel_mult)
    defaults = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                64: (1, 2, 3, 4)}
    if image_size not in defaults:
        raise InputError(f"give channel_mult for image_size {image_size} (guided-diffusion "
                         f"defaults exist for {sorted(defaults)}).")
    return defaults[image_size]


class GuidedDiffusionUNet(DiffUNet):
    """The guided-diffusion ``UNetModel`` (Dhariwal & Nichol 2021) built from its config
    names with deepinv's DiffUNet blocks; state-dict keys match openai/guided-diffusion
    checkpoints (unconditional). ``forward(x_t, t)`` -> eps, (B, C or 2C, H, W).

    Defaults are the FFHQ-256 model of DPS (``ffhq_10m.pt``, = deepinv DiffUNet small).
    """

    def __init__(self, image_size: int = 256, in_channels: int = 3, num_channels: int = 128,
                 num_res_blocks: int = 1, channel_mult="", attention_resolutions="16",
                 learn_sigma: bool = True, num_heads: int = 4, num_head_channels: int = 64,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = True,
                 resblock_updown: bool = True, use_new_attention_order: bool = False,
                 dropout: float = 0.0):
        Denoiser.__init__(self)
        mult = _channel_mult(channel_mult, image_size)
        if isinstance(attention_resolutions, str):
            attention_resolutions = [int(r) for r in attention_resolutions.split(",") if r]
        attn_ds = {image_size // int(r) for r in attention_resolutions}
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.model_channels, self.num_classes, self.dtype = num_channels, None, torch.float32
        self.in_channels = in_channels
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        emb = 4 * num_channels
        self.time_embed = nn.Sequential(nn.Linear(num_channels, emb), nn.SiLU(),
                                        nn.Linear(emb, emb))

        def res(cin, cout, **kw):
            return ResBlock(cin, emb, dropout, out_channels=cout,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(c, heads):
            return AttentionBlock(c, num_heads=heads, num_head_channels=num_head_channels,
                                  use_new_attention_order=use_new_attention_order)

        def down(c):
            return res(c, c, down=True) if resblock_updown else Downsample(c, True, 2, c)

        def up(c):
            return res(c, c, up=True) if resblock_updown else Upsample(c, True, 2, c)

        ch = input_ch = int(mult[0] * num_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(m * num_channels))]
                ch = int(m * num_channels)
                if ds in attn_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(down(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads),
                                                    res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, m in list(enumerate(mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + chans.pop(), int(m * num_channels))]
                ch = int(m * num_channels)
                if ds in attn_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == num_res_blocks:
                    layers.append(up(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(input_ch, self.out_channels, 3,
                                                       padding=1)))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.forward_diffusion(x, t)


# --------------------------------------------------------------------- checkpoint loaders
_VP_KEYS = ("betas", "num_train_steps", "beta_start", "beta_end", "schedule", "timestep",
            "data_range", "channels")


def _read_checkpoint(path, kw: dict) -> tuple[dict, dict]:
    """(state_dict, config): a raw state dict, or {"state_dict": ..., "config": {...}}
    (also "model" / "ema" wrappers); ``kw`` overrides the stored config."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint file {str(path)!r} does not exist.")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    config = {}
    if isinstance(obj, dict):
        for key in ("state_dict", "ema", "model"):
            if isinstance(obj.get(key), dict):
                config = dict(obj.get("config", {}))
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise InputError(f"checkpoint {str(path)!r} does not hold a state dict.")
    return obj, {**config, **kw}


def _split(config: dict, keys) -> tuple[dict, dict]:
    return ({k: v for k, v in config.items() if k in keys},
            {k: v for k, v in config.items() if k not in keys})


def _build(cls, path, state_dict: dict, arch: dict) -> nn.Module:
    names = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    unknown = sorted(set(arch) - names)
    if unknown:
        raise InputError(f"unknown option(s) {unknown} for {cls.__name__} loading "
                         f"{str(path)!r}; expected some of {sorted(names)}.")
    if "pretrained" in names:
        arch = {**arch, "pretrained": None}
    net = cls(**arch)
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise InputError(f"checkpoint {str(path)!r} does not match {cls.__name__}({arch}); "
                         f"pass its architecture options ({first}).") from err
    return net.eval()


def _adm_net(path, kw):
    sd, config = _read_checkpoint(path, kw)
    prior_kw, arch = _split(config, _VP_KEYS)
    if "input_blocks.0.0.weight" in sd and "out.2.weight" in sd:
        w_in, w_out = sd["input_blocks.0.0.weight"], sd["out.2.weight"]
        arch.setdefault("in_channels", w_in.shape[1])
        arch.setdefault("num_channels", w_in.shape[0])
        arch.setdefault("learn_sigma", w_out.shape[0] == 2 * w_in.shape[1])
    prior_kw.setdefault("channels", arch.get("in_channels", 3))
    return _build(GuidedDiffusionUNet, path, sd, arch), prior_kw


def load_adm(path, **kw) -> VPEpsPrior:
    """guided-diffusion (ADM) eps checkpoint; architecture options use guided-diffusion's
    names (image_size, num_channels, channel_mult, attention_resolutions, ...), schedule
    options those of ``VPEpsPrior``."""
    net, prior_kw = _adm_net(path, kw)
    return VPEpsPrior(net, **prior_kw)


def load_vpred(path, **kw) -> VPredictionPrior:
    """v-prediction checkpoint on the guided-diffusion UNet (options as ``load_adm``)."""
    kw.setdefault("learn_sigma", False)
    net, prior_kw = _adm_net(path, kw)
    return VPredictionPrior(net, **prior_kw)


def load_ncsnpp(path, **kw) -> VEScorePrior:
    """deepinv/EDM-layout NCSN++ trained with the VE baseline (score-SDE converted by EDM):
    D = z + sigma F(z, log(sigma / 2)). Options: deepinv ``NCSNpp`` arguments plus
    sigma_min, sigma_max, data_range (default [-1, 1])."""
    sd, config = _read_checkpoint(path, kw)
    prior_kw, arch = _split(config, ("sigma_min", "sigma_max", "data_range", "channels"))
    prior_kw.setdefault("sigma_min", 0.02)
    prior_kw.setdefault("sigma_max", 100.0)
    prior_kw.setdefault("data_range", (-1.0, 1.0))
    prior_kw.setdefault("channels", arch.get("in_channels", 3))
    arch.setdefault("precondition_type", "ve-baseline")
    net = _build(NCSNpp, path, sd, arch)
    return VEScorePrior(_Method(net, "forward_unet"), output="scaled_score",
                        noise_input="log_half_sigma", **prior_kw)


def load_edm(path, arch: str = "ADMUNet", **kw) -> EDMPrior:
    """EDM-trained network in deepinv's layout (``arch`` "ADMUNet" or "NCSNpp"), raw F with
    EDM preconditioning. Options: the architecture's arguments plus sigma_data (0.5),
    sigma_min, sigma_max, data_range (default [-1, 1])."""
    classes = {"ADMUNet": ADMUNet, "NCSNpp": NCSNpp}
    if arch not in classes:
        raise InputError(f"unknown EDM arch {arch!r}; expected one of {sorted(classes)}.")
    sd, config = _read_checkpoint(path, kw)
    keys = ("sigma_data", "sigma_min", "sigma_max", "data_range", "channels")
    prior_kw, arch_kw = _split(config, keys)
    prior_kw.setdefault("channels", arch_kw.get("in_channels", 3))
    net = _build(classes[arch], path, sd, arch_kw)
    return EDMPrior(_Method(net, "forward_unet"), **prior_kw)


def load_deepinv(path, model: str = "DRUNet", **kw) -> DeepinvDenoiserPrior:
    """State dict of a ``deepinv.models.<model>`` denoiser; options: its constructor
    arguments plus data_range, sigma_min, sigma_max."""
    import deepinv.models as dm

    cls = getattr(dm, model, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InputError(f"deepinv.models has no denoiser named {model!r}.")
    sd, config = _read_checkpoint(path, kw)
    prior_kw, arch = _split(config, ("data_range", "sigma_min", "sigma_max", "channels"))
    return DeepinvDenoiserPrior(_build(cls, path, sd, arch), **prior_kw)


def load_diffusers(path, **kw) -> DiffusersPrior:
    """A LOCAL diffusers model directory (``unet/`` + ``scheduler/``)."""
    return DiffusersPrior.from_pretrained(path, **kw)
