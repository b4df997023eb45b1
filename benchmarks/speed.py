"""Speed: wall time per NFE of each solver against the bare denoiser, SMC memory per particle,
CG share of DDS, deepinv DPS vs diffrecon DPS.

    python -m benchmarks.speed [--quick] [--size 64] [--steps 20] [--batch 4]

Problem: Shepp-Logan (size x size) blurred by a Gaussian kernel (std 1.5 px, circular),
noise 0.02. Prior: the shipped "phantom-ct" network when ``diffrecon.priors.available()``
lists it, else a small U-Net with random weights (torch seed 1000; the timings are real,
the images are not). Timings: median of ``--repeats`` runs after one warm-up, single
torch thread unless ``--threads``. Definitions:
  denoiser fwd / fwd+bwd: one call on a batch of ``--batch`` rows (fwd+bwd = forward plus
      backward to the input, what DPS and twisted SMC pay per step);
  ms / NFE: solver wall time / NFE (NFE = denoiser evaluations per chain or particle);
  overhead = solver time / (denoiser rows evaluated x per-row denoiser time), the per-row
      time being fwd+bwd for DPS and twisted SMC, fwd otherwise (1.0 = all time in the net);
  SMC memory / particle: on CUDA, torch.cuda.max_memory_allocated differenced between two
      particle counts; on CPU, the peak resident set (resource.getrusage ru_maxrss) of two
      fresh subprocesses running N1 and N2 particles, differenced: (peak(N2) - peak(N1)) /
      (N2 - N1). tracemalloc is not used: it does not see torch's allocator;
  DDS CG share = 1 - t(cg_iters = 0) / t(cg_iters = M) (cg_iters = 0 still applies the
      normal operator once per step for the initial residual, so this is a slight
      underestimate).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from benchmarks.common import REPO, SEED0, arguments, header, markdown_table, nice, setup

SOLVER_ROWS = {  # label -> (registry name, options, uses a backward pass)
    "dps": ("dps", {}, True),
    "reddiff": ("reddiff", {}, False),
    "dds": ("dds", {}, False),
    "smc gaussian": ("smc", {"proposal": "gaussian", "cg_iters": 20}, False),
    "smc twisted": ("smc", {"proposal": "twisted"}, True),
    "smc bootstrap": ("smc", {"proposal": "bootstrap"}, False),
}


# ---------------------------------------------------------------------------- problem
def make_prior(quick: bool):
    """(prior, description): the shipped phantom-ct prior if present, else a random U-Net."""
    import diffrecon.priors as priors

    if not quick and "phantom-ct" in priors.available():
        return priors.load("phantom-ct"), "shipped phantom-ct"
    from diffrecon.priors.network import NetworkPrior, UNet, count_parameters

    torch.manual_seed(SEED0)
    net = UNet(channels=1, base=8 if quick else 16, mults=(1, 2), blocks=1, emb_dim=32)
    prior = NetworkPrior(net, name="random-unet").eval().requires_grad_(False)
    return prior, f"random U-Net ({count_parameters(net)} parameters, untrained)"


def make_problem(size: int, dtype=torch.float32):
    from diffrecon.datasets.phantoms import shepp_logan
    from diffrecon.operators import blur

    x = torch.from_numpy(shepp_logan(size))[None, None].to(dtype)
    physics = blur("gaussian", width=1.5, noise_sigma=0.02, dtype=dtype)
    gen = torch.Generator().manual_seed(SEED0)
    y = physics.A(x) + 0.02 * torch.randn(physics.A(x).shape, generator=gen, dtype=dtype)
    return x, physics, y


def timed(fn, repeats: int) -> float:
    """Median wall time (s) of fn() over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def denoiser_times(prior, size: int, batch: int, repeats: int) -> tuple[float, float]:
    """(forward, forward + backward to the input) seconds for one batch of ``batch`` rows."""
    gen = torch.Generator().manual_seed(SEED0)
    z = torch.randn(batch, 1, size, size, generator=gen)

    def fwd():
        with torch.no_grad():
            prior.denoise(z, 1.0)

    def fwd_bwd():
        zg = z.clone().requires_grad_(True)
        torch.autograd.grad(prior.denoise(zg, 1.0).square().sum(), zg)

    return timed(fwd, repeats), timed(fwd_bwd, repeats)


