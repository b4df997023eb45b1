"""Calibration files for the run pipeline: the task key of a run, calibration from result
files and their scans, and the calibrated intervals a result carries.

The task a calibration applies to (``diffrecon.calibration``: its guarantee holds only for
scans exchangeable with the calibration scans, reconstructed the same way) is the dict

    modality, solver, option.<name> (every solver option but batch_size, steps included),
    prior, prior_label, prior_sha256, samples, and the acquisition:
    MRI acceleration (the scan's nominal ``acceleration`` attribute, else its mask's sampled
    fraction^-1, or the retrospective mask's; 4 decimals), mask_type
    and center_fraction (retrospective masks; None for a file's own mask); CT views;
    image operator.

:func:`run_task` builds it from a run's settings (the ``settings`` attribute a result
records) and a cheap read of the scan's acquisition (:func:`scan_acquisition`: the mask,
the angles' length or the operator attribute, no k-space), so ``run --calibration``
refuses a mismatched task before any computation (the prior checksum once the prior is
loaded, before any scan is read). :func:`result_task` builds the same dict from a result
file's provenance, which is what ``diffrecon calibrate`` records.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffrecon import calibration as C
from diffrecon.errors import InputError

FLAG = "--calibration"


# ------------------------------------------------------------------------------ task key
def _acceleration(value) -> float | None:
    return None if value is None else round(float(value), 4)


def _nominal(value) -> float | None:
    """A scan's ``acceleration`` attribute (fastMRI test files, ``diffrecon simulate``) as
    a number > 1, else None. Random and equispaced masks are drawn per file, so the sampled
    fraction of one file (3.7x-5.3x for a 48-line 4x mask) is not the task: the nominal
    acceleration is."""
    try:
        v = float(np.asarray(value).item())
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v >= 1 else None


def run_task(modality: str, settings: Mapping[str, Any], acquisition: Mapping[str, Any],
             prior_sha256: str | None = None) -> dict[str, Any]:
    """The task key (module docstring) of a run with ``settings`` (``Plan.settings`` or a
    result's ``settings`` attribute) on a scan with ``acquisition`` (:func:`scan_acquisition`
    or :func:`result_acquisition`). ``prior_sha256`` None leaves that key out."""
    opts = settings.get("solver_options") or {}
    task: dict[str, Any] = {"modality": modality, "solver": settings.get("solver"),
                            "prior": settings.get("prior") or "none",
                            "prior_label": settings.get("prior_label"),
                            "samples": int(settings.get("samples", 1))}
    task.update({f"option.{k}": v for k, v in sorted(opts.items()) if k != "batch_size"})
    task.update(acquisition)
    if prior_sha256 is not None:
        task["prior_sha256"] = prior_sha256
    return task


def scan_acquisition(path, modality: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The acquisition part of the task key from a scan file, reading no bulk data: the
    MRI nominal acceleration (:func:`_nominal`; without it the mask's), or the retrospective
    mask's settings, the CT angles' length, the image operator attribute."""
    from diffrecon.datasets.safe_open import open_h5_checked

    with open_h5_checked(path) as f:
        if modality == "mri":
            if settings.get("acceleration") is not None:
                return {"acceleration": _acceleration(settings["acceleration"]),
                        "mask_type": settings.get("mask_type") or "random",
                        "center_fraction": float(settings["center_fraction"])}
            mask = np.asarray(f["mask"][()]) if "mask" in f else None
            acc = None if mask is None else _nominal(f.attrs.get("acceleration"))
            if mask is not None and acc is None:
                acc = mask.size / max(int(mask.sum()), 1)
            return {"acceleration": _acceleration(acc), "mask_type": None,
                    "center_fraction": None}
        if modality == "ct":
            return {"views": int(f["angles"].shape[0]) if "angles" in f else None}
        op = f.attrs.get("operator")
        return {"operator": op.decode() if isinstance(op, bytes) else op}


