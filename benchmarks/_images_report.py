"""Figures and tables of ``benchmarks.images`` (its private helper): the scored image of a
task, the PSNR-vs-time figure, the per-task, summary and coverage tables, and the collection
of per-task JSON results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from benchmarks.common import fmt_ms, header, markdown_table


def display(task, x: np.ndarray) -> np.ndarray:
    """Prior layout (..., C, H, W) -> the image that is scored: magnitude for MRI (as
    ``diffrecon run`` writes it), else the single channel / the channels as they are."""
    if task.modality == "mri":
        return np.sqrt(x[..., 0, :, :] ** 2 + x[..., 1, :, :] ** 2)
    return x[..., 0, :, :] if x.shape[-3] == 1 else x


# ------------------------------------------------------------------------------ figures
def _best(rows, family):
    ok = [r for r in rows if r["family"] == family and "psnr" in r]
    return max(ok, key=lambda r: np.mean(r["psnr"])) if ok else None


def figure(task, result: dict, truth: np.ndarray, png: Path) -> None:
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
             f"Command: `python -m benchmarks.images {' '.join(argv)}`".replace(" `", "`"),
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


def collect(out: Path, tasks: list[str]) -> list[dict]:
    """Results of ``<out>/<task>.json``, in task order; rows of ``<out>/*/<task>.json``
    (supplementary runs, e.g. ``--solvers smc --out <out>/smc``) with the same size and
    slice count are appended when their label is new, or replace a failed row."""
    results = []
    for name in tasks:
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
