"""guided-diffusion (ADM) checkpoints: the UNet, its architecture read off the state dict, and
the repositories' configs (guided-diffusion / DPS / RED-diff / DDS) accepted as released.

A released ADM file is ``torch.save(model.state_dict())``. Everything the weights determine
(width, channel_mult, res-blocks per level, attention levels, learned sigma, scale-shift norm,
resblock up/down, class count) is inferred; the rest (attention heads, new attention order)
defaults to the released configs' values (64 channels per head, legacy order). A config or an
option that contradicts the file is an error naming both values.
"""

from __future__ import annotations

import re

import torch
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

from ...errors import InputError
from ..adapters import VPEpsPrior, VPredictionPrior, vp_betas
from .io import load_state

# guided-diffusion's create_model defaults for channel_mult="" (DDS adds 320)
DEFAULT_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 320: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4),
                128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
GD_ARCH = {"image_size", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma",
           "class_cond", "attention_resolutions", "num_heads", "num_head_channels",
           "num_heads_upsample", "use_scale_shift_norm", "resblock_updown",
           "use_new_attention_order", "in_channels", "dropout", "resamp_with_conv"}
HARMLESS = {"use_fp16", "use_checkpoint", "model_path", "ckpt", "_target_", "type", "var_type",
            "out_channels", "sampler", "model_var_type", "dynamic_threshold", "clip_denoised",
            "timestep_respacing", "use_kl", "rescale_learned_sigmas", "sigma_small",
            "T_sampling", "batch_size", "ema_rate"}
DIFFUSION = {"steps", "diffusion_steps", "num_diffusion_timesteps", "noise_schedule",
             "beta_schedule", "beta_start", "beta_end", "model_mean_type", "predict_xstart",
             "rescale_timesteps"}
PRIOR = {"timestep", "data_range", "channels", "schedule", "num_train_steps", "betas",
         "prediction"}
UNET = ("in_channels", "model_channels", "out_channels", "num_res_blocks",
        "attention_resolutions", "dropout", "channel_mult", "conv_resample", "num_classes",
        "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
        "resblock_updown", "use_new_attention_order")
DEFAULTS = dict(dropout=0.0, conv_resample=True, num_heads=4, num_head_channels=64,
                num_heads_upsample=-1, use_new_attention_order=False, num_classes=None)


