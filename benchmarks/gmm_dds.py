"""DDS on the Gaussian-mixture exactness protocol (algorithms.md): sliced W1 to exact
posterior samples next to the exact-vs-exact noise floor, mixture-weight TV and the
posterior-mean error, for d in {8, 80}, d_y in {1, 2, 4}, 3 seeds (mean and spread).

    python -m benchmarks.gmm_dds [--samples 1000] [--steps 50] [--seeds 3] [--quick]
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import arguments, setup
from diffrecon.priors.analytic import mcgdiff_problem, mixture_weight_tv, sliced_wasserstein
from diffrecon.recon.dds import DDSSolver

VARIANTS = {
    "ddim eta=1": dict(),
    "reference c=0.85": dict(eta=0.85, noise_convention="reference"),
}


def run_cell(d: int, d_y: int, seed: int, n: int, steps: int) -> dict[str, tuple]:
    prior, phys, y, _ = mcgdiff_problem(d, d_y, seed)
    post = prior.posterior(phys, y)
    g = torch.Generator().manual_seed(10_000 + seed)
    exact, exact2 = post.sample(n, g), post.sample(n, g)
    out = {"floor": (float(sliced_wasserstein(exact, exact2, 100, g)), 0.0, 0.0)}
    for name, kw in VARIANTS.items():
        rec = DDSSolver(steps=steps, batch_size=n, **kw).solve(y, phys, prior, num_samples=n,
                                                              seed=seed)
        s = rec.samples[:, 0]
        out[name] = (float(sliced_wasserstein(s, exact, 100, g)),
                     float(mixture_weight_tv(s, post)),
                     float((s.mean(0) - post.mean()).norm()))
    return out


def main(argv=None) -> str:
    ap = arguments(__doc__, "d = 8, d_y = 2, 1 seed, 200 samples, 10 steps")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    setup(args.threads)
    cells = [(8, 2)] if args.quick else [(d, d_y) for d in (8, 80) for d_y in (1, 2, 4)]
    if args.quick:
        args.samples, args.steps, args.seeds = 200, 10, 1
    cols = ["floor", *VARIANTS]
    lines = [f"DDS, {args.steps} steps, {args.samples} samples, seeds 0..{args.seeds - 1}; "
             "cells: SW mean +- std over seeds [mixture TV, |mean error|]",
             "| d | d_y | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    print("\n".join(lines), flush=True)
    for d, d_y in cells:
        t0 = time.perf_counter()
        runs = [run_cell(d, d_y, s, args.samples, args.steps) for s in range(args.seeds)]
        row = []
        for c in cols:
            v = torch.tensor([r[c] for r in runs], dtype=torch.float64)  # (seeds, 3)
            sw, sd = float(v[:, 0].mean()), float(v[:, 0].std()) if len(runs) > 1 else 0.0
            cell = f"{sw:.2f} +- {sd:.2f}"
            if c != "floor":
                cell += f" [{float(v[:, 1].mean()):.2f}, {float(v[:, 2].mean()):.1f}]"
            row.append(cell)
        secs = time.perf_counter() - t0
        lines.append(f"| {d} | {d_y} | " + " | ".join(row) + f" |  ({secs:.0f} s)")
        print(lines[-1], flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
