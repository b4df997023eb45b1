"""Compact fully convolutional U-Net denoiser with EDM preconditioning, and its file format.

Preconditioning (Karras et al. 2022, "Elucidating the design space", Table 1), with an
optional constant data offset ``mu`` (0 for zero-mean data such as complex MRI)::

    c_skip = sd^2 / (s^2 + sd^2)      c_out = s sd / sqrt(s^2 + sd^2)
    c_in   = 1 / sqrt(s^2 + sd^2)     c_noise = log(s) / 4
    D(x, s) = mu + c_skip (x - mu) + c_out F(c_in (x - mu), c_noise)

The network has 3 resolution levels (downsampling factor 4, so ``size_multiple = 4``), no
attention, GroupNorm + SiLU residual blocks with FiLM (scale/shift) noise conditioning. It is
translation equivariant up to padding, so a prior trained on crops runs on any H, W; inputs
whose size is not a multiple of 4 are reflect-padded and cropped back.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffrecon.priors.adapters import edm_scalings
from diffrecon.priors.base import Prior, expand_like

FORMAT = "diffrecon-network-prior/1"


class FourierEmbedding(nn.Module):
    """sin/cos features of a scalar at fixed geometric frequencies (1 to 128 rad per unit)."""

    def __init__(self, dim: int):
        super().__init__()
        freqs = torch.exp(torch.linspace(0.0, math.log(128.0), dim // 2))
        self.register_buffer("freqs", freqs)

    def forward(self, t: Tensor) -> Tensor:
        arg = t[:, None] * self.freqs[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c // 4) or 1, c)


class ResBlock(nn.Module):
    """GN-SiLU-conv, FiLM from the noise embedding, GN-SiLU-conv, residual / sqrt(2)."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        with torch.no_grad():  # start close to identity (EDM uses small init on the last conv)
            self.conv2.weight.mul_(0.2)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm2(h), scale + 1))
        return (self.conv2(h) + self.skip(x)) * (0.5**0.5)


