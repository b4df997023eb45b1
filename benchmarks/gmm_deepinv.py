"""deepinv 0.5's own samplers (DPS, DDRM, DiffPIR) on the GMM exactness problems, with the
same exact GMM denoiser diffrecon's solvers get.

    python -m benchmarks.gmm_deepinv [--quick] [--d 8 80] [--dy 1 2 4] [--seeds 3]

Adaptation (exact, documented). deepinv's samplers assume images in [0, 1] (DPS and DiffPIR
work internally in [-1, 1], clip the denoised estimate to [-1, 1], and DiffPIR starts from
2 A^T y - 1). The GMM lives on about [-R, R]^d, R = max |prior.data_range| (20 for the
protocol's means +-16 with unit variances). We therefore run deepinv on the affinely mapped
problem u = (x / R + 1) / 2 in [0, 1]^d:
    denoiser  D_u(u, s) = (D_x(R (2u - 1), 2 R s) / R + 1) / 2        (exact for the GMM)
    physics   the same matrix A, noise sigma_y / (2 R);  y_u = (y + R A 1) / (2 R)
and map the samples back, x = R (2u - 1). Signals are vectors (B, d); deepinv's samplers
accept them as they are (nothing image-specific is used), so no (B, 1, 1, d) reshape is
needed. DDRM needs a ``DecomposablePhysics``: we build it from the full SVD of A,
A = U diag(s) V^T, with singular values padded by zeros to length d (DDRM compares U^T y
and V^T x coordinate-wise, so both must be d-vectors). Each sampler otherwise runs with its
own defaults (DPS: VP, DDPM solver, 1000 steps, weight 1, "norm" guidance; DDRM: sigmas
linspace(1, 0, 100) in [0, 1] units, eta 0.85; DiffPIR: 100 steps, zeta 0.1, lambda 7),
except that ``--quick`` uses fewer steps. deepinv draws from the global torch RNG; we
seed it with ``torch.manual_seed`` per run.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from benchmarks.common import (
    SEED0,
    arguments,
    fmt_ms,
    gmm_metrics,
    header,
    markdown_table,
    mean_spread,
    nice,
    setup,
)

SAMPLERS = ("dps", "ddrm", "diffpir")
# deepinv 0.5 defaults; NFE = steps (DDRM, DiffPIR), steps - 1 (DPS: time points)
DEFAULT_STEPS = {"dps": 1000, "ddrm": 100, "diffpir": 100}


class UnitDenoiser(torch.nn.Module):
    """deepinv-style denoiser ``forward(u, sigma)`` in [0, 1] units around a diffrecon prior
    on [-R, R]: D_u(u, s) = (D_x(R (2u - 1), 2 R s) / R + 1) / 2. Runs the prior in float64
    and returns u's dtype. ``sigma``: float or tensor with B (or 1) entries."""

    def __init__(self, prior, radius: float):
        super().__init__()
        self.prior, self.radius = prior, float(radius)

    def forward(self, u, sigma, *args, **kwargs):
        b = u.shape[0]
        s = torch.as_tensor(sigma, dtype=torch.float64, device=u.device).reshape(-1)
        s = s.expand(b) if s.numel() == 1 else s
        x = self.radius * (2 * u.reshape(b, -1).to(torch.float64) - 1)
        d = self.prior.denoise(x, 2 * self.radius * s)
        return ((d / self.radius + 1) / 2).reshape(u.shape).to(u.dtype)


def svd_physics(matrix: torch.Tensor, noise_sigma: float, dtype=torch.float32):
    """deepinv ``DecomposablePhysics`` for A (d_y, d) on vectors (B, d): U^T y and V^T x are
    both d-vectors (zero-padded singular values ``mask`` (1, d))."""
    import deepinv as dinv

    a = matrix.to(torch.float64)
    d_y, d = a.shape
    u, s, vh = torch.linalg.svd(a, full_matrices=True)          # u (d_y, d_y), vh (d, d)
    u, v = u.to(dtype), vh.T.contiguous().to(dtype)
    mask = torch.zeros(1, d, dtype=dtype)
    mask[0, :d_y] = s.to(dtype)

    def u_adj(y):                      # (B, d_y) -> (B, d), zero-padded
        out = y.new_zeros(y.shape[0], d)
        out[:, :d_y] = y @ u
        return out

    return dinv.physics.DecomposablePhysics(
        U=lambda z: z[:, :d_y] @ u.T, U_adjoint=u_adj, V=lambda z: z @ v.T,
        V_adjoint=lambda x: x @ v, mask=mask,
        noise_model=dinv.physics.GaussianNoise(sigma=float(noise_sigma)))


