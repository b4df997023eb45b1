"""Exact analytic priors: Gaussian mixtures with closed-form denoiser and posterior.

The noisy marginal of a GMM is again a GMM (covariances Sigma_k + sigma^2 I), so
D(x, sigma) = E[x0 | x0 + sigma n = x] is exact, and so is the posterior under a
linear-Gaussian measurement y = A x + sigma_y n. These are the ground truth every solver
is tested against (algorithms.md, "Gaussian-mixture exactness protocol"; MCGdiff,
arXiv 2308.07983, section 5). All arithmetic is float64.

Covariance storage (chosen by the constructor):
    isotropic  ``covariances=None``: Sigma_k = variance_k I, O(B K d) denoiser.
    tied       ``covariances`` (d, d): one Sigma for every component, O(B K d + B d^2).
    full       ``covariances`` (K, d, d): eigendecomposition cached per component.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .base import Prior

_LOG_2PI = math.log(2 * math.pi)


class GaussianMixture(Prior):
    """Gaussian mixture prior on vectors (B, d) with an exact denoiser.

    Args:
        means: (K, d) component means.
        weights: (K,) non-negative mixture weights (normalised here).
        covariances: None (isotropic, ``variance * I``), (d, d) shared by all components,
            or (K, d, d) one per component. Symmetric positive semi-definite.
        variance: isotropic variance, a float or (K,) per component (used when
            ``covariances`` is None); must be > 0.
    """

    name = "gaussian_mixture"
    channels = None

    def __init__(self, means, weights, covariances=None, variance=1.0):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64, device=means.device)
        if means.ndim != 2 or weights.shape != means.shape[:1]:
            raise ValueError(f"GaussianMixture expects means (K, d) and weights (K,), got "
                             f"{tuple(means.shape)} and {tuple(weights.shape)}.")
        if bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ValueError("GaussianMixture weights must be non-negative with a positive sum.")
        k, d = means.shape
        self.signal_shape = (d,)
        self.register_buffer("means", means.clone())
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        if covariances is None:
            var = torch.as_tensor(variance, dtype=torch.float64, device=means.device)
            var = var.expand(k).clone()
            if not bool((var > 0).all()):
                raise ValueError("GaussianMixture isotropic variance must be > 0.")
            self.kind = "isotropic"
            self.register_buffer("variances", var)
            diag = var[:, None].expand(k, d)
            self._floor = 0.0
        else:
            cov = torch.as_tensor(covariances, dtype=torch.float64, device=means.device)
            if cov.shape == (d, d):
                cov = cov[None]
            if cov.shape not in ((1, d, d), (k, d, d)):
                raise ValueError(f"GaussianMixture covariances must be ({d}, {d}) or "
                                 f"({k}, {d}, {d}), got {tuple(cov.shape)}.")
            cov = 0.5 * (cov + cov.mT)
            evals, evecs = torch.linalg.eigh(cov)
            evals = evals.clamp_min(0.0)
            self.kind = "tied" if cov.shape[0] == 1 else "full"
            self.register_buffer("cov_stack", cov)
            self.register_buffer("eigvals", evals)
            self.register_buffer("eigvecs", evecs)
            diag = torch.diagonal(cov, dim1=-2, dim2=-1).expand(k, d)
            # Variance floor so singular covariances (noiseless posteriors) keep finite
            # densities: eigenvalues below 1e-12 x the largest are treated as that value.
            self._floor = 1e-12 * max(float(evals.max()), 1e-300)
        std = diag.clamp_min(0).sqrt()
        self.data_range = (float((means - 4 * std).min()), float((means + 4 * std).max()))

    # ---------------------------------------------------------------- moments, shapes
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()

    @property
    def covariances(self) -> Tensor:
        """(K, d, d) component covariances (an expanded view when shared)."""
        k, d = self.means.shape
        if self.kind == "isotropic":
            eye = torch.eye(d, dtype=torch.float64, device=self.means.device)
            return self.variances[:, None, None] * eye
        return self.cov_stack.expand(k, d, d)

    def mean(self) -> Tensor:
        """(d,) mixture mean."""
        return self.weights @ self.means

    def cov(self) -> Tensor:
        """(d, d) mixture covariance sum_k w_k (Sigma_k + mu_k mu_k^T) - m m^T."""
        w, mu = self.weights, self.means
        m = w @ mu
        within = (w[:, None, None] * self.covariances).sum(0)
        return within + (mu.T * w) @ mu - torch.outer(m, m)

    # ---------------------------------------------------------------- densities
    def _logits(self, x: Tensor, s2: Tensor) -> Tensor:
        """log w_k + log N(x; mu_k, Sigma_k + s2 I) for x (B, d), s2 (B,) -> (B, K)."""
        mu, d = self.means, self.dim
        cols = []
        if self.kind == "isotropic":
            var = self.variances[None, :] + s2[:, None]                      # (B, K)
            dist = torch.cdist(x, mu, compute_mode="donot_use_mm_for_euclid_dist")
            quad = dist ** 2 / var
            logdet = d * torch.log(var)
        elif self.kind == "tied":
            q = self.eigvecs[0]
            var = (self.eigvals[0][None, :] + s2[:, None]).clamp_min(self._floor)  # (B, d)
            e, m = x @ q, mu @ q
            for k in range(mu.shape[0]):
                cols.append((((e - m[k]) ** 2) / var).sum(1))
            quad = torch.stack(cols, 1)
            logdet = torch.log(var).sum(1, keepdim=True)
        else:
            logdet = []
            for k in range(mu.shape[0]):
                var = (self.eigvals[k][None, :] + s2[:, None]).clamp_min(self._floor)
                e = (x - mu[k]) @ self.eigvecs[k]
                cols.append((e ** 2 / var).sum(1))
                logdet.append(torch.log(var).sum(1))
            quad, logdet = torch.stack(cols, 1), torch.stack(logdet, 1)
        return self.log_weights - 0.5 * quad - 0.5 * logdet - 0.5 * d * _LOG_2PI

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """log p_sigma(x) of the noisy marginal (sigma = 0: the prior); x (B, d) -> (B,).

        Differentiable in x (used for Tweedie checks: D = x + sigma^2 grad log p_sigma).
        """
        x64 = x.to(torch.float64)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])
        return torch.logsumexp(self._logits(x64, s ** 2), 1)

    def responsibilities(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """(B, K) posterior component probabilities p(k | x0 + sigma n = x)."""
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])
        return torch.softmax(self._logits(x.to(torch.float64), s ** 2), 1)

    # ---------------------------------------------------------------- denoiser
    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        x = x.to(torch.float64)
        s2 = sigma.to(torch.float64) ** 2
        r = torch.softmax(self._logits(x, s2), 1)                            # (B, K)
        mu = self.means
        if self.kind == "isotropic":
            # mu_k + v_k/(v_k+s^2) (x - mu_k) = c_k x + (1 - c_k) mu_k
            var = self.variances[None, :] + s2[:, None]
            keep = (r * self.variances / var).sum(1, keepdim=True)
            out = keep * x + (r * s2[:, None] / var) @ mu
        elif self.kind == "tied":
            q, lam = self.eigvecs[0], self.eigvals[0]
            var = (lam[None, :] + s2[:, None]).clamp_min(self._floor)
            e = x @ q
            out = ((lam / var) * e + (s2[:, None] / var) * (r @ (mu @ q))) @ q.T
        else:
            out = torch.zeros_like(x)
            for k in range(mu.shape[0]):
                q, lam = self.eigvecs[k], self.eigvals[k]
                var = (lam[None, :] + s2[:, None]).clamp_min(self._floor)
                e = (x - mu[k]) @ q
                out = out + r[:, k:k + 1] * (mu[k] + ((lam / var) * e) @ q.T)
        return torch.where(s2[:, None] > 0, out, x)

    def mmse(self, sigmas: Tensor, num_draws: int = 4096) -> Tensor:
        """Per-entry MMSE at each sigma (Prior.mmse): exact for one component
        (mean of sigma^2 l / (l + sigma^2) over the covariance eigenvalues l), otherwise a
        Monte Carlo average over ``num_draws`` fixed-seed prior draws (deterministic; relative
        error about 1 / sqrt(num_draws d)). One call per solve, not per step."""
        sig = torch.as_tensor(sigmas, dtype=torch.float64).to(self.means.device)
        s2 = sig[:, None] ** 2
        if self.num_components == 1:
            lam = (self.variances.expand(self.dim) if self.kind == "isotropic"
                   else self.eigvals[0]).clamp_min(0)
            return (s2 * lam / (lam + s2).clamp_min(self._floor)).mean(1).reshape(sig.shape)
        g = torch.Generator(device=self.means.device).manual_seed(0)
        x = self.sample(num_draws, g)
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device)
        out = [((self._denoise(x + s * noise, s.expand(num_draws)) - x) ** 2).mean()
               if s > 0 else s.new_zeros(()) for s in sig]
        return torch.stack(out).reshape(sig.shape) if out else sig.clone()

    # ---------------------------------------------------------------- sampling
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact draws, (n, d) float64 on the buffers' device."""
        mu = self.means
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, device=mu.device, generator=generator)
        if self.kind == "isotropic":
            return mu[comp] + self.variances[comp, None].sqrt() * z
        root = self.eigvecs * self.eigvals.sqrt()[:, None, :]                 # Q diag(sqrt l)
        if self.kind == "tied":
            return mu[comp] + z @ root[0].T
        out = torch.empty_like(z)
        for k in range(mu.shape[0]):
            sel = comp == k
            out[sel] = mu[k] + z[sel] @ root[k].T
        return out

    # ---------------------------------------------------------------- posterior
    def _cov_stack(self) -> Tensor:
        """(1 or K, d, d) covariances; one when every component shares it."""
        if self.kind != "isotropic":
            return self.cov_stack
        v = self.variances
        eye = torch.eye(self.dim, dtype=torch.float64, device=v.device)
        if bool((v == v[0]).all()):
            return v[:1, None, None] * eye
        return v[:, None, None] * eye

    def posterior(self, physics, y) -> GaussianMixture:
        """Exact posterior p(x | y) for y = A x + sigma_y n (A linear), a GMM with full
        (possibly shared) covariances.

        S_k = sigma_y^2 I + A Sigma_k A^T, K_k = Sigma_k A^T S_k^-1,
        m_k' = mu_k + K_k (y - A mu_k), Sigma_k' = Sigma_k - K_k A Sigma_k,
        w_k' proportional to w_k N(y; A mu_k, S_k). sigma_y = 0 works when A Sigma_k A^T is
        invertible. ``y`` is (d_y,) or (1, d_y).
        """
        dev = self.means.device
        a = dense_matrix(physics, self.dim, device=dev)                       # (d_y, d)
        y = torch.as_tensor(y, device=dev).to(torch.float64)
        if y.ndim == 2 and y.shape[0] == 1:
            y = y[0]
        if y.shape != (a.shape[0],):
            raise ValueError(f"posterior expects y of shape ({a.shape[0]},) or "
                             f"(1, {a.shape[0]}), got {tuple(y.shape)}.")
        sy = physics_noise_sigma(physics)
        cov = self._cov_stack()                                               # (C, d, d)
        cat = cov @ a.T                                                       # (C, d, d_y)
        s = a @ cat + sy ** 2 * torch.eye(a.shape[0], dtype=torch.float64, device=dev)
        chol = torch.linalg.cholesky(0.5 * (s + s.mT))
        gain = torch.cholesky_solve(cat.mT, chol).mT                          # (C, d, d_y)
        resid = y - self.means @ a.T                                          # (K, d_y)
        new_means = self.means + (gain @ resid[..., None])[..., 0]
        new_cov = cov - gain @ cat.mT
        new_cov = 0.5 * (new_cov + new_cov.mT)
        white = torch.linalg.solve_triangular(chol, resid[..., None], upper=False)[..., 0]
        log_lik = (-0.5 * (white ** 2).sum(-1)
                   - torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
                   - 0.5 * a.shape[0] * _LOG_2PI)
        log_w = self.log_weights + log_lik
        weights = torch.softmax(log_w, 0)
        return GaussianMixture(new_means, weights, new_cov[0] if new_cov.shape[0] == 1
                               else new_cov)


