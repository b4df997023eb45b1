"""Coverage of central credible intervals per solver: how often the truth lies within
mean +- 1.64 std (nominal 90% for a Gaussian posterior).

    python -m benchmarks.uncertainty [--quick] [--seeds 5] [--samples 200]

Two problems with exact posteriors:
  gmm    the GMM protocol (``mcgdiff_problem(d, d_y, seed)``, x_true drawn from the prior).
         The posterior is a mixture, so even exact +-1.64 std intervals need not cover 90%:
         the "exact posterior" row (exact draws) is the reference to compare with.
  image  a size x size image with a Gaussian-random-field prior (mean 0.5, std 0.1,
         squared-exponential correlation length 2 px, nugget 1e-4), Gaussian blur (std 1 px,
         circular) with noise 0.05; exact Gaussian posterior, so exact coverage is 90%.
Coverage pools every coordinate (pixel) of every seed; "± sd" is the spread over seeds.
width ratio = mean solver std / mean exact posterior std (1 = intervals of the right width).
RED-diff's spread comes only from its random draws (a MAP-like estimate per seed), so its
coverage is not a posterior statement. Solver options: defaults except ``steps``.
"""

from __future__ import annotations

import math
import sys

import torch

from benchmarks.common import (
    SEED0,
    arguments,
    fmt_ms,
    header,
    markdown_table,
    mean_spread,
    nice,
    setup,
)
from diffrecon.priors.base import Prior

Z90 = 1.64
SOLVERS = {  # label -> (registry name, options)
    "dps": ("dps", {}),
    "reddiff": ("reddiff", {}),
    "dds": ("dds", {}),
    "smc gaussian": ("smc", {"proposal": "gaussian"}),
    "smc twisted": ("smc", {"proposal": "twisted"}),
    "smc bootstrap": ("smc", {"proposal": "bootstrap"}),
}
COLUMNS = ["problem", "solver", "coverage", "± sd", "width ratio", "coordinates"]


class ImagePrior(Prior):
    """A vector GMM prior (d = H W) seen as images (B, 1, H, W) (exact denoiser)."""

    channels = 1

    def __init__(self, gmm, size: int):
        super().__init__()
        self.gmm, self.size = gmm, size
        self.signal_shape = (1, size, size)
        self.data_range = gmm.data_range

    def _denoise(self, x, sigma):
        return self.gmm.denoise(x.reshape(x.shape[0], -1), sigma).reshape(x.shape)

    def mmse(self, sigmas):
        """Per-pixel MMSE of the underlying Gaussian (exact; SMC's analytic kernel variance)."""
        return self.gmm.mmse(sigmas)


def grf_problem(size: int, seed: int):
    """(image prior, physics, y, x_true, exact posterior GMM on flattened images)."""
    from diffrecon.operators import blur, matrix
    from diffrecon.priors.analytic import Gaussian

    r = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1)
    r = r.reshape(-1, 2).to(torch.float64)
    cov = 0.01 * torch.exp(-torch.cdist(r, r) ** 2 / (2 * 2.0 ** 2))
    cov = cov + 1e-4 * torch.eye(size * size, dtype=torch.float64)
    gmm = Gaussian(torch.full((size * size,), 0.5, dtype=torch.float64), cov)
    prior = ImagePrior(gmm, size)
    physics = blur("gaussian", width=1.0, noise_sigma=0.05, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    x = gmm.sample(1, gen).reshape(1, 1, size, size)
    ax = physics.A(x)
    y = ax + 0.05 * torch.randn(ax.shape, generator=gen, dtype=torch.float64)
    eye = torch.eye(size * size, dtype=torch.float64).reshape(-1, 1, size, size)
    a = physics.A(eye).reshape(size * size, -1).T                      # (d_y, d)
    post = gmm.posterior(matrix(a, 0.05), y.reshape(1, -1))
    return prior, physics, y, x, post


def solve(label: str, prior, physics, y, steps: int, samples: int, seed: int):
    """(mean, std) flattened (d,) of solver ``label``'s posterior estimate."""
    from diffrecon.recon import get_solver

    name, opts = SOLVERS[label]
    opts = dict(opts, steps=steps)
    if name == "smc":
        opts.update(num_particles=samples, chunk_size=samples)
    else:
        opts.update(batch_size=samples)
    rec = get_solver(name, **opts).solve(y, physics, prior, num_samples=samples, seed=seed)
    return rec.mean[0].reshape(-1).to(torch.float64), rec.std[0].reshape(-1).to(torch.float64)


def coverage_rows(problem: str, make, seeds, labels, steps, samples) -> list[dict]:
    """Coverage per solver (and the exact posterior) over ``seeds`` of ``make(seed)``."""
    hits = {k: [] for k in ["exact posterior", *labels]}
    widths = {k: [] for k in hits}
    coords = {k: 0 for k in hits}
    for seed in seeds:
        prior, physics, y, x, post = make(seed)
        x = x.reshape(-1).to(torch.float64)
        gen = torch.Generator().manual_seed(seed + 2)
        ex = post.sample(max(samples, 2000), gen)
        exact_std = ex.std(0)
        for label in hits:
            if label == "exact posterior":
                mean, std = ex.mean(0), exact_std
            else:
                mean, std = solve(label, prior, physics, y, steps, samples, seed + 1)
            inside = ((x - mean).abs() <= Z90 * std).to(torch.float64)
            hits[label].append(float(inside.mean()))
            widths[label].append(float(std.mean() / exact_std.mean()))
            coords[label] += x.numel()
    rows = []
    for label in hits:
        m, s = mean_spread(hits[label])
        rows.append({"problem": problem, "solver": label, "coverage": m, "± sd": s,
                     "width ratio": fmt_ms(widths[label]), "coordinates": coords[label]})
    return rows


def main(argv=None) -> str:
    p = arguments(__doc__, "1 seed, tiny problems")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--samples", type=int, default=200, help="draws / particles per solve")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--d", type=int, default=8, help="GMM dimension")
    p.add_argument("--dy", type=int, default=2, help="GMM measurement dimension")
    p.add_argument("--size", type=int, default=16, help="image side (pixels)")
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    a = p.parse_args(argv)
    setup(a.threads)
    if a.quick:
        a.seeds, a.samples, a.steps, a.size = 1, 32, 8, 8
    seeds = [SEED0 + 10 * i for i in range(a.seeds)]

    def gmm(seed):
        from diffrecon.priors.analytic import mcgdiff_problem

        prior, physics, y, x = mcgdiff_problem(a.d, a.dy, seed)
        return prior, physics, y, x, prior.posterior(physics, y)

    rows = coverage_rows(f"gmm d={a.d} d_y={a.dy}", gmm, seeds, a.solvers, a.steps, a.samples)
    rows += coverage_rows(f"image {a.size}x{a.size} GRF blur", lambda s: grf_problem(a.size, s),
                          seeds, a.solvers, a.steps, a.samples)
    nominal = 2 * 0.5 * (1 + math.erf(Z90 / math.sqrt(2))) - 1
    text = "\n\n".join([
        "## Uncertainty: coverage of mean ± 1.64 std intervals", header(),
        f"Command: `python -m benchmarks.uncertainty {' '.join(argv or [])}`",
        f"Seeds {seeds}; {a.samples} draws (SMC: particles) per solve; {a.steps} steps. "
        f"Nominal coverage for a Gaussian posterior: {nominal:.3f}.",
        markdown_table(rows, COLUMNS)])
    print(text)
    return text


if __name__ == "__main__":
    nice()
    main(sys.argv[1:])
