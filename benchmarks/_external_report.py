"""The held-out benchmark's report (``benchmarks/external.py``): the markdown tables
(every row, then default / best diffusion vs best classical) and the per-task figure."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import _external_sim as sim
from benchmarks._external_runs import Context, options_of, read_result
from benchmarks._external_tasks import Group, Row, Task, images_label

DIFFUSION = ("dds", "dds3d", "dps", "reddiff", "smc")


# ------------------------------------------------------------------------------ report
def row_label(r: dict[str, Any]) -> str:
    prov = r.get("provenance", {})
    if r["row"] == "default":
        opts = options_of(r)
        steps = f" {opts['steps']}" if "steps" in opts else ""
        prior = f", {prov['prior']}" if prov.get("prior", "none") != "none" else ""
        draws = int(prov.get("num_samples", 1))
        mean = f", mean of {draws} draws" if draws > 1 else ""
        return f"default ({prov.get('solver', '?')}{steps}{mean}{prior})"
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
