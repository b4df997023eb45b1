"""Calibrated intervals of DDS on independent held-out slices (issue 17 evidence).

    nice -n 15 env OMP_NUM_THREADS=1 python -m benchmarks.coverage_external \\
        [--out DIR] [--tasks mri-4x-rand-8c,mri-8x-equi-8c,ct-8] [--steps 50] \\
        [--samples 2] [--splits 100] [--max-slices N] [--no-run] [--quick]

Pool: the independent held-out slices of ``benchmarks/_coverage_pool.py`` (62 at 128 px:
VALIDATION dipy aniso_vox / test_piesno, TEST dipy S0 / t1_coronal / mpl s1045, nibabel's
example4d EPI), each its own scan file simulated by ``benchmarks/_external_sim.py`` (no
diffrecon code) with the task's acquisition (``benchmarks/_external_tasks.py``). Slices are
reconstructed in one fixed random order (seed 2026), so the finished ones are a random
subset of the pool (``--max-slices`` or an interrupted run keep the design valid):
``diffrecon run FILES -o DIR/ --solver dds --steps S --samples K`` (resumable).

Calibration is ``diffrecon.calibration.calibrate`` (conformal risk control, unit = slice,
pixels above 5% of each slice's reference maximum, floor 1e-3); reconstructions are computed
once and the splits are free:

* ``halves``: the finished slices split at random into calibration / test halves, by image
  (disjoint), ``--splits`` times. Calibration and test slices are then exchangeable (the
  split is a uniform random permutation of a fixed pool), which is exactly the guarantee's
  assumption: the mean test coverage over splits must be >= the level.
* ``80/20``: the same with 80% of the slices calibrating (more calibration units, a smaller
  conformal correction).
* ``VAL -> rest`` / ``VAL -> TEST``: calibrate on the VALIDATION sources (aniso, piesno),
  test on all the others (S0, t1_coronal, s1045, example4d) / on the TEST sources only (S0,
  t1_coronal, s1045): not exchangeable, the contrast (session 8's design, at 128 px).

Per task, design, spread (``smooth`` 0: the 2-draw std; 2: pooled over 2 px) and level:
coverage of the uncalibrated mean +- z std, the calibration slices' mean coverage the rule
holds them at (``CRC target`` = 1 - (alpha (n + 1) - 1) / n; the expected test coverage
sits near it when slices have many pixels, ``diffrecon.calibration``), the calibrated
mean +- lambda u's test coverage pooled over the test pixels (mean and sd over splits) and
its mean over test slices of each slice's coverage (the guaranteed quantity; ``slice p10``:
the 10th percentile of single test slices' coverage, all splits), the calibrated
half-width (mean of lambda u over foreground pixels) over the slice's reference maximum,
lambda, and std / RMSE (mean over all slices). A second table: mean test coverage at 90%
against the number of calibration slices. ``--quick``: 48 px, 12 slices, 5 steps, MRI 4x
and CT 8 views, levels 80 / 90 (a smoke test; numbers are not meaningful).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np

from benchmarks import _coverage_pool as pool
from benchmarks._external_runs import diffrecon_cmd

TASKS = ("mri-4x-rand-8c", "mri-8x-equi-8c", "ct-8")
FOREGROUND = 0.05
FLOOR = 1e-3
SMOOTHS = (0.0, 2.0)  # spread: the 2-draw std itself, and pooled over 2 px (calibration docs)
ORDER_SEED = 2026
CHUNK = 6          # files per `diffrecon run` call


def order(names=pool.POOL) -> list[str]:
    """The pool in its fixed random run order."""
    return [names[i] for i in np.random.default_rng(ORDER_SEED).permutation(len(names))]


def run_task(task: str, names: list[str], out: Path, size: int, steps: int, samples: int
             ) -> None:
    """Simulate and reconstruct the slices ``names`` of a task (finished results are kept)."""
    res = out / "results" / task
    res.mkdir(parents=True, exist_ok=True)
    todo = [n for n in names if not (res / f"{n}_recon.h5").exists()]
    for i in range(0, len(todo), CHUNK):
        files = [str(pool.simulate_slice(task, n, out, size)[0]) for n in todo[i:i + CHUNK]]
        subprocess.run([*diffrecon_cmd(), "run", *files, "-o", f"{res}/", "-q", "--solver",
                        "dds", "--steps", str(steps), "--samples", str(samples)], check=True)


def load_task(task: str, names: list[str], out: Path) -> list[dict]:
    """Finished slices of a task: name, source, reference, mean, std (float64, (1, H, W))."""
    found = []
    for n in names:
        result, ref = out / "results" / task / f"{n}_recon.h5", out / "scans" / task / f"{n}.npy"
        if not (result.exists() and ref.exists()):
            continue
        with h5py.File(result, "r") as f:
            mean, std = f["reconstruction"][()], f["std"][()]
        if mean.ndim == 4:                          # (slices, 1, H, W)
            mean, std = mean[:, 0], std[:, 0]
        found.append({"name": n, "source": pool.source_of(n),
                      "ref": np.load(ref).astype(np.float64),
                      "mean": mean.astype(np.float64), "std": std.astype(np.float64)})
    return found


def prepare(s: dict) -> dict:
    """Per-slice arrays the test figures reuse: foreground pixels' |error|, std, spreads."""
    from diffrecon.calibration import foreground, pooled_std, spread

    mask = foreground(s["ref"], FOREGROUND)
    return {**s, "err_fg": np.abs(s["ref"] - s["mean"])[mask], "std_fg": s["std"][mask],
            "u_fg": {sm: spread(s["mean"], s["std"], FLOOR, sm)[mask] for sm in SMOOTHS},
            "pooled": {sm: pooled_std(s["std"], sm) for sm in SMOOTHS},
            "peak": float(s["ref"].max())}


