"""Scan files -> result files: the library behind ``diffrecon run``.

    from diffrecon import pipeline
    pipeline.reconstruct_file("knee.h5", "knee_recon.h5", solver="dds", samples=4)
    pipeline.reconstruct_many(["study/"], "results/", pipeline.RunOptions(solver="tv"))

``options`` (``RunOptions``: every run option, validated once), ``run`` (plan ->
``problems.load_problem`` -> solve each slice -> write), ``batch`` (inputs, batches,
torchrun sharding), ``resume`` (settings fingerprint, output status, stale temporaries).
"""

from .batch import collect_inputs, reconstruct_many
from .options import (
    DEFAULT_PRIORS,
    DEFAULT_SOLVER,
    RunOptions,
    default_solver,
    load_prior,
    make_solver,
    resolve_device,
)
from .results import degenerate_below
from .run import Plan, plan_run, reconstruct_file

__all__ = ["DEFAULT_PRIORS", "DEFAULT_SOLVER", "Plan", "RunOptions", "collect_inputs",
           "default_solver", "degenerate_below", "load_prior", "make_solver", "plan_run",
           "reconstruct_file", "reconstruct_many", "resolve_device"]
