"""Self-tuning classical baselines vs their own oracle weight on independently simulated scans.

    python -m benchmarks.baselines_auto [--quick] [--split val|test] [--size 128]
                                        [--tasks mri-4x ct-8 ...] [--timing] [--out DIR]

Scans are simulated with sigpy / scikit-image / numpy only (nothing from diffrecon's
simulators): MRI = magnitude image x smooth random phase, sigpy birdcage coils (NOT given to
the solvers: ESPIRiT maps estimated from the undersampled data, as ``diffrecon run`` does),
numpy 1D masks with a fully sampled centre, complex Gaussian k-space noise; CT = scikit-image
``radon`` sinograms (parallel beam) + Gaussian noise; deblurring = scikit-image Gaussian
filter (periodic boundary) + noise; SR x4 = scikit-image ``downscale_local_mean`` (box) +
noise. The solvers get ``physics.noise_model.sigma`` as the pipeline gives it: MRI noise
estimated from outer k-space (``kspace_noise_sigma``) floored by the model-mismatch level
(``model_mismatch_sigma``); CT / images the true noise std (the file attribute).

Images (``--split``, see the coordinator's splits): ``val`` = MNI152 T1 slices, dipy
``test_piesno`` / ``aniso_vox`` slices (MRI, CT) and scikit-image photographs coins, moon,
brick, cell, page (deblur, SR); ``test`` = dipy ``t1_coronal_slice``, ``S0_10slices``
slices 2..7, matplotlib ``s1045.ima.gz`` (MRI, CT: no real CT outside the reserved packages,
so anatomy images serve as attenuation maps) and photographs camera, astronaut, chelsea,
china (grey). PSNR: fastMRI's definition (data range = max of the reference) on the
magnitude (MRI, reference = RSS of the fully sampled coil images) or the image.

For every tunable baseline (cg-sense, l1-wavelet, tv) the table gives the auto weight's PSNR,
the oracle PSNR (best of a log sweep of ``lam``, factor sqrt 2 around the best; for
cg-sense the best stopping iteration), their gap, and the reference method (zero-filled for
MRI, FBP for CT, the measurement / box upsampling for deblur / SR).

Code: ``_baselines_scans`` (the images and the simulated scans); this module runs the
baselines, their oracles and the tables.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._baselines_scans import (
    Case,
    anatomy_images,
    column_mask,
    ct_case,
    deblur_case,
    mri_case,
    photo_images,
    sr_case,
)
from benchmarks.common import arguments, header, setup

# ----------------------------------------------------------------------------- tasks
TASKS = {  # name: (modality, builder(image name, image, noise, seed), noise levels)
    "mri-4x": ("mri", lambda k, a, s, seed: mri_case(k, a, coils=8, accel=4, kind="random",
                                                     noise=s, seed=seed, task="mri-4x"),
               (0.0, 0.01, 0.03)),
    "mri-8x": ("mri", lambda k, a, s, seed: mri_case(k, a, coils=16, accel=8,
                                                     kind="equispaced", noise=s, seed=seed,
                                                     task="mri-8x"), (0.0, 0.01)),
    "ct-30": ("ct", lambda k, a, s, seed: ct_case(k, a, views=30, angle_range=180, noise=s,
                                                  seed=seed, task="ct-30"), (0.0, 0.01)),
    "ct-8": ("ct", lambda k, a, s, seed: ct_case(k, a, views=8, angle_range=180, noise=s,
                                                 seed=seed, task="ct-8"), (0.0, 0.01)),
    "ct-limited": ("ct", lambda k, a, s, seed: ct_case(k, a, views=45, angle_range=90,
                                                       noise=s, seed=seed, task="ct-limited"),
                   (0.0, 0.01)),
    "deblur": ("photo", lambda k, a, s, seed: deblur_case(k, a, width=2.0, noise=s, seed=seed,
                                                          task="deblur"), (0.005, 0.02)),
    "sr-4x": ("photo", lambda k, a, s, seed: sr_case(k, a, factor=4, noise=s, seed=seed,
                                                     task="sr-4x"), (0.005, 0.02)),
}
BASELINES = {"mri": ("cg-sense", "l1-wavelet", "tv"), "ct": ("cg-sense", "tv"),
             "photo": ("cg-sense", "tv")}


def _solver(name: str, **options):
    from diffrecon.recon import solver_class

    return solver_class(name)(**options)


def run_auto(case: Case, name: str) -> dict:
    """The baseline with its defaults (auto weight): PSNR, time and the tuning info."""
    t0 = time.perf_counter()
    rec = _solver(name).solve(case.y, case.physics)
    info = {k: rec.info[k] for k in ("lam", "lam_rule", "inner_solves", "lam_search",
                                     "residual_target", "sigma_used", "ls_residual",
                                     "stop_iteration", "stop_rule") if k in rec.info}
    return {"psnr": case.score(rec.mean), "time_s": time.perf_counter() - t0,
            "residual": rec.info["residual"][0], **info}


def oracle(case: Case, name: str, auto: dict, cap: int = 60) -> dict:
    """Best PSNR over the baseline's own regularisation parameter: every CG iteration up to
    ``cap`` (cg-sense), else lam on a factor-4 grid around the auto weight (extended while
    the best is at an edge), refined by factors 2 (at most 11 solves)."""
    from diffrecon.recon.common import cg, normal_operator, relative_residual

    if name == "cg-sense":
        from diffrecon.recon.tuning import MRI_RULE, residual_target

        scores, residuals = [], []
        normal = normal_operator(case.physics)

        def record(x):
            scores.append(case.score(x))
            residuals.append(float(relative_residual(case.physics, x, case.y)[0]))
            return torch.zeros(x.shape[0], dtype=torch.bool)

        with torch.no_grad():
            cg(normal, case.physics.A_adjoint(case.y), iters=cap, stop=record)
        k = int(np.argmax(scores))
        t = residual_target(case.physics, case.y, tau=1.0, kappa=MRI_RULE["kappa"])
        return {"psnr": scores[k], "iterations": k + 1, "path_psnr": scores,
                "path_residual": residuals, "sigma_hat_capped": t.sigma[0],
                "ls_residual": t.ls_residual[0]}
    tried: dict[float, tuple[float, float]] = {}

    def at(lam: float) -> float:
        if lam not in tried:
            rec = _solver(name, lam=lam).solve(case.y, case.physics)
            tried[lam] = (case.score(rec.mean), float(relative_residual(
                case.physics, rec.mean, case.y)[0]))
        return tried[lam][0]

    lam0 = auto["lam"][0]
    for lam in (lam0 / 4, lam0, lam0 * 4):
        at(lam)
    for _ in range(4):  # extend while the best is at an edge
        best = max(tried, key=lambda v: tried[v][0])
        if best == min(tried):
            at(best / 4)
        elif best == max(tried):
            at(best * 4)
        else:
            break
    best = max(tried, key=lambda v: tried[v][0])
    for f in (2.0, 0.5):
        at(best * f)
    best = max(tried, key=lambda v: tried[v][0])
    return {"psnr": tried[best][0], "lam": best, "residual": tried[best][1],
            "sweep": sorted((v, p, r) for v, (p, r) in tried.items())}


def evaluate(split: str, size: int, tasks, images: int, seed0: int = 1000,
             json_path: Path | None = None) -> list[dict]:
    """Run every task x image x noise level; one dict per (case, baseline), also written to
    ``json_path`` after each row."""
    rows = []
    anat, photos = anatomy_images(split, size), photo_images(split, size)
    for task in tasks:
        modality, build, levels = TASKS[task]
        pool = photos if modality == "photo" else anat
        for i, (image, arr) in enumerate(pool[:images]):
            for j, noise in enumerate(levels):
                case = build(image, arr, noise, seed0 + 100 * i + j)
                for name in BASELINES[modality]:
                    auto = run_auto(case, name)
                    best = oracle(case, name, auto)
                    rows.append({"task": task, "image": image, "noise": noise,
                                 "reference": case.reference[0],
                                 "reference_psnr": case.reference[1], "baseline": name,
                                 "auto": auto, "oracle": best})
                    print(f"  {task} {image} noise {noise}: {name} auto {auto['psnr']:.2f} "
                          f"oracle {best['psnr']:.2f} ({case.reference[0]} "
                          f"{case.reference[1]:.2f}) {auto['time_s']:.1f} s",
                          file=sys.stderr, flush=True)
                    if json_path is not None:
                        import json

                        json_path.write_text(json.dumps(rows, indent=1, default=float))
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per case x baseline, then per-task summaries."""
    out = ["| task | image | noise | reference | baseline | auto | oracle | auto - oracle | "
           "auto - reference | lam / stop (auto) | solves | s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, o = r["auto"], r["oracle"]
        how = (f"{a['stop_rule'][0]} @ {a['stop_iteration'][0]} (oracle {o['iterations']})"
               if "stop_rule" in a else
               f"{a['lam'][0]:.2g} ({a['lam_rule'][0]}; oracle {o['lam']:.2g})")
        out.append(f"| {r['task']} | {r['image']} | {r['noise']:g} | {r['reference']} "
                   f"{r['reference_psnr']:.2f} | {r['baseline']} | {a['psnr']:.2f} | "
                   f"{o['psnr']:.2f} | {a['psnr'] - o['psnr']:+.2f} | "
                   f"{a['psnr'] - r['reference_psnr']:+.2f} | {how} | "
                   f"{a.get('inner_solves', 1)} | {a['time_s']:.1f} |")
    out += ["", "| task | baseline | cases | mean auto - oracle | worst auto - oracle | "
                "worst auto - reference |", "|---|---|---|---|---|---|"]
    keys = sorted({(r["task"], r["baseline"]) for r in rows}, key=lambda k: (
        list(TASKS).index(k[0]), k[1]))
    for task, name in keys:
        sel = [r for r in rows if r["task"] == task and r["baseline"] == name]
        gaps = [r["auto"]["psnr"] - r["oracle"]["psnr"] for r in sel]
        refs = [r["auto"]["psnr"] - r["reference_psnr"] for r in sel]
        out.append(f"| {task} | {name} | {len(sel)} | {np.mean(gaps):+.2f} | {min(gaps):+.2f} "
                   f"| {min(refs):+.2f} |")
    return "\n".join(out)


def timing(sizes=(128, 320), coils: int = 16) -> str:
    """Seconds per slice of each MRI baseline (auto weight) on a 4x random 16-coil slice
    (true birdcage maps normalised, noise 0.01), torch / numpy threads as set."""
    import sigpy as sp
    import sigpy.mri

    from diffrecon import operators
    from diffrecon.operators.mri import kspace_to_tensor

    lines = ["| size | baseline | s per slice | solves | lam rule |", "|---|---|---|---|---|"]
    mag = anatomy_images("val", max(sizes))[0][1]
    for n in sizes:
        from skimage.transform import resize

        img = resize(mag, (n, n), anti_aliasing=True).astype(np.complex128)
        maps = sigpy.mri.birdcage_maps((coils, n, n))
        maps = maps / np.sqrt((np.abs(maps) ** 2).sum(0))
        rng = np.random.default_rng(0)
        mask = column_mask(n, 4, "random", rng)
        k = sp.fft(maps * img, axes=(-2, -1))
        k = ((k + 0.01 * (rng.normal(size=k.shape) + 1j * rng.normal(size=k.shape))) * mask)
        y = kspace_to_tensor(k.astype(np.complex64)[None])
        phys = operators.mri(mask, maps.astype(np.complex64), noise_sigma=0.01)
        for name in ("zero-filled", "cg-sense", "l1-wavelet", "tv"):
            t0 = time.perf_counter()
            rec = _solver(name).solve(y, phys)
            dt = time.perf_counter() - t0
            lines.append(f"| {n} | {name} | {dt:.1f} | {rec.info.get('inner_solves', 1)} | "
                         f"{rec.info.get('lam_rule', rec.info.get('stop_rule', ['-']))[0]} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main(argv=None) -> str:
    p = arguments(__doc__, "one 64 px image per task, 3 tasks")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--images", type=int, default=2, help="images per task")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--timing", action="store_true", help="also time 128 / 320 px MRI slices")
    p.add_argument("--json", type=Path, default=None,
                   help="write the raw rows here (default: <--out>/rows.json, none without --out)")
    a = p.parse_args(argv)
    if a.json is None and a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        a.json = a.out / "rows.json"
    setup(a.threads)
    tasks, size, images = a.tasks, a.size, a.images
    if a.quick:
        tasks, size, images = ["mri-4x", "ct-30", "deblur"], 64, 1
        for t in tasks:  # one noise level each
            TASKS[t] = (*TASKS[t][:2], TASKS[t][2][-1:])
    rows = evaluate(a.split, size, tasks, images, json_path=a.json)
    report = "\n".join([f"# Auto-tuned baselines vs oracle ({a.split} images, {size} px)", "",
                        header(), "", table(rows)])
    if a.timing:
        report += "\n\n## Time per MRI slice (16 coils, 4x)\n\n" + timing()
    print(report)
    return report


if __name__ == "__main__":
    main()
