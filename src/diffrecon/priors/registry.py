"""Load a prior by shipped name or from a local checkpoint.

``load(path_or_name, kind=None, config=None, trust_pickle=False, label=None, **options)``.
Shipped names are the ``priors/weights/<name>.pt`` files (diffrecon network priors). A local
checkpoint's kind is read off the file where it can be (``checkpoints.detect_kind``); the file
formats, architectures and configs are in ``checkpoints/``. Nothing is ever downloaded and no
pickle is read without ``trust_pickle=True``.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from ..errors import InputError
from .base import Prior

# kind -> what it reads (the loaders are checkpoints.LOADERS; add a kind in both places)
KINDS = {
    "adm": "guided-diffusion / ADM state dict (DPS, RED-diff, DDS; class-conditional too)",
    "vpred": "v-prediction network on the guided-diffusion UNet",
    "score_sde": "score_sde_pytorch / score-MRI NCSN++ checkpoint (EMA applied), VE score",
    "ncsnpp": "EDM / deepinv-layout NCSN++ trained with the VE baseline",
    "edm": "EDM network-snapshot .pkl (needs trust_pickle) or EDM-layout state dict",
    "diffusers": "local diffusers folder (unet/ + scheduler/)",
    "deepinv": "state dict of a deepinv.models denoiser",
    "diffrecon": "diffrecon network prior (priors/weights format)",
}


def _weights_dir() -> Path:
    return Path(str(importlib.resources.files("diffrecon.priors") / "weights"))


# Names that load a shipped file of another name: one grey-scale prior trained on CT-like
# anatomy and photographs together (``weights/gray.md``) serves both roles.
ALIASES = {"ct": "gray", "natural": "gray"}


def _shipped() -> list[str]:
    folder = _weights_dir()
    return sorted(p.stem for p in folder.glob("*.pt")) if folder.is_dir() else []


def available() -> list[str]:
    """Names of the shipped priors (``priors/weights/<name>.pt`` and ``ALIASES``), sorted."""
    files = _shipped()
    return sorted(files + [a for a, f in ALIASES.items() if f in files])


def load(path_or_name: str | os.PathLike, kind: str | None = None, config=None, *,
         trust_pickle: bool = False, label: int | None = None, **options) -> Prior:
    """A shipped prior by name (see ``available()``), or a local checkpoint (see ``KINDS``;
    detected from the file when ``kind`` is None) with the repository's own ``config`` file
    for what the file cannot tell; ``options`` override (architecture, schedule, data range).
    See ``checkpoints.load_checkpoint``."""
    from . import checkpoints

    name = str(path_or_name)
    if kind in (None, "diffrecon") and name in available():
        name = ALIASES.get(name, name)
        prior = checkpoints.load_checkpoint(_weights_dir() / f"{name}.pt", "diffrecon", config,
                                            label=label, **options)
        prior.name = name  # the file's: an alias loads the same prior, same checksum
        return prior
    if not Path(name).exists():
        raise InputError(f"{name!r} is neither a shipped prior {available()} nor an "
                         "existing checkpoint path.")
    if not Path(name).is_dir():  # a FIFO or device is refused unopened (a FIFO would block)
        from diffrecon.datasets.safe_open import check_readable_file

        check_readable_file(name, "a checkpoint file or model folder")
    if kind is not None and kind not in KINDS:
        raise InputError(f"unknown prior kind {kind!r}; expected one of {', '.join(KINDS)}.")
    return checkpoints.load_checkpoint(name, kind, config, trust_pickle=trust_pickle,
                                       label=label, **options)
