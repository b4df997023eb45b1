"""Image quality of every solver with the shipped priors (issue "Benchmarks", table 2).

    python -m benchmarks.images [--quick] [--tasks mri-4x ct-30 ...] [--solvers dds smc ...]
                                [--out benchmarks/images_results] [--collect]

Scans are simulated on held-out ``split="test"`` phantoms (file seeds >= 1000, see
``benchmarks.common.SEED0``) in the documented layouts and run through the same code path as
``diffrecon run``: ``problems.load_problem`` (normalisation into the prior's range, per-slice
physics), the solver per slice with seed material (seed, slice), mapping back to scan units.
Metrics are the fastMRI definitions of ``diffrecon.metrics`` on the magnitude image (MRI,
against the noise-free ``ground_truth_complex``), the attenuation image (CT) or the intensity image,
volume data range = max of the reference over the task's slices; tables give the mean over
slices (± sd over slices for PSNR).

Tasks (64 px, ``--slices`` slices each, noise stds in units where the image max is 1):
  mri-4x, mri-8x     8-coil birdcage MRI, fastMRI random 1D mask (8% / 4% centre), noise 0.01
  mri-poisson-8x     8-coil MRI, Poisson-disc 2D mask 8x, noise 0.01
  ct-30, ct-8        parallel beam, 30 / 8 views over pi, noise 1% of the sinogram maximum
  ct-limited         60 views over pi/2 (limited angle), noise 1%
  deblur-gaussian    Gaussian blur width 2 px (circular), sigma_y 0.01
  deblur-motion      linear motion blur length 9 px (circular), sigma_y 0.01
  sr-4x              bicubic super-resolution x4 (circular), sigma_y 0.01
MRI scans store the true coil maps (no ESPIRiT error in the comparison). Priors: shipped
``phantom-mri`` (MRI) and ``phantom-ct`` (CT and images, trained on ellipses).

Solvers: DDS 20/50/100 steps, DPS 100/300/1000, RED-diff 50/100/300, SMC gaussian proposal N
= 16/64 with 50 steps, each with its default options (one posterior draw, except "DDS s x4":
4 draws, metrics of their mean; ``--dds-x4`` picks s, default 50); deepinv 0.5's DPS (100
steps), DiffPIR (100 steps, zeta 0.1, lambda 7) and DDRM (100 steps; blur tasks only, it
needs an SVD: :func:`svd_physics`) with the same prior wrapped as a deepinv denoiser on
[0, 1] (see :class:`UnitDenoiser`); classical baselines: zero-filled / A^T y, CG
(least squares, 30 iterations from 0), FBP (CT), L1-wavelet (MRI) and TV, the regularised
ones at several weights (chosen on the test slices themselves: an oracle choice that FAVOURS
the baselines).
Coverage: fraction of pixels (both channels for MRI, prior layout, data units) whose true
value lies in mean +- 1.64 std, for solvers with >= 4 draws or particles; "std / RMSE" is
the mean posterior std over the root mean squared error (1 = calibrated width on average).

Each task writes ``<out>/<task>.json`` (metrics, NFE, times) and ``<out>/<task>.png`` (PSNR vs
wall time per slice, one point per solver x step count, and the reconstructions, |error| and
std maps of the first slice); tables go to ``<out>/tables.md``. ``--collect`` only rebuilds
the tables from the JSON files present (e.g. after running task subsets in parallel; rows of
supplementary runs in sub-folders, ``--out <out>/smc``, are merged in).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._images_deepinv import run_deepinv
from benchmarks._images_report import collect, display, figure, report
from benchmarks.common import (
    REPO,
    SEED0,
    arguments,
    setup,
)

Z90 = 1.64
DEFAULT_OUT = REPO / "benchmarks" / "images_results"


# ------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class Task:
    """A simulated scan: ``modality`` and the keyword arguments of its simulator."""

    name: str
    modality: str              # "mri" | "ct" | "image"
    sim: dict[str, Any]
    label: str


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("mri-4x", "mri", {"acceleration": 4, "center_fraction": 0.08, "mask_type": "random",
                           "noise": 0.01}, "MRI 8 coils, random 1D 4x"),
    Task("mri-8x", "mri", {"acceleration": 8, "center_fraction": 0.04, "mask_type": "random",
                           "noise": 0.01}, "MRI 8 coils, random 1D 8x"),
    Task("mri-poisson-8x", "mri", {"acceleration": 8, "center_fraction": 0.08,
                                   "mask_type": "poisson", "noise": 0.01},
         "MRI 8 coils, Poisson 2D 8x"),
    Task("ct-30", "ct", {"views": 30, "noise": 0.01}, "CT 30 views"),
    Task("ct-8", "ct", {"views": 8, "noise": 0.01}, "CT 8 views"),
    Task("ct-limited", "ct", {"views": 60, "angle_range": math.pi / 2, "noise": 0.01},
         "CT limited angle (60 views over pi/2)"),
    Task("deblur-gaussian", "image", {"operator": "blur", "kernel": "gaussian",
                                      "kernel_width": 2.0, "noise": 0.01},
         "Gaussian deblur (2 px)"),
    Task("deblur-motion", "image", {"operator": "blur", "kernel": "motion", "kernel_width": 9.0,
                                    "noise": 0.01}, "motion deblur (9 px)"),
    Task("sr-4x", "image", {"operator": "superres", "factor": 4, "kind": "bicubic",
                            "noise": 0.01}, "super-resolution x4 (bicubic)"),
]}
QUICK_TASKS = ("mri-4x", "ct-30")


def task_seed(name: str) -> int:
    """Held-out file seed of a task (>= SEED0, distinct per task)."""
    return SEED0 + 10 * list(TASKS).index(name)


def simulate(task: Task, folder: Path, size: int, slices: int) -> Path:
    """Write the task's scan into ``folder``; returns its path."""
    from diffrecon.datasets import simulate as sim

    path = folder / f"{task.name}.h5"
    seed = task_seed(task.name)
    if task.modality == "mri":
        return sim.simulate_mri(path, size=size, slices=slices, coils=8, seed=seed,
                                split="test", with_coil_maps=True, **task.sim)
    if task.modality == "ct":
        return sim.simulate_ct(path, size=size, slices=slices, seed=seed, split="test",
                               family="ellipses", **task.sim)
    return sim.simulate_image(path, size=size, slices=slices, seed=seed, split="test",
                              family="ellipses", boundary="circular", **task.sim)


