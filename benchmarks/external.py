"""Held-out independent benchmark: does diffrecon win on scans it did not make (issue 15)?

    nice -n 15 env OMP_NUM_THREADS=1 python -m benchmarks.external \\
        [--quick | --full] [--tasks PAT,...] [--rows PAT,...] [--images NAME,...] \\
        [--prior NAME] [--out DIR] [--threads N] [--overwrite] [--collect]

Scans are simulated by ``benchmarks/_external_sim.py``, which shares nothing with diffrecon's
simulators (numpy / scipy / sigpy / scikit-image / h5py only), from held-out TEST images
(never used to train, tune or select anything; the TEST split of issue 15): anatomy dipy
``t1_coronal_slice``, matplotlib ``s1045.ima``, dipy ``S0_10slices`` slices 2-7; photographs
scikit-image ``camera``, ``astronaut``, ``chelsea``, sklearn ``china``. The scan files hold no
ground truth and no coil maps; the truth stays in ``<out>/truth``. Every reconstruction goes
through the command line in a subprocess, ``diffrecon run FILE -o OUT [--solver S --steps N
--option k=v --prior P --coil-maps M]``, exactly as a user would type it.

Tasks (``--tasks``, fnmatch patterns; native sizes: anatomy 256 / 128 px, photos 256 px):
  mri-4x-rand-8c, mri-4x-equi-16c, mri-8x-rand-16c, mri-8x-equi-8c
        fastMRI multicoil layout, sigpy birdcage coils, smooth random phase, 1D mask with a
        fully sampled centre (8% at 4x, 4% at 8x), complex noise at 35 dB k-space SNR
  mri-4x-equi-16c-640   real-size row: 640 x 320 readout-oversampled k-space, 16 coils,
        reconSpace 320 x 320 (t1_coronal and s1045 resized to 320 px)
  ct-30, ct-8, ct-90deg  parallel beam (skimage radon), 30 / 8 views over 180 deg, 60 views
        over 90 deg; attenuation maps = image * 0.04 / mm, FOV 256 mm (EPI 128 px zero-padded
        to 129: see ``_external_sim.ct_size``); sinogram noise 0.02
  deblur-gauss2   Gaussian blur std 2 px (13 x 13 kernel), mirror boundary, noise 0.01
  sr-4x           antialiased bicubic x4 decimation, mirror boundary, noise 0.01
CT uses MR images and the ``camera`` photo as attenuation maps: no real CT is available
outside the reserved packages.

Rows (``--rows``, fnmatch patterns), in run order: ``default`` (plain ``diffrecon run``, no
--solver / --prior); every baseline at its default (``zero-filled``, ``cg-sense``,
``l1-wavelet``, ``tv``, ``fbp`` where they apply) and at its oracle (``*-oracle``: the
default value and one step either side, half-decade steps for ``lam``, factor 2 for CG
``iters`` with ``lam=0``, extended (at most 4 steps) while the best value sits at an edge;
one value per task, the best mean PSNR on the test images themselves, which FAVOURS the
baselines); independent scikit-image references ``skimage-fbp`` (iradon, ramp),
``skimage-sart-oracle`` (best of 1-30 SART iterations) and ``skimage-bicubic`` (SR); then
``dds-25 / -50 / -100`` and ``reddiff-100`` (``--full`` adds ``dps-200``, ``dps-1000`` and
``smc-16``: SMC, 16 particles, 50 steps).
``--prior`` is passed to the diffusion rows (not to ``default``). MRI rows other than
``default`` read ESPIRiT maps made once per file by ``diffrecon calib`` (``--coil-maps``;
the maps are those ``run`` would estimate) and their s/slice includes that calibration time.
A ``dds-N`` row with the default row's solver, steps and prior is not rerun but reported as
the default row.

Metrics (fastMRI definitions, ``diffrecon.metrics``): PSNR and SSIM per slice with data range
= max of the reference over the slices of the same source volume (each image is its own
volume except the six S0 EPI slices), mean over the task's slices. MRI: magnitude at
reconSpace against |x| (= RSS of the noise-free coil images: the birdcage maps are
RSS-normalised); CT: attenuation per pixel; images: intensities. s/slice: the result's
provenance ``wall_time_s`` / slices (+ calibration share), excluding interpreter start-up.

Output (``--out``, default ``./external_results``): ``scans/``, ``truth/``, ``results/<task>/
<row>/*.h5`` and ``<row>.json`` (cache: a rerun skips finished rows, ``--overwrite`` redoes
them), ``<task>.png`` (reference, default run, best classical, |error| maps), ``table.md``
(printed too). Reruns with another prior or diffrecon version need a fresh ``--out``.
``--quick``: 48 px, one image per task, rows default / tv / tv-oracle (a smoke test).

The "before" table of the shipped phantom priors (``benchmarks/external_before.md``) ran
the committed code of 82f631c (a snapshot, so that work in progress in the tree could not
leak in; the runner and every ``diffrecon`` subprocess import it through PYTHONPATH):
    git archive 82f631c | tar -x -C /tmp/head
    PYTHONPATH=/tmp/head/src nice -n 15 env OMP_NUM_THREADS=1 python -m benchmarks.external \\
        --tasks mri-4x-rand-8c,mri-4x-equi-16c,ct-30 \\
        --images t1_coronal,s1045_sagittal,camera --out external_before
The full benchmark (all tasks, images and rows; ``--full`` adds DPS and SMC) is
    nice -n 15 env OMP_NUM_THREADS=1 python -m benchmarks.external --out external_after
and ``--collect`` tabulates whatever rows are cached so far (e.g. several processes, each
with its own ``--tasks``, sharing one ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from benchmarks import _external_sim as sim

SEED0 = 1000
SART_ITERS = 30
EPI = tuple(f"S0_epi_{k}" for k in range(2, 8))
ANAT256 = ("t1_coronal", "s1045_sagittal")
DIFFUSION = ("dds", "dds3d", "dps", "reddiff", "smc")


# ------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class Group:
    """One scan file of a task: held-out images of one size (size None = native)."""

    name: str
    images: tuple[str, ...]
    size: int | None = None
    mask_key: str = ""                  # MRI mask seed material (default: name)


@dataclass(frozen=True)
class Task:
    name: str
    modality: str                       # mri | ct | image
    label: str
    params: dict[str, Any]
    groups: tuple[Group, ...]


MRI_GROUPS = (Group("anat256", ANAT256), Group("epi128", EPI))
CT_GROUPS = (Group("anat256", (*ANAT256, "camera"), 256), Group("epi128", EPI))
PHOTO_GROUPS = (Group("photo256", sim.PHOTOS, 256),)


def _mri(name, acc, kind, coils, groups=MRI_GROUPS, oversample=1):
    cf = {4: 0.08, 8: 0.04}[acc]
    label = (f"MRI {acc}x {kind} 1D ({cf:.0%} centre), {coils} coils"
             + (f", {oversample}x readout oversampling" if oversample > 1 else ""))
    return Task(name, "mri", label, {"acceleration": acc, "center_fraction": cf,
                                     "mask_kind": kind, "coils": coils, "snr_db": 35.0,
                                     "oversample": oversample}, groups)


def _ct(name, views, range_deg):
    return Task(name, "ct", f"CT {views} views over {range_deg:g} deg",
                {"views": views, "angle_range_deg": range_deg, "noise": 0.02,
                 "mu_max_per_mm": 0.04, "fov_mm": 256.0}, CT_GROUPS)


TASKS: dict[str, Task] = {t.name: t for t in [
    _mri("mri-4x-rand-8c", 4, "random", 8),
    _mri("mri-4x-equi-16c", 4, "equispaced", 16),
    _mri("mri-8x-rand-16c", 8, "random", 16),
    _mri("mri-8x-equi-8c", 8, "equispaced", 8),
    _mri("mri-4x-equi-16c-640", 4, "equispaced", 16, (Group("anat320", ANAT256, 320),), 2),
    _ct("ct-30", 30, 180.0), _ct("ct-8", 8, 180.0), _ct("ct-90deg", 60, 90.0),
    Task("deblur-gauss2", "image", "Gaussian deblur, std 2 px, mirror boundary",
         {"operator": "blur", "width": 2.0, "noise": 0.01}, PHOTO_GROUPS),
    Task("sr-4x", "image", "super-resolution x4, bicubic, mirror boundary",
         {"operator": "superres", "factor": 4, "noise": 0.01}, PHOTO_GROUPS),
]}
QUICK_SIZE = 48  # fastMRI 4x centre at 48 px: 4 lines, the fewest ESPIRiT accepts
QUICK_IMAGE = {"mri": "t1_coronal", "ct": "t1_coronal", "image": "camera"}


def quick_task(task: Task) -> Task:
    """QUICK_SIZE px, one image, 4 coils (the smoke-test version of ``task``)."""
    params = dict(task.params)
    if task.modality == "mri":
        params.update(coils=4, oversample=1)
    label = task.label + f" [quick: {QUICK_SIZE} px, 1 image]"
    return Task(task.name, task.modality, label, params,
                (Group(f"quick{QUICK_SIZE}", (QUICK_IMAGE[task.modality],), QUICK_SIZE),))


def volume_of(image: str) -> str:
    """Source volume of a held-out image (the data range of its PSNR / SSIM)."""
    return "S0_epi" if image.startswith("S0_epi_") else image


def images_label(task: Task) -> str:
    names = [n for g in task.groups for n in g.images]
    epi = [n for n in names if n.startswith("S0_epi_")]
    rest = [n for n in names if n not in epi]
    if epi:
        ks = [int(n.rsplit("_", 1)[1]) for n in epi]
        rest.append(f"S0_epi_{min(ks)}-{max(ks)}" if len(ks) > 1 else epi[0])
    return f"{', '.join(rest)} ({len(names)} slices)"


# ------------------------------------------------------------------------------ rows
@dataclass(frozen=True)
class Row:
    """A ``diffrecon run`` configuration; ``sweep`` = (option, factor, kind) for oracles."""

    name: str
    family: str                          # default | diffusion | classical | external
    solver: str | None = None
    steps: int | None = None
    options: tuple[tuple[str, Any], ...] = ()
    sweep: tuple[str, float, str] | None = None
    full_only: bool = False


def rows_for(task: Task, full: bool) -> list[Row]:
    """The rows of a task, in run order: default, classical (default, oracle), scikit-image
    references, then the diffusion solvers (so an interrupted run has the key comparison)."""
    rows = [Row("default", "default")]
    base = {"mri": ("zero-filled", "cg-sense", "l1-wavelet", "tv"),
            "ct": ("fbp", "cg-sense", "tv"), "image": ("cg-sense", "tv")}[task.modality]
    rows += [Row(b, "classical", b) for b in base]
    for b in base:
        if b == "cg-sense":
            rows.append(Row("cg-sense-oracle", "classical", b, options=(("lam", 0),),
                            sweep=("iters", 2.0, "int")))
        elif b in ("l1-wavelet", "tv"):
            rows.append(Row(f"{b}-oracle", "classical", b, sweep=("lam", math.sqrt(10), "float")))
    if task.modality == "ct":
        rows += [Row("skimage-fbp", "external"), Row("skimage-sart-oracle", "external")]
    if task.params.get("operator") == "superres":
        rows.append(Row("skimage-bicubic", "external"))
    rows += [Row(f"dds-{n}", "diffusion", "dds", n) for n in (25, 50, 100)]
    rows.append(Row("reddiff-100", "diffusion", "reddiff", 100))
    rows += [Row(f"dps-{n}", "diffusion", "dps", n, full_only=True) for n in (200, 1000)]
    rows.append(Row("smc-16", "diffusion", "smc", 50, (("num_particles", 16),), full_only=True))
    return [r for r in rows if full or not r.full_only]


QUICK_ROWS = ("default", "tv", "tv-oracle")


def select(names, patterns: str | None) -> list[str]:
    if not patterns:
        return list(names)
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]


# ------------------------------------------------------------------------------ simulation
def seed_of(*parts: str) -> int:
    """Benchmark seed (>= SEED0) from names: slice seeds from (task, image), MRI mask seeds
    from (task, group), so a subset run (--images) simulates the same slices."""
    return SEED0 + zlib.crc32("/".join(parts).encode()) % 1_000_000


def sim_kwargs(task: Task, group: Group, images: tuple[str, ...]) -> dict[str, Any]:
    p = task.params
    seeds = [seed_of(task.name, i) for i in images]
    if task.modality == "mri":
        return {"coils": p["coils"], "acceleration": p["acceleration"],
                "center_fraction": p["center_fraction"], "mask_kind": p["mask_kind"],
                "snr_db": p["snr_db"], "seeds": seeds, "oversample": p["oversample"],
                "mask_seed": seed_of(task.name, group.mask_key or group.name, "mask")}
    if task.modality == "ct":
        return {"views": p["views"], "angle_range_deg": p["angle_range_deg"],
                "noise": p["noise"], "seeds": seeds, "mu_max_per_mm": p["mu_max_per_mm"]}
    if p["operator"] == "blur":
        return {"width": p["width"], "noise": p["noise"], "seeds": seeds}
    return {"factor": p["factor"], "noise": p["noise"], "seeds": seeds}


def simulate(task: Task, group: Group, imgs: np.ndarray, images: tuple[str, ...],
             noise: bool = True) -> dict[str, Any]:
    kw = sim_kwargs(task, group, images)
    if not noise:
        kw.update({"snr_db": math.inf} if task.modality == "mri" else {"noise": 0.0})
    if task.modality == "mri":
        return sim.simulate_mri(imgs, **kw)
    if task.modality == "ct":
        return sim.simulate_ct(imgs, pixel_mm=task.params["fov_mm"] / imgs.shape[-1], **kw)
    if task.params["operator"] == "blur":
        return sim.simulate_blur(imgs, **kw)
    return sim.simulate_sr(imgs, **kw)


def simulate_group(task: Task, group: Group, out: Path) -> tuple[Path, Path]:
    """Write the scan file and the truth file (reference, image names, volumes) of a group;
    existing files are kept (the simulation is deterministic)."""
    scan = out / "scans" / task.name / f"{group.name}.h5"
    truth = out / "truth" / task.name / f"{group.name}.npz"
    if scan.exists() and truth.exists():
        return scan, truth
    scan.parent.mkdir(parents=True, exist_ok=True)
    truth.parent.mkdir(parents=True, exist_ok=True)
    imgs = np.stack([sim.load_image(n, group.size) for n in group.images])
    s = simulate(task, group, imgs, group.images)
    if task.modality == "mri":
        sim.write_mri(scan, s, acceleration=task.params["acceleration"],
                      patient_id=group.name, pixel_mm=256.0 / imgs.shape[-1])
    elif task.modality == "ct":
        sim.write_ct(scan, s)
    else:
        sim.write_image(scan, s)
    tmp = truth.with_name(truth.stem + f".tmp-{os.getpid()}.npz")
    np.savez(tmp, reference=s["reference"], images=np.asarray(group.images),
             volumes=np.asarray([volume_of(i) for i in group.images]))
    os.replace(tmp, truth)
    return scan, truth


def forward_check(task: Task, group: Group) -> str:
    rel = forward_error(task, group)
    return (f"forward-model check ({group.images[0]}, noise off): ||y_independent - "
            f"A_diffrecon(x)|| / ||A_diffrecon(x)|| = {rel:.1e} (scan stored in float32)")


def forward_error(task: Task, group: Group) -> float:
    """Relative difference between the independent simulation (noise off) of the group's
    first image and diffrecon's own operator applied to the same ground truth (float32
    precision expected: the scan stores float32)."""
    import torch

    imgs = np.stack([sim.load_image(n, group.size) for n in group.images[:1]])
    s, p = simulate(task, group, imgs, group.images[:1], noise=False), task.params
    if task.modality == "mri":
        from diffrecon.operators.mri import mri, tensor_to_kspace

        x = torch.as_tensor(np.stack([s["x"].real, s["x"].imag], 1), dtype=torch.float64)
        phys = mri(s["mask"], torch.as_tensor(s["maps"], dtype=torch.complex128))
        ref, mine = tensor_to_kspace(phys.A(x)), s["kspace"]
    elif task.modality == "ct":
        from diffrecon.operators.ct import ct

        n = s["reference"].shape[-1]
        phys = ct(n, angles=s["angles"], n_detectors=s["sinogram"].shape[-1],
                  dtype=torch.float64)
        y = phys.A(torch.as_tensor(s["reference"][:, None], dtype=torch.float64))
        ref, mine = np.swapaxes(y[:, 0].numpy(), -1, -2), s["sinogram"]
    else:
        import diffrecon.operators as ops

        if p["operator"] == "blur":
            a = s["attrs"]
            phys = ops.blur("gaussian", width=a["kernel_width"], size=a["kernel_size"],
                            boundary=a["boundary"], dtype=torch.float64)
        else:
            phys = ops.superres(p["factor"], img_size=(1, *imgs.shape[-2:]),
                                boundary=s["attrs"]["boundary"], dtype=torch.float64)
        ref = phys.A(torch.as_tensor(imgs[:, None], dtype=torch.float64)).numpy()
        mine = s["measurement"]
    return float(np.linalg.norm(np.asarray(mine) - ref) / np.linalg.norm(ref))


# ------------------------------------------------------------------------------ running
def diffrecon_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "diffrecon"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("diffrecon")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from diffrecon.cli.main import main; "
                                  "sys.exit(main())"]


def run_cli(args: list[str], log: Path, env: dict[str, str]) -> tuple[bool, str]:
    """Run ``diffrecon ARGS``; (ok, last stderr line). Output goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(diffrecon_cmd() + args, capture_output=True, text=True, env=env)
    log.write_text("$ diffrecon " + " ".join(args) + "\n" + proc.stdout + proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return proc.returncode == 0, (lines[-1] if lines else f"exit {proc.returncode}")


@dataclass
class Context:
    out: Path
    env: dict[str, str]
    prior: str | None
    overwrite: bool
    collect: bool = False                # report cached rows only, run nothing
    scans: dict[str, Path] = field(default_factory=dict)
    truths: dict[str, Path] = field(default_factory=dict)
    calib: dict[str, tuple[Path, float]] = field(default_factory=dict)


def calibrate(ctx: Context, task: Task, group: Group) -> tuple[Path, float]:
    """ESPIRiT maps of a multi-coil scan via ``diffrecon calib`` (once); (path, s/slice)."""
    key = f"{task.name}/{group.name}"
    if key in ctx.calib:
        return ctx.calib[key]
    maps = ctx.out / "calib" / task.name / f"{group.name}_maps.h5"
    meta = maps.with_suffix(".json")
    if not (maps.exists() and meta.exists()):
        maps.parent.mkdir(parents=True, exist_ok=True)
        maps.unlink(missing_ok=True)
        proc = subprocess.run(diffrecon_cmd() + ["calib", str(ctx.scans[key]), "-o", str(maps),
                                                 "--json"],
                              capture_output=True, text=True, env=ctx.env)
        if proc.returncode != 0:
            raise RuntimeError(f"diffrecon calib {ctx.scans[key]}: {proc.stderr.strip()}")
        meta.write_text(proc.stdout)
    info = json.loads(meta.read_text())
    info = info[0] if isinstance(info, list) else info
    ctx.calib[key] = (maps, float(info["wall_time_s"]) / len(group.images))
    return ctx.calib[key]


def cli_args(row: Row, ctx: Context, extra: tuple[tuple[str, Any], ...] = ()) -> list[str]:
    args = []
    if row.family != "default":
        args += ["--solver", row.solver]
        if row.steps is not None:
            args += ["--steps", str(row.steps)]
        if row.family == "diffusion" and ctx.prior:
            args += ["--prior", ctx.prior]
    for k, v in (*row.options, *extra):
        args += ["--option", f"{k}={v}"]
    return args


def read_result(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    with h5py.File(path, "r") as f:
        rec = f["reconstruction"][()]
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    return rec, attrs


def score(pred: np.ndarray, truth: Path) -> list[dict[str, Any]]:
    """Per-slice fastMRI PSNR / SSIM with the data range of the slice's source volume."""
    from diffrecon.metrics import psnr, ssim

    t = np.load(truth)
    ref, names, vols = t["reference"], list(t["images"]), list(t["volumes"])
    out = []
    for k, name in enumerate(names):
        vmax = float(max(ref[j].max() for j, v in enumerate(vols) if v == vols[k]))
        g, p = ref[k][None].astype(np.float64), np.asarray(pred[k], np.float64)[None]
        out.append({"image": str(name), "psnr": psnr(g, p, vmax), "ssim": ssim(g, p, vmax)})
    return out


def run_config(ctx: Context, task: Task, row: Row, key: str,
               extra: tuple[tuple[str, Any], ...] = ()) -> dict[str, Any]:
    """Run one CLI configuration on every group of ``task`` (cached in ``<key>.json``)."""
    rdir = ctx.out / "results" / task.name
    cache = rdir / f"{key}.json"
    if cache.exists() and not ctx.overwrite:
        return json.loads(cache.read_text())
    if ctx.collect:
        return {"row": key, "error": "not run (--collect)"}
    slices, secs, prov, t_cli = [], 0.0, {}, time.perf_counter()
    for group in task.groups:
        gkey = f"{task.name}/{group.name}"
        res = rdir / key / f"{group.name}.h5"
        res.parent.mkdir(parents=True, exist_ok=True)
        args = ["run", str(ctx.scans[gkey]), "-o", str(res), "-q", *cli_args(row, ctx, extra)]
        calib_s = 0.0
        if task.modality == "mri" and row.family != "default":
            maps, calib_s = calibrate(ctx, task, group)
            args += ["--coil-maps", str(maps)]
        if ctx.overwrite:
            args.append("--overwrite")
        ok, msg = run_cli(args, ctx.out / "logs" / task.name / f"{key}-{group.name}.log",
                          ctx.env)
        if not ok:
            return {"row": key, "error": msg}
        rec, attrs = read_result(res)
        slices += score(rec, ctx.truths[gkey])
        secs += float(attrs.get("wall_time_s", math.nan)) + calib_s * len(group.images)
        prov = {k: attrs[k] for k in ("solver", "solver_options", "prior", "prior_sha256",
                                      "diffrecon_version", "device") if k in attrs}
    result = {"row": key, "slices": slices, "s_per_slice": secs / len(slices),
              "cli_wall_s": time.perf_counter() - t_cli, "provenance": prov,
              "args": cli_args(row, ctx, extra)}
    result.update(summarise(slices))
    cache.write_text(json.dumps(result, indent=1, default=str))
    return result


def options_of(result: dict[str, Any]) -> dict[str, Any]:
    """The solver options a result ran with (its provenance), {} when unknown."""
    opts = result.get("provenance", {}).get("solver_options") or "{}"
    try:
        return json.loads(opts) if isinstance(opts, str) else dict(opts)
    except (ValueError, TypeError):
        return {}


def summarise(slices: list[dict]) -> dict[str, float]:
    return {"psnr": float(np.mean([s["psnr"] for s in slices])),
            "ssim": float(np.mean([s["ssim"] for s in slices]))}


def default_value(row: Row, base: dict[str, Any]) -> float:
    """Centre of an oracle sweep: the value the default run used (its provenance)."""
    v = options_of(base).get(row.sweep[0])
    if isinstance(v, int | float) and not isinstance(v, bool) and v > 0:
        return float(v)
    from diffrecon.recon import solver_class

    v = getattr(solver_class(row.solver).Options(), row.sweep[0])
    if isinstance(v, int | float) and not isinstance(v, bool) and v > 0:
        return float(v)
    return {"lam": 1e-3, "iters": 30}[row.sweep[0]]


def log_sweep(evaluate, centre: float, factor: float, *, integer: bool = False,
              side: int = 2, max_extend: int = 4) -> tuple[float, dict[float, float]]:
    """Maximise ``evaluate(value)`` over centre * factor^j, j = -side..side, extending the
    grid one step at a time (at most ``max_extend`` steps) while the best value is at an
    edge. Integer grids are rounded (>= 1) and deduplicated. Returns (best value, {value:
    score}); a None score (failed run) counts as -inf."""
    def value(j):
        v = centre * factor ** j
        return max(1, int(round(v))) if integer else float(f"{v:.3g}")

    scores: dict[float, float] = {}

    def ev(j):
        v = value(j)
        if v not in scores:
            s = evaluate(v)
            scores[v] = -math.inf if s is None else s
        return scores[v]

    lo, hi = -side, side
    for j in range(lo, hi + 1):
        ev(j)
    for _ in range(max_extend):
        best = max(scores, key=scores.get)
        if best == value(lo) and not (integer and value(lo) == 1):
            lo -= 1
            ev(lo)
        elif best == value(hi):
            hi += 1
            ev(hi)
        else:
            break
    return max(scores, key=scores.get), scores


def run_oracle(ctx: Context, task: Task, row: Row, base: dict[str, Any], quick: bool
               ) -> dict[str, Any]:
    name, factor, kind = row.sweep
    centre = default_value(row, base) if "error" not in base else default_value(row, {})
    used = options_of(base)
    same = all(used.get(k) == v for k, v in row.options)  # default run = a sweep point?
    runs: dict[float, dict] = {}

    def evaluate(v):
        if same and "error" not in base and used.get(name) == v:
            r = dict(base, result_key=row.solver)
        else:
            key = f"{row.solver}@{name}={v}"
            r = dict(run_config(ctx, task, row, key, ((name, v),)), result_key=key)
        runs[v] = r
        return r.get("psnr")

    best, scores = log_sweep(evaluate, centre, factor, integer=kind == "int", side=1,
                             max_extend=0 if quick else 4)
    out = dict(runs[best])
    if "error" in out:
        return {"row": row.name, "error": out["error"]}
    if any("error" in r for r in runs.values()):
        out["partial"] = sorted(str(v) for v, r in runs.items() if "error" in r)
    out.update(row=row.name, oracle={name: best}, sweep={str(k): v for k, v in scores.items()},
               sweep_s_per_slice=sum(r.get("s_per_slice", 0.0) for r in runs.values()))
    return out


# ------------------------------------------------------------------------------ skimage rows
def run_external(ctx: Context, task: Task, row: Row) -> dict[str, Any]:
    """In-process scikit-image references (CT FBP / SART, SR bicubic), cached like rows.
    SART: iterations 1..SART_ITERS (relaxation 0.15), the best mean PSNR over the task (oracle);
    its s/slice is the time of that many iterations."""
    from skimage.transform import iradon, iradon_sart, resize

    rdir = ctx.out / "results" / task.name
    cache = rdir / f"{row.name}.json"
    if cache.exists() and not ctx.overwrite:
        return json.loads(cache.read_text())
    if ctx.collect:
        return {"row": row.name, "error": "not run (--collect)"}
    rdir.mkdir(parents=True, exist_ok=True)
    secs, preds = 0.0, {}              # group -> (iterations or 1, S, ...) predictions
    for group in task.groups:
        gkey = f"{task.name}/{group.name}"
        with h5py.File(ctx.scans[gkey], "r") as f:
            data = f["sinogram" if task.modality == "ct" else "measurement"][()]
            theta = np.rad2deg(f["angles"][()]) if task.modality == "ct" else None
        ref = np.load(ctx.truths[gkey])["reference"]
        t0 = time.perf_counter()
        if row.name == "skimage-fbp":
            pred = [np.stack([iradon(s.T.astype(np.float64), theta, output_size=ref.shape[-1],
                                     filter_name="ramp", circle=False) for s in data])]
        elif row.name == "skimage-bicubic":
            pred = [np.stack([resize(y.astype(np.float64), ref.shape[1:], order=3,
                                     mode="reflect", anti_aliasing=False) for y in data])]
        else:  # SART works on radon's zero-padded D x D grid: crop back to N x N
            n, d = ref.shape[-1], data.shape[-1]
            crop = slice(d // 2 - n // 2, d // 2 - n // 2 + n)
            pred, cur = [], [None] * len(data)
            for _ in range(SART_ITERS):
                cur = [iradon_sart(s.T.astype(np.float64), theta, image=c)
                       for s, c in zip(data, cur, strict=True)]
                pred.append(np.stack(cur)[:, crop, crop])
        secs += time.perf_counter() - t0
        preds[group.name] = pred
    runs = {it: [s for g in task.groups for s in score(preds[g.name][it], ctx.truths[
        f"{task.name}/{g.name}"])] for it in range(len(preds[task.groups[0].name]))}
    means = {it: summarise(v)["psnr"] for it, v in runs.items()}
    best = max(means, key=means.get)
    for g in task.groups:
        np.save(rdir / f"{row.name}-{g.name}.npy", preds[g.name][best].astype(np.float32))
    n = sum(len(g.images) for g in task.groups)
    result = {"row": row.name, "slices": runs[best], "provenance": {"solver": row.name},
              "s_per_slice": secs / n * (best + 1) / len(means), **summarise(runs[best])}
    if len(means) > 1:
        result.update(oracle={"iterations": best + 1},
                      sweep={str(it + 1): v for it, v in means.items()})
    cache.write_text(json.dumps(result, indent=1, default=str))
    return result


# ------------------------------------------------------------------------------ one task
def same_as_default(row: Row, base: dict[str, Any], prior: str | None) -> bool:
    """True when ``row`` would repeat the default run (same solver, steps, prior)."""
    if row.family != "diffusion" or row.options or prior or "error" in base:
        return False
    return (base.get("provenance", {}).get("solver") == row.solver
            and options_of(base).get("steps") == row.steps)


def run_row(ctx: Context, task: Task, row: Row, done: dict[str, dict], quick: bool
            ) -> dict[str, Any]:
    if row.family == "external":
        return run_external(ctx, task, row)
    if row.sweep is not None:
        base = done.get(row.solver) or run_config(ctx, task, Row(row.solver, "classical",
                                                                 row.solver), row.solver)
        return run_oracle(ctx, task, row, base, quick)
    if row.family != "default" and same_as_default(row, done.get("default", {}), ctx.prior):
        return dict(done["default"], row=row.name, same_as="default")
    return run_config(ctx, task, row, row.name)


def run_task(ctx: Context, task: Task, rows: list[Row], quick: bool) -> dict[str, Any]:
    notes = []
    for group in task.groups:
        key = f"{task.name}/{group.name}"
        ctx.scans[key], ctx.truths[key] = simulate_group(task, group, ctx.out)
    try:
        notes.append(forward_check(task, task.groups[-1]))
    except Exception as exc:  # noqa: BLE001 - a failed check is reported, not fatal
        notes.append(f"forward-model check failed: {exc}")
    results: dict[str, dict] = {}
    done = {}
    for row in rows:
        t0 = time.perf_counter()
        try:
            r = run_row(ctx, task, row, done, quick)
        except Exception as exc:  # noqa: BLE001 - one broken row must not stop the table
            r = {"row": row.name, "error": f"{type(exc).__name__}: {exc}"}
        done[row.name] = results[row.name] = r
        status = r.get("error") or f"{r['psnr']:.2f} dB"
        print(f"[{task.name}] {row.name}: {status} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    if "fbp" in results and "skimage-fbp" in results:
        notes.append(fbp_consistency(ctx, task))
    return {"task": task, "rows": results, "notes": notes}


def fbp_consistency(ctx: Context, task: Task) -> str:
    """PSNR of diffrecon ``--solver fbp`` against skimage iradon on the same sinograms."""
    from diffrecon.metrics import psnr

    vals = []
    for group in task.groups:
        rec, _ = read_result(ctx.out / "results" / task.name / "fbp" / f"{group.name}.h5")
        sk = np.load(ctx.out / "results" / task.name / f"skimage-fbp-{group.name}.npy")
        vals += [psnr(s[None], r[None]) for s, r in zip(sk, rec, strict=True)]
    return (f"FBP consistency: PSNR(diffrecon fbp vs skimage iradon ramp, same sinograms) "
            f"= {np.mean(vals):.1f} dB (min {np.min(vals):.1f})")


# ------------------------------------------------------------------------------ report
def row_label(r: dict[str, Any]) -> str:
    prov = r.get("provenance", {})
    if r["row"] == "default":
        opts = options_of(r)
        steps = f" {opts['steps']}" if "steps" in opts else ""
        prior = f", {prov['prior']}" if prov.get("prior", "none") != "none" else ""
        return f"default ({prov.get('solver', '?')}{steps}{prior})"
    if "oracle" in r:
        (k, v), = r["oracle"].items()
        missing = f"; {k}={','.join(r['partial'])} failed / not run" if r.get("partial") else ""
        return f"{r['row']} ({k}={v}{missing})"
    if r.get("same_as"):
        return f"{r['row']} (= default)"
    return r["row"]


def family(r: dict[str, Any], rows: list[Row]) -> str:
    """diffusion | classical | external; the default row by the solver it ran."""
    if r["row"] == "default":
        solver = r.get("provenance", {}).get("solver")
        return "diffusion" if solver in DIFFUSION else "classical"
    return next((x.family for x in rows if x.name == r["row"]), "classical")


def best_of(results: dict, rows: list[Row], fam: tuple[str, ...],
            only: str | None = None) -> tuple[str, float] | None:
    """(row, PSNR) of the best row of the families ``fam`` (or just row ``only``)."""
    cands = [(k, r["psnr"]) for k, r in results.items() if "error" not in r
             and family(r, rows) in fam and (only is None or k == only)]
    return max(cands, key=lambda kv: kv[1]) if cands else None


def report(done: list[dict], rows_of: dict[str, list[Row]], argv: list[str], quick: bool,
           prior: str | None) -> str:
    import platform

    import torch

    held = "; ".join(f"{k}: {v}" for k, v in sim.HELD_OUT.items())
    lines = [
        "## Held-out independent benchmark (`benchmarks/external.py`)", "",
        f"Held-out TEST images (never used for training, tuning or selection): {held}. "
        "Scans simulated by `benchmarks/_external_sim.py` (numpy / scipy / sigpy / "
        "scikit-image only; no ground truth or coil maps in the files). CT: MR images and "
        "`camera` used as attenuation maps (no real CT outside the reserved packages). "
        "Oracle rows pick one value per task on these test images (favours the baselines).",
        "",
        f"`python -m benchmarks.external {' '.join(argv)}`; {datetime.date.today()}, "
        f"{platform.processor() or platform.machine()}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}"
        + (f", diffusion rows --prior {prior}" if prior else "") + ". "
        "PSNR / SSIM: fastMRI definitions (data range = max of the reference volume), mean "
        "over slices; s/slice from the result provenance.", "",
        "| task | held-out images | row | PSNR | SSIM | s/slice |",
        "|---|---|---|---|---|---|",
    ]
    summary = ["| task | default run | best diffusion | best classical (oracle) | "
               "best diffusion - best classical | default - best classical |",
               "|---|---|---|---|---|---|"]
    notes = []
    for d in done:
        task, res, rows = d["task"], d["rows"], rows_of[d["task"].name]
        first = True
        for r in res.values():
            cells = [f"{task.name}" if first else "", images_label(task) if first else ""]
            first = False
            if "error" in r:
                lines.append("| " + " | ".join(cells + [r["row"], f"failed: {r['error']}",
                                                        "", ""]) + " |")
                continue
            lines.append("| " + " | ".join(cells + [
                row_label(r), f"{r['psnr']:.2f}", f"{r['ssim']:.3f}",
                f"{r['s_per_slice']:.1f}"]) + " |")
        bdef = best_of(res, rows, ("diffusion", "classical"), only="default")
        bd = best_of(res, rows, ("diffusion",))
        bc = best_of(res, rows, ("classical", "external"))

        def fmt(b):
            return "-" if b is None else f"{b[0]} {b[1]:.2f}"

        def diff(a, b):
            return "-" if a is None or b is None else f"{a[1] - b[1]:+.2f} dB"

        summary.append(f"| {task.name} | {fmt(bdef)} | {fmt(bd)} | {fmt(bc)} | {diff(bd, bc)} "
                       f"| {diff(bdef, bc)} |")
        notes += [f"- {task.name} ({task.label}): {n}" for n in d["notes"]]
    lines += ["", "### Default run and best diffusion vs best classical (oracle)", "",
              *summary]
    if notes:
        lines += ["", "### Checks", "", *notes]
    if quick:
        lines += ["", "(--quick: 48 px smoke run, numbers not meaningful)"]
    return "\n".join(lines) + "\n"


def figure(ctx: Context, d: dict, rows: list[Row], png: Path) -> None:
    """First slice of each group: reference, default run, best classical, |error| maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, res = d["task"], d["rows"]
    bc = best_of(res, rows, ("classical", "external"))
    picks = [("default", res.get("default"))]
    if bc is not None:
        picks.append((bc[0], res[bc[0]]))
    fig, axes = plt.subplots(len(task.groups), 1 + 2 * len(picks),
                             figsize=(2.2 * (1 + 2 * len(picks)), 2.3 * len(task.groups)),
                             squeeze=False)
    for gi, group in enumerate(task.groups):
        ref = np.load(ctx.truths[f"{task.name}/{group.name}"])["reference"][0]
        ref = ref.reshape(ref.shape[-2:])
        vmax = float(ref.max())
        ax = axes[gi]
        ax[0].imshow(ref, cmap="gray", vmin=0, vmax=vmax)
        ax[0].set_title(f"reference\n{group.images[0]}", fontsize=7)
        for j, (name, r) in enumerate(picks):
            img = load_prediction(ctx, task, group, name, r)
            for a in (ax[1 + j], ax[1 + len(picks) + j]):
                a.set_xticks([])
                a.set_yticks([])
            if img is None:
                continue
            img = img.reshape(ref.shape)
            ax[1 + j].imshow(img, cmap="gray", vmin=0, vmax=vmax)
            ax[1 + j].set_title(f"{row_label(r)}\n{r['slices'][0]['psnr']:.1f} dB", fontsize=7)
            ax[1 + len(picks) + j].imshow(np.abs(img - ref), cmap="magma", vmin=0,
                                          vmax=0.25 * vmax)
            ax[1 + len(picks) + j].set_title(f"|error| {name}\n(0-25% of max)", fontsize=7)
        ax[0].set_xticks([])
        ax[0].set_yticks([])
    fig.tight_layout()
    tmp = png.with_name(png.stem + f".tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=70)
    plt.close(fig)
    os.replace(tmp, png)


def load_prediction(ctx: Context, task: Task, group: Group, name: str,
                    r: dict | None) -> np.ndarray | None:
    if r is None or "error" in r:
        return None
    rdir = ctx.out / "results" / task.name
    if r.get("same_as"):
        name = r["same_as"]
    key = r.get("result_key", name)
    h5 = rdir / key / f"{group.name}.h5"
    if h5.exists():
        return read_result(h5)[0][0]
    npy = rdir / f"{name}-{group.name}.npy"
    return np.load(npy)[0] if npy.exists() else None


# ------------------------------------------------------------------------------ main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="48 px smoke run (1 image per task, "
                    "rows default / tv / tv-oracle unless --rows)")
    ap.add_argument("--full", action="store_true", help="add dps-200, dps-1000, smc-16")
    ap.add_argument("--tasks", help=f"comma-separated fnmatch patterns of {', '.join(TASKS)}")
    ap.add_argument("--rows", help="comma-separated fnmatch patterns of row names")
    ap.add_argument("--images", help="comma-separated held-out image names to keep "
                    f"({', '.join(sim.ANATOMY + sim.PHOTOS)})")
    ap.add_argument("--prior", help="prior passed to the diffusion rows (not to default)")
    ap.add_argument("--out", type=Path, default=Path("external_results"))
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the diffrecon runs "
                    "(default: inherited)")
    ap.add_argument("--overwrite", action="store_true", help="redo cached rows")
    ap.add_argument("--collect", action="store_true", help="only tabulate the cached rows "
                    "(e.g. while another process still runs); nothing is computed")
    return ap.parse_args(argv)


def main(argv=None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    names = select(TASKS, a.tasks)
    if not names:
        raise SystemExit(f"external.py: --tasks {a.tasks!r} matches none of "
                         f"{', '.join(TASKS)}")
    if a.quick and not a.tasks:
        names = ["mri-4x-rand-8c", "ct-30", "deblur-gauss2"]
    env = dict(os.environ)
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    a.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(a.out.resolve(), env, a.prior, a.overwrite and not a.collect, a.collect)
    done, rows_of = [], {}
    for name in names:
        task = quick_task(TASKS[name]) if a.quick else TASKS[name]
        if a.images:
            keep = {s.strip() for s in a.images.split(",")}
            groups = tuple(Group(g.name, tuple(i for i in g.images if i in keep), g.size)
                           for g in task.groups)
            groups = tuple(g for g in groups if g.images)
            if not groups:
                continue
            task = Task(task.name, task.modality, task.label, task.params,
                        tuple(Group(g.name + "-" + "-".join(g.images), g.images, g.size,
                                    g.mask_key or g.name) for g in groups))
        rows = rows_for(task, a.full)
        pats = a.rows or (",".join(QUICK_ROWS) if a.quick else None)
        rows = [r for r in rows if r.name in select([x.name for x in rows], pats)]
        rows_of[task.name] = rows
        d = run_task(ctx, task, rows, a.quick)
        figure(ctx, d, rows, ctx.out / f"{task.name}.png")
        done.append(d)
    text = report(done, rows_of, argv, a.quick, a.prior)
    (ctx.out / "table.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