def solve_once(label: str, prior, physics, y, steps: int, batch: int, **extra):
    from diffrecon.recon import get_solver

    name, opts, _ = SOLVER_ROWS[label]
    opts = dict(opts, steps=steps, **extra)
    if name == "smc":
        opts.update(num_particles=batch, chunk_size=batch)
        return get_solver(name, **opts).solve(y, physics, prior, num_samples=1, seed=SEED0)
    opts.update(batch_size=batch)
    return get_solver(name, **opts).solve(y, physics, prior, num_samples=batch, seed=SEED0)


def solver_rows(prior, physics, y, steps, batch, repeats, t_fwd, t_bwd) -> list[dict]:
    rows = []
    for label, (_, _, backward) in SOLVER_ROWS.items():
        info = {}

        def run(label=label, info=info):
            info.update(solve_once(label, prior, physics, y, steps, batch).info)

        wall = timed(run, repeats)
        per_row = (t_bwd if backward else t_fwd) / batch
        rows.append({"solver": label, "steps": steps, "rows": batch, "NFE": info["nfe"],
                     "time (s)": wall, "ms / NFE": 1e3 * wall / max(info["nfe"], 1),
                     "overhead": wall / (info["denoiser_rows"] * per_row),
                     "backward": "yes" if backward else "no"})
    return rows


def dds_cg_share(prior, physics, y, steps, batch, repeats) -> dict:
    t = {m: timed(lambda m=m: solve_once("dds", prior, physics, y, steps, batch, cg_iters=m),
                  repeats) for m in (0, 5)}
    return {"solver": "dds", "cg_iters": 5, "time (s)": t[5], "time cg_iters=0 (s)": t[0],
            "CG share": 1 - t[0] / t[5]}