def test_figures(calib, tests: list[dict], level: float, smooth: float) -> dict:
    """Coverage (pooled over pixels, and mean over slices) and half-width / max."""
    from diffrecon.calibration import z_score

    z, lam = z_score(level), calib.scales[level]
    raw = cal = total = 0
    per_slice, half = [], []
    for s in tests:
        u = s["u_fg"][smooth]
        inside = s["err_fg"] <= lam * u
        raw += int((s["err_fg"] <= z * s["std_fg"]).sum())
        cal += int(inside.sum())
        total += inside.size
        per_slice.append(float(inside.mean()))
        half.append(float(np.mean(lam * u)) / s["peak"])
    return {"raw": raw / total, "cal": cal / total, "slice": float(np.mean(per_slice)),
            "half": float(np.mean(half)), "lam": lam, "slices": per_slice}


def calibrate_on(slices: list[dict], levels, smooth: float):
    """``calibrate(..., smooth=smooth)``'s multipliers; the pooled std is computed once per
    slice (``prepare``) and passed with smooth 0: the same spread, so the same lambda."""
    from diffrecon.calibration import calibrate

    return calibrate([s["ref"] for s in slices], [s["mean"] for s in slices],
                     [s["pooled"][smooth] for s in slices], levels, unit="slice",
                     foreground=FOREGROUND, floor=FLOOR)


