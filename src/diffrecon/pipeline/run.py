"""Scan file -> reconstruction file: plan -> load_problem -> solve each slice -> write.

The plan validates the options and the input cheaply and fingerprints them (a complete
result with the same fingerprint is skipped); ``problems.load_problem`` reads the scan
into the prior's units; each selected slice is solved and mapped back to scan units; the
result is written atomically with its provenance. Conventions of the written result:

* MRI: ``reconstruction`` is the MAGNITUDE of the SENSE-combined image (on the scale of
  ``reconstruction_rss``), centre-cropped to the header's reconSpace; the complex image is
  ``reconstruction_complex``; ``std`` is the pointwise standard deviation of the complex
  value, sqrt(std_re^2 + std_im^2).
* Randomness: slice ``k`` of a file uses seed material ``(seed, k)`` whatever slices it is
  solved with, so results do not depend on slice selection, order or the number of
  processes. Slices of one volume are solved together, ``RunOptions.batch_size`` at a time
  (solvers with ``row_noise``: DDS, the default; ``Problem.stack``): the network sees
  (N, C, H, W). The batch changes a result only in float rounding (batched convolutions
  round differently: about 5e-6 of the image peak on the CPU, tests/test_slice_batch.py;
  bit-identical results need the same ``--batch-size``, like the same device and
  ``--threads``), so the batch size is provenance (``slice_batch_per_slice``), not part of
  the resume fingerprint: a complete result made with another batch size is kept. The
  solver's own ``batch_size`` option bounds the posterior samples / particles per pass of
  one slice.
* An SMC cloud whose particles descend from fewer than ``degenerate_below(N)`` initial
  particles is reported (``warnings`` of the summary): its std is not a posterior std.
* With a calibration file (``RunOptions.calibration``, ``pipeline.calibrate``) its task is
  checked in the plan (the prior checksum once the prior is loaded), and the result also
  holds ``lower_<level>`` / ``upper_<level>`` computed from the stored float32 mean and std.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffrecon.errors import InputError, as_input_error
from diffrecon.problems import check_acquisition, load_problem

from .concurrency import fixed_threads, kept_memory, output_lock
from .options import (
    DEFAULT_PRIORS,
    DEFAULT_SAMPLES,
    RunOptions,
    default_solver,
    load_prior,
    make_solver,
    resolve_device,
    result_fields,
    set_precision,
    solver_option_dict,
)
from .results import (  # noqa: F401  (re-exported: old import path)
    MISFIT_WARN_CHI,
    check_slice_result,
    degeneracy_warning,
    degenerate_below,
    misfit_warning,
    slice_result,
    write,
)
from .resume import existing_result, fingerprint, remove_stale_temporaries

Progress = Callable[[dict[str, Any]], None]


@dataclass
class Plan:
    """A validated job: what will be run on which file, and its settings fingerprint."""

    input_path: Path
    output_path: Path
    modality: str
    solver: Any                      # a diffrecon.recon.Solver
    prior: Any                       # prior name, path or Prior to load; None: classical
    settings: dict[str, Any]
    digest: str
    options: RunOptions
    calibration: Any = None          # a diffrecon.calibration.Calibration, or None


def plan_run(input_path, output_path, options: RunOptions) -> Plan:
    """Validate the options against the input (cheap checks, no reconstruction) and
    fingerprint them."""
    from diffrecon.datasets.io import check_output_path, detect_modality, sha256_file
    from diffrecon.recon import DIFFUSION_SOLVERS

    input_path, output_path = Path(input_path), Path(output_path)
    check_output_path(output_path, input_path)
    modality = detect_modality(input_path)
    check_acquisition(input_path, modality, options.acquisition())
    name = options.solver or default_solver(modality)
    solver = make_solver(name, options)
    if options.samples is None:
        options = dataclasses.replace(options, samples=DEFAULT_SAMPLES.get(name, 1))
    if solver.volume:  # a volume in one coupled solve: not what run does (slice by slice)
        raise InputError(f"--solver {name} solves a whole volume at once, which diffrecon run "
                         f"does not do (it solves slices independently); use the Python API: "
                         f"get_solver({name!r}).solve(y_slices, physics, prior)")
    prior = (options.prior or DEFAULT_PRIORS[modality]) if name in DIFFUSION_SOLVERS else None
    label = None if prior is None else str(prior) if isinstance(prior, str | os.PathLike) \
        else getattr(prior, "name", type(prior).__name__)
    settings = {k: getattr(options, k) for k in result_fields()}
    settings.update(
        input_sha256=sha256_file(input_path), solver=name, prior=label,
        solver_options={k: v for k, v in solver_option_dict(solver).items() if k != "batch_size"},
        seed=int(options.seed), save_samples=bool(options.save_samples),
        center_fraction=options.center_fraction if options.acceleration is not None else None,
        coil_maps=None if options.coil_maps is None else sha256_file(options.coil_maps))
    if prior is not None:   # how the checkpoint was read, when given (older digests unchanged)
        settings.update({f"prior_{k}": v for k, v in options.prior_load().items()
                         if v not in (None, False) and k != "trust_pickle"})
    calib = None
    if options.calibration is not None:  # its task must be this run's (checked before work)
        from . import calibrate as cal

        calib = cal.load_for_run(options.calibration)
        cal.check_run(calib, cal.run_task(modality, settings, cal.scan_acquisition(
            input_path, modality, settings)), options.calibration)
        settings["calibration"] = sha256_file(options.calibration)
    else:
        settings.pop("calibration", None)  # older digests unchanged
    return Plan(input_path, output_path, modality, solver, prior, settings,
                fingerprint(settings), options, calib)


def reconstruct_file(input_path, output_path, options: RunOptions | None = None, *,
                     progress: Progress | None = None, shard=None, **overrides
                     ) -> dict[str, Any] | None:
    """Reconstruct one scan file into ``output_path`` (module docstring).

    Args:
        input_path: MRI (fastMRI layout), CT or image scan file (never modified).
        output_path: result file, written atomically. A complete result with the same
            settings is skipped (``overwrite`` redoes it); one made with other settings or
            from another input raises ``InputError``.
        options: a ``RunOptions``; ``overrides`` are its fields as keywords
            (``reconstruct_file(scan, out, solver="tv", seed=3)``).
        progress: callback receiving event dicts: {'event': 'file' | 'step' | 'slice' |
            'skip' | 'done' | 'message', ...}.
        shard: under torchrun, this rank's share of the slices (``batch.SliceShard``) or
            of each solve's particles (``spread.ParticleShard``); the result is then written
            by rank 0 and the other ranks return None.

    Returns a summary dict (input, output, status 'done' | 'skipped', solver, nfe, ...).
    """
    t0 = time.perf_counter()
    with planned(input_path, output_path, RunOptions.of(options, **overrides), progress,
                 shard) as plan:
        return reconstruct_planned(plan, progress, shard, t0)


@contextlib.contextmanager
def planned(input_path, output_path, options: RunOptions, progress: Progress | None = None,
            shard=None, wait: bool = True) -> Iterator[Plan | None]:
    """Within: the validated :class:`Plan` of a file, holding its output's lock (concurrent
    runs compute each result once; under torchrun rank 0 holds it) with the thread count
    fixed and freed memory kept for reuse (``concurrency``). ``wait=False``: yields None
    at once when another run holds the lock."""
    plan = plan_run(input_path, output_path, options)
    lock = contextlib.nullcontext(True) if shard is not None and shard.rank != 0 else \
        output_lock(plan.output_path, blocking=wait, on_wait=lambda text: _emit(
            progress, event="message", text=text))
    with lock as held, fixed_threads(plan.options.threads), kept_memory():
        yield plan if held else None


def reconstruct_planned(plan: Plan, progress: Progress | None = None, shard=None,
                        t0: float | None = None) -> dict[str, Any] | None:
    """:func:`reconstruct_file` of a plan (within :func:`planned`); ``t0``: when the job
    started (``time.perf_counter``; default now)."""
    t0 = time.perf_counter() if t0 is None else t0
    opts = plan.options
    if shard is None or shard.rank == 0:  # the lock holder: temporaries of killed runs
        remove_stale_temporaries(plan.output_path, maps_cache(plan.output_path))
    if existing_result(plan.output_path, plan.digest, opts.overwrite):
        _emit(progress, event="skip", path=str(plan.input_path), output=str(plan.output_path))
        return {"input": str(plan.input_path), "output": str(plan.output_path),
                "status": "skipped", "modality": plan.modality,
                "solver": plan.settings["solver"]}
    device = resolve_device(opts.device)
    prior = load_prior(plan.prior, device, **opts.prior_load()) if plan.prior is not None \
        else None
    precision = "fp32" if prior is None else set_precision(prior, opts.precision,
                                                         plan.settings["prior"], device)
    if plan.calibration is not None:  # the prior's weights too, before any scan is read
        from .calibrate import check_run

        check_run(plan.calibration, {"prior_sha256": prior.checksum if prior is not None
                                     else "none"}, opts.calibration, only=["prior_sha256"])
    problem = load_problem(plan.input_path, prior, opts.slices, device=device,
                           progress=progress, maps_cache=maps_cache(plan.output_path),
                           **opts.acquisition())
    todo = range(len(problem.slices))
    todo = todo if shard is None else shard.mine(todo)
    solver = plan.solver if shard is None else shard.solver(plan.solver)
    results, name = {}, plan.input_path.name
    _emit(progress, event="file", path=str(plan.input_path), slices=len(todo),
          steps=getattr(solver.options, "steps", None), samples=opts.samples)
    # slices of one volume together, up to the slice batch size (module docstring; the loop
    # is here, not in a helper, to keep the run -> denoiser call depth at its bound)
    size, pending = slice_batch_size(solver, opts, device), list(todo)
    while pending:
        group = problem.batches(pending, size)[0]
        ks = [problem.slices[j] for j in group]
        report = None if progress is None else (
            lambda fields, ks=ks: progress({"event": "step", "slice": ks[0], "slices": ks,
                                            **fields}))
        try:
            y, physics = problem.stack(group)
            rec = solver.solve(y, physics, prior, num_samples=opts.samples,
                               seed=[(opts.seed, k) for k in ks], callback=report)
        except torch.OutOfMemoryError:  # halve the slice batch first, then samples per pass
            if getattr(shard, "lockstep", False):  # spread particles: no rank redoes alone
                raise
            solver, size = smaller_batches(solver, name, progress, slices=len(group))
            continue
        except (TypeError, ValueError) as exc:  # the solver refuses this problem
            raise as_input_error(exc, name) from exc
        for row, (j, k) in enumerate(zip(group, ks, strict=True)):
            results[k] = slice_result(rec, problem.normalisers[j], opts.save_samples,
                                      None if problem.supports is None else problem.supports[j],
                                      row=row)
            check_slice_result(name, k, results[k])
            _emit(progress, event="slice", slice=k)
        pending = pending[len(group):]
    if shard is not None:
        results = shard.gather(results)
        if results is None:  # another rank writes
            return None
    checksum = prior.checksum if prior is not None else "none"
    summary = write(plan, problem, solver, results, checksum, str(device), t0, precision)
    remove_stale_temporaries(plan.output_path)
    _emit(progress, event="done", path=str(plan.input_path), output=str(plan.output_path))
    return summary


def slice_batch_size(solver, options: RunOptions, device: torch.device) -> int:
    """Slices of one volume solved together (``RunOptions.batch_size``; default 1 on the
    CPU, ``CUDA_SLICE_BATCH`` on a GPU): only for solvers with ``row_noise`` (slices have
    their own noise levels), else 1."""
    if not getattr(solver, "row_noise", False):
        return 1
    if options.batch_size is not None:
        return int(options.batch_size)
    return CUDA_SLICE_BATCH if device.type == "cuda" else 1


CUDA_SLICE_BATCH = 8  # default slices per pass on a GPU (halved on out-of-memory)


def maps_cache(output_path: Path) -> Path:
    """The directory next to a result where ESPIRiT coil maps are cached for later runs
    (``problems.mri.cached_maps``: keyed by the input's checksum, slice and parameters)."""
    return output_path.parent / ".diffrecon-cache"


def smaller_batches(solver, name: str, progress: Progress | None, slices: int = 1):
    """After a CUDA out-of-memory error solving ``slices`` slices together: (the solver, half
    that many slices) when there were several; else (the same solver with half its
    ``batch_size``, the posterior samples / particles per pass, 1). RuntimeError when both
    are 1."""
    torch.cuda.empty_cache()
    if slices > 1:
        size = max(1, slices // 2)
        _emit(progress, event="message", text=f"{name}: CUDA out of memory; retrying with "
                                              f"--batch-size {size} (slices)")
        return solver, size
    bs = int(getattr(solver.options, "batch_size", 1))
    if bs <= 1:
        raise RuntimeError(f"{name}: CUDA out of memory even with one slice and one sample "
                           f"per pass (--batch-size 1, --option batch_size=1); use fewer "
                           f"--samples or --device cpu") from None
    smaller = type(solver)(dataclasses.replace(solver.options, batch_size=max(1, bs // 2)))
    _emit(progress, event="message", text=f"{name}: CUDA out of memory; retrying with "
                                          f"--option batch_size={smaller.options.batch_size} "
                                          f"(samples per pass)")
    return smaller, 1


def _emit(progress: Progress | None, **event) -> None:
    if progress is not None:
        progress(event)


__all__ = ["InputError", "Plan", "degenerate_below", "plan_run", "reconstruct_file", "write"]
