"""Solver base: options handling, per-sample random streams, chunking, counters, timing.

A solver subclass defines ``Options`` (a frozen dataclass with documented defaults) and
``_sample(y, ctx) -> x`` which runs one posterior draw per row of ``y``. The base class
turns that into the public ``solve(y, physics, prior, *, num_samples, seed, callback)``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .common import RowNoise, make_generators
from .reconstruction import Reconstruction


def noise_sigma(physics) -> float:
    """Gaussian noise standard deviation of a deepinv physics (0.0 when noiseless).

    Read once per solve, at the edge, so the step loop never touches the host.
    """
    model = getattr(physics, "noise_model", None)
    sigma = getattr(model, "sigma", None)
    if sigma is None:
        return 0.0
    if isinstance(sigma, Tensor):
        if sigma.numel() != 1:
            raise ValueError("per-measurement noise levels are not supported; "
                             "give physics.noise_model a scalar sigma")
        return float(sigma.detach().cpu())
    return float(sigma)


def mean_residual(physics, mean: Tensor, y: Tensor) -> list[float]:
    """Relative data residual ||A(mean_b) - y_b|| / ||y_b|| of each measurement's posterior
    mean (B floats; one forward application after the step loop, not counted in the NFE /
    operator tallies)."""
    with torch.no_grad():
        r = (physics.A(mean.to(y.dtype)) - y).reshape(y.shape[0], -1)
        norm = y.reshape(y.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(y.dtype).tiny)
        return (r.norm(dim=1) / norm).tolist()


def physics_in_dtype(physics, dtype: torch.dtype):
    """A copy of ``physics`` whose buffers and parameters are in ``dtype`` (complex buffers
    in the matching complex dtype); the caller's object is left untouched. Solvers whose
    linear algebra is ill-conditioned in float32 (SMC's measurement-space CG at small
    sigma) run in float64 through this."""
    import copy

    clone = copy.deepcopy(physics)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    for module in clone.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is None:
                continue
            if buf.is_complex():
                module._buffers[name] = buf.to(complex_dtype)
            elif buf.is_floating_point():
                module._buffers[name] = buf.to(dtype)
        for name, par in list(module.named_parameters(recurse=False)):
            if par.is_floating_point():
                module._parameters[name] = torch.nn.Parameter(par.detach().to(dtype),
                                                              requires_grad=False)
    return clone


class CountingPrior:
    """Proxy counting denoiser calls (NFE per row) and rows evaluated; no host sync."""

    def __init__(self, prior):
        self.prior = prior
        self.calls = 0
        self.rows = 0

    def denoise(self, x: Tensor, sigma) -> Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        return self.prior.denoise(x, sigma)

    def __getattr__(self, name):
        return getattr(self.prior, name)


class CountingPhysics:
    """Proxy counting forward and adjoint applications of a deepinv physics."""

    def __init__(self, physics):
        self.physics = physics
        self.forward_calls = 0
        self.adjoint_calls = 0

    def A(self, x: Tensor, **kw) -> Tensor:
        self.forward_calls += 1
        return self.physics.A(x, **kw)

    def A_adjoint(self, y: Tensor, **kw) -> Tensor:
        self.adjoint_calls += 1
        return self.physics.A_adjoint(y, **kw)

    def __getattr__(self, name):
        return getattr(self.physics, name)


@dataclass
class SolveContext:
    """What ``_sample`` gets besides y: the counted prior and physics, the measurement
    noise level, per-row random streams, the signal shape and the progress callback."""

    physics: CountingPhysics
    prior: CountingPrior
    sigma_y: float
    noise: RowNoise
    signal_shape: tuple[int, ...]
    callback: Callable[[dict], None] | None
    diagnostics: dict[str, list]

    def report(self, **fields) -> None:
        if self.callback is not None:
            self.callback(fields)


def measurement_entropy(seed: int | Sequence[int] | None, batch: int) -> list[tuple[int, ...]]:
    """Per-measurement seed material: an int seed gives (seed, b); a sequence gives one seed
    per measurement (the pipeline passes (seed, slice index) so results do not depend on
    how slices are batched); None draws a fresh seed."""
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    if isinstance(seed, int):
        return [(seed, b) for b in range(batch)]
    seeds = list(seed)
    if len(seeds) != batch:
        raise ValueError(f"seed has {len(seeds)} entries but y has batch size {batch}")
    return [tuple(s) if isinstance(s, tuple | list) else (int(s),) for s in seeds]


class Solver:
    """Base class; see module docstring. ``Options`` must have ``batch_size`` (rows per pass)."""

    name: ClassVar[str] = "solver"
    Options: ClassVar[type]
    requires_linear: ClassVar[bool] = False

    def __init__(self, options: Any | None = None, **overrides: Any):
        opts = options if options is not None else self.Options()
        valid = {f.name for f in dataclasses.fields(opts)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"{self.name}: unknown option(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(valid))}")
        self.options = dataclasses.replace(opts, **overrides)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    # -- public --------------------------------------------------------------------------
    def solve(self, y: Tensor, physics, prior, *, num_samples: int = 1,
              seed: int | Sequence[int] | None = None,
              callback: Callable[[dict], None] | None = None) -> Reconstruction:
        """Draw ``num_samples`` posterior samples for each of the B measurements in ``y``.

        Returns a Reconstruction with samples (num_samples, B, *signal_shape). Sample i of
        measurement b depends only on (seed, b, i), not on the batch or chunk it ran in.
        With B > 1 the physics may hold per-measurement parameters; samples then run one
        sample index at a time over the whole batch. With B == 1 samples are batched
        ``batch_size`` at a time (the physics must broadcast over the batch).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self._check_physics(physics)
        t0 = time.perf_counter()
        cphys, cprior = CountingPhysics(physics), CountingPrior(prior)
        sigma_y = noise_sigma(physics)
        signal_shape = self._signal_shape(y, physics, prior)
        batch = y.shape[0]
        entropy = measurement_entropy(seed, batch)
        diagnostics: dict[str, list] = {}
        rows_per_pass = max(1, int(self.options.batch_size))
        draws = []  # list over sample chunks of (S_chunk, B, *shape)
        if batch == 1:
            for start in range(0, num_samples, rows_per_pass):
                idx = range(start, min(num_samples, start + rows_per_pass))
                noise = RowNoise(make_generators([(*entropy[0], i) for i in idx], y.device),
                                 y.dtype, y.device)
                ctx = SolveContext(cphys, cprior, sigma_y, noise, signal_shape, callback,
                                   diagnostics)
                ys = y.expand(len(idx), *y.shape[1:])
                draws.append(self._sample(ys, ctx).unsqueeze(1))
        else:
            for i in range(num_samples):
                noise = RowNoise(make_generators([(*e, i) for e in entropy], y.device),
                                 y.dtype, y.device)
                ctx = SolveContext(cphys, cprior, sigma_y, noise, signal_shape, callback,
                                   diagnostics)
                draws.append(self._sample(y, ctx).unsqueeze(0))
        samples = torch.cat(draws, 0)
        info = self._info(cphys, cprior, samples.shape[0] * batch, t0, diagnostics)
        rec = Reconstruction.from_samples(samples.detach(), info)
        rec.info["residual"] = mean_residual(physics, rec.mean, y)
        return rec

    # -- for subclasses ------------------------------------------------------------------
    @staticmethod
    def _signal_shape(y: Tensor, physics, prior) -> tuple[int, ...]:
        """Shape of x without batch: from A_adjoint for linear physics, else the prior's
        fixed ``signal_shape``, else the physics' ``img_size``, else (prior.channels, *y's
        spatial size) for shape-preserving nonlinear operators."""
        from deepinv.physics import LinearPhysics

        if isinstance(physics, LinearPhysics):
            with torch.no_grad():
                return tuple(physics.A_adjoint(y).shape[1:])
        if getattr(prior, "signal_shape", None) is not None:
            return tuple(prior.signal_shape)
        if getattr(physics, "img_size", None) is not None:
            return tuple(physics.img_size)
        if getattr(prior, "channels", None) is not None and y.ndim == 4:
            return (prior.channels, *y.shape[2:])
        raise ValueError("cannot infer the signal shape for a nonlinear physics: set "
                         "physics.img_size = (C, H, W)")

    def _sample(self, y: Tensor, ctx: SolveContext) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _check_physics(self, physics) -> None:
        if self.requires_linear:
            from deepinv.physics import LinearPhysics

            if not isinstance(physics, LinearPhysics):
                raise TypeError(f"{self.name} requires a deepinv LinearPhysics (A_adjoint), "
                                f"got {type(physics).__name__}")

    def _info(self, cphys: CountingPhysics, cprior: CountingPrior, chains: int, t0: float,
              diagnostics: dict[str, list]) -> dict[str, Any]:
        return {
            "solver": self.name,
            "options": {k: (v if isinstance(v, int | float | str | bool | type(None)) else str(v))
                        for k, v in dataclasses.asdict(self.options).items()},
            "nfe": cprior.rows // max(chains, 1),
            "denoiser_calls": cprior.calls,
            "denoiser_rows": cprior.rows,
            "forward_applications": cphys.forward_calls,
            "adjoint_applications": cphys.adjoint_calls,
            "wall_time_s": time.perf_counter() - t0,
            **diagnostics,
        }
