"""EDM-layout networks (NVlabs/edm's SongUNet / DhariwalUNet, deepinv's NCSNpp / ADMUNet):
EDM network-snapshot pickles read without running their code, EDM-layout state dicts, and
their preconditioning ("edm": Karras et al. 2022; "ve": the VE baseline).

An EDM ``.pkl`` pickles persistent classes (``torch_utils.persistence``) whose source code
would be executed on a plain ``pickle.load``. ``unpickle`` instead maps every global the pickle
names to an inert record (tensors through ``torch.load(weights_only=True)``), so nothing from
the file runs and EDM's code is not needed; the network is rebuilt from the recorded
``init_kwargs`` with deepinv's ports of EDM's architectures. The caller still asks for the
user's consent first (``trust_pickle``): the file is untrusted input.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections import OrderedDict

import numpy as np
import torch
from deepinv.models import ADMUNet, NCSNpp
from deepinv.models.utils import FourierEmbedding, PositionalEmbedding, UNetBlock, UpDownConv2d
from torch import Tensor, nn

from ...errors import InputError
from ..adapters import EDMPrior, VEScorePrior
from .io import json_safe, load_state


# --------------------------------------------------------------------- restricted unpickling
class Record:
    """Any object the pickle names: its class path and state, never its code."""

    def __init__(self, *args, **kwargs):
        self.args, self.state = args, {}

    def __setstate__(self, state):
        self.state = state[0] if isinstance(state, tuple) and len(state) == 2 else state


def _persistent(meta):
    rec = Record()
    rec.cls = meta.get("class_name", "?")
    rec.__setstate__(meta.get("state", {}))
    return rec


def _parameter(data, requires_grad=False, *args):
    return data


def _storage(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


class _Unpickler(pickle.Unpickler):
    SAFE = {("collections", "OrderedDict"): OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): _parameter,
            ("torch.storage", "_load_from_bytes"): _storage,
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
            ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
            ("numpy", "dtype"): np.dtype}

    def find_class(self, module, name):
        if (module, name) in self.SAFE:
            return self.SAFE[module, name]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return lambda dtype, data=b"": np.frombuffer(data, dtype=dtype)[0]
        return type(name, (Record,), {"cls": f"{module}.{name}"})


def unpickle(path) -> Record | dict:
    """The pickle's object graph with every class replaced by a ``Record``."""
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _Unpickler(f).load()
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as err:
            raise InputError(f"cannot read pickle {str(path)!r} ({err}).") from err


def record_state_dict(rec: Record, prefix: str = "") -> dict:
    """A torch-style state dict from a recorded nn.Module (parameters + persistent buffers)."""
    out, state = {}, rec.state
    skip = set(state.get("_non_persistent_buffers_set", ()) or ())
    for key, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + key] = value
    for key, value in (state.get("_buffers") or {}).items():
        if value is not None and key not in skip:
            out[prefix + key] = value
    for key, child in (state.get("_modules") or {}).items():
        if isinstance(child, Record):
            out.update(record_state_dict(child, f"{prefix}{key}."))
    return out


def from_pickle(obj, where: str) -> tuple[dict, dict, str]:
    """(state dict of the raw network, its EDM init kwargs, preconditioning class name)."""
    net = obj.get("ema") if isinstance(obj, dict) else obj
    if not isinstance(net, Record) or "_init_kwargs" not in net.state:
        raise InputError(f"pickle {where!r} holds no EDM network (expected a dict with 'ema').")
    kwargs = dict(net.state["_init_kwargs"] or {})
    sd = record_state_dict(net)
    sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return sd, json_safe(kwargs), getattr(net, "cls", "?")