def splits(n: int, n_cal: int, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` random (calibration, test) index pairs: ``n_cal`` slices calibrate, the
    rest test."""
    rng = np.random.default_rng(seed)
    return [(p[:n_cal], p[n_cal:]) for p in (rng.permutation(n) for _ in range(count))]


def design_rows(task: str, slices: list[dict], levels, n_splits: int) -> list[dict]:
    n = len(slices)
    designs = {"halves": splits(n, n // 2, n_splits, 1),
               "80/20": splits(n, round(0.8 * n), n_splits, 2)}
    split = np.array([pool.SPLIT[s["source"]] for s in slices])
    val, rest = np.flatnonzero(split == "VALIDATION"), np.flatnonzero(split != "VALIDATION")
    if len(val) and len(rest):
        designs["VAL -> rest"] = [(val, rest)]
    if len(val) and (split == "TEST").any():
        designs["VAL -> TEST"] = [(val, np.flatnonzero(split == "TEST"))]
    ratio = float(np.mean([np.sqrt(np.mean(s["std"] ** 2) / np.mean((s["ref"] - s["mean"]) ** 2))
                           for s in slices]))
    rows = []
    for (name, cuts), smooth in ((d, sm) for d in designs.items() for sm in SMOOTHS):
        figs = {lv: [] for lv in levels}
        n_cal, n_test = len(cuts[0][0]), len(cuts[0][1])
        ok = [lv for lv in levels if n_cal >= min_units(lv)]
        for cal_idx, test_idx in cuts:
            calib = calibrate_on([slices[i] for i in cal_idx], ok, smooth)
            for lv in ok:
                figs[lv].append(test_figures(calib, [slices[i] for i in test_idx], lv, smooth))
        for lv in ok:
            f = {k: np.array([d[k] for d in figs[lv]]) for k in figs[lv][0] if k != "slices"}
            every = np.concatenate([d["slices"] for d in figs[lv]])
            rows.append({"task": task, "design": name, "cal / test": f"{n_cal} / {n_test}",
                         "smooth px": f"{smooth:g}", "level": lv, "splits": len(cuts),
                         "coverage (z std)": f["raw"].mean(),
                         "CRC target": 1 - ((1 - lv) * (n_cal + 1) - 1) / n_cal,
                         "coverage": f["cal"].mean(), "coverage sd": f["cal"].std(),
                         "per-slice coverage": f["slice"].mean(),
                         "slice p10": float(np.percentile(every, 10)),
                         "half-width / max": f["half"].mean(), "lambda": f["lam"].mean(),
                         "std / RMSE": ratio})
    return rows


def size_rows(task: str, slices: list[dict], n_splits: int, level: float = 0.9,
              smooth: float = SMOOTHS[-1]) -> list[dict]:
    """Mean test coverage at ``level`` against the number of calibration slices."""
    n, rows = len(slices), []
    sizes = sorted({k for k in (10, 15, 20, 30, 40, 50, n - 6) if min_units(level) <= k <= n - 4})
    for n_cal in sizes:
        cov = []
        for cal_idx, test_idx in splits(n, n_cal, n_splits, 3 + n_cal):
            calib = calibrate_on([slices[i] for i in cal_idx], [level], smooth)
            cov.append(test_figures(calib, [slices[i] for i in test_idx], level,
                                    smooth)["slice"])
        alpha = 1 - level
        rows.append({"task": task, "smooth px": f"{smooth:g}", "calibration slices": n_cal,
                     "test slices": n - n_cal,
                     "mean per-slice coverage": float(np.mean(cov)),
                     "sd over splits": float(np.std(cov)),
                     "CRC target": 1 - (alpha * (n_cal + 1) - 1) / n_cal})
    return rows


def min_units(level: float) -> int:
    from diffrecon.calibration import min_units as m

    return m(level)


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                                       for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("coverage_results"))
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--splits", type=int, default=100,
                    help="random splits per design (half as many per calibration size)")
    ap.add_argument("--max-slices", type=int, default=None,
                    help="reconstruct only the first N slices of the run order")
    ap.add_argument("--no-run", action="store_true",
                    help="analyse the finished results only (no simulation, no run)")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    size, levels, tasks = pool.SIZE, (0.8, 0.9, 0.95), a.tasks
    if a.quick:
        size, levels, a.steps, a.samples = 48, (0.8, 0.9), min(a.steps, 5), 2
        a.max_slices, a.splits = min(a.max_slices or 12, 12), min(a.splits, 20)
        tasks = "mri-4x-rand-8c,ct-8" if a.tasks == ",".join(TASKS) else a.tasks
    names = order()[:a.max_slices]
    rows, curve = [], []
    for task in [t.strip() for t in tasks.split(",") if t.strip()]:
        if not a.no_run:
            run_task(task, names, a.out, size, a.steps, a.samples)
        slices = [prepare(s) for s in load_task(task, names, a.out)]
        if len(slices) < 2 * min_units(min(levels)):
            print(f"{task}: {len(slices)} finished slices, too few to split")
            continue
        rows += design_rows(task, slices, levels, a.splits)
        curve += size_rows(task, slices, max(a.splits // 2, 1))
    text = (markdown(rows) + "\n\nMean test coverage at 90% against the calibration size "
            "(random splits, the rest tests):\n\n" + markdown(curve))
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "table.md").write_text(text + "\n")
    (a.out / "rows.json").write_text(json.dumps({"designs": rows, "sizes": curve}, indent=1))
    return text


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
