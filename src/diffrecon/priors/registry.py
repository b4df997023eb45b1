"""Load a prior by shipped name or from a local checkpoint: ``load(path_or_name, kind, **kw)``.

Shipped names are the ``priors/weights/<name>.pt`` files (diffrecon network priors). Local
checkpoints need a ``kind``; the loaders and their options are in ``adapters.py``. Nothing
is ever downloaded.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from ..errors import InputError
from . import adapters
from .base import Prior


def _load_diffrecon(path, **kw) -> Prior:
    from . import network

    loader = getattr(network, "load_network_prior", None)
    if loader is None:  # pragma: no cover - network.py is written concurrently
        raise InputError("diffrecon network priors are not available in this build.")
    if not Path(path).is_file():
        raise InputError(f"checkpoint file {str(path)!r} does not exist.")
    return loader(path, **kw)


KINDS = {
    "adm": adapters.load_adm,
    "ncsnpp": adapters.load_ncsnpp,
    "edm": adapters.load_edm,
    "vpred": adapters.load_vpred,
    "diffusers": adapters.load_diffusers,
    "deepinv": adapters.load_deepinv,
    "diffrecon": _load_diffrecon,
}


def _weights_dir() -> Path:
    return Path(str(importlib.resources.files("diffrecon.priors") / "weights"))


def available() -> list[str]:
    """Names of the shipped priors (``priors/weights/<name>.pt``), sorted."""
    folder = _weights_dir()
    return sorted(p.stem for p in folder.glob("*.pt")) if folder.is_dir() else []


def load(path_or_name: str | os.PathLike, kind: str | None = None, **kw) -> Prior:
    """A shipped prior by name (see ``available()``), or a local checkpoint of ``kind``
    ("adm", "ncsnpp", "edm", "vpred", "diffusers", "deepinv", "diffrecon"); ``kw`` are
    the loader's options (architecture, schedule, data range)."""
    name = str(path_or_name)
    if kind is None and name in available():
        prior = _load_diffrecon(_weights_dir() / f"{name}.pt", **kw)
        prior.name = name
        return prior
    if kind is None:
        if not Path(name).exists():
            raise InputError(f"{name!r} is neither a shipped prior {available()} nor an "
                             "existing checkpoint path.")
        raise InputError(f"give kind= for checkpoint {name!r}, one of {sorted(KINDS)}.")
    if kind not in KINDS:
        raise InputError(f"unknown prior kind {kind!r}; expected one of {sorted(KINDS)}.")
    if not Path(name).exists():
        raise InputError(f"checkpoint {name!r} does not exist.")
    prior = KINDS[kind](name, **kw)
    prior.name = Path(name).stem
    return prior
