"""Reading checkpoint files without running code from them, and strict state-dict loading whose
error names the first differing keys and shapes and the option that would fix it."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import InputError


@dataclass
class Checkpoint:
    """A checkpoint as read from disk: ``obj`` is what ``torch.load(weights_only=True)``
    returned, the restricted unpickler's records (``fmt="pickle"``), or None for a folder."""

    path: Path
    obj: Any
    fmt: str          # "torch" | "pickle" | "directory"


def pickle_refused(path: Path) -> InputError:
    return InputError(
        f"checkpoint {str(path)!r} is a Python pickle: unpickling can run code stored in the "
        "file, so it is read only with trust_pickle=True (--trust-pickle) for a file whose "
        f"source you trust; `diffrecon convert-prior {path} OUT.pt --trust-pickle` turns it "
        "once into a safe state dict + json card that loads without it.")


def read(path, trust_pickle: bool = False) -> Checkpoint:
    """Read a checkpoint file or model folder. Torch files load with ``weights_only=True``;
    anything else that unpickles is refused unless ``trust_pickle``, and even then is read by
    a restricted unpickler that imports nothing (``edm.unpickle``)."""
    path = Path(path)
    if path.is_dir():
        return Checkpoint(path, None, "directory")
    if not path.is_file():
        raise InputError(f"checkpoint {str(path)!r} does not exist.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
        return Checkpoint(path, obj, "torch")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:160]
        is_zip = zipfile.is_zipfile(path)
        with open(path, "rb") as f:
            head = f.read(2)
        if not (is_zip or head[:1] == b"\x80") or "Weights only load failed" not in str(err):
            raise InputError(f"cannot read checkpoint {str(path)!r} ({first}).") from err
    if not trust_pickle:
        raise pickle_refused(path)
    if zipfile.is_zipfile(path):      # torch.save of whole objects: torch's own unpickler
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        return Checkpoint(path, obj, "torch")
    from .edm import unpickle

    return Checkpoint(path, unpickle(path), "pickle")


def strip_prefix(sd: Mapping[str, Any], prefix: str = "module.") -> dict:
    """Drop a DataParallel / DDP ``module.`` prefix when every key carries it."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def tensors(obj: Any) -> dict | None:
    """The state dict held by ``obj`` (a raw state dict, or one under "state_dict", "ema",
    "model", "net" or "params_ema"), with a ``module.`` prefix removed; None if none."""
    if not isinstance(obj, Mapping):
        return None
    for key in ("state_dict", "ema", "model", "net", "params_ema"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()):
            return strip_prefix(inner)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return strip_prefix(obj)
    return None


def load_state(net: nn.Module, sd: Mapping[str, torch.Tensor], what: str, fix: str) -> nn.Module:
    """``net.load_state_dict(sd, strict=True)``; on a mismatch one line naming the first
    differing keys and shapes, then ``fix`` (the option that would make them agree)."""
    own = net.state_dict()
    wrong = [f"{k} {tuple(sd[k].shape)} in the file vs {tuple(v.shape)}"
             for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    if wrong or missing or extra:
        parts = []
        if wrong:
            parts.append(f"shape {', '.join(wrong[:2])}")
        if missing:
            parts.append(f"{len(missing)} key(s) missing from the file, first {missing[0]}")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s), first {extra[0]}")
        raise InputError(f"{what} does not match the architecture ({'; '.join(parts)}): {fix}.")
    net.load_state_dict(sd, strict=True)
    return net.eval().requires_grad_(False)


def json_safe(value: Any) -> Any:
    """Tuples -> lists, numpy / torch scalars -> Python numbers, recursively (for cards)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