class Gaussian(GaussianMixture):
    """A single Gaussian N(mean, cov); ``cov`` a (d, d) matrix or a scalar variance."""

    name = "gaussian"

    def __init__(self, mean, cov=1.0):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        one = torch.ones(1, dtype=torch.float64)
        if cov.ndim == 0:
            super().__init__(mean[None], one, variance=cov)
        else:
            super().__init__(mean[None], one, covariances=cov)


# -------------------------------------------------------------------- physics helpers
def physics_noise_sigma(physics) -> float:
    """Scalar Gaussian noise level of a deepinv physics (0.0 when it has none)."""
    sigma = getattr(getattr(physics, "noise_model", None), "sigma", None)
    if sigma is None:
        return 0.0
    sigma = torch.as_tensor(sigma)
    if sigma.numel() != 1:
        raise ValueError("posterior needs a scalar physics.noise_model.sigma.")
    return float(sigma.detach().cpu())


def dense_matrix(physics, d: int, device=None) -> Tensor:
    """The (d_y, d) float64 matrix of a linear physics acting on (B, d) signals.

    Uses the ``matrix`` buffer of ``diffrecon.operators.matrix`` physics, else applies
    ``physics.A`` to the identity (fine for any small linear physics).
    """
    m = getattr(physics, "matrix", None)
    if isinstance(m, Tensor) and m.ndim == 2 and m.shape[1] == d:
        return m.detach().to(device=device, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64, device=device)
    try:
        cols = physics.A(eye)
    except RuntimeError:  # physics holding float32 parameters
        cols = physics.A(eye.float())
    return cols.detach().reshape(d, -1).to(torch.float64).T.contiguous()