def ground_truth(task: Task, path: Path) -> np.ndarray:
    """Reference in prior layout and data units: (slices, C, H, W) float64 (MRI: real, imag
    of ``ground_truth_complex``)."""
    if task.modality == "mri":
        from diffrecon.datasets.fastmri import read_mri_scan

        gt = np.asarray(read_mri_scan(path).ground_truth)
        return np.stack([gt.real, gt.imag], 1).astype(np.float64)
    from diffrecon.metrics import load_reference

    ref, _ = load_reference(path)
    return ref[:, None] if ref.ndim == 3 else ref


# ------------------------------------------------------------------------------ solvers
@dataclass(frozen=True)
class Config:
    """One row of a table: a registered solver (or deepinv sampler) with options."""

    label: str
    family: str                # dds | dps | reddiff | smc | deepinv | baseline
    solver: str
    steps: int | None = None
    samples: int = 1
    options: dict[str, Any] = field(default_factory=dict)


BASELINES = {  # modality -> configs (regularisation weights: see module docstring)
    "mri": [Config("zero-filled", "baseline", "zero-filled"),
            Config("CG-SENSE", "baseline", "cg-sense"),
            *[Config(f"L1-wavelet lam={lam:g}", "baseline", "l1-wavelet",
                     options={"lam": lam}) for lam in (1e-4, 1e-3, 1e-2)],
            *[Config(f"TV lam={lam:g}", "baseline", "tv", options={"lam": lam})
              for lam in (1e-3, 3e-3, 1e-2)]],
    "ct": [Config("FBP", "baseline", "fbp"),
           Config("CG", "baseline", "cg"),
           *[Config(f"TV lam={lam:g}", "baseline", "tv", options={"lam": lam, "iters": 100})
             for lam in (1e-2, 3e-2, 1e-1)]],
    "image": [Config("A^T y", "baseline", "zero-filled"),
              Config("CG", "baseline", "cg"),
              *[Config(f"TV lam={lam:g}", "baseline", "tv", options={"lam": lam, "iters": 100})
                for lam in (3e-3, 1e-2, 3e-2)]],
}


