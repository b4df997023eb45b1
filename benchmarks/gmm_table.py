"""Exactness table on the Gaussian-mixture protocol (algorithms.md): diffrecon's DPS, RED-diff,
DDS and every SMC variant, plus deepinv's own samplers (``gmm_deepinv``), against the exact
posterior.

    python -m benchmarks.gmm_table [--quick] [--d 8 80 800] [--dy 1 2 4] [--seeds 3]
                                   [--N 100 1000] [--steps 100] [--no-deepinv]

Per problem (d, d_y, seed): ``mcgdiff_problem(d, d_y, seed)``; 2000 posterior draws per
solver (independent chains for DPS / RED-diff / DDS; for SMC, 2000 systematic draws from the
final weighted cloud of N particles, so with replacement when N < 2000) against 2000 exact
draws. Columns: SW = sliced W1 over 500 directions and its noise floor (two exact sets, same
directions); weight TV = total variation of the recovered mixture weights; mean err =
||m_hat - E[x|y]||_2 (SMC: weighted particle mean); ESS/N = final effective sample size of
the SMC cloud; time = solver wall time for all draws (s); ref = the matching column of the
reference figures (algorithms.md; 100 directions, 10 seeds, a numpy re-implementation).
Every cell is mean ± sd over seeds. Seeds >= 1000 (tests use < 100). Solver options: each
solver's defaults except ``steps`` (all) and ``eta = 0.85`` (DDS, SMC: the reference
protocol's 100 DDIM steps at eta 0.85).
"""

from __future__ import annotations

import sys
import time

from benchmarks import gmm_deepinv
from benchmarks.common import (
    SEED0,
    arguments,
    fmt_ms,
    gmm_metrics,
    header,
    markdown_table,
    mean_spread,
    nice,
    pooled_smc_run,
    setup,
)

# algorithms.md "Reference figures": (d, d_y) -> floor, DPS, MCGdiff (reference code),
# MCGdiff frozen+ESS, TDS, bootstrap FK. None = not reported.
REFERENCE = {
    (8, 1): (0.18, 3.06, 1.47, 0.71, 0.35, 0.41),
    (8, 2): (0.08, 1.51, 0.38, 0.21, 0.10, 0.28),
    (8, 4): (0.04, 0.37, 0.28, 0.12, 0.06, 0.08),
    (80, 1): (0.12, 3.07, 1.35, 0.46, 0.30, 0.30),
    (80, 2): (0.09, 1.86, 1.07, 0.47, 0.20, 0.25),
    (80, 4): (0.04, 1.49, 0.36, 0.18, 0.09, 0.11),
    (800, 1): (0.21, 3.93, 4.30, None, 3.12, 2.86),
}
REF_COLUMNS = ("floor", "DPS", "MCGdiff (reference code)", "MCGdiff frozen+ESS", "TDS",
               "bootstrap FK")
# which reference column each row is judged against
REF_OF = {"dps": "DPS", "smc gaussian": "MCGdiff frozen+ESS",
          "smc gaussian dense": "MCGdiff frozen+ESS", "smc twisted": "TDS",
          "smc bootstrap": "bootstrap FK", "deepinv DPS": "DPS"}

# label -> (registry name, options); SMC rows get num_particles added per N
SOLVERS = {
    "dps": ("dps", {}),
    "reddiff": ("reddiff", {}),
    "dds": ("dds", {"eta": 0.85}),
    "smc gaussian": ("smc", {"proposal": "gaussian", "eta": 0.85}),
    "smc gaussian dense": ("smc", {"proposal": "gaussian", "eta": 0.85, "krylov": False}),
    "smc twisted": ("smc", {"proposal": "twisted", "eta": 0.85}),
    "smc bootstrap": ("smc", {"proposal": "bootstrap", "eta": 0.85}),
}
COLUMNS = ["d", "d_y", "solver", "N", "NFE", "SW", "floor", "ref", "weight TV", "mean err",
           "ESS/N", "time (s)"]


def reference(label: str, d: int, d_y: int):
    col = REF_OF.get(label)
    vals = REFERENCE.get((d, d_y))
    return None if col is None or vals is None else vals[REF_COLUMNS.index(col)]


