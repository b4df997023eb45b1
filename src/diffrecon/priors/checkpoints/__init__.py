"""Published checkpoints as priors: file formats, architectures, configs, conversion.

    prior = load_checkpoint("ffhq_10m.pt")                                  # kind detected
    prior = load_checkpoint("model.pt", config="fastmri_knee_320_complex.yml")
    prior = load_checkpoint("imagenet256_cond.pt", label=207)
    prior = load_checkpoint("edm.pkl", trust_pickle=True, label=None)      # pickles: opt-in
    convert("edm.pkl", "edm.pt", trust_pickle=True)                        # safe .pt + .json
    describe(prior)                                                        # what was inferred

Kinds: ``adm`` (guided-diffusion: DPS, RED-diff, DDS), ``vpred``, ``score_sde``
(score_sde_pytorch / score-MRI NCSN++), ``ncsnpp`` (EDM/deepinv layout, VE baseline), ``edm``
(EDM pickles and EDM-layout state dicts), ``diffusers`` (local folder), ``deepinv``,
``diffrecon``. The kind is read off the file where it can be. Nothing is downloaded and no
pickle is read without ``trust_pickle=True``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import torch
from torch import nn

from ...errors import InputError, as_input_error
from ..adapters import PerChannel
from ..base import Prior
from . import adm
from .configs import read_config
from .io import Checkpoint, json_safe, load_state, read, tensors

FORMAT = "diffrecon-checkpoint/1"


# --------------------------------------------------------------------- kind detection
def detect_kind(ckpt: Checkpoint) -> str:
    """The kind of a checkpoint read by ``io.read``, or an error listing the choices."""
    from ..network import FORMAT as NETWORK_FORMAT

    where = str(ckpt.path)
    if ckpt.fmt == "directory":
        root = ckpt.path
        if (root / "unet").is_dir() or any(root.glob("diffusion_pytorch_model.*")):
            return "diffusers"
        raise InputError(f"folder {where!r} is not a diffusers model (no unet/ or "
                         "diffusion_pytorch_model.*).")
    if ckpt.fmt == "pickle":
        return "edm"
    obj = ckpt.obj
    if isinstance(obj, dict):
        if obj.get("format") == NETWORK_FORMAT:
            return "diffrecon"
        if obj.get("format") == FORMAT:
            return str(obj["kind"])
        if isinstance(obj.get("ema"), dict) and "shadow_params" in obj["ema"]:
            return "score_sde"
    sd = tensors(obj)
    if sd is None:
        raise InputError(f"checkpoint {where!r} holds no state dict; give kind= "
                         f"(one of {', '.join(LOADERS)}).")
    keys = set(sd)
    if any(k.startswith("all_modules.") for k in keys):
        return "score_sde"
    if {"input_blocks.0.0.weight", "time_embed.0.weight"} <= keys:
        return "adm"
    if any(k.startswith(("enc.", "model.enc.")) for k in keys):
        raise InputError(f"checkpoint {where!r} is an EDM/deepinv-layout network: give "
                         "kind='edm' (EDM-trained) or kind='ncsnpp' (VE baseline).")
    raise InputError(f"cannot tell the kind of checkpoint {where!r} from its keys (first "
                     f"{next(iter(keys), 'none')!r}); give kind= (one of {', '.join(LOADERS)}).")


# --------------------------------------------------------------------- loaders per kind
def _converted(ckpt: Checkpoint, cfg: dict) -> tuple[dict | None, dict]:
    """(state dict, config) of a converted file (config = its card's, then ``cfg``); for a
    ``{"state_dict": ..., "config": {...}}`` file (None, its config then ``cfg``)."""
    obj = ckpt.obj
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj["state_dict"], {**obj.get("config", {}), **cfg}
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        return None, {**obj["config"], **cfg}
    return None, cfg


def _state(ckpt: Checkpoint, what: str) -> dict:
    sd = tensors(ckpt.obj)
    if sd is None:
        raise InputError(f"checkpoint {str(ckpt.path)!r} holds no {what} state dict.")
    return sd


def _adm(ckpt, cfg, options, label, prediction=None):
    sd, cfg = _converted(ckpt, cfg)
    sd = _state(ckpt, "guided-diffusion") if sd is None else sd
    label = cfg.pop("label", None) if label is None else label
    cfg.pop("assumed", None)
    where = str(ckpt.path)
    net, kw, card = adm.build(sd, cfg, options, where, label)
    prior = adm.make_prior(net, kw, prediction)
    card.update(json_safe({k: v for k, v in kw.items()}), label=label)
    inferred = sorted(adm.infer(sd))
    return prior, card, inferred


def _vpred(ckpt, cfg, options, label):
    return _adm(ckpt, cfg, options, label, prediction="v_prediction")


def _score_sde(ckpt, cfg, options, label):
    from . import score_sde

    sd, cfg = _converted(ckpt, cfg)
    return score_sde.load(ckpt, sd, cfg, options, label)


def _edm(ckpt, cfg, options, label):
    from . import edm

    sd, cfg = _converted(ckpt, cfg)
    return edm.load(ckpt, sd, cfg, options, label, precond=cfg.pop("precond", "edm"))


def _ncsnpp(ckpt, cfg, options, label):
    from . import edm

    sd, cfg = _converted(ckpt, cfg)
    return edm.load(ckpt, sd, {"arch": "NCSNpp", **cfg}, options, label, precond="ve")


def _deepinv(ckpt, cfg, options, label):
    import deepinv.models as dm

    from ..adapters import DeepinvDenoiserPrior

    sd, cfg = _converted(ckpt, cfg)
    sd = _state(ckpt, "deepinv") if sd is None else sd
    kw = {**cfg, **options}
    model = kw.pop("model", "DRUNet")
    prior_kw = {k: kw.pop(k) for k in ("data_range", "sigma_min", "sigma_max", "channels")
                if k in kw}
    cls = getattr(dm, model, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InputError(f"deepinv.models has no denoiser named {model!r}.")
    names = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    unknown = sorted(set(kw) - names)
    if unknown:
        raise InputError(f"unknown option(s) {unknown} for deepinv {model} loading "
                         f"{str(ckpt.path)!r}; expected some of {sorted(names)}.")
    net = cls(**kw, **({"pretrained": None} if "pretrained" in names else {}))
    load_state(net, sd, str(ckpt.path), f"give the {model} constructor arguments")
    card = {"model": model, **json_safe(kw), **json_safe(prior_kw)}
    return DeepinvDenoiserPrior(net, **prior_kw), card, []


def _diffusers(ckpt, cfg, options, label):
    from ..adapters import DiffusersPrior

    try:
        from diffusers import DDPMScheduler, UNet2DModel
    except ImportError as err:
        raise InputError("loading a diffusers model needs the 'diffusers' extra "
                         "(pip install 'diffrecon[diffusers]').") from err
    if ckpt.fmt != "directory":
        raise InputError(f"a diffusers model is a folder; {str(ckpt.path)!r} is a file.")
    root = ckpt.path
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    sched_dir = root / "scheduler" if (root / "scheduler").is_dir() else root
    unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
    sched = DDPMScheduler.from_pretrained(sched_dir, local_files_only=True)
    kw = {"channels": unet.config.in_channels, **cfg, **options}
    prior = DiffusersPrior(unet.eval().requires_grad_(False), sched.betas.to(torch.float64),
                           sched.config.prediction_type, **kw)
    return prior, {"prediction": sched.config.prediction_type, **json_safe(kw)}, []


def _diffrecon(ckpt, cfg, options, label):
    from ..network import load_network_prior

    if cfg or options or label is not None:
        raise InputError(f"diffrecon prior {str(ckpt.path)!r} takes no config or options.")
    return load_network_prior(ckpt.path), {}, []


LOADERS = {"adm": _adm, "vpred": _vpred, "score_sde": _score_sde, "ncsnpp": _ncsnpp,
           "edm": _edm, "diffusers": _diffusers, "deepinv": _deepinv, "diffrecon": _diffrecon}


# --------------------------------------------------------------------- public API
def load_checkpoint(path, kind: str | None = None, config=None, *, trust_pickle: bool = False,
                    label: int | None = None, **options) -> Prior:
    """A prior from a local checkpoint file or folder.

    Args:
        path: the file (or diffusers folder) as its repository released it.
        kind: one of ``LOADERS``; detected from the file when None.
        config: the repository's own config file(s) (.yaml / .yml / .json / .py, or a dict,
            or a list of these) for what the file cannot tell.
        trust_pickle: allow reading a Python pickle (EDM .pkl); never on by default.
        label: class index for class-conditional networks (None = the null label, where the
            network has one).
        channels: run a one-channel network on each of this many channels separately
            (``adapters.PerChannel``; e.g. 2 for a real-valued score-MRI prior on complex MRI).
        options: overrides (architecture names of the repository, schedule, data_range, ...).
    """
    ckpt = read(path, trust_pickle=trust_pickle)
    kind = detect_kind(ckpt) if kind is None else kind
    if kind not in LOADERS:
        raise InputError(f"unknown prior kind {kind!r}; expected one of {', '.join(LOADERS)}.")
    cfg = read_config(config)
    card_cfg = ckpt.obj.get("config", {}) if isinstance(ckpt.obj, dict) else {}
    per = card_cfg.pop("per_channel", None) if isinstance(card_cfg, dict) else None
    channels = options.pop("channels", cfg.pop("per_channel", per))
    try:
        prior, card, inferred = LOADERS[kind](ckpt, cfg, dict(options), label)
    except ValueError as exc:  # an adapter refusing what the file or its config says
        raise as_input_error(exc, repr(str(ckpt.path))) from exc
    prior.name = ckpt.path.stem or "prior"
    if channels is not None and prior.channels is None:
        prior.channels = int(channels)
    elif channels is not None and int(channels) != prior.channels:
        if prior.channels != 1:
            raise InputError(f"{str(ckpt.path)!r} has {prior.channels} channels, not "
                             f"channels={channels}.")
        prior = PerChannel(prior, int(channels))
        card = {**card, "per_channel": int(channels)}
    prior.source = {"kind": kind, "file": str(ckpt.path), "format": ckpt.fmt,
                    "config": json_safe(card), "inferred": inferred}
    return prior.eval().requires_grad_(False)


def describe(prior: Prior) -> dict:
    """What a loaded prior is and what was inferred about it (JSON-safe)."""
    source = getattr(prior, "source", {}) or {}
    out = {"name": prior.name, "kind": source.get("kind", "diffrecon"),
           "class": type(prior).__name__, "file": source.get("file"),
           "channels": prior.channels, "size_multiple": prior.size_multiple,
           "data_range": list(prior.data_range), "sigma_min": float(prior.sigma_min),
           "sigma_max": float(prior.sigma_max),
           "intensity_reference": getattr(prior, "intensity_reference", None),
           "parameters": sum(p.numel() for p in prior.parameters()),
           "inferred_from_file": source.get("inferred", []),
           "config": source.get("config", {})}
    return json_safe(out)


def export_state(prior: Prior) -> dict:
    """The network weights a converted file stores, in the layout its kind loads."""
    prior = prior.inner if isinstance(prior, PerChannel) else prior
    net = prior.net if hasattr(prior, "net") else prior.denoiser
    net = net.export() if hasattr(net, "export") else net
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}


def convert(src, dst, kind: str | None = None, config=None, *, trust_pickle: bool = False,
            label: int | None = None, **options) -> Path:
    """Load ``src`` (any supported checkpoint; a pickle only with ``trust_pickle``) and write
    ``dst`` (a ``weights_only``-loadable .pt: state dict + everything needed to rebuild it)
    and ``dst`` with suffix .json (the same card, human-readable), atomically. The result
    loads with ``load_checkpoint(dst)`` and no options."""
    prior = load_checkpoint(src, kind, config, trust_pickle=trust_pickle, label=label,
                            **options)
    source = prior.source
    if source["kind"] in ("diffusers", "diffrecon"):
        raise InputError(f"{str(src)!r} ({source['kind']}) is already a safe format; "
                         "nothing to convert.")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    card = {"format": FORMAT, "kind": source["kind"], "config": source["config"],
            "source_file": Path(src).name, "source_sha256": _sha256(src),
            **{k: v for k, v in describe(prior).items() if k not in ("config", "file", "name")}}
    blob = {"format": FORMAT, "kind": source["kind"], "config": source["config"],
            "state_dict": export_state(prior)}
    _atomic(dst, lambda f: torch.save(blob, f))
    _atomic(dst.with_suffix(".json"),
            lambda f: f.write(json.dumps(card, indent=2, sort_keys=True).encode()))
    return dst


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


__all__ = ["LOADERS", "FORMAT", "detect_kind", "load_checkpoint", "describe", "convert",
           "read_config"]
