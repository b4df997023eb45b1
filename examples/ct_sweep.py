"""A CT sparse-view sweep: number of views x solver -> PSNR table (CSV) and plot, from the
Python API (``problems.load_problem`` and a solver per slice; no result files).

    python examples/ct_sweep.py --out ct_sweep/ [--views 8 15 30 60] [--solvers fbp tv]
    python examples/ct_sweep.py --quick --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def sweep(out: Path, views: list[int], solvers: list[str], size: int, slices: int) -> list[dict]:
    """Simulate one scan per view count (same phantoms), load it as a Problem in the prior's
    units, reconstruct every slice with each solver, score against the ground truth."""
    from diffrecon import priors
    from diffrecon.datasets.simulate import simulate_ct
    from diffrecon.metrics import evaluate_arrays, load_reference
    from diffrecon.problems import load_problem
    from diffrecon.recon import DIFFUSION_SOLVERS, get_solver

    prior = priors.load("phantom-ct") if set(solvers) & set(DIFFUSION_SOLVERS) else None
    rows = []
    for v in views:
        scan = simulate_ct(out / f"ct_{v}views.h5", size=size, slices=slices, views=v,
                           noise=0.002, seed=0)
        problem = load_problem(scan, prior)
        truth, _ = load_reference(scan)
        for solver in solvers:
            images = []
            for k, y, physics, norm in zip(problem.slices, problem.measurements,
                                           problem.physics, problem.normalisers, strict=True):
                rec = get_solver(solver).solve(
                    y, physics, prior if solver in DIFFUSION_SOLVERS else None, seed=[(0, k)])
                images.append(norm.from_prior(rec.mean[0, 0]).double().numpy())
            m = evaluate_arrays(truth, images)
            rows.append({"views": v, "solver": solver, "psnr": round(m["psnr"], 3),
                         "ssim": round(m["ssim"], 4)})
    return rows


def table(rows: list[dict]) -> str:
    solvers = sorted({r["solver"] for r in rows})
    lines = ["views | " + " | ".join(solvers)]
    for v in sorted({r["views"] for r in rows}):
        cells = [f"{next(r['psnr'] for r in rows if r['views'] == v and r['solver'] == s):.2f}"
                 for s in solvers]
        lines.append(f"{v:5d} | " + " | ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for s in sorted({r["solver"] for r in rows}):
        pts = sorted((r["views"], r["psnr"]) for r in rows if r["solver"] == s)
        ax.plot(*zip(*pts, strict=True), marker="o", label=s)
    ax.set_xlabel("views")
    ax.set_ylabel("PSNR (dB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("ct_sweep"))
    p.add_argument("--views", type=int, nargs="+", default=[8, 15, 30, 60])
    p.add_argument("--solvers", nargs="+", default=["fbp", "tv"])
    p.add_argument("--quick", action="store_true", help="32 px, 1 slice, 2 view counts")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    views = [8, 30] if a.quick else a.views
    rows = sweep(a.out, views, a.solvers, size=32 if a.quick else 128,
                 slices=1 if a.quick else 4)
    with open(a.out / "psnr.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, a.out / "psnr.png")
    print(table(rows))
    print(f"wrote {a.out / 'psnr.csv'} and {a.out / 'psnr.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
