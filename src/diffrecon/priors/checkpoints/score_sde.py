"""score_sde_pytorch / score-MRI NCSN++ checkpoints (Song et al. 2021, arXiv 2011.13456).

The training scripts save ``{'optimizer', 'model', 'ema': {'shadow_params': [...]}, 'step'}``
with DataParallel ``module.`` keys; inference copies the EMA shadow parameters onto the
model's trainable parameters (``ema.copy_to``), so this loader does the same (the Fourier
features ``W`` are not trained and come from ``model``). The network is a flat
``all_modules`` list; its units map one-to-one, in order, onto EDM's SongUNet layout (EDM's
re-implementation of NCSN++), which is what runs. VE, continuous time: the net is fed
``log(sigma)`` and returns the score; with ``data.centered = False`` it sees ``2 x - 1`` of
data in [0, 1]. D(x, sigma) = x + sigma^2 score.
"""

from __future__ import annotations

import re

import torch
from deepinv.models.utils import UNetBlock
from torch import Tensor, nn

from ...errors import InputError
from ..adapters import VEScorePrior
from .configs import flatten
from .edm import SongUNet
from .io import json_safe, load_state, strip_prefix, tensors

# values this loader supports for the config keys that change the computation
SUPPORTED = {"model.name": ("ncsnpp",), "model.resblock_type": ("biggan",),
             "model.progressive": ("none", "output_skip"),
             "model.progressive_input": ("residual", "input_skip"),
             "model.progressive_combine": ("sum",), "model.embedding_type": ("fourier",),
             "model.conditional": (True,), "model.fir": (True,),
             "model.fir_kernel": ([1, 3, 3, 1], (1, 3, 3, 1)), "model.skip_rescale": (True,),
             "model.scale_by_sigma": (True,), "model.attention_type": ("ddpm",),
             "training.sde": ("vesde",), "training.continuous": (True,)}
OPTIONS = ("sigma_min", "sigma_max", "centered", "image_size", "data_range", "channels")


