"""Slice results -> result file: each solved slice mapped back to scan units and checked
(no NaN / Inf, nothing empty), the result written atomically with its provenance, and the
summary warnings (prior misfit ``noise_chi``, SMC weight degeneracy). Re-exported by
:mod:`diffrecon.pipeline.run`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffrecon.errors import InputError
from diffrecon.problems import Problem, format_slices

from .options import solver_option_dict

if TYPE_CHECKING:
    from .run import Plan


def check_slice_result(name: str, k: int, result: dict[str, Any]) -> None:
    """The last guard before a result is written: ``InputError`` (nothing is written) when
    slice ``k``'s mean, std or draws are empty or hold NaN / Inf (degenerate data or
    options the checks before the solve did not catch)."""
    for key in ("mean", "std", "draws"):
        arr = result.get(key)
        if arr is None:
            continue
        if arr.size == 0:
            raise InputError(f"{name}: slice {k}: the reconstruction's {key} is empty (shape "
                             f"{arr.shape}); nothing written")
        bad = int(arr.size - np.isfinite(arr).sum())
        if bad:
            raise InputError(f"{name}: slice {k}: the reconstruction's {key} has {bad} NaN or "
                             f"Inf values (degenerate data or solver options); nothing written")


def slice_result(rec, norm, save_samples: bool, support=None, row: int = 0
                 ) -> dict[str, Any]:
    """Measurement ``row`` of a Reconstruction (one slice of a slice batch) in scan units and
    prior layout (C, H, W), float64 numpy, zero outside ``support`` ((H, W) bool,
    ``Problem.supports``), with what the result file records of its info (the solve's wall
    time shared equally by the slices of the batch)."""
    def host(t):
        t = t if support is None else t * support.to(t.device)
        return norm.from_prior(t.detach().to("cpu", torch.float64)).numpy()

    rows = int(rec.mean.shape[0])
    out = {"mean": host(rec.mean[row]), "std": host(rec.std[row]),
           "draws": host(rec.samples[:, row]) if save_samples else None,
           "nfe": int(rec.info.get("nfe", 0)), "slice_batch": rows,
           "wall_time_s": float(rec.info.get("wall_time_s", 0.0)) / rows,
           "scale": float(norm.scale)}
    if "residual" in rec.info:
        out["residual"] = float(rec.info["residual"][row])
    if "noise_chi" in rec.info:
        out["noise_chi"] = float(rec.info["noise_chi"][row])
    if "lineages" in rec.info:
        out.update(lineages=int(rec.info["lineages"][row]),
                   particles=int(rec.info["num_particles"]))
    return out


def write(plan: Plan, problem: Problem, solver, results: dict[int, dict[str, Any]],
          prior_checksum: str, device: str, t0: float, precision: str = "fp32"
          ) -> dict[str, Any]:
    """Write the result file of ``plan`` atomically with its provenance; return a summary.
    ``precision``: the network precision used (``options.set_precision``)."""
    from diffrecon import __version__
    from diffrecon.datasets.io import write_result

    order = problem.slices
    per = [results[k] for k in order]
    rec, cplx = zip(*(problem.scan_image(r["mean"]) for r in per), strict=True)
    sd = [problem.scan_image(r["std"], std=True)[0] for r in per]
    for k, m, s in zip(order, rec, sd, strict=True):  # on the scan grid (reconSpace crop)
        check_slice_result(plan.input_path.name, k, {"mean": m, "std": s})
    smp = [np.stack([problem.scan_image(d)[0] for d in r["draws"]]) for r in per
           if r["draws"] is not None]
    nfe = [r["nfe"] for r in per]
    st = plan.settings
    attrs = {
        "diffrecon_version": __version__, "torch_version": str(torch.__version__),
        "input": plan.input_path.name, "input_sha256": st["input_sha256"],
        "modality": problem.modality, "solver": st["solver"],
        "solver_options": solver_option_dict(solver), "prior": st["prior"] or "none",
        "prior_sha256": prior_checksum, "seed": st["seed"],
        "seed_convention": "slice k draws from seed material (seed, k)",
        "num_samples": st["samples"], "slices": np.asarray(order, dtype=np.int64),
        "device": device, "precision": precision, "threads": int(torch.get_num_threads()),
        "nfe": int(max(nfe)) if nfe else 0,
        "nfe_per_slice": np.asarray(nfe, dtype=np.int64),
        "slice_batch_per_slice": np.asarray([r.get("slice_batch", 1) for r in per],
                                            dtype=np.int64),
        "solve_time_s": float(sum(r["wall_time_s"] for r in per)),
        "wall_time_s": float(time.perf_counter() - t0),
        "normalisation": "image = scale * prior image; " + problem.normalisation,
        "scale_per_slice": np.asarray([r["scale"] for r in per]),
        "settings": st, "settings_sha256": plan.digest, **problem.meta,
    }
    if order and all("residual" in r for r in per):
        attrs["data_residual_per_slice"] = np.asarray([r["residual"] for r in per],
                                                      dtype=np.float64)
    warnings = []
    if order and all("noise_chi" in r for r in per):
        chi = [r["noise_chi"] for r in per]
        attrs["noise_chi_per_slice"] = np.asarray(chi, dtype=np.float64)
        if plan.prior is not None:  # diffusion solvers: is it the prior that misses the data?
            warnings += misfit_warning(plan.input_path.name, order, chi)
    if order and all("lineages" in r for r in per):
        lineages = [r["lineages"] for r in per]
        attrs["smc_lineages_per_slice"] = np.asarray(lineages, dtype=np.int64)
        warnings += degeneracy_warning(plan.input_path.name, order, lineages,
                                       per[0]["particles"])
    intervals = None
    if plan.calibration is not None:
        from . import calibrate as cal

        intervals = cal.intervals(plan.calibration, np.stack(rec), np.stack(sd))
        attrs.update(cal.provenance(plan.calibration, plan.options.calibration,
                                    np.stack(rec), np.stack(sd)))
    write_result(plan.output_path, np.stack(rec), np.stack(sd),
                 samples=np.stack(smp) if smp else None,
                 complex=np.stack(cplx) if problem.modality == "mri" else None, attrs=attrs,
                 intervals=intervals)
    return {"input": str(plan.input_path), "output": str(plan.output_path), "status": "done",
            "modality": problem.modality, "solver": st["solver"], "prior": st["prior"],
            "slices": len(order), "nfe": attrs["nfe"], "device": device,
            "wall_time_s": round(attrs["wall_time_s"], 3), "warnings": warnings}


# A posterior mean whose data misfit exceeds this many noise levels (``noise_chi``) is
# reported: the prior does not explain the scan (or its noise level is underestimated).
MISFIT_WARN_CHI = 2.0


def misfit_warning(name: str, order: list[int], chi: list[float]) -> list[str]:
    """The summary warning for slices whose ``noise_chi`` exceeds ``MISFIT_WARN_CHI``."""
    bad = [k for k, c in zip(order, chi, strict=True) if c > MISFIT_WARN_CHI]
    if not bad:
        return []
    worst = max(c for c in chi if c == c)
    return [f"{name}: slices {format_slices(bad)}: the reconstruction misses the data by up to "
            f"{worst:.1f} x the noise level (noise_chi); the prior may not fit this scan "
            f"(or noise_sigma is underestimated): compare with a classical --solver"]


def degenerate_below(num_particles: int) -> int:
    """An SMC cloud with fewer distinct time-0 ancestors than this is reported as
    degenerate: max(3, N / 10)."""
    return max(3, num_particles // 10)


def degeneracy_warning(name: str, order: Sequence[int], lineages: Sequence[int],
                       particles: int) -> list[str]:
    """The SMC weight-degeneracy warning of a file (empty when every cloud kept enough
    lineages)."""
    weak = [(k, c) for k, c in zip(order, lineages, strict=True)
            if c < degenerate_below(particles)]
    if not weak:
        return []
    lo, hi = min(c for _, c in weak), max(c for _, c in weak)
    return [f"{name}: SMC slices {format_slices([k for k, _ in weak])}: the {particles} particles "
            f"descend from {lo if lo == hi else f'{lo}-{hi}'} initial particle(s) (weight "
            f"degeneracy), so std is not a posterior std; use more particles, or an ensemble "
            f"(--solver dds --samples K)."]
