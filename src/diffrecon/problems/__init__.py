"""Scan file -> Problem: measurements, physics and normalisers in the prior's units.

    prior = diffrecon.priors.load("phantom-mri")
    problem = load_problem("knee.h5", prior, slices=[0, 1], acceleration=None)
    rec = get_solver("dds").solve(problem.measurements[0], problem.physics[0], prior)
    image = problem.normalisers[0].from_prior(rec.mean)          # back to scan units

The pipeline (``diffrecon run``), the benchmarks, the examples and user scripts all start
here. Per modality: ``mri`` (mask, coil-map and noise policy), ``ct``, ``image``; the one
place where value ranges are converted is ``normalise``. ``info.describe_file`` (``diffrecon
info``) and ``calib.calibrate_file`` (``diffrecon calib``) report on and prepare scans.
"""

from __future__ import annotations

import os

import torch

from diffrecon.errors import InputError, as_input_error

from .normalise import Normaliser, intensity_reference, reference_level
from .problem import Problem, format_slices, parse_slices

ACQUISITION = ("acceleration", "mask_type", "center_fraction", "coil_maps",  # MRI only
               "coil_compression", "maps_cache")


def load_problem(path: str | os.PathLike, prior=None, slices=None, *,
                 device: str | torch.device = "cpu", progress=None, **acquisition) -> Problem:
    """Read, validate and set up a scan file (MRI fastMRI layout, CT or image scan).

    Args:
        path: the scan file (never modified).
        prior: the ``Prior`` the problem is solved with, or None (classical solvers): its
            declared ``intensity_reference`` sets the MRI scale, its ``channels`` must match.
        slices: slice indices (list, int or '0,2,5-7'; None = all).
        device: where measurements and operators live.
        progress: optional callable receiving {'event': 'message', 'text': ...} events.
        acquisition: MRI only: ``acceleration``, ``mask_type``, ``center_fraction`` (the
            retrospective fastMRI mask of a fully sampled file) and ``coil_maps`` (a side
            file with dataset ``coil_maps``).

    Bad input raises ``InputError`` naming the file, dataset, key or flag (an operator's
    ``ValueError`` about what the file holds, prefixed with the file).
    """
    from diffrecon.datasets.io import detect_modality

    unknown = sorted(set(acquisition) - set(ACQUISITION))
    if unknown:
        raise TypeError(f"load_problem() got unexpected keyword argument(s) "
                        f"{', '.join(unknown)}; acquisition options: {', '.join(ACQUISITION)}")
    modality = detect_modality(path)
    check_acquisition(path, modality, acquisition)
    selected = parse_slices(slices)
    try:
        if modality == "mri":
            from .mri import load_mri

            problem = load_mri(path, prior, selected, device=device, progress=progress,
                               **acquisition)
        else:
            from .ct import load_ct
            from .image import load_image

            problem = (load_ct if modality == "ct" else load_image)(path, prior, selected,
                                                                   device=device)
    except ValueError as exc:  # an operator refusing what the file holds: bad input
        raise as_input_error(exc, str(path)) from exc
    channels = getattr(prior, "channels", None)
    if channels not in (None, problem.channels):
        raise InputError(f"--prior {getattr(prior, 'name', type(prior).__name__)!r} has "
                         f"{channels} channel(s) but this {modality} scan needs "
                         f"{problem.channels}")
    return problem


def check_acquisition(path, modality: str, acquisition: dict) -> None:
    """InputError unless ``path`` is a scan and the acquisition options are only given for
    MRI and fit the MRI scan (``mri.check_mri_file``: no k-space read; cheap: the pipeline
    calls it before any expensive work)."""
    if modality == "result":
        raise InputError(f"{path}: is a diffrecon result file, expected a scan file")
    if modality != "mri" and (acquisition.get("acceleration") is not None
                              or acquisition.get("mask_type") is not None):
        raise InputError(f"{path}: --acceleration/--mask-type apply to MRI scans only "
                         f"(this is a {modality} scan)")
    if modality == "mri":
        from .mri import check_mri_file

        check_mri_file(path, acquisition)


__all__ = ["ACQUISITION", "Normaliser", "Problem", "check_acquisition", "intensity_reference",
           "format_slices", "load_problem", "parse_slices", "reference_level"]