def unit_problem(prior, physics, y):
    """(denoiser, physics, y_u, R) of the [0, 1]-mapped problem (module docstring)."""
    from diffrecon.priors.analytic import dense_matrix, physics_noise_sigma

    radius = float(max(abs(v) for v in prior.data_range))
    a = dense_matrix(physics, prior.dim)
    y_u = (y.to(torch.float64) + radius * a.sum(1)) / (2 * radius)
    phys = svd_physics(a, physics_noise_sigma(physics) / (2 * radius))
    return UnitDenoiser(prior, radius), phys, y_u.float(), radius


def run_sampler(name: str, prior, physics, y, n: int, seed: int, steps: int | None = None):
    """n posterior draws (n, d) float64 in x units from deepinv's sampler ``name``."""
    import deepinv as dinv

    den, phys, y_u, radius = unit_problem(prior, physics, y)
    ys = y_u.expand(n, -1).contiguous()
    torch.manual_seed(seed)
    with torch.no_grad():
        if name == "dps":
            model = dinv.sampling.DPS(den, num_steps=steps or DEFAULT_STEPS["dps"],
                                      dtype=torch.float64,
                                      rng=torch.Generator().manual_seed(seed))
            u = model(ys, phys, seed=seed)
        elif name == "ddrm":
            sigmas = np.linspace(1, 0, steps or DEFAULT_STEPS["ddrm"])
            u = dinv.sampling.DDRM(den, sigmas=sigmas)(ys, phys, seed=seed)
        elif name == "diffpir":
            model = dinv.sampling.DiffPIR(den, dinv.optim.data_fidelity.L2(),
                                          max_iter=steps or DEFAULT_STEPS["diffpir"])
            u = model(ys, phys, seed=seed)
        else:
            raise ValueError(f"unknown deepinv sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return (radius * (2 * u.to(torch.float64) - 1)).reshape(n, -1)


def evaluate(name: str, d: int, d_y: int, seeds, n: int = 2000, steps: int | None = None
             ) -> dict:
    """Run sampler ``name`` on problems (d, d_y, seed) for each seed; per-seed metrics lists."""
    from diffrecon.priors.analytic import mcgdiff_problem

    out = {"sw": [], "floor": [], "tv": [], "mean_err": [], "time": [], "error": None}
    for seed in seeds:
        prior, physics, y, _ = mcgdiff_problem(d, d_y, seed)
        post = prior.posterior(physics, y)
        t0 = time.perf_counter()
        try:
            x = run_sampler(name, prior, physics, y, n, seed + 1, steps)
        except Exception as exc:  # report a sampler that cannot run instead of faking it
            out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            return out
        out["time"].append(time.perf_counter() - t0)
        if not torch.isfinite(x).all():
            out["error"] = "non-finite samples"
            return out
        for k, v in gmm_metrics(x, post, seed + 2).items():
            out[k].append(v)
    return out


def rows_for(d_list, dy_list, seeds, n, steps, samplers=SAMPLERS) -> list[dict]:
    rows = []
    for d in d_list:
        for d_y in dy_list:
            for name in samplers:
                r = evaluate(name, d, d_y, seeds, n, steps)
                rows.append({
                    "d": d, "d_y": d_y, "solver": f"deepinv {name.upper()}", "N": None,
                    "NFE": (steps or DEFAULT_STEPS[name]) - (name == "dps"),
                    "SW": fmt_ms(r["sw"]) if not r["error"] else f"failed: {r['error']}",
                    "floor": fmt_ms(r["floor"]), "weight TV": fmt_ms(r["tv"]),
                    "mean err": fmt_ms(r["mean_err"]), "ESS/N": None,
                    "time (s)": mean_spread(r["time"])[0]})
    return rows


COLUMNS = ["d", "d_y", "solver", "N", "NFE", "SW", "floor", "weight TV", "mean err", "ESS/N",
           "time (s)"]


def main(argv=None) -> str:
    p = arguments(__doc__, "d=8, d_y=2, 1 seed, few steps")
    p.add_argument("--d", type=int, nargs="+", default=[8, 80, 800])
    p.add_argument("--dy", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--steps", type=int, default=None, help="override every sampler's steps")
    p.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    a = p.parse_args(argv)
    setup(a.threads)
    if a.quick:
        a.d, a.dy, a.seeds, a.samples, a.steps = [8], [2], 1, 500, a.steps or 20
    seeds = [SEED0 + 10 * i for i in range(a.seeds)]
    rows = rows_for(a.d, a.dy, seeds, a.samples, a.steps, tuple(a.samplers))
    text = "\n\n".join([
        "## deepinv samplers on the GMM exactness problems", header(),
        f"Command: `python -m benchmarks.gmm_deepinv {' '.join(argv or [])}`".replace(" `", "`"),
        f"{a.samples} draws per problem, seeds {seeds}; SW = sliced W1 (500 directions), "
        "mean ± sd over seeds. Problem mapped to [0, 1] exactly (see module docstring).",
        markdown_table(rows, COLUMNS)])
    print(text)
    return text


if __name__ == "__main__":
    nice()
    main(sys.argv[1:])