def unwrap(obj, where: str) -> dict:
    """The ``all_modules`` state dict with the EMA weights applied (``module.`` removed)."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd = strip_prefix(obj["model"])
        shadow = (obj.get("ema") or {}).get("shadow_params")
        if shadow is not None:
            fixed = {"sigmas"} | {k for k in sd if re.fullmatch(r"all_modules\.0\.W", k)}
            names = [k for k in sd if k not in fixed]
            if len(names) != len(shadow) or any(tuple(sd[n].shape) != tuple(p.shape)
                                                for n, p in zip(names, shadow, strict=True)):
                raise InputError(f"{where}: the {len(shadow)} EMA shadow parameters do not line "
                                 f"up with the model's {len(names)} trainable ones.")
            sd.update(zip(names, shadow, strict=True))
        return sd
    sd = tensors(obj)
    if sd is None:
        raise InputError(f"checkpoint {where!r} holds no score-SDE state dict.")
    return sd


def _units(sd: dict) -> list[dict]:
    groups: dict[int, dict] = {}
    for key, value in sd.items():
        m = re.match(r"all_modules\.(\d+)\.(.+)", key)
        if m:
            groups.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return [groups[i] for i in sorted(groups)]


def _kind(unit: dict) -> str:
    keys = set(unit)
    if keys == {"W"}:
        return "fourier"
    if {"Conv_0.weight", "Dense_0.weight"} <= keys:
        return "res"
    if "NIN_0.W" in keys:
        return "attn"
    if "Conv2d_0.weight" in keys:
        return "pyramid"
    if keys == {"Conv_0.weight", "Conv_0.bias"}:
        return "combine"
    if keys == {"weight", "bias"}:
        return {4: "conv", 2: "dense", 1: "norm"}[unit["weight"].ndim]
    return "?"


def infer(sd: dict, where: str) -> dict:
    """SongUNet arguments of an ``all_modules`` NCSN++ (see ``SUPPORTED``)."""
    units = _units(sd)
    kinds = [_kind(u) for u in units]
    if kinds[:4] != ["fourier", "dense", "dense", "conv"]:
        raise InputError(f"{where}: not a continuous NCSN++ (fourier features, conditional); "
                         f"its first modules are {kinds[:4]}.")
    nf, channels = units[3]["weight"].shape[0], units[3]["weight"].shape[1]
    markers = [i for i, k in enumerate(kinds) if k in ("pyramid", "combine")]
    if not markers:
        raise InputError(f"{where}: NCSN++ without an input pyramid is not supported "
                         "(progressive_input residual / input_skip).")
    nrb = sum(k == "res" for k in kinds[4:markers[0]]) - 1
    levels, attn, i = [], [], 4
    for stop in markers + [None]:
        res_i = [j for j in range(i, len(kinds) if stop is None else stop) if kinds[j] == "res"]
        res_i = res_i[:nrb]
        levels.append(units[res_i[0]]["Conv_0.weight"].shape[0])
        attn.append(kinds[res_i[0] + 1] == "attn")
        i = (stop or 0) + 1
    decoder = kinds[markers[-1] + 1:]
    return dict(in_channels=channels, out_channels=channels, model_channels=nf,
                channel_mult=[w // nf for w in levels], num_blocks=nrb, attn_levels=attn,
                encoder_type="residual" if kinds[markers[0]] == "pyramid" else "skip",
                decoder_type="skip" if decoder.count("norm") > 1 else "standard",
                fourier_scale=None)


def _check_config(flat: dict, where: str) -> None:
    for key, allowed in SUPPORTED.items():
        if key in flat and flat[key] not in allowed:
            value = flat[key]
            if isinstance(value, str) and value.lower() in allowed:
                continue
            raise InputError(f"{where}: {key}={value!r} is not supported for score-SDE "
                             f"checkpoints (supported: {list(allowed)}).")


def _map(units: list[dict], net: SongUNet, where: str) -> dict:
    """The SongUNet state dict whose units are, in order, score-SDE's ``units``."""
    targets = [("fourier", "map_noise"), ("dense", "map_layer0"), ("dense", "map_layer1")]
    for part in ("enc", "dec"):
        for name, block in getattr(net, part).items():
            prefix = f"{part}.{name}"
            if isinstance(block, UNetBlock):
                targets.append(("res", prefix))
                if block.num_heads:
                    targets.append(("attn", prefix))
            elif getattr(block, "weight", None) is not None:
                kind = ("pyramid" if "aux_residual" in name else "combine" if "aux_skip" in name
                        else "norm" if isinstance(block, nn.GroupNorm) else "conv")
                targets.append((kind, prefix))
    kinds = [_kind(u) for u in units]
    if [k for k, _ in targets] != kinds:
        want = [k for k, _ in targets]
        first = next((i for i, (a, b) in enumerate(zip(kinds, want, strict=False)) if a != b),
                     min(len(kinds), len(targets)))
        raise InputError(f"{where}: NCSN++ module {first} does not match the inferred "
                         "architecture; give the repository's config (--prior-config).")
    out = net.state_dict()
    for (kind, p), u in zip(targets, units, strict=True):
        if kind == "fourier":
            out[f"{p}.freqs"] = u["W"]
        elif kind in ("dense", "conv", "norm"):
            out[f"{p}.weight"], out[f"{p}.bias"] = u["weight"], u["bias"]
        elif kind in ("pyramid", "combine"):
            src = "Conv2d_0" if kind == "pyramid" else "Conv_0"
            out[f"{p}.weight"], out[f"{p}.bias"] = u[f"{src}.weight"], u[f"{src}.bias"]
        elif kind == "res":
            for a, b in (("GroupNorm_0", "norm0"), ("Conv_0", "conv0"), ("Dense_0", "affine"),
                         ("GroupNorm_1", "norm1"), ("Conv_1", "conv1"), ("Conv_2", "skip")):
                if f"{a}.weight" in u:
                    out[f"{p}.{b}.weight"], out[f"{p}.{b}.bias"] = u[f"{a}.weight"], u[f"{a}.bias"]
        else:     # NIN: y_k = sum_c x_c W[c, k] + b_k; EDM's qkv interleaves (c, q/k/v)
            out[f"{p}.norm2.weight"], out[f"{p}.norm2.bias"] = (u["GroupNorm_0.weight"],
                                                                u["GroupNorm_0.bias"])
            w = torch.stack([u[f"NIN_{j}.W"].T for j in range(3)], dim=1)
            out[f"{p}.qkv.weight"] = w.reshape(-1, w.shape[2], 1, 1)
            out[f"{p}.qkv.bias"] = torch.stack([u[f"NIN_{j}.b"] for j in range(3)], 1).reshape(-1)
            out[f"{p}.proj.weight"] = u["NIN_3.W"].T[:, :, None, None]
            out[f"{p}.proj.bias"] = u["NIN_3.b"]
    return out