class GuidedDiffusionUNet(DiffUNet):
    """guided-diffusion's ``UNetModel`` (Dhariwal & Nichol 2021, arXiv 2105.05233) with its own
    argument names, built from deepinv's DiffUNet blocks; state-dict keys are guided-diffusion's.
    ``attention_resolutions`` are downsampling factors (``image_size // resolution``).
    ``forward(x_t, t)`` -> (B, out_channels, H, W); a class-conditional net uses ``self.label``
    (an int in [0, num_classes)) for every sample."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions, dropout: float = 0.0,
                 channel_mult=(1, 2, 4, 8), conv_resample: bool = True, num_classes=None,
                 num_heads: int = 1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False):
        Denoiser.__init__(self)
        attn_ds = {int(d) for d in attention_resolutions}
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.model_channels, self.num_classes = model_channels, num_classes
        self.dtype = torch.float32
        self.in_channels, self.out_channels = in_channels, out_channels
        self.size_multiple = 2 ** (len(channel_mult) - 1)
        self.label: int | None = None
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(),
                                        nn.Linear(emb, emb))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb)

        def res(cin, cout, **kw):
            return ResBlock(cin, emb, dropout, out_channels=cout,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(c, heads):
            return AttentionBlock(c, num_heads=heads, num_head_channels=num_head_channels,
                                  use_new_attention_order=use_new_attention_order)

        def down(c):
            return res(c, c, down=True) if resblock_updown else Downsample(c, conv_resample, 2, c)

        def up(c):
            return res(c, c, up=True) if resblock_updown else Upsample(c, conv_resample, 2, c)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, m in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(m * model_channels))]
                ch = int(m * model_channels)
                if ds in attn_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(down(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads),
                                                    res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, m in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + chans.pop(), int(m * model_channels))]
                ch = int(m * model_channels)
                if ds in attn_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == num_res_blocks:
                    layers.append(up(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1)))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        y = None
        if self.num_classes is not None:
            y = torch.full((x.shape[0],), int(self.label), dtype=torch.long, device=x.device)
        return self.forward_diffusion(x, t, y)


# --------------------------------------------------------------------- architecture inference
def _blocks(sd: dict, prefix: str) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for key in sd:
        m = re.match(rf"{prefix}\.(\d+)\.(.*)", key)
        if m:
            out.setdefault(int(m.group(1)), set()).add(m.group(2))
    return out


def infer(sd: dict) -> dict:
    """The UNet arguments a guided-diffusion state dict determines (see module docstring)."""
    need = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")
    if not all(k in sd for k in need):
        raise InputError(f"not a guided-diffusion state dict (needs {', '.join(need)}).")
    mc = sd["time_embed.0.weight"].shape[1]
    ins, outs = _blocks(sd, "input_blocks"), _blocks(sd, "output_blocks")
    ups = sorted(i for i, keys in outs.items()
                 if any(re.match(r"[1-9]\.(in_layers|conv)\.", k) for k in keys))
    levels = len(ups) + 1
    nrb = len(outs) // levels - 1
    if nrb < 1 or ups != [(k + 1) * (nrb + 1) - 1 for k in range(levels - 1)]:
        raise InputError("cannot read the level structure of this guided-diffusion state dict; "
                         "give num_res_blocks and channel_mult.")
    first = [1 + level * (nrb + 1) for level in range(levels)]
    widths = [sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first]
    mult = tuple(w // mc if w % mc == 0 else w / mc for w in widths)
    in_ch, out_ch = sd["input_blocks.0.0.weight"].shape[1], sd["out.2.weight"].shape[0]
    return dict(
        model_channels=mc, in_channels=in_ch, out_channels=out_ch, num_res_blocks=nrb,
        channel_mult=mult,
        attention_resolutions=tuple(2 ** lv for lv, i in enumerate(first)
                                    if any(k.startswith("1.qkv.") for k in ins[i])),
        use_scale_shift_norm=sd["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * widths[0],
        resblock_updown=levels > 1 and any(k.startswith("0.in_layers.") for k in ins[nrb + 1]),
        num_classes=sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None)


# --------------------------------------------------------------------- configs
def split_config(cfg: dict, where: str) -> tuple[dict, dict, dict, dict]:
    """(guided-diffusion arch keys, diffusion keys, diffrecon prior options, resolved UNet
    args) of a config: flat (DPS model_config.yaml, RED-diff model yaml, guided-diffusion
    flags), nested with a ``model:`` / ``diffusion:`` block (DDS), or a converted card."""
    cfg = dict(cfg)
    unet = dict(cfg.pop("unet", {}) or {})
    flat: dict = {}
    if isinstance(cfg.get("model"), dict):
        flat.update(cfg.pop("model"))
        flat.update(cfg.pop("diffusion", {}) or {})
        for block in ("data", "sampling", "training", "optim"):
            cfg.pop(block, None)
    flat.update(cfg)
    unknown = sorted(set(flat) - GD_ARCH - HARMLESS - DIFFUSION - PRIOR)
    if unknown:
        raise InputError(f"{where}: unknown option(s) {unknown} for an ADM checkpoint; expected "
                         f"guided-diffusion names ({', '.join(sorted(GD_ARCH))}) or "
                         f"{', '.join(sorted(PRIOR))}.")
    pick = lambda keys: {k: v for k, v in flat.items() if k in keys}  # noqa: E731
    return pick(GD_ARCH), pick(DIFFUSION), pick(PRIOR), unet


def _numbers(value) -> tuple:
    if isinstance(value, str):
        return tuple(float(v) if "." in v else int(v) for v in value.split(",") if v.strip())
    if isinstance(value, (int, float)):
        return (value,)
    return tuple(value)


def unet_args(gd: dict, where: str) -> dict:
    """guided-diffusion create_model names -> UNetModel arguments (only those given)."""
    out = {}
    renames = {"num_channels": "model_channels", "resamp_with_conv": "conv_resample"}
    for key in ("in_channels", "num_res_blocks", "num_heads", "num_head_channels",
                "num_heads_upsample", "use_scale_shift_norm", "resblock_updown",
                "use_new_attention_order", "dropout", "num_channels", "resamp_with_conv"):
        if key in gd:
            out[renames.get(key, key)] = gd[key]
    size = gd.get("image_size")
    if "channel_mult" in gd:
        if gd["channel_mult"] not in ("", None):
            out["channel_mult"] = _numbers(gd["channel_mult"])
        elif size in DEFAULT_MULT:
            out["channel_mult"] = DEFAULT_MULT[size]
    if "attention_resolutions" in gd:
        if size is None:
            raise InputError(f"{where}: attention_resolutions needs image_size.")
        out["attention_resolutions"] = tuple(sorted(size // int(r) for r in
                                                    _numbers(gd["attention_resolutions"])))
    return out


def _check(given: dict, inferred: dict, where: str, what: str) -> None:
    for key, value in given.items():
        if key not in inferred:
            continue
        have = inferred[key]
        same = (tuple(_numbers(value)) == tuple(have) if isinstance(have, tuple)
                else value == have)
        if not same:
            raise InputError(f"{where}: {key}={value!r} but {what} has {key}={have!r}; drop the "
                             "option or give the config that belongs to this file.")


def build(sd: dict, cfg: dict, options: dict, where: str, label=None):
    """(UNet with weights, prior options, card) from a state dict, a config and options."""
    gd, diff, prior_kw, unet = split_config({**cfg, **options}, where)
    inferred = infer(sd)
    args = {**DEFAULTS, **inferred}
    given_keys: set = set()
    levels = {2 ** lv for lv in range(len(inferred["channel_mult"]))}
    for given in (unet, unet_args(gd, where)):
        if "attention_resolutions" in given:      # e.g. "16" at image_size 320: no level
            given["attention_resolutions"] = tuple(
                d for d in _numbers(given["attention_resolutions"]) if d in levels)
        _check(given, inferred, where, "the file")
        args.update(given)
        given_keys |= set(given)
    if "learn_sigma" in gd and bool(gd["learn_sigma"]) != (args["out_channels"]
                                                          == 2 * args["in_channels"]):
        raise InputError(f"{where}: learn_sigma={gd['learn_sigma']} but the file's output has "
                         f"{args['out_channels']} channels for {args['in_channels']} inputs.")
    if "class_cond" in gd and bool(gd["class_cond"]) != (args["num_classes"] is not None):
        raise InputError(f"{where}: class_cond={gd['class_cond']} but the file is "
                         f"{'un' if args['num_classes'] is None else ''}conditional.")
    args = {k: args[k] for k in UNET}
    mult, mc = args["channel_mult"], args["model_channels"]
    attn_widths = [int(m * mc) for lv, m in enumerate(mult)
                   if 2 ** lv in args["attention_resolutions"]] + [int(mult[-1] * mc)]
    bad = [w for w in attn_widths if args["num_head_channels"] > 0
           and w % args["num_head_channels"]]
    if bad:
        raise InputError(f"{where}: attention over {bad[0]} channels does not split into heads "
                         f"of num_head_channels={args['num_head_channels']} (the released "
                         "default); give num_head_channels, or num_heads with "
                         "num_head_channels=-1, or the config of this file.")
    net = GuidedDiffusionUNet(**args)
    load_state(net, sd, where, "give the architecture options of this file "
               "(num_res_blocks, channel_mult, attention_resolutions with image_size, ...)")
    if args["num_classes"] is not None:
        if label is None:
            raise InputError(f"{where} is class-conditional ({args['num_classes']} classes): "
                             f"give label=<0..{args['num_classes'] - 1}> (--prior-label).")
        if not 0 <= int(label) < args["num_classes"]:
            raise InputError(f"{where}: label {label} is outside 0..{args['num_classes'] - 1}.")
        net.label = int(label)
    elif label is not None:
        raise InputError(f"{where}: label={label} given but the checkpoint is unconditional.")
    assumed = sorted(k for k in DEFAULTS if k not in given_keys and k not in inferred)
    return net, _prior_options(diff, prior_kw, args, where), {"unet": args, "assumed": assumed}


def _prior_options(diff: dict, prior_kw: dict, args: dict, where: str) -> dict:
    steps = diff.get("num_diffusion_timesteps", diff.get("diffusion_steps", diff.get("steps")))
    schedule = diff.get("beta_schedule", diff.get("noise_schedule"))
    kw = dict(prior_kw)
    if steps is not None:
        kw.setdefault("num_train_steps", int(steps))
    if schedule is not None:
        kw.setdefault("schedule", schedule)
    steps = kw.get("num_train_steps", 1000)
    if "beta_start" in diff or "beta_end" in diff:
        kw.setdefault("beta_start", float(diff.get("beta_start", 1e-4)))
        kw.setdefault("beta_end", float(diff.get("beta_end", 0.02)))
    elif kw.get("schedule", "linear") == "linear" and steps != 1000 and "betas" not in kw:
        kw.setdefault("beta_start", 1e-4 * 1000 / steps)   # guided-diffusion's "linear"
        kw.setdefault("beta_end", 0.02 * 1000 / steps)     # is defined for any T this way
    mean = str(diff.get("model_mean_type", "epsilon")).strip().lower()
    if diff.get("predict_xstart") or mean == "start_x":
        kw.setdefault("prediction", "sample")
    elif mean not in ("epsilon", "eps"):
        raise InputError(f"{where}: model_mean_type {mean!r} is not supported "
                         "(epsilon or start_x).")
    if diff.get("rescale_timesteps") and steps != 1000:
        raise InputError(f"{where}: rescale_timesteps with {steps} steps is not supported.")
    kw.setdefault("channels", args["in_channels"])
    return kw


def make_prior(net: GuidedDiffusionUNet, kw: dict, prediction: str | None = None):
    """The VP prior over the UNet with the schedule options ``kw``."""
    kw = dict(kw)
    pred = kw.pop("prediction", prediction or "epsilon")
    if "betas" in kw:
        kw["betas"] = torch.as_tensor(kw["betas"], dtype=torch.float64)
    elif "beta_start" in kw:
        kw["betas"] = vp_betas(kw.pop("num_train_steps", 1000), kw.pop("beta_start"),
                               kw.pop("beta_end", 0.02), kw.pop("schedule", "linear"))
    cls = VPredictionPrior if pred == "v_prediction" else VPEpsPrior
    try:
        prior = cls(net, **kw)
    except TypeError as err:
        raise InputError(f"ADM prior options {sorted(kw)}: {err}.") from err
    if pred not in ("epsilon", "v_prediction"):
        prior.prediction = pred
    prior.size_multiple = net.size_multiple
    return prior