# DPS guidance step (``zeta`` of diffrecon's DPS, ``weight`` of deepinv's): the paper's 0.3
# for deblurring / SR and 1.0 otherwise; CT operators have ||A|| = 20-60 at 64 px and diverge
# at 1.0 (PSNR 2 dB at 32 px), so CT uses 0.1, the best of {1, 0.3, 0.1, 0.03, 0.01} on a
# 32 px slice of ct-30 with 100 steps.
DPS_ZETA = {"mri": 1.0, "ct": 0.1, "image": 0.3}
SMC_CG_ITERS = 20   # CG iterations per S-solve (default 50; cut for the CPU budget)


def diffusion_configs(modality: str, dds=(20, 50, 100), dps=(100, 300, 1000),
                      reddiff=(50, 100, 300), smc=(16, 64), deepinv=(100,),
                      smc_gain=(False,),
                      dds_x4=(50,)) -> list[Config]:
    """The diffusion rows of a task (module docstring); options not given are defaults.
    ``dds_x4``: step counts of the "DDS s x4" rows (mean of 4 draws)."""
    zeta = DPS_ZETA[modality]
    rows = [Config(f"DDS {s}", "dds", "dds", s) for s in dds]
    rows += [Config(f"DDS {s} x4", "dds", "dds", s, samples=4) for s in dds_x4]
    rows += [Config(f"DPS {s}", "dps", "dps", s, options={"zeta": zeta}) for s in dps]
    rows += [Config(f"RED-diff {s}", "reddiff", "reddiff", s) for s in reddiff]
    rows += [Config(f"SMC N={n}" + (" gain" if gain else ""), "smc", "smc", 50, samples=4,
                    options={"proposal": "gaussian", "num_particles": n, "chunk_size": n,
                             "cg_iters": SMC_CG_ITERS, **({"operator_gain": True} if gain
                                                          else {})})
             for n in smc for gain in smc_gain]
    for s in deepinv:
        rows += [Config(f"deepinv DPS {s}", "deepinv", "dps", s, options={"weight": zeta}),
                 Config(f"deepinv DiffPIR {s}", "deepinv", "diffpir", s)]
        if modality == "image":  # DDRM needs an SVD: circular blur only (svd_physics)
            rows.append(Config(f"deepinv DDRM {s}", "deepinv", "ddrm", s))
    return rows


def quick_configs(modality: str) -> list[Config]:
    return [Config("DDS 10 x4", "dds", "dds", 10, samples=4)]


def quick_baselines(modality: str) -> list[Config]:
    """Two or three cheap baselines per modality for --quick."""
    return [c for c in BASELINES[modality]
            if c.solver in ("zero-filled", "cg-sense", "cg", "fbp")
            or c.label in ("TV lam=0.001", "TV lam=0.03")]


# ------------------------------------------------------------------------------ running
def scores(task: Task, gt: np.ndarray, mean: np.ndarray, std: np.ndarray | None,
           samples: int) -> dict[str, Any]:
    """fastMRI metrics of the scored image, plus coverage for >= 4 draws."""
    from diffrecon.metrics import evaluate_arrays

    ev = evaluate_arrays(display(task, gt), display(task, mean))
    out = {"psnr": [s["psnr"] for s in ev["per_slice"]],
           "ssim": [s["ssim"] for s in ev["per_slice"]],
           "nmse": [s["nmse"] for s in ev["per_slice"]]}
    if std is not None and samples >= 4:
        err = np.abs(gt - mean)
        out["coverage"] = float(np.mean(err <= Z90 * std))
        out["std_over_rmse"] = float(std.mean() / np.sqrt(np.mean(err ** 2)))
    return out


