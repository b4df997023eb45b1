"""SMC's "dds" proposal on held-out MRI 4x scans: lineages, ESS and image quality against DDS
at the same denoiser calls per particle (issue 17).

    nice -n 15 env OMP_NUM_THREADS=1 python -m benchmarks.smc_images [--split test]
        [--size 64] [--slices 2] [--particles 16 32 64] [--steps 50] [--draws 4]
        [--option name=value ...] [--quick] [--out DIR]

Task: ``benchmarks.external``'s mri-4x-rand-8c (8 coils, random 1D 4x, 8% centre, 35 dB),
simulated by ``_external_tasks.simulate_group`` at ``--size`` px (64 by default: at 128 px
one 64-particle run costs ~40 min of a shared 2-core CPU), the shipped ``mri`` prior.
Splits: ``test`` = dipy ``S0_10slices`` b0 EPI slices 2, 3, ... (TEST split of
benchmarks/external; never tuned on); ``validation`` = dipy ``aniso_vox`` slices 10, 13, ...
(``_coverage_pool.load_slice``; the split the steering constants were checked on).
PSNR / SSIM: magnitude images (the result file's), data range of the slice's source volume
(``_external_runs.score``).

Rows per slice: DDS with ``--draws`` draws of ``--steps`` steps (seed 0): "1 draw" is its
first draw, "mean of K" the mean of all; SMC ``proposal=dds`` with N particles of
``--steps`` steps (seed 0), the weighted mean. Columns: PSNR, SSIM (mean over slices),
final lineages (distinct time-0 ancestors, min over slices), min ESS over the steps, the
number of resampling steps (mean), the coverage of mean +- 1.645 std and std / RMSE over
foreground pixels (``spread``; the SMC std is the weighted particle std) and wall time per
slice. NFE per particle = steps for every row.
``--quick``: one 48 px TEST slice, 5 steps, N = 4 and 8 (a smoke test; numbers meaningless).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from benchmarks import _coverage_pool as pool
from benchmarks import _external_sim as sim
from benchmarks._external_runs import score
from benchmarks._external_tasks import EPI, TASKS, Group, quick_task, simulate_group
from benchmarks.common import markdown_table

TASK = "mri-4x-rand-8c"
VALIDATION = tuple(f"aniso_vox_{k}" for k in (10, 13, 16, 8, 12))
COLUMNS = ["split", "slices", "method", "N / draws", "PSNR", "SSIM", "lineages (min)",
           "min ESS", "resamplings", "coverage 90%", "std / RMSE", "wall s / slice"]


def scan_for(split: str, size: int, slices: int, out: Path, quick: bool) -> tuple[Path, Path]:
    """(scan, truth npz) of the split, simulated once under ``out``."""
    task = TASKS[TASK]
    if quick:
        task = quick_task(task)
        return simulate_group(task, task.groups[0], out)
    if split == "test":
        return simulate_group(task, Group(f"epi{size}", EPI[:slices], size), out)
    from benchmarks._external_tasks import sim_kwargs

    names = VALIDATION[:slices]
    scan, truth = out / "scans" / f"validation{size}.h5", out / "truth" / f"validation{size}.npz"
    if scan.exists() and truth.exists():
        return scan, truth
    scan.parent.mkdir(parents=True, exist_ok=True)
    truth.parent.mkdir(parents=True, exist_ok=True)
    imgs = np.stack([pool.load_slice(n.replace("aniso_vox_", "aniso_"), size) for n in names])
    s = sim.simulate_mri(imgs, **sim_kwargs(task, Group("validation", names, size), names))
    sim.write_mri(scan, s, acceleration=4, patient_id="val", pixel_mm=256.0 / size)
    np.savez(truth, reference=s["reference"], images=np.asarray(names),
             volumes=np.asarray([n.rsplit("_", 1)[0] for n in names]))
    return scan, truth


def images(problem, recs) -> tuple[np.ndarray, np.ndarray]:
    """(slices, H, W) magnitude mean and std images in scan units, as a result file stores
    them."""
    from diffrecon.pipeline.results import slice_result

    means, stds = [], []
    for k, rec in enumerate(recs):
        support = problem.supports[k] if problem.supports else None
        r = slice_result(rec, problem.normalisers[k], False, support)
        means.append(problem.scan_image(r["mean"])[0])
        stds.append(problem.scan_image(r["std"], std=True)[0])
    return np.stack(means), np.stack(stds)


def spread(truth: Path, mean: np.ndarray, std: np.ndarray) -> dict:
    """Coverage of mean +- 1.645 std (nominal 90% for a Gaussian) and std / RMSE over the
    pixels above 5% of each slice's reference maximum (``metrics.coverage_report``)."""
    from diffrecon.metrics import coverage_report

    ref = np.load(truth)["reference"].astype(np.float64)
    mask = ref > 0.05 * ref.reshape(len(ref), -1).max(1)[:, None, None]
    rep = coverage_report(ref, mean - 1.645 * std, mean + 1.645 * std, mean, std, mask)
    return {"coverage 90%": rep["coverage"], "std / RMSE": rep["std_rmse"]}