def result_acquisition(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The acquisition part of the task key from a result's provenance attributes."""
    modality = attrs.get("modality")
    if modality == "mri":
        return {"acceleration": _acceleration(attrs.get("acceleration")),
                "mask_type": attrs.get("mask_type"),
                "center_fraction": attrs.get("center_fraction")
                if attrs.get("mask_type") is not None else None}
    if modality == "ct":
        return {"views": attrs.get("views")}
    return {"operator": attrs.get("operator")}


def result_task(attrs: Mapping[str, Any], where: str = "result", scan=None) -> dict[str, Any]:
    """The task key of a result file from its attributes (``InputError`` when it lacks the
    provenance ``diffrecon run`` writes); with ``scan`` (the file it was reconstructed
    from) the acquisition is read from the scan as ``run --calibration`` reads it."""
    settings = attrs.get("settings")
    if not isinstance(settings, dict) or "modality" not in attrs:
        raise InputError(f"{where}: no run provenance (attributes 'settings', 'modality'); "
                         f"expected a result written by `diffrecon run`")
    acq = (result_acquisition(attrs) if scan is None
           else scan_acquisition(scan, attrs["modality"], settings))
    return run_task(attrs["modality"], settings, acq, str(attrs.get("prior_sha256", "none")))


def load_for_run(path) -> C.Calibration:
    """Read a calibration file for ``run --calibration``: one-line errors name the flag."""
    try:
        return C.Calibration.load(path)
    except InputError as exc:
        raise InputError(f"{FLAG} {exc}") from None


FIRST = ("modality", "solver", "prior", "samples")  # reported first when they differ


def first_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """The first key (``FIRST``, then alphabetical) whose value differs between two task
    keys, None when they agree."""
    keys = [k for k in FIRST if k in a or k in b]
    keys += sorted((set(a) | set(b)) - set(keys))
    return next((k for k in keys if a.get(k) != b.get(k)), None)


def check_run(calib: C.Calibration, task: Mapping[str, Any], path, *,
              only: Sequence[str] | None = None) -> None:
    """``InputError`` naming ``--calibration`` and the first key (:func:`first_difference`)
    whose value differs between the calibration's task and ``task``: every key but
    ``prior_sha256`` unless ``task`` has it, or only the keys ``only`` (the prior checksum,
    once the prior is loaded)."""
    if only is not None:
        mine, task = ({k: d.get(k) for k in only} for d in (calib.task, task))
    else:
        mine = {k: v for k, v in calib.task.items() if k != "prior_sha256" or k in task}
    key = first_difference(mine, task)
    if key is not None:
        raise InputError(f"{FLAG} {path}: calibrated for {key}={mine.get(key)!r}, this run "
                         f"has {key}={task.get(key)!r}; calibrate for this task")


def intervals(calib: C.Calibration | None, mean: np.ndarray, std: np.ndarray
              ) -> dict[float, tuple[np.ndarray, np.ndarray]] | None:
    """The calibrated intervals of a result (float32, as stored), None without a
    calibration. Computed from the float32 mean and std the file stores, so they can be
    recomputed from the file bit for bit."""
    if calib is None:
        return None
    return calib.intervals(np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32))


def provenance(calib: C.Calibration, path, mean: np.ndarray, std: np.ndarray
               ) -> dict[str, Any]:
    """What a result records of the calibration it used (with ``calibration_foreground``, the
    pixels its coverage counts, when it has one), and the calibrated per-slice RMSE bounds
    ``calibration_rmse_bound`` (levels, slices) of its float32 mean and std (scan units, the
    result's grid)."""
    from diffrecon.datasets.io import sha256_file

    bounds = calib.rmse_bounds(np.asarray(mean, dtype=np.float32),
                               np.asarray(std, dtype=np.float32))
    return {"calibration_file": Path(path).name, "calibration_sha256": sha256_file(path),
            "calibration_method": calib.method, "calibration_unit": calib.unit,
            "calibration_levels": np.asarray(calib.levels, dtype=np.float64),
            "calibration_scales": np.asarray([calib.scales[lv] for lv in calib.levels]),
            "calibration_floor": calib.floor, "calibration_smooth": calib.smooth,
            "calibration_rmse_bound": np.stack([bounds[lv] for lv in calib.levels]),
            **({} if calib.foreground is None
               else {"calibration_foreground": float(calib.foreground)})}


