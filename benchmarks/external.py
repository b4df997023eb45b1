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

Code: ``_external_tasks`` (the task table, the rows, the simulation of each scan),
``_external_runs`` (running the rows, oracle sweeps, scores), ``_external_report`` (tables,
figures); this module parses the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks import _external_sim as sim
from benchmarks._external_report import figure, report
from benchmarks._external_runs import Context, log_sweep, run_task
from benchmarks._external_tasks import (
    QUICK_ROWS,
    TASKS,
    Group,
    Task,
    forward_error,
    quick_task,
    rows_for,
    select,
)

__all__ = ["TASKS", "Group", "Task", "forward_error", "log_sweep", "main", "quick_task"]


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