class UNet(nn.Module):
    """F(x, c_noise): (B, channels, H, W), H and W multiples of 2^(len(mults)-1).

    Encoder: per level ``blocks`` ResBlocks then 2x average pooling; decoder: nearest 2x
    upsampling, concatenation with the encoder output of that level, ``blocks`` ResBlocks.
    """

    def __init__(self, channels: int = 1, base: int = 32, mults: tuple[int, ...] = (1, 2, 4),
                 blocks: int = 2, emb_dim: int = 128):
        super().__init__()
        self.config = {"channels": int(channels), "base": int(base), "mults": list(mults),
                       "blocks": int(blocks), "emb_dim": int(emb_dim)}
        widths = [base * m for m in mults]
        self.fourier = FourierEmbedding(64)
        self.emb = nn.Sequential(nn.Linear(64, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim),
                                 nn.SiLU())
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.enc = nn.ModuleList()
        c = widths[0]
        for w in widths:
            self.enc.append(nn.ModuleList([ResBlock(c if i == 0 else w, w, emb_dim)
                                           for i in range(blocks)]))
            c = w
        self.dec = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.dec.append(nn.ModuleList([ResBlock(c + w if i == 0 else w, w, emb_dim)
                                           for i in range(blocks)]))
            c = w
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, channels, 3, padding=1)
        with torch.no_grad():
            self.conv_out.weight.mul_(0.1)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.config["mults"]) - 1)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        emb = self.emb(self.fourier(c_noise))
        h = self.conv_in(x)
        skips = []
        for level, blocks in enumerate(self.enc):
            if level > 0:
                h = F.avg_pool2d(h, 2)
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
        skips.pop()
        for blocks in self.dec:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class NetworkPrior(Prior):
    """A trained U-Net wrapped in EDM preconditioning (see module docstring).

    ``sigma_data`` is the data's standard deviation and ``data_mean`` its mean (scalar, data
    units). The network runs in float32, or under bf16 autocast when ``autocast`` (training:
    ``amp`` on CUDA; inference: ``RunOptions.precision="bf16"``, CUDA or a CPU with native
    bf16; the output F is then about 1% off in relative L2 norm, scaled by c_out); the
    result is returned in x's dtype by :meth:`Prior.denoise`.
    """

    def __init__(self, net: UNet, *, name: str = "network", data_range=(0.0, 1.0),
                 sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 data_mean: float = 0.0, intensity_reference: float | None = None,
                 autocast: bool = False):
        super().__init__()
        self.net = net
        self.name = name
        self.channels = net.config["channels"]
        self.size_multiple = net.size_multiple
        self.data_range = (float(data_range[0]), float(data_range[1]))
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data, self.data_mean = float(sigma_data), float(data_mean)
        self.intensity_reference = (None if intensity_reference is None
                                    else float(intensity_reference))
        self.autocast = autocast

    @property
    def meta(self) -> dict:
        return {"name": self.name, "channels": self.channels, "data_range": list(self.data_range),
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": self.sigma_data, "data_mean": self.data_mean,
                "intensity_reference": self.intensity_reference,
                "size_multiple": self.size_multiple}

    def precond(self, x: Tensor, sigma: Tensor) -> Tensor:
        """D(x, sigma) for float32 x (B, C, H, W) with H, W multiples of size_multiple."""
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        xc = x - self.data_mean
        fast = self.autocast and x.device.type in ("cuda", "cpu")
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=fast):
            f = self.net(xc * expand_like(c_in, x), c_noise)
        return self.data_mean + expand_like(c_skip, x) * xc + expand_like(c_out, x) * f.to(x.dtype)

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        dtype = self.net.conv_in.weight.dtype
        x, sigma = x.to(dtype), sigma.to(dtype)
        h, w = x.shape[-2:]
        m = self.size_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        return self.precond(x, sigma)[..., :h, :w]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_network_prior(prior: NetworkPrior, path: str | os.PathLike,
                       extra_meta: dict | None = None,
                       storage_dtype: torch.dtype = torch.float32) -> Path:
    """Write config + (EMA) weights + metadata to one .pt file atomically (tmp + rename).

    Only plain dicts / lists / str / numbers / tensors are stored, so
    ``torch.load(path, weights_only=True)`` works. ``storage_dtype`` float16 halves the file
    (the shipped priors); weights are loaded back into float32 networks.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", storage_dtype if v.is_floating_point() else v.dtype)
             .clone() for k, v in prior.net.state_dict().items()}
    blob = {"format": FORMAT, "config": dict(prior.net.config), "state_dict": state,
            "meta": prior.meta, "extra": dict(extra_meta or {})}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def load_network_prior(path: str | os.PathLike, map_location="cpu") -> NetworkPrior:
    """Load a file written by :func:`save_network_prior` (``weights_only=True``)."""
    from diffrecon.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"prior file {str(path)!r} does not exist.")
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise InputError(f"prior file {str(path)!r} is not a diffrecon network prior "
                         f"(expected format {FORMAT!r}).")
    cfg = blob["config"]
    net = UNet(channels=cfg["channels"], base=cfg["base"], mults=tuple(cfg["mults"]),
               blocks=cfg["blocks"], emb_dim=cfg["emb_dim"])
    net.load_state_dict(blob["state_dict"])
    meta = blob["meta"]
    prior = NetworkPrior(net, name=meta["name"], data_range=tuple(meta["data_range"]),
                         sigma_min=meta["sigma_min"], sigma_max=meta["sigma_max"],
                         sigma_data=meta["sigma_data"], data_mean=meta.get("data_mean", 0.0),
                         intensity_reference=meta.get("intensity_reference"))
    prior.extra = blob.get("extra", {})
    return prior.to(map_location).eval().requires_grad_(False)