def run_one(label: str, d: int, d_y: int, seed: int, *, steps: int, n: int | None,
            samples: int) -> dict:
    """One solver on one problem: metrics + nfe, ess_frac, time."""
    from diffrecon.priors.analytic import mcgdiff_problem
    from diffrecon.recon import get_solver

    name, opts = SOLVERS[label]
    prior, physics, y, _ = mcgdiff_problem(d, d_y, seed)
    post = prior.posterior(physics, y)
    opts = dict(opts, steps=steps)
    if name == "smc":
        opts.update(num_particles=n, chunk_size=min(n, 1024))
    else:
        opts.update(batch_size=samples)
    solver = get_solver(name, **opts)
    t0 = time.perf_counter()
    if name == "smc":  # independent runs of n particles pooled to `samples` points
        draws, mean, ess, rec = pooled_smc_run(solver, y, physics, prior, samples, n, seed + 1)
    else:
        rec = solver.solve(y, physics, prior, num_samples=samples, seed=seed + 1)
        draws, mean, ess = rec.samples[:, 0], None, None
    wall = time.perf_counter() - t0
    m = gmm_metrics(draws, post, seed + 2, mean=mean)
    m.update(nfe=rec.info.get("nfe"), time=wall, ess=ess)
    return m


def solver_rows(d_list, dy_list, seeds, labels, n_list, steps, samples) -> list[dict]:
    rows = []
    for d in d_list:
        for d_y in dy_list:
            for label in labels:
                for n in (n_list if SOLVERS[label][0] == "smc" else [None]):
                    if label == "smc gaussian dense" and d > 800:
                        continue
                    runs = [run_one(label, d, d_y, s, steps=steps, n=n, samples=samples)
                            for s in seeds]
                    col = {k: [r[k] for r in runs] for k in runs[0]}
                    rows.append({
                        "d": d, "d_y": d_y, "solver": label, "N": n, "NFE": runs[0]["nfe"],
                        "SW": fmt_ms(col["sw"]), "floor": fmt_ms(col["floor"]),
                        "ref": reference(label, d, d_y), "weight TV": fmt_ms(col["tv"]),
                        "mean err": fmt_ms(col["mean_err"]),
                        "ESS/N": fmt_ms(col["ess"]) if n else None,
                        "time (s)": mean_spread(col["time"])[0]})
                    print(f"  done d={d} d_y={d_y} {label} N={n}", file=sys.stderr, flush=True)
    return rows


def reference_table() -> str:
    rows = [{"d": d, "d_y": dy, **{c: v for c, v in zip(REF_COLUMNS, vals, strict=True)}}
            for (d, dy), vals in REFERENCE.items()]
    return markdown_table(rows, ["d", "d_y", *REF_COLUMNS])


def main(argv=None) -> str:
    p = arguments(__doc__, "d=8, d_y=2, 1 seed, N=100, 10 steps, 500 draws")
    p.add_argument("--d", type=int, nargs="+", default=[8, 80, 800])
    p.add_argument("--dy", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seeds", type=int, default=3, help="number of problem seeds (from 1000)")
    p.add_argument("--N", type=int, nargs="+", default=[100, 1000], help="SMC particle counts")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    p.add_argument("--no-deepinv", action="store_true", help="skip deepinv's samplers")
    p.add_argument("--deepinv-steps", type=int, default=None,
                   help="steps of deepinv's samplers (default: their own defaults)")
    a = p.parse_args(argv)
    setup(a.threads)
    if a.quick:
        a.d, a.dy, a.seeds, a.N, a.steps, a.samples = [8], [2], 1, [100], 10, 500
        a.deepinv_steps = a.deepinv_steps or 10
    seeds = [SEED0 + 10 * i for i in range(a.seeds)]
    rows = solver_rows(a.d, a.dy, seeds, a.solvers, a.N, a.steps, a.samples)
    if not a.no_deepinv:
        for r in gmm_deepinv.rows_for(a.d, a.dy, seeds, a.samples, a.deepinv_steps):
            r["ref"] = reference(r["solver"].replace("DIFFPIR", "DiffPIR"), r["d"], r["d_y"])
            rows.append(r)
        rows.sort(key=lambda r: (r["d"], r["d_y"]))
    text = "\n\n".join([
        "## GMM exactness table", header(),
        f"Command: `python -m benchmarks.gmm_table {' '.join(argv or [])}`",
        f"Seeds {seeds}; {a.samples} draws per solver; diffrecon solvers: {a.steps} steps; "
        f"deepinv samplers: {a.deepinv_steps or 'their default'} steps. SW = sliced W1 "
        "(500 directions) vs 2000 exact draws, floor = exact vs exact; mean ± sd over seeds. "
        "ref = algorithms.md reference figure for the matching method (TDS for twisted, "
        "MCGdiff frozen+ESS for gaussian, bootstrap FK for bootstrap).",
        markdown_table(rows, COLUMNS),
        "### Reference figures (algorithms.md; SW, 100 directions, mean over 10 seeds)",
        reference_table()])
    print(text)
    return text


if __name__ == "__main__":
    nice()
    main(sys.argv[1:])
