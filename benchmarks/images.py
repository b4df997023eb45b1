"""Image quality of every solver with the shipped priors (issue "Benchmarks", table 2).

    python benchmarks/images.py [--quick] [--tasks mri-4x ct-30 ...] [--solvers dds smc ...]
                                [--out benchmarks/images_results] [--collect]

Scans are simulated on held-out ``split="test"`` phantoms (file seeds >= 1000, see
``benchmarks.common.SEED0``) in the documented layouts and run through the same code path as
``diffrecon run``: ``pipeline.plan_file`` + ``pipeline.compute`` (normalisation into the
prior's range, per-slice physics, solver, mapping back to scan units). Metrics are the
fastMRI definitions of ``diffrecon.metrics`` on the magnitude image (MRI, against the
noise-free ``ground_truth_complex``), the attenuation image (CT) or the intensity image,
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

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    REPO,
    SEED0,
    fmt_ms,
    header,
    markdown_table,
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


def display(task: Task, x: np.ndarray) -> np.ndarray:
    """Prior layout (..., C, H, W) -> the image that is scored: magnitude for MRI (as
    ``diffrecon run`` writes it), else the single channel / the channels as they are."""
    if task.modality == "mri":
        return np.sqrt(x[..., 0, :, :] ** 2 + x[..., 1, :, :] ** 2)
    return x[..., 0, :, :] if x.shape[-3] == 1 else x


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


# ------------------------------------------------------------------------------ deepinv
class UnitDenoiser(torch.nn.Module):
    """A diffrecon prior as a deepinv denoiser ``forward(u, sigma)`` on [0, 1] images (the
    range deepinv's DPS and DiffPIR assume): with x = lo + span u, span = hi - lo,
    D_u(u, s) = (D_x(lo + span u, span s) - lo) / span."""

    def __init__(self, prior):
        super().__init__()
        self.prior = prior
        self.lo, hi = (float(v) for v in prior.data_range)
        self.span = hi - self.lo

    def forward(self, u, sigma, *args, **kwargs):
        s = torch.as_tensor(sigma, dtype=u.dtype, device=u.device).reshape(-1)
        s = s.expand(u.shape[0]) if s.numel() == 1 else s
        # deepinv's DDRM ends its schedule at sigma = 0, where an EDM network's log(sigma)
        # conditioning is -inf (NaN image): denoise at the prior's sigma_min instead (~identity)
        s_x = (self.span * s).float().clamp_min(float(self.prior.sigma_min))
        d = self.prior.denoise((self.lo + self.span * u).float(), s_x)
        return ((d - self.lo) / self.span).to(u.dtype)


def svd_physics(physics, sigma_u: float, img_size):
    """The deepinv ``DecomposablePhysics`` DDRM needs: ``BlurFFT`` with the same kernel for a
    circular blur of (C, H, W) images (equal to the task's operator to 1e-6), noise
    ``sigma_u``. Other operators (multi-coil MRI, CT, bicubic SR) have no cheap SVD here:
    ValueError."""
    import deepinv as dinv

    kernel = getattr(physics, "filter", None)
    if kernel is None or not isinstance(physics, dinv.physics.Blur):
        raise ValueError(f"DDRM needs an SVD (DecomposablePhysics); {type(physics).__name__} "
                         f"has none here")
    return dinv.physics.BlurFFT(img_size=tuple(img_size), filter=kernel,
                                noise_model=dinv.physics.GaussianNoise(sigma_u))


def run_deepinv(name: str, steps: int, y, physics, prior, seed: int, weight: float = 1.0):
    """One draw (1, C, H, W) in prior units from deepinv's ``name`` ("dps" | "diffpir" |
    "ddrm") on the problem mapped to [0, 1]: y_u = (y - A(lo 1)) / span, noise sigma_y /
    span."""
    import deepinv as dinv

    den = UnitDenoiser(prior)
    shape = physics.A_adjoint(y).shape
    y_u = (y - physics.A(torch.full(shape, den.lo, dtype=y.dtype, device=y.device))) / den.span
    sigma_u = float(physics.noise_model.sigma) / den.span
    phys = dinv.physics.LinearPhysics(A=physics.A, A_adjoint=physics.A_adjoint,
                                      noise_model=dinv.physics.GaussianNoise(sigma_u),
                                      max_iter=20)  # CG iterations of DiffPIR's prox
    torch.manual_seed(seed)
    if name == "ddrm":
        with torch.no_grad():
            model = dinv.sampling.DDRM(den, sigmas=np.linspace(1, 0, steps))
            u = model(y_u, svd_physics(physics, sigma_u, shape[1:]), seed=seed)
        return (den.lo + den.span * u).detach()
    if name == "dps":
        model = dinv.sampling.DPS(den, num_steps=steps, weight=weight, dtype=torch.float32,
                                  rng=torch.Generator().manual_seed(seed))
        u = model(y_u, phys, x_init=tuple(shape), seed=seed)
    else:
        with torch.no_grad():
            model = dinv.sampling.DiffPIR(den, dinv.optim.data_fidelity.L2(), max_iter=steps)
            u = model(y_u, phys, seed=seed)
    return (den.lo + den.span * u).detach()


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


def run_config(task: Task, cfg: Config, path: Path, prior, gt: np.ndarray, problem_box: list,
               seed: int) -> dict[str, Any]:
    """Run one configuration on every slice of the task's scan; a dict of per-slice metrics,
    NFE, wall time (s per slice) and the first slice's mean / std (prior layout)."""
    from diffrecon import pipeline

    t0 = time.perf_counter()
    if cfg.family == "deepinv":
        if not problem_box:
            raise RuntimeError("deepinv rows need a prior-unit problem from an earlier row")
        problem = problem_box[0]
        means, times = [], []
        for j, k in enumerate(problem.slices):
            t1 = time.perf_counter()
            x = run_deepinv(cfg.solver, cfg.steps, problem.measurements[j], problem.physics[j],
                            prior, seed + k, **cfg.options)
            times.append(time.perf_counter() - t1)
            means.append(problem.normalisers[j].from_prior(x[0].double()).numpy())
        mean, std = np.stack(means), None
        nfe = cfg.steps
    else:
        is_diffusion = cfg.family != "baseline"
        with tempfile.TemporaryDirectory() as tmp:
            plan = pipeline.plan_file(path, Path(tmp) / "out.h5", solver=cfg.solver,
                                      prior=prior if is_diffusion else None, steps=cfg.steps,
                                      samples=cfg.samples, seed=seed,
                                      solver_options=cfg.options or None)
            comp = pipeline.compute(plan, device="cpu")
        order = comp.problem.slices
        if not problem_box:
            problem_box.append(comp.problem)
        mean = np.stack([comp.means[k] for k in order])
        std = np.stack([comp.stds[k] for k in order])
        times = [comp.infos[k]["wall_time_s"] for k in order]
        nfe = max(comp.infos[k]["nfe"] for k in order)
    row = {"label": cfg.label, "family": cfg.family, "solver": cfg.solver, "steps": cfg.steps,
           "samples": cfg.samples, "options": cfg.options, "nfe": int(nfe),
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
    from diffrecon import pipeline

    prior = pipeline.load_prior(pipeline.DEFAULT_PRIORS[task.modality], torch.device("cpu"))
    rows, problem_box = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = simulate(task, Path(tmp), size, slices)
        gt = ground_truth(task, path)
        for cfg in configs:
            try:
                row = run_config(task, cfg, path, prior, gt, problem_box, task_seed(task.name))
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


# ------------------------------------------------------------------------------ figures
def _best(rows, family):
    ok = [r for r in rows if r["family"] == family and "psnr" in r]
    return max(ok, key=lambda r: np.mean(r["psnr"])) if ok else None


def figure(task: Task, result: dict, truth: np.ndarray, png: Path) -> None:
    """PSNR vs wall time (per slice) and the first slice's images (best row per family)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fams = ["baseline", "dds", "dps", "reddiff", "smc", "deepinv"]
    picks = [r for r in (_best(rows, f) for f in fams) if r is not None]
    ncol = 1 + len(picks)
    fig = plt.figure(figsize=(1.55 * max(ncol, 6), 3.0 + 2 * 1.55))
    grid = fig.add_gridspec(3, ncol, height_ratios=[2.0, 1.0, 1.0])
    ax = fig.add_subplot(grid[0, :])
    colours = dict(zip(fams, ["k", "C0", "C1", "C2", "C3", "C4"], strict=True))
    for fam in fams:
        pts = [r for r in rows if r["family"] == fam and "psnr" in r]
        if fam in ("deepinv", "baseline"):
            for r in pts:
                ax.plot(np.mean(r["time_s"]), np.mean(r["psnr"]), "o" if fam == "deepinv"
                        else "s", color=colours[fam], ms=4)
                ax.annotate(r["label"].replace("deepinv ", "dinv "),
                            (np.mean(r["time_s"]), np.mean(r["psnr"])), fontsize=6)
            continue
        for tag in sorted({(r["samples"], str(r["options"])) for r in pts}):
            line = sorted((r for r in pts if (r["samples"], str(r["options"])) == tag),
                          key=lambda r: np.mean(r["time_s"]))
            t = [np.mean(r["time_s"]) for r in line]
            p = [np.mean(r["psnr"]) for r in line]
            ax.plot(t, p, "-o", color=colours[fam], ms=4, lw=1)
            for r, ti, pi in zip(line, t, p, strict=True):
                ax.annotate(r["label"], (ti, pi), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("wall time per slice (s, CPU)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"{task.label}: {result['slices']} test slices, {result['size']} px", fontsize=9)
    ax.grid(alpha=0.3)
    vmax = float(truth.max())
    images = [("truth", truth, None)] + [
        (r["label"], display(task, r["_mean0"]),
         None if r["_std0"] is None or not np.any(r["_std0"]) else display(task, r["_std0"])
         if task.modality != "mri" else np.sqrt(r["_std0"][0] ** 2 + r["_std0"][1] ** 2))
        for r in picks]
    for c, (name, img, sd) in enumerate(images):
        a = fig.add_subplot(grid[1, c])
        a.imshow(img if img.ndim == 2 else img[0], cmap="gray", vmin=0, vmax=vmax)
        a.set_title(name, fontsize=7)
        a.axis("off")
        b = fig.add_subplot(grid[2, c])
        b.axis("off")
        if c == 0:
            continue
        if sd is not None:
            b.imshow(sd if sd.ndim == 2 else sd[0], cmap="viridis")
            b.set_title("std", fontsize=7)
        else:
            err = np.abs(img - truth)
            b.imshow(err if err.ndim == 2 else err[0], cmap="magma", vmin=0, vmax=0.3 * vmax)
            b.set_title("|error|", fontsize=7)
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=70)
    plt.close(fig)
    os.replace(tmp, png)


# ------------------------------------------------------------------------------ tables
COLUMNS = ["solver", "NFE", "draws", "time/slice (s)", "PSNR", "SSIM", "NMSE"]


def task_table(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        if "error" in r:
            rows.append({"solver": r["label"], "PSNR": f"failed: {r['error'][:80]}"})
            continue
        draws = r["options"].get("num_particles", r["samples"]) if r["family"] == "smc" \
            else r["samples"] if r["family"] != "baseline" else None
        rows.append({"solver": r["label"], "NFE": r["nfe"], "draws": draws,
                     "time/slice (s)": float(np.mean(r["time_s"])), "PSNR": fmt_ms(r["psnr"]),
                     "SSIM": float(np.mean(r["ssim"])), "NMSE": float(np.mean(r["nmse"]))})
    return markdown_table(rows, COLUMNS)


def summary_table(results: list[dict]) -> str:
    rows = []
    for res in results:
        ok = [r for r in res["rows"] if "psnr" in r]
        base = [r for r in ok if r["family"] == "baseline"]
        diff = [r for r in ok if r["family"] != "baseline"]
        b = max(base, key=lambda r: np.mean(r["psnr"])) if base else None
        d = max(diff, key=lambda r: np.mean(r["psnr"])) if diff else None
        gain = np.mean(d["psnr"]) - np.mean(b["psnr"]) if b and d else float("nan")
        dssim = np.mean(d["ssim"]) - np.mean(b["ssim"]) if b and d else float("nan")
        rows.append({
            "task": res["task"], "best diffusion": d["label"] if d else "—",
            "PSNR": float(np.mean(d["psnr"])) if d else None,
            "SSIM": float(np.mean(d["ssim"])) if d else None,
            "best baseline": b["label"] if b else "—",
            "PSNR ": float(np.mean(b["psnr"])) if b else None,
            "SSIM ": float(np.mean(b["ssim"])) if b else None,
            "ΔPSNR (dB)": float(gain), "ΔSSIM": float(dssim)})
    cols = ["task", "best diffusion", "PSNR", "SSIM", "best baseline", "PSNR ", "SSIM ",
            "ΔPSNR (dB)", "ΔSSIM"]
    return markdown_table(rows, cols)


def coverage_table(results: list[dict]) -> str:
    rows = []
    for res in results:
        for r in res["rows"]:
            if "coverage" in r:
                draws = r["options"].get("num_particles", r["samples"]) \
                    if r["family"] == "smc" else r["samples"]
                rows.append({"task": res["task"], "solver": r["label"], "draws": draws,
                             "coverage (nominal 0.90)": r["coverage"],
                             "std / RMSE": r["std_over_rmse"],
                             "PSNR": float(np.mean(r["psnr"]))})
    return markdown_table(rows, ["task", "solver", "draws", "coverage (nominal 0.90)",
                                 "std / RMSE", "PSNR"])


def report(results: list[dict], argv, quick: bool) -> str:
    parts = ["## Image quality with the shipped priors (table 2)", header(),
             f"Command: `python benchmarks/images.py {' '.join(argv)}`".replace(" `", "`"),
             ("Mode: --quick (CI smoke; numbers are NOT meaningful)" if quick else "Mode: full"),
             "Metrics: fastMRI PSNR / SSIM / NMSE (`diffrecon.metrics`), mean over slices "
             "(PSNR ± sd over slices); time = solver wall time per slice on this CPU; NFE = "
             "denoiser evaluations per draw as reported by the solver (SMC: per particle "
             "batch step). Baseline weights are picked on the test slices (favours them)."]
    if results:
        r0 = results[0]
        cards = sorted({f"{r['prior']} ({r.get('prior_training', '?').split('(')[0].strip()}"
                        f", sha256 {r['prior_sha256'][:12]})" for r in results})
        parts.append(f"Priors: {'; '.join(cards)}. "
                     f"{r0['size']} px, {r0['slices']} slice(s) per task, file seeds "
                     f"{sorted(r['seed'] for r in results)} (split 'test').")
    parts.append("### Best diffusion solver vs best classical baseline\n\n"
                 + summary_table(results))
    for res in results:
        parts.append(f"### {res['task']}: {res['label']}\n\n" + task_table(res))
    parts.append("### Coverage of mean ± 1.64 std (>= 4 draws / particles)\n\n"
                 + coverage_table(results))
    return "\n\n".join(parts)


def collect(out: Path) -> list[dict]:
    """Results of ``<out>/<task>.json``, in task order; rows of ``<out>/*/<task>.json``
    (supplementary runs, e.g. ``--solvers smc --out <out>/smc``) with the same size and
    slice count are appended when their label is new, or replace a failed row."""
    results = []
    for name in TASKS:
        files = [out / f"{name}.json"] + sorted(out.glob(f"*/{name}.json"))
        found = [json.loads(f.read_text()) for f in files if f.is_file()]
        if not found:
            continue
        main_res = found[0]
        rows = main_res["rows"]
        for extra in found[1:]:
            if (extra["size"], extra["slices"]) != (main_res["size"], main_res["slices"]):
                continue
            for r in extra["rows"]:
                at = [i for i, old in enumerate(rows) if old["label"] == r["label"]]
                if not at:
                    rows.append(r)
                elif "error" in rows[at[0]] and "error" not in r:
                    rows[at[0]] = r
        results.append(main_res)
    return results


# ------------------------------------------------------------------------------ main
def main(argv=None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: one MRI 4x and one CT 30-view slice at 32 px, DDS 10")
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
    p.add_argument("--out", default=None,
                   help=f"output folder (default {DEFAULT_OUT.relative_to(REPO)}; --quick: a "
                        f"temporary folder)")
    p.add_argument("--collect", action="store_true",
                   help="only rebuild tables.md from the JSON files in --out")
    p.add_argument("--notes", default=None, help="markdown file appended to the report")
    p.add_argument("--threads", type=int, default=1)
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
        results = collect(out)
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