def run(a) -> list[dict]:
    import torch

    from diffrecon import priors
    from diffrecon.problems import load_problem
    from diffrecon.recon import get_solver
    from diffrecon.recon.reconstruction import Reconstruction

    torch.set_num_threads(1)
    scan, truth = scan_for(a.split, a.size, a.slices, a.out, a.quick)
    prior = priors.load("mri")
    problem = load_problem(scan, prior)
    n_slices = len(problem.measurements)
    extra = dict(kv.split("=", 1) for kv in a.option)
    extra = {k: (v if not v.replace(".", "", 1).isdigit() else float(v)) for k, v in
             extra.items()}
    rows, label = [], f"{n_slices} x {problem.measurements[0].shape[-1]} px"

    def solve(name, **kw):
        recs, infos, t0 = [], [], time.perf_counter()
        for k in range(n_slices):
            solver = get_solver(name, steps=a.steps, **kw)
            rec = solver.solve(problem.measurements[k], problem.physics[k], prior,
                               num_samples=a.draws if name == "dds" else 1, seed=[(0, k)])
            recs.append(rec)
            infos.append(rec.info)
        return recs, infos, (time.perf_counter() - t0) / n_slices

    def row(method, count, recs, infos, wall):
        mean, std = images(problem, recs)
        sc = score(mean, truth)
        r = {"split": a.split if not a.quick else "test (quick)", "slices": label,
             "method": method, "N / draws": count,
             "PSNR": float(np.mean([s["psnr"] for s in sc])),
             "SSIM": float(np.mean([s["ssim"] for s in sc])),
             "lineages (min)": "—", "min ESS": "—", "resamplings": "—",
             "wall s / slice": wall, "coverage 90%": "—", "std / RMSE": "—"}
        if count > 1:
            r.update(spread(truth, mean, std))
        if "lineages" in infos[0]:
            r.update({"lineages (min)": min(i["lineages"][0] for i in infos),
                      "min ESS": min(min(e[0] for e in i["ess"]) for i in infos),
                      "resamplings": float(np.mean([i["resampling_steps"][0] for i in infos]))})
        rows.append(r)
        print(markdown_table([r], COLUMNS).splitlines()[-1], flush=True)

    recs, infos, wall = solve("dds")
    first = [Reconstruction.from_samples(r.samples[:1]) for r in recs]
    row("dds, 1 draw", 1, first, infos, wall / a.draws)
    row(f"dds, mean of {a.draws} draws", a.draws, recs, infos, wall)
    for n in a.particles:
        recs, infos, wall = solve("smc", proposal="dds", num_particles=n,
                                  chunk_size=min(n, a.chunk), **extra)
        row("smc dds", n, recs, infos, wall)
    return rows


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=("test", "validation"), default="test")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--slices", type=int, default=2)
    ap.add_argument("--particles", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=16, help="SMC chunk_size cap")
    ap.add_argument("--option", action="append", default=[],
                    help="extra SMC option name=value (validation tuning)")
    ap.add_argument("--out", type=Path, default=Path("smc_images_results"))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.draws, a.particles, a.slices = 5, 2, [4, 8], 1
    rows = run(a)
    text = "## SMC dds proposal vs DDS on MRI 4x\n\n" + markdown_table(rows, COLUMNS)
    print("\n" + text)
    return text


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