def run_config(task: Task, cfg: Config, problems: dict[bool, Any], prior, gt: np.ndarray,
               seed: int) -> dict[str, Any]:
    """Run one configuration on every slice of the task's scan, slice k with seed material
    (seed, k) as ``diffrecon run`` does; a dict of per-slice metrics, NFE, wall time (s per
    slice) and the first slice's mean / std (prior layout). ``problems[True]`` is the scan's
    problem with the prior, ``problems[False]`` without (the classical rows')."""
    from diffrecon.recon import get_solver

    t0 = time.perf_counter()
    classical = cfg.family == "baseline"
    problem = problems[not classical]
    means, stds, times, nfes = [], [], [], []  # NFE: the solver's own count; deepinv: steps
    if cfg.family != "deepinv":
        solver = get_solver(cfg.solver, **({"steps": cfg.steps} if cfg.steps else {}),
                            **cfg.options)
    for j, k in enumerate(problem.slices):
        norm = problem.normalisers[j]
        if cfg.family == "deepinv":
            t1 = time.perf_counter()
            x = run_deepinv(cfg.solver, cfg.steps, problem.measurements[j], problem.physics[j],
                            prior, seed + k, **cfg.options)
            times.append(time.perf_counter() - t1)
            means.append(norm.from_prior(x[0].double()).numpy())
            continue
        rec = solver.solve(problem.measurements[j], problem.physics[j],
                           None if classical else prior, num_samples=cfg.samples,
                           seed=[(seed, k)])
        means.append(norm.from_prior(rec.mean[0].detach().to(torch.float64)).numpy())
        stds.append(norm.from_prior(rec.std[0].detach().to(torch.float64)).numpy())
        times.append(float(rec.info["wall_time_s"]))
        nfes.append(int(rec.info["nfe"]))
    mean, std = np.stack(means), (np.stack(stds) if stds else None)
    row = {"label": cfg.label, "family": cfg.family, "solver": cfg.solver, "steps": cfg.steps,
           "samples": cfg.samples, "options": cfg.options, "nfe": max(nfes, default=cfg.steps),
           "time_s": [float(t) for t in times], "total_s": time.perf_counter() - t0}
    samples = cfg.samples if cfg.family != "smc" else cfg.options.get("num_particles", 1)
    if not np.isfinite(mean).all():  # skimage's PSNR of a NaN image is inf: never score it
        raise FloatingPointError(f"{cfg.label} returned non-finite values")
    row.update(scores(task, gt, mean, std, samples))
    row["_mean0"], row["_std0"] = mean[0], (None if std is None else std[0])
    return row


def prior_card_line(name: str) -> str:
    """The "Training:" line of a shipped prior's model card (``weights/<name>.md``)."""
    import importlib.resources

    card = Path(str(importlib.resources.files("diffrecon.priors") / "weights")) / f"{name}.md"
    if card.is_file():
        for line in card.read_text().splitlines():
            if line.startswith("- Training:"):
                return line[len("- Training:"):].split("(")[0].strip()
    return "unknown"


def run_task(task: Task, configs: list[Config], size: int, slices: int, out: Path,
             log=print) -> dict[str, Any]:
    """Simulate the task's scan, run every config (baselines first), write
    ``<out>/<task>.json`` and ``<out>/<task>.png``; returns the JSON content."""
    from diffrecon import priors
    from diffrecon.pipeline import DEFAULT_PRIORS
    from diffrecon.problems import load_problem

    prior = priors.load(DEFAULT_PRIORS[task.modality]).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = simulate(task, Path(tmp), size, slices)
        gt = ground_truth(task, path)
        problems = {True: load_problem(path, prior), False: load_problem(path)}
        for cfg in configs:
            try:
                row = run_config(task, cfg, problems, prior, gt, task_seed(task.name))
            except Exception as exc:  # noqa: BLE001 - a failing row is reported, not hidden
                row = {"label": cfg.label, "family": cfg.family, "steps": cfg.steps,
                       "samples": cfg.samples, "error": f"{type(exc).__name__}: {exc}"[:200]}
            rows.append(row)
            msg = row.get("error") or (f"PSNR {np.mean(row['psnr']):.2f} dB, "
                                       f"{np.mean(row['time_s']):.1f} s/slice")
            log(f"[{task.name}] {cfg.label}: {msg}")
    result = {"task": task.name, "label": task.label, "modality": task.modality,
              "size": size, "slices": slices, "seed": task_seed(task.name),
              "prior": prior.name, "prior_sha256": prior.checksum,
              "prior_training": prior_card_line(prior.name), "rows": rows}
    figure(task, result, display(task, gt[0]), out / f"{task.name}.png")
    for r in rows:
        r.pop("_mean0", None)
        r.pop("_std0", None)
    tmp_json = out / f"{task.name}.json.tmp"
    tmp_json.write_text(json.dumps(result, indent=1, default=float))
    os.replace(tmp_json, out / f"{task.name}.json")
    return result