# ------------------------------------------------------------------------------ calibrate
def pair_inputs(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], dict[str, Path]]:
    """Split files and directories (their .h5/.hdf5 files) into result files and scan files
    (by name); ``InputError`` for anything else."""
    from diffrecon.datasets.io import detect_modality

    results, scans = [], {}
    for item in paths:
        p = Path(item)
        if p.is_dir():
            files = sorted(q for q in p.iterdir() if q.suffix in (".h5", ".hdf5"))
            if not files:
                raise InputError(f"{p}: directory holds no .h5/.hdf5 files")
        elif p.exists():
            files = [p]
        else:
            raise InputError(f"{p}: no such file or directory")
        for q in files:
            if detect_modality(q) == "result":
                if q.resolve() not in {r.resolve() for r in results}:
                    results.append(q)
            else:
                if q.name in scans and scans[q.name].resolve() != q.resolve():
                    raise InputError(f"{q}: two scans named {q.name} ({scans[q.name]}); "
                                     f"results name their scan by file name")
                scans[q.name] = q
    if not results:
        raise InputError("no result files among the inputs; give results of `diffrecon run` "
                         "and their scans (files or directories)")
    return results, scans


def calibrate_results(paths: Sequence[str | os.PathLike], levels: Sequence[float] = C.LEVELS,
                      *, unit: str = "slice", foreground: float | None = None,
                      floor: float = 1e-3, reference_kind: str = "auto", smooth: float = 0.0
                      ) -> C.Calibration:
    """Calibrate on result files of ``diffrecon run`` and the scans holding their
    references (``paths``: files or directories with both; a result is paired with the scan
    named by its ``input`` attribute, checked by checksum).

    The results must share one task (:func:`result_task` with the acquisition read from
    each paired scan, as ``run --calibration`` reads it), which the calibration records.
    Reads ``reconstruction`` and ``std`` (the std the run writes; draws are not used) and
    the reference as ``diffrecon evaluate`` does (MRI ``reconstruction_rss`` or
    ``|ground_truth_complex|``, CT ``ground_truth``, images ``image``; a larger
    reconstruction is centre-cropped to it). ``InputError`` (one line) on bad inputs, raised
    before the calibration is computed.
    """
    from diffrecon.datasets.io import read_result, sha256_file
    from diffrecon.metrics import paired_result

    levels = tuple(sorted({float(lv) for lv in levels}))
    for lv in levels:
        if not 0 < lv < 1:
            raise InputError(f"--levels {lv:g} is not in (0, 1)")
    if unit not in C.UNITS:
        raise InputError(f"--unit {unit!r} is not valid; expected {' or '.join(C.UNITS)}")
    if foreground is not None and not 0 <= foreground < 1:
        raise InputError(f"--foreground {foreground!r} is not valid; expected a fraction in "
                         f"[0, 1)")
    results, scans = pair_inputs(paths)
    task, first, refs, means, stds, n_slices = None, None, [], [], [], 0
    for r in results:
        res = read_result(r)
        result_task(res.attrs, str(r))  # its provenance, before the scan is looked up
        name = str(res.attrs.get("input", ""))
        scan = scans.get(name)
        if scan is None:
            raise InputError(f"{r}: its scan {name!r} is not among the inputs; give the scan "
                             f"files (or their directory) too")
        if sha256_file(scan) != res.attrs.get("input_sha256"):
            raise InputError(f"{r}: scan {scan} is not the file it was reconstructed from "
                             f"(checksum differs)")
        t = result_task(res.attrs, str(r), scan)
        if task is None:
            task, first = t, r
        else:
            key = first_difference(task, t)
            if key is not None:
                raise InputError(f"{r}: {key}={t.get(key)!r} but {first} has "
                                 f"{key}={task.get(key)!r}; calibrate one task at a time")
        p = paired_result(res, scan, reference_kind)
        refs.append(p["reference"])
        means.append(p["mean"])
        stds.append(p["std"])
        n_slices += len(p["reference"])
    n_units = n_slices if unit == "slice" else len(results)
    for lv in levels:
        if n_units < C.min_units(lv):
            raise InputError(f"--levels {lv:g} needs at least {C.min_units(lv)} calibration "
                             f"{unit}s, got {n_units}")
    try:
        return C.calibrate(refs, means, stds, levels, unit=unit, foreground=foreground,
                           floor=floor, smooth=smooth, task=task)
    except ValueError as exc:
        raise InputError(f"calibrate: {exc}") from None


__all__ = ["calibrate_results", "check_run", "intervals", "load_for_run", "provenance",
           "result_task", "run_task", "scan_acquisition"]
