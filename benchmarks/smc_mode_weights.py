"""SMC mode-weight variance on one GMM problem: the posterior weights SMC puts on the top
mixture components, run after run, against the exact ones (RESULTS.md table 1b diagnosis).

    python -m benchmarks.smc_mode_weights [--d 80] [--dy 2] [--seed 1050] [--N 10000]
        [--steps 100 400] [--runs 3] [--proposal gaussian] [--chain 100000] [--quick]

Per run: sum over particles of normalised weight x exact posterior responsibility of each
component (no sampling noise from the final draw), the final ESS, and the exact weights.
``--chain M``: also the weights SMC converges to as N grows, i.e. the posterior of the
discretised prior chain (SMC's target model): M unconditional draws of that chain (same
schedule and kernel variance as the solver), their component frequencies r_k reweight the
exact posterior, w_k r_k / prior_k, renormalised. The gap between these and the exact
weights is discretisation bias that no particle count removes.
"""

from __future__ import annotations

import torch

from benchmarks.common import arguments, setup
from diffrecon.priors.analytic import mcgdiff_problem
from diffrecon.recon.smc import PROPOSALS, SMCSolver


def chain_target_weights(prior, post, steps: int, draws: int, chunk: int = 20000):
    """Posterior component weights of the discretised prior chain (module docstring)."""
    from diffrecon.recon.common import ddim_fresh_fraction, ddim_kernel_variance
    from diffrecon.recon.schedules import karras

    sigmas = karras(steps, prior.sigma_min, 500.0)
    gamma = prior.mmse(sigmas[:-1])
    eta = torch.tensor(1.0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    freq = torch.zeros_like(prior.weights)
    d = prior.means.shape[1]
    for start in range(0, draws, chunk):
        n = min(chunk, draws - start)
        z = sigmas[0] * torch.randn(n, d, generator=gen, dtype=torch.float64)
        for i in range(steps):
            t, s = sigmas[i], sigmas[i + 1]
            x0 = prior.denoise(z, t.expand(n))
            f = ddim_fresh_fraction(eta, t, s)
            v = ddim_kernel_variance(t, s, f, gamma[i])
            z = x0 + (1 - f).sqrt() * s * (z - x0) / t + v.sqrt() * torch.randn(
                n, d, generator=gen, dtype=torch.float64)
        freq += prior.responsibilities(z).sum(0)
    implied = post.weights * (freq / draws) / prior.weights
    return implied / implied.sum()


def main(argv=None) -> str:
    p = arguments(__doc__, "d = 8, N = 200, 10 steps, 1 run")
    p.add_argument("--d", type=int, default=80)
    p.add_argument("--dy", type=int, default=2)
    p.add_argument("--seed", type=int, default=1050, help="problem seed (held out: >= 1000)")
    p.add_argument("--N", type=int, default=10000)
    p.add_argument("--steps", type=int, nargs="+", default=[100, 400])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--proposal", choices=PROPOSALS, default="gaussian")
    p.add_argument("--top", type=int, default=3, help="components shown")
    p.add_argument("--chain", type=int, default=0, metavar="M",
                   help="also the chain's model-target weights from M prior-chain draws")
    a = p.parse_args(argv)
    if a.quick:
        a.d, a.N, a.steps, a.runs = 8, 200, [10], 1
    setup(a.threads)
    prior, physics, y, _ = mcgdiff_problem(a.d, a.dy, a.seed)
    post = prior.posterior(physics, y)
    top = torch.topk(post.weights, a.top).indices
    lines = [f"d={a.d} d_y={a.dy} seed={a.seed} N={a.N} proposal={a.proposal}",
             f"exact weights: {[round(float(post.weights[k]), 3) for k in top]}"]
    print("\n".join(lines), flush=True)
    for steps in a.steps:
        if a.chain:
            target = chain_target_weights(prior, post, steps, a.chain)
            lines.append(f"steps {steps} chain model target: "
                         f"{[round(float(target[k]), 3) for k in top]}")
            print(lines[-1], flush=True)
        for run in range(a.runs):
            solver = SMCSolver(num_particles=a.N, proposal=a.proposal, steps=steps,
                               sigma_max=500.0, cg_iters=a.dy + 4, chunk_size=2000)
            rec = solver.solve(y, physics, prior, num_samples=1, seed=run)
            w = torch.softmax(rec.log_weights[:, 0].double(), 0)
            mode_w = (w[:, None] * post.responsibilities(rec.particles[:, 0].double())).sum(0)
            lines.append(f"steps {steps} run {run}: {[round(float(mode_w[k]), 3) for k in top]}, "
                         f"final ESS {rec.info['final_ess'][0]:.0f}")
            print(lines[-1], flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