# -------------------------------------------------------------------- MCGdiff protocol
def mcgdiff_problem(d: int, d_y: int, seed: int):
    """The GMM exactness problem of algorithms.md (MCGdiff recipe), all from
    ``np.random.default_rng(seed)`` in float64.

    Draw order: xi (25,) for the weights; a (d_y, d) Gaussian matrix; s (d_y,) ~ U(0, 1)
    sorted decreasing; u ~ U(0, 1); the component of x* and its N(0, I) offset; the
    measurement noise n (d_y,).

    Returns:
        prior (25-component GMM, means (8i, 8j, 8i, 8j, ...), identity covariances),
        physics (``diffrecon.operators.matrix(A, sigma_y)``), y (1, d_y), x_true (1, d).
    """
    if d % 2 or d < 2 or not 1 <= d_y <= d:
        raise ValueError(f"mcgdiff_problem needs an even d >= 2 and 1 <= d_y <= d, "
                         f"got d={d}, d_y={d_y}.")
    from ..operators import matrix  # imported here: operators pull in sigpy

    rng = np.random.default_rng(seed)
    grid = [(8.0 * i, 8.0 * j) for i in range(-2, 3) for j in range(-2, 3)]
    means = np.array([list(p) * (d // 2) for p in grid])
    xi = rng.standard_normal(len(grid))
    weights = xi ** 2 / np.sum(xi ** 2)
    g = rng.standard_normal((d_y, d))
    u_mat, _, vh = np.linalg.svd(g, full_matrices=False)  # vh = Vh[:d_y]
    s = np.sort(rng.uniform(size=d_y))[::-1]
    a = u_mat @ np.diag(s) @ vh[:d_y]
    sigma_y = float(rng.uniform() * s.max())
    k = rng.choice(len(grid), p=weights)
    x_true = means[k] + rng.standard_normal(d)
    y = a @ x_true + sigma_y * rng.standard_normal(d_y)
    prior = GaussianMixture(means, weights, variance=1.0)
    physics = matrix(torch.from_numpy(a), sigma_y)
    return (prior, physics, torch.from_numpy(y)[None], torch.from_numpy(x_true)[None])


# -------------------------------------------------------------------- metrics
def sliced_wasserstein(x: Tensor, y: Tensor, n_directions: int = 500,
                       generator: torch.Generator | None = None) -> Tensor:
    """Sliced W1 between two equal-size sample sets (n, d): mean over random unit
    directions of the 1-D W1 of the projections (sorted-sample difference). Scalar tensor."""
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs two (n, d) sample sets of equal shape, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}.")
    x, y = x.to(torch.float64), y.to(device=x.device, dtype=torch.float64)
    theta = torch.randn(x.shape[1], n_directions, dtype=torch.float64, device=x.device,
                        generator=generator)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, 0)
    py, _ = torch.sort(y @ theta, 0)
    return (px - py).abs().mean()


def mixture_weight_tv(samples: Tensor, posterior: GaussianMixture) -> Tensor:
    """Total variation 0.5 sum_k |p_k - w_k| between the histogram of most-responsible
    components of ``samples`` (n, d) and the exact weights w of ``posterior``."""
    resp = posterior.responsibilities(samples.to(posterior.means.device))
    counts = torch.bincount(resp.argmax(1), minlength=posterior.num_components)
    p = counts.to(torch.float64) / samples.shape[0]
    return 0.5 * (p - posterior.weights).abs().sum()
