"""Posterior solvers and classical baselines behind one interface.

    solver = get_solver("dds", steps=50)
    rec = solver.solve(y, physics, prior, num_samples=4, seed=0)   # -> Reconstruction
"""

from __future__ import annotations

import importlib

from .base import Solver
from .reconstruction import Reconstruction
from .schedules import get_schedule

# name -> "module:Class"; a plain dict, imported lazily so a solver's dependencies load on use.
SOLVERS: dict[str, str] = {
    "dps": "dps:DPSSolver",
    "reddiff": "reddiff:REDDiffSolver",
    "dds": "dds:DDSSolver",
    "dds3d": "dds3d:DDS3DSolver",
    "smc": "smc:SMCSolver",
    "zero-filled": "baselines:ZeroFilledSolver",
    "cg-sense": "baselines:CGSolver",
    "cg": "baselines:CGSolver",
    "fbp": "baselines:FBPSolver",
    "l1-wavelet": "baselines:L1WaveletSolver",
    "tv": "baselines:TVSolver",
}

DIFFUSION_SOLVERS = ("dps", "reddiff", "dds", "dds3d", "smc")


def solver_class(name: str) -> type[Solver]:
    """The Solver subclass registered under ``name``; unknown names list the valid ones."""
    try:
        module, cls = SOLVERS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; valid: {', '.join(SOLVERS)}") from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def get_solver(name: str, **options) -> Solver:
    """Build solver ``name`` with option overrides (see its ``Options`` dataclass)."""
    return solver_class(name)(**options)


__all__ = ["SOLVERS", "DIFFUSION_SOLVERS", "Reconstruction", "Solver", "get_solver", "get_schedule",
           "solver_class"]
