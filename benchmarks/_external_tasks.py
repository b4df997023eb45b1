"""The held-out benchmark's task table (``benchmarks/external.py``): tasks and their
scan groups, the rows (``diffrecon run`` configurations) run on each, and the simulation
of each group's scan and truth files by ``_external_sim`` (with the check that diffrecon's
own operator gives the same measurement)."""

from __future__ import annotations

import fnmatch
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _external_sim as sim

SEED0 = 1000
EPI = tuple(f"S0_epi_{k}" for k in range(2, 8))
ANAT256 = ("t1_coronal", "s1045_sagittal")


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