# ---------------------------------------------------------------------------- memory
def _memory_child(n: int, proposal: str, size: int, steps: int, quick: bool) -> None:
    """Subprocess entry: run SMC with n particles, print the peak RSS (bytes) as JSON."""
    setup(1)
    prior, _ = make_prior(quick)
    _, physics, y = make_problem(size)
    SOLVER_ROWS["_mem"] = ("smc", {"proposal": proposal, "cg_iters": 5}, False)
    solve_once("_mem", prior, physics, y, steps, n)
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def smc_memory_per_particle(proposal: str, size: int, steps: int, n1: int, n2: int,
                            quick: bool, prior=None, physics=None, y=None) -> dict:
    """Bytes per particle, by differencing two particle counts (module docstring)."""
    if torch.cuda.is_available() and prior is not None:
        peaks = []
        for n in (n1, n2):
            torch.cuda.reset_peak_memory_stats()
            SOLVER_ROWS["_mem"] = ("smc", {"proposal": proposal, "cg_iters": 5}, False)
            solve_once("_mem", prior.cuda(), physics.cuda(), y.cuda(), steps, n)
            peaks.append(torch.cuda.max_memory_allocated())
        method = "torch.cuda.max_memory_allocated"
    else:
        peaks = []
        for n in (n1, n2):
            cmd = [sys.executable, "-m", "benchmarks.speed", "--_memory", str(n), proposal,
                   str(size), str(steps)] + (["--quick"] if quick else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"])
        method = "peak RSS of fresh subprocesses"
    per = (peaks[1] - peaks[0]) / (n2 - n1)
    return {"proposal": proposal, "N1": n1, "N2": n2, "peak N1 (MiB)": peaks[0] / 2 ** 20,
            "peak N2 (MiB)": peaks[1] / 2 ** 20, "KiB / particle": per / 1024,
            "image KiB": size * size * 4 / 1024, "method": method}


# ---------------------------------------------------------------------------- deepinv DPS
class _Counting(torch.nn.Module):
    """deepinv denoiser around a diffrecon prior, counting rows evaluated."""

    def __init__(self, prior):
        super().__init__()
        self.prior, self.rows = prior, 0

    def forward(self, x, sigma, *args, **kwargs):
        self.rows += x.shape[0]
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        return self.prior.denoise(x, s.expand(x.shape[0]) if s.numel() == 1 else s)


def dps_comparison(prior, size, steps, batch, repeats) -> list[dict]:
    """deepinv.sampling.DPS vs diffrecon DPS, same prior and steps, float32 and float64
    solver state (the network runs in float32 in both; deepinv also evaluates its data term
    in float32 whatever its ``dtype``, so its physics and y stay float32)."""
    import deepinv as dinv

    from diffrecon.recon import get_solver

    rows = []
    _, phys32, y32 = make_problem(size, torch.float32)
    ys = y32.expand(batch, *y32.shape[1:]).contiguous()
    for dtype in (torch.float32, torch.float64):
        _, physics, y = make_problem(size, dtype)
        den = _Counting(prior)
        # deepinv's num_steps counts time points: num_steps - 1 denoiser calls
        model = dinv.sampling.DPS(den, num_steps=steps + 1, dtype=dtype,
                                  rng=torch.Generator().manual_seed(SEED0))
        t = timed(lambda model=model: model(ys, phys32, seed=SEED0), repeats)
        nfe = den.rows // (batch * (repeats + 1))
        rows.append({"implementation": "deepinv DPS", "dtype": str(dtype).split(".")[-1],
                     "steps": steps, "NFE": nfe, "time (s)": t, "ms / NFE": 1e3 * t / nfe})
        solver = get_solver("dps", steps=steps, batch_size=batch)
        info = {}

        def run(solver=solver, y=y, physics=physics, info=info):
            info.update(solver.solve(y, physics, prior, num_samples=batch, seed=SEED0).info)

        t = timed(run, repeats)
        rows.append({"implementation": "diffrecon DPS", "dtype": str(dtype).split(".")[-1],
                     "steps": steps, "NFE": info["nfe"], "time (s)": t,
                     "ms / NFE": 1e3 * t / info["nfe"]})
    return rows


# ---------------------------------------------------------------------------- main
def main(argv=None) -> str:
    p = arguments(__doc__, "16 px, 3 steps, tiny net")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="chains / particles per pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--particles", type=int, nargs=2, default=[16, 64],
                   help="N1 N2 for the SMC memory difference")
    p.add_argument("--_memory", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._memory:
        n, proposal, size, steps = a._memory
        _memory_child(int(n), proposal, int(size), int(steps), a.quick)
        return ""
    setup(a.threads)
    if a.quick:
        a.size, a.steps, a.batch, a.repeats, a.particles = 16, 3, 2, 1, [4, 32]
    prior, prior_desc = make_prior(a.quick)
    _, physics, y = make_problem(a.size)
    t_fwd, t_bwd = denoiser_times(prior, a.size, a.batch, max(a.repeats, 3))
    base = [{"operation": "denoiser forward", "rows": a.batch, "time (ms)": 1e3 * t_fwd,
             "ms / row": 1e3 * t_fwd / a.batch},
            {"operation": "denoiser forward + backward", "rows": a.batch,
             "time (ms)": 1e3 * t_bwd, "ms / row": 1e3 * t_bwd / a.batch}]
    rows = solver_rows(prior, physics, y, a.steps, a.batch, a.repeats, t_fwd, t_bwd)
    cg_row = dds_cg_share(prior, physics, y, a.steps, a.batch, a.repeats)
    if a.quick and not torch.cuda.is_available():  # the subprocesses take ~15 s each
        mem = [{"proposal": pr, "KiB / particle": None,
                "method": "skipped in --quick (needs fresh subprocesses on CPU)"}
               for pr in ("gaussian", "twisted")]
    else:
        mem = [smc_memory_per_particle(pr, a.size, a.steps, *a.particles, a.quick, prior,
                                       physics, y) for pr in ("gaussian", "twisted")]
    dps = dps_comparison(prior, a.size, a.steps, a.batch, a.repeats)
    text = "\n\n".join([
        "## Speed", header(),
        f"Command: `python -m benchmarks.speed {' '.join(argv or [])}`",
        f"Problem: {a.size}x{a.size} Shepp-Logan, Gaussian blur (std 1.5 px), noise 0.02; "
        f"prior: {prior_desc}; {a.batch} rows per pass; median of {a.repeats} runs.",
        markdown_table(base),
        "### Solvers vs the bare denoiser",
        markdown_table(rows),
        "### DDS: conjugate-gradient share",
        markdown_table([cg_row]),
        "### SMC memory per particle",
        markdown_table(mem),
        "### deepinv DPS vs diffrecon DPS (same prior, same steps)",
        markdown_table(dps)])
    print(text)
    return text


if __name__ == "__main__":
    if "--_memory" not in sys.argv:
        nice()
    main(sys.argv[1:])