class ScoreNet(nn.Module):
    """score(x, sigma) = F(x', log sigma) / sigma with x' = 2 x - 1 unless ``centered``."""

    def __init__(self, net: SongUNet, centered: bool = False):
        super().__init__()
        self.net, self.centered = net, centered

    def export(self) -> nn.Module:
        return self.net

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        h = x if self.centered else 2 * x - 1
        out = self.net.forward_unet(h, sigma.log())
        return out / sigma.reshape(-1, *([1] * (x.ndim - 1)))


def load(ckpt, sd, cfg: dict, options: dict, label):
    where = str(ckpt.path)
    if label is not None:
        raise InputError(f"{where}: score-SDE NCSN++ networks are unconditional (no label).")
    flat = flatten({k: v for k, v in cfg.items() if k != "songunet"})
    _check_config(flat, where)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InputError(f"{where}: unknown option(s) {unknown} for a score-SDE checkpoint; "
                         f"expected some of {list(OPTIONS)} (architecture comes from the file "
                         "and --prior-config).")
    size = options.get("image_size", flat.get("data.image_size", 256))
    if sd is not None:                       # converted: already in SongUNet layout
        arch, mapped = dict(cfg["songunet"]), sd
        sigmas = None
    else:
        raw = unwrap(ckpt.obj, where)
        sigmas = raw.get("sigmas")
        arch = infer(raw, where)
        given = {"model.nf": arch["model_channels"], "model.num_res_blocks": arch["num_blocks"],
                 "data.num_channels": arch["in_channels"]}
        for key, have in given.items():
            if key in flat and flat[key] != have:
                raise InputError(f"{where}: config {key}={flat[key]!r} but the file has {have}.")
        if "model.ch_mult" in flat and list(flat["model.ch_mult"]) != arch["channel_mult"]:
            raise InputError(f"{where}: config model.ch_mult={flat['model.ch_mult']!r} but the "
                             f"file has {tuple(arch['channel_mult'])}.")
        levels = arch.pop("attn_levels")
        arch.pop("fourier_scale")
        if "model.attn_resolutions" in flat:
            want = [size >> lv in tuple(flat["model.attn_resolutions"]) for lv in
                    range(len(levels))]
            if want != levels:
                raise InputError(f"{where}: config attn_resolutions="
                                 f"{flat['model.attn_resolutions']} at image_size {size} puts "
                                 f"attention at levels {want}, the file at {levels}.")
        arch.update(img_resolution=size, embedding_type="fourier", channel_mult_noise=2,
                    resample_filter=[1, 3, 3, 1],
                    attn_resolutions=[size >> lv for lv, a in enumerate(levels) if a])
        mapped = None
    net = SongUNet(**arch)
    if mapped is None:
        mapped = _map(_units(raw), net, where)
    load_state(net, mapped, where, "give the repository's config (--prior-config)")
    centered = bool(options.get("centered", flat.get("data.centered", cfg.get("centered", False))))
    smin = options.get("sigma_min", flat.get("model.sigma_min", cfg.get("sigma_min")))
    smax = options.get("sigma_max", flat.get("model.sigma_max", cfg.get("sigma_max")))
    if sigmas is not None and sigmas.numel():
        smin = float(sigmas.min()) if smin is None else smin
        smax = float(sigmas.max()) if smax is None else smax
    smin, smax = float(0.01 if smin is None else smin), float(378.0 if smax is None else smax)
    data_range = tuple(options.get("data_range", (-1.0, 1.0) if centered else (0.0, 1.0)))
    prior = VEScorePrior(ScoreNet(net, centered), output="score", noise_input="sigma",
                         sigma_min=smin, sigma_max=smax, data_range=data_range,
                         channels=options.get("channels", arch["in_channels"]))
    prior.size_multiple = net.size_multiple
    card = {"songunet": json_safe(arch), "centered": centered, "sigma_min": smin,
            "sigma_max": smax, "data_range": list(data_range)}
    inferred = [] if sd is not None else ["model.nf", "model.ch_mult", "model.num_res_blocks",
                                          "attention levels", "progressive", "progressive_input",
                                          "data.num_channels", "sigma range (sigmas buffer)"]
    return prior, card, inferred
