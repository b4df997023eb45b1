"""DPS and RED-diff on the Gaussian-mixture exactness protocol (algorithms.md).

Prints, per (d, d_y), the sliced W1 (100 directions, n vs n samples) to the exact posterior,
mean and spread over seeds, next to the noise floor (two independent exact sample sets),
and the mixture-weight TV. RED-diff is a point estimator: its SW measures how far its
seed-to-seed scatter is from the posterior, not a sampler's accuracy.

    python -m benchmarks.gmm_dps_reddiff --n 500 --seeds 0 1 2 [--quick]
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import arguments, setup
from diffrecon.priors.analytic import mcgdiff_problem, mixture_weight_tv, sliced_wasserstein
from diffrecon.recon.dps import DPSSolver
from diffrecon.recon.reddiff import REDDiffSolver


def sw(a, b, seed):
    return float(sliced_wasserstein(a, b, 100, torch.Generator().manual_seed(seed)))


def main(argv=None) -> str:
    p = arguments(__doc__, "d = 8, d_y = 2, 1 seed, 100 samples, 10 steps each")
    p.add_argument("--n", type=int, default=500, help="samples per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dims", type=int, nargs="+", default=[8, 80])
    p.add_argument("--dys", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dps-steps", type=int, default=100)
    p.add_argument("--zeta", type=float, default=1.0)
    p.add_argument("--reddiff-steps", type=int, default=300)
    p.add_argument("--reddiff-lr", type=float, default=0.01,
                   help="in half data-range units (the GMM range is about +-20)")
    args = p.parse_args(argv)
    setup(args.threads)
    if args.quick:
        args.n, args.seeds, args.dims, args.dys = 100, [0], [8], [2]
        args.dps_steps = args.reddiff_steps = 10
    solvers = {
        "dps": DPSSolver(steps=args.dps_steps, zeta=args.zeta, batch_size=args.n),
        "reddiff": REDDiffSolver(steps=args.reddiff_steps, lr=args.reddiff_lr,
                                 batch_size=args.n),
    }
    lines = [f"n={args.n} seeds={args.seeds} dps steps={args.dps_steps} zeta={args.zeta} "
             f"reddiff steps={args.reddiff_steps} lr={args.reddiff_lr}",
             "| d | d_y | floor | DPS SW | DPS TV | RED-diff SW | RED-diff TV | s/run |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for d in args.dims:
        for dy in args.dys:
            rows = {k: [] for k in ("floor", "dps", "dps_tv", "reddiff", "reddiff_tv")}
            t0 = time.perf_counter()
            for seed in args.seeds:
                prior, physics, y, _ = mcgdiff_problem(d, dy, seed)
                post = prior.posterior(physics, y)
                g = torch.Generator().manual_seed(1000 + seed)
                ref, ref2 = post.sample(args.n, g), post.sample(args.n, g)
                rows["floor"].append(sw(ref, ref2, seed))
                for name, solver in solvers.items():
                    s = solver.solve(y, physics, prior, num_samples=args.n, seed=seed).samples[:, 0]
                    rows[name].append(sw(s, ref, seed))
                    rows[f"{name}_tv"].append(float(mixture_weight_tv(s, post)))
            per_run = (time.perf_counter() - t0) / len(args.seeds)

            def fmt(v):
                t = torch.tensor(v)
                return f"{float(t.mean()):.2f} ± {float(t.std()) if len(v) > 1 else 0.0:.2f}"

            lines.append(f"| {d} | {dy} | {fmt(rows['floor'])} | {fmt(rows['dps'])} | "
                         f"{fmt(rows['dps_tv'])} | {fmt(rows['reddiff'])} | "
                         f"{fmt(rows['reddiff_tv'])} | {per_run:.0f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