# --------------------------------------------------------------------- architectures
def edm_group_norms(net: nn.Module) -> nn.Module:
    """EDM / score-SDE group counts, min(32, C // 4) (deepinv's blocks fix 32; the same for
    C >= 128, as in all released networks, different for the narrow test networks)."""
    for m in net.modules():
        if isinstance(m, nn.GroupNorm):
            m.num_groups = min(32, m.num_channels // 4)
    return net


class SongUNet(NCSNpp):
    """EDM's SongUNet (DDPM++ / NCSN++) with every encoder / decoder type, in deepinv's
    NCSNpp layout (same keys, same ``forward_unet``); deepinv's own class fixes the types."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int,
                 label_dim: int = 0, augment_dim: int = 0, model_channels: int = 128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb: int = 4, num_blocks: int = 4,
                 attn_resolutions=(16,), dropout: float = 0.0, label_dropout: float = 0.0,
                 embedding_type: str = "positional", channel_mult_noise: int = 1,
                 encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter=(1, 1)):
        nn.Module.__init__(self)
        if encoder_type not in ("standard", "skip", "residual") or \
                decoder_type not in ("standard", "skip"):
            raise InputError(f"SongUNet encoder_type {encoder_type!r} / decoder_type "
                             f"{decoder_type!r} are not EDM's.")
        self.label_dropout, self.precondition_type = label_dropout, "edm"
        emb_ch, noise_ch = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        kw = dict(emb_channels=emb_ch, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5),
                  eps=1e-6, resample_filter=resample_filter, resample_proj=True,
                  adaptive_scale=False)
        self.map_noise = (PositionalEmbedding(noise_ch, endpoint=True)
                          if embedding_type == "positional"
                          else FourierEmbedding(noise_ch, device=None))
        self.map_label = nn.Linear(label_dim, noise_ch) if label_dim else None
        self.map_augment = nn.Linear(augment_dim, noise_ch, bias=False) if augment_dim else None
        self.map_layer0, self.map_layer1 = nn.Linear(noise_ch, emb_ch), nn.Linear(emb_ch, emb_ch)
        self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = UpDownConv2d(cin, cout, kernel=3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **kw)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = UpDownConv2d(
                        caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = UpDownConv2d(caux, cout, kernel=1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = UpDownConv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter,
                        fused_resample=True)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **kw)
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **kw)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **kw)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **kw)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=idx == num_blocks and res in attn_resolutions, **kw)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = UpDownConv2d(
                        out_channels, out_channels, kernel=0, up=True,
                        resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = nn.GroupNorm(32, cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = UpDownConv2d(cout, out_channels, kernel=3)
        self.size_multiple = 2 ** (len(channel_mult) - 1)
        edm_group_norms(self)


SONG = ("img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim",
        "model_channels", "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions",
        "dropout", "label_dropout", "embedding_type", "channel_mult_noise", "encoder_type",
        "decoder_type", "resample_filter")
DHARIWAL = ("img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim",
            "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
            "attn_resolutions", "dropout", "label_dropout")


def build_net(arch: str, kw: dict, where: str) -> nn.Module:
    """SongUNet or deepinv's ADMUNet (= EDM's DhariwalUNet) from EDM's arguments."""
    names = SONG if arch in ("SongUNet", "NCSNpp") else DHARIWAL
    unknown = sorted(set(kw) - set(names))
    if unknown:
        raise InputError(f"{where}: unknown {arch} option(s) {unknown}; expected some of "
                         f"{list(names)}.")
    if arch not in ("SongUNet", "NCSNpp", "DhariwalUNet", "ADMUNet"):
        raise InputError(f"{where}: unknown EDM architecture {arch!r} (SongUNet, DhariwalUNet).")
    try:
        if arch in ("SongUNet", "NCSNpp"):
            return SongUNet(**kw)
        net = ADMUNet(pretrained=None, **kw)
    except TypeError as err:
        raise InputError(f"{where}: {arch} options: {err}.") from err
    net.size_multiple = 2 ** (len(kw.get("channel_mult", (1, 2, 3, 4))) - 1)
    return edm_group_norms(net)


class EDMNet(nn.Module):
    """F(x, c_noise) of an EDM-layout network with a fixed class label: one-hot of
    ``label`` in [0, label_dim), or all zeros (EDM's null label) when None."""

    def __init__(self, net: nn.Module, label_dim: int = 0, label: int | None = None):
        super().__init__()
        self.net, self.label_dim, self.label = net, label_dim, label

    def export(self) -> nn.Module:
        return self.net

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        labels = None
        if self.label_dim:
            labels = torch.zeros(x.shape[0], self.label_dim, dtype=x.dtype, device=x.device)
            if self.label is not None:
                labels[:, self.label] = 1
        return self.net.forward_unet(x, c_noise, labels)