# ------------------------------------------------------------------------------ main
def main(argv=None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = arguments(__doc__, "one MRI 4x and one CT 30-view slice at 32 px, DDS 10")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None)
    p.add_argument("--solvers", nargs="+", default=None,
                   choices=["dds", "dps", "reddiff", "smc", "deepinv", "baseline"],
                   help="families to run (default all; baselines always run)")
    p.add_argument("--dps-steps", type=int, nargs="+", default=[100, 300, 1000])
    p.add_argument("--smc-particles", type=int, nargs="*", default=[16, 64],
                   help="particle counts of the SMC rows (none: no SMC rows)")
    p.add_argument("--smc-operator-gain", action="store_true",
                   help="SMC rows with operator_gain=True (label 'SMC N=n gain') instead")
    p.add_argument("--dds-steps", type=int, nargs="*", default=[20, 50, 100])
    p.add_argument("--dds-x4", type=int, nargs="*", default=[50],
                   help="step counts of the 'DDS s x4' rows (mean of 4 draws)")
    p.add_argument("--reddiff-steps", type=int, nargs="*", default=[50, 100, 300])
    p.add_argument("--deepinv", nargs="*", choices=["dps", "diffpir", "ddrm"],
                   default=["dps", "diffpir", "ddrm"],
                   help="deepinv samplers to run (100 steps; DDRM on the blur tasks only)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--slices", type=int, default=2)
    p.add_argument("--collect", action="store_true",
                   help="only rebuild tables.md from the JSON files in --out")
    p.add_argument("--notes", default=None, help="markdown file appended to the report")
    a = p.parse_args(argv)
    setup(a.threads)
    if a.out is None:
        out = Path(tempfile.mkdtemp(prefix="images_quick_")) if a.quick else DEFAULT_OUT
    else:
        out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.quick:
        tasks = list(a.tasks or QUICK_TASKS)
        size, slices = 32, 1

        def build(m):
            return quick_baselines(m) + quick_configs(m)
    else:
        tasks = list(a.tasks or TASKS)
        size, slices = a.size, a.slices

        def build(m):
            rows = diffusion_configs(m, dds=tuple(a.dds_steps), dps=tuple(a.dps_steps),
                                     reddiff=tuple(a.reddiff_steps),
                                     smc=tuple(a.smc_particles), dds_x4=tuple(a.dds_x4),
                                     smc_gain=(True,) if a.smc_operator_gain else (False,))
            return BASELINES[m] + [r for r in rows if r.family != "deepinv"
                                   or r.solver in a.deepinv]
    results = []
    if a.collect:
        results = collect(out, list(TASKS))
    else:
        for name in tasks:
            task = TASKS[name]
            configs = [c for c in build(task.modality)
                       if not a.solvers or c.family in a.solvers or c.family == "baseline"]
            results.append(run_task(task, configs, size, slices, out,
                                    log=lambda m: print(m, file=sys.stderr, flush=True)))
    text = report(results, argv, a.quick)
    if a.notes:
        text += "\n\n### Notes\n\n" + Path(a.notes).read_text().strip()
    tmp = out / "tables.md.tmp"
    tmp.write_text(text + "\n")
    os.replace(tmp, out / "tables.md")
    print(text)
    return text


if __name__ == "__main__":
    main()