# --------------------------------------------------------------------- loading
def load(ckpt, sd, cfg: dict, options: dict, label, precond: str = "edm"):
    """An EDM-layout prior from a pickle (records) or a state dict plus ``arch`` options."""
    from .io import tensors

    where = str(ckpt.path)
    cfg = {**cfg, **options}
    if ckpt.fmt == "pickle":
        sd, kwargs, cls = from_pickle(ckpt.obj, where)
        precond = {"EDMPrecond": "edm", "VEPrecond": "ve"}.get(cls)
        if precond is None:
            raise InputError(f"{where}: EDM preconditioning {cls!r} is not supported "
                             "(EDMPrecond, VEPrecond).")
        arch = kwargs.pop("model_type", "DhariwalUNet")
        pre_kw = {k: kwargs.pop(k) for k in ("sigma_min", "sigma_max", "sigma_data", "use_fp16",
                                             "M", "epsilon_t") if k in kwargs}
        kwargs["in_channels"] = kwargs["out_channels"] = kwargs.pop("img_channels", 3)
        for key in ("sigma_min", "sigma_max", "sigma_data"):
            if key in pre_kw and key not in cfg:
                cfg[key] = pre_kw[key]
        cfg = {"arch": arch, **kwargs, **cfg}
    elif sd is None:
        sd = tensors(ckpt.obj)
        if sd is None:
            raise InputError(f"checkpoint {where!r} holds no EDM-layout state dict.")
        if any(k.startswith("model.") for k in sd):
            sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    arch = cfg.pop("arch", "DhariwalUNet")
    if label is None:
        label = cfg.pop("label", None)
    prior_kw = {k: cfg.pop(k) for k in ("sigma_min", "sigma_max", "sigma_data", "data_range",
                                        "channels") if k in cfg}
    for key in ("precond", "label", "precondition_type", "pixel_std", "pretrained",
                "_was_trained_on_minus_one_one", "device"):    # deepinv-only, no weights
        cfg.pop(key, None)
    cfg.setdefault("augment_dim", 0)        # deepinv's ADMUNet / NCSNpp default to 9
    model_type = str(cfg.pop("model_type", "ncsn")).lower()   # deepinv NCSNpp's two presets
    if arch in ("NCSNpp", "SongUNet") and "embedding_type" not in cfg:
        if model_type not in ("ncsn", "ddpm"):
            raise InputError(f"{where}: model_type {model_type!r}; expected ncsn or ddpm.")
        cfg.update(dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                        decoder_type="standard", resample_filter=(1, 3, 3, 1))
                   if model_type == "ncsn" else
                   dict(embedding_type="positional", channel_mult_noise=1,
                        encoder_type="standard", decoder_type="standard",
                        resample_filter=(1, 1)))
    net = build_net(arch, cfg, where)
    load_state(net, sd, where, f"give the {arch} arguments of this file (img_resolution, "
               "model_channels, channel_mult, num_blocks, attn_resolutions, label_dim, ...)")
    label_dim = cfg.get("label_dim", 0)
    if label is not None and not 0 <= int(label) < max(label_dim, 0):
        raise InputError(f"{where}: label {label} is outside the network's "
                         f"{label_dim} classes.")
    wrapped = EDMNet(net, label_dim, None if label is None else int(label))
    prior_kw.setdefault("channels", cfg.get("in_channels", 3))
    smin, smax = (prior_kw.get("sigma_min", 0.002 if precond == "edm" else 0.02),
                  prior_kw.get("sigma_max", 80.0 if precond == "edm" else 100.0))
    prior_kw["sigma_min"] = float(smin) if smin else 0.002          # EDMPrecond: 0 / inf
    prior_kw["sigma_max"] = float(smax) if np.isfinite(smax) else 80.0
    if precond == "edm":
        prior = EDMPrior(wrapped, **prior_kw)
    else:
        prior_kw.pop("sigma_data", None)
        prior_kw.setdefault("data_range", (-1.0, 1.0))
        prior = VEScorePrior(wrapped, output="scaled_score", noise_input="log_half_sigma",
                             **prior_kw)
    prior.size_multiple = net.size_multiple
    card = {"precond": precond, "arch": arch, **json_safe(cfg), **json_safe(prior_kw),
            "label": label}
    return prior, card, sorted(cfg) if ckpt.fmt == "pickle" else []
