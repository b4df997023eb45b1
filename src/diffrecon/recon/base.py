"""Solver base: the one ``solve()`` every solver shares, and the counting proxies.

``solve`` validates, wraps the prior and physics in counting proxies, runs the solver's
passes and assembles one ``Reconstruction`` with its info (NFE, operator applications, wall
time, the data residual of the mean). A solver subclass defines ``Options`` (a frozen
dataclass with documented defaults, validated at construction) and ``_sample(y, ctx)``, one
pass of draws; the other hooks have defaults that suit per-sample posterior samplers:

    _check(physics, prior)        refuse an unsuitable physics / prior (ValueError, TypeError)
    _passes(y, ctx, num_samples)  the (rows, context) pairs handed to ``_sample``
    _combine(draws, ctx)          the pass results -> Reconstruction
    working_dtype                 dtype of y and the physics inside the solve (None: as given)

Library errors are ordinary exceptions naming the offending option; the pipeline and the
CLI turn them into one-line input errors.
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .common import (
    RowNoise,
    make_generators,
    measurement_entropy,
    noise_chi,
    noise_sigma,
    physics_in_dtype,
    relative_residual,
)
from .reconstruction import Reconstruction
from .schedules import check_schedule, solver_sigmas

# Ranges of numeric solver options, by name (every solver's Options share these names).
# (low, low_inclusive, high): value must be > low (>= low when inclusive) and <= high.
OPTION_RANGES: dict[str, tuple[float, bool, float]] = {
    **dict.fromkeys(("steps", "batch_size", "iters", "num_particles", "chunk_size",
                     "max_solves"), (1, True, math.inf)),
    **dict.fromkeys(("cg_iters", "search_iters", "lam", "lam_reference", "kappa", "plateau",
                     "zeta", "rho"), (0, True, math.inf)),  # 0: DDS = denoiser, dds3d = dds
    **dict.fromkeys(("gamma", "sigma_min", "sigma_max", "lr", "tau", "sigma_y_floor"),
                    (0, False, math.inf)),
    **dict.fromkeys(("eta", "ess_threshold"), (0, True, 1.0)),
}


def check_options(name: str, cls: type, values: dict[str, Any]) -> None:
    """ValueError naming the option unless each field of the Options dataclass ``cls`` that
    ``values`` gives has its annotated type (an int where a float is expected is fine, a bool
    is not a number), a finite value in its ``OPTION_RANGES`` range, sigma_min < sigma_max,
    and a known ``schedule`` that takes the bounds it is given. Run when a solver is built,
    before any data is seen (the Options' own ``__post_init__`` checks their text values)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        hint = hints.get(f.name, Any)
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (
            typing.Union, type(int | str)) else (hint,)
        ok = any(_is_kind(value, k) for k in kinds) if Any not in kinds else True
        if not ok:
            want = " or ".join(_KIND_NAMES.get(k, getattr(k, "__name__", str(k)))
                               for k in kinds)
            raise ValueError(f"{name}: option {f.name}={value!r} must be {want}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            low, inclusive, high = OPTION_RANGES.get(f.name, (-math.inf, True, math.inf))
            if not (math.isfinite(value) and (value >= low if inclusive else value > low)
                    and value <= high):
                side = ">=" if inclusive else ">"
                what = "an integer" if int in kinds and float not in kinds else "a finite number"
                rng = f"{what} {side} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
                raise ValueError(f"{name}: option {f.name}={value!r} is not valid; "
                                 f"expected {rng}")
    lo, hi = values.get("sigma_min"), values.get("sigma_max")
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"{name}: options sigma_min={lo!r} and sigma_max={hi!r} are not "
                         f"valid; expected sigma_min < sigma_max")
    if "schedule" in values:
        try:
            check_schedule(values["schedule"], lo, hi)
        except ValueError as exc:
            raise ValueError(f"{name}: option schedule: {exc}") from None


_KIND_NAMES = {int: "an integer", float: "a number", str: "text", bool: "true or false",
               type(None): "null"}


def _is_kind(value, kind) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is type(None):
        return value is None
    return isinstance(value, kind) if isinstance(kind, type) else True


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
    """What ``_sample`` gets besides y: the counted prior and physics, the measurement noise
    level, the signal shape, the seed, the progress callback, the diagnostics collected into
    ``info`` and (per pass) the per-row random streams ``noise``."""

    physics: CountingPhysics
    prior: CountingPrior
    sigma_y: float | tuple[float, ...]   # a tuple (one per row) for ``Solver.row_noise``
    signal_shape: tuple[int, ...]
    seed: int | Sequence[int] | None
    callback: Callable[[dict], None] | None
    diagnostics: dict[str, Any]
    noise: RowNoise | None = None

    def report(self, **fields) -> None:
        if self.callback is not None:
            self.callback(fields)

    def with_noise(self, entropies: Sequence[Sequence[int]], like: Tensor) -> SolveContext:
        """This context with one random stream per entropy tuple (one per row)."""
        noise = RowNoise(make_generators(entropies, like.device), like.dtype, like.device)
        return dataclasses.replace(self, noise=noise)


def record(diagnostics: dict[str, Any], key: str, values: list[Tensor]) -> None:
    """Append a step loop's 0-dim tensors to ``diagnostics[key]`` as floats (one host sync,
    after the loop)."""
    if values:
        diagnostics.setdefault(key, []).extend(torch.stack(values).tolist())


def signal_shape(y: Tensor, physics, prior) -> tuple[int, ...]:
    """Shape of x without batch: from A_adjoint for linear physics, else the prior's fixed
    ``signal_shape``, else the physics' ``img_size``, else (prior.channels, *y's spatial
    size) for shape-preserving nonlinear operators."""
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


class Solver:
    """Base class; see module docstring. ``Options`` must have ``batch_size`` (rows per pass)."""

    name: ClassVar[str] = "solver"
    Options: ClassVar[type]
    requires_linear: ClassVar[bool] = False
    requires_prior: ClassVar[bool] = True
    working_dtype: ClassVar[torch.dtype | None] = None
    # Measurements of a batch may carry their own noise level (a physics whose
    # noise_model.sigma has one entry per row of y, ``problems.Problem.stack``): ctx.sigma_y
    # is then a tuple of floats, one per row. The pipeline solves slices of one volume
    # together only for such solvers.
    row_noise: ClassVar[bool] = False
    # The rows of y are the slices of ONE volume, solved together and coupled (dds3d): the
    # pipeline, which solves slices one by one or in independent batches, cannot run it.
    volume: ClassVar[bool] = False

    def __init__(self, options: Any | None = None, **overrides: Any):
        opts = options if options is not None else self.Options()
        valid = {f.name for f in dataclasses.fields(opts)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"{self.name}: unknown option(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(valid))}")
        check_options(self.name, type(opts), {**dataclasses.asdict(opts), **overrides})
        self.options = dataclasses.replace(opts, **overrides)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    def solve(self, y: Tensor, physics, prior=None, *, num_samples: int = 1,
              seed: int | Sequence[int] | None = None,
              callback: Callable[[dict], None] | None = None) -> Reconstruction:
        """Draw ``num_samples`` posterior samples for each of the B measurements in ``y``.

        Returns a Reconstruction with samples (num_samples, B, *signal_shape). Sample i of
        measurement b depends only on (seed, b, i), not on the batch or chunk it ran in.
        With B > 1 the physics may hold per-measurement parameters; samples then run one
        sample index at a time over the whole batch. With B == 1 samples are batched
        ``batch_size`` at a time (the physics must broadcast over the batch). ``callback``
        receives a dict per step (``i``, ``sigma``, ``x``, ``denoised``, ...).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self._check(physics, prior)
        t0 = time.perf_counter()
        out_dtype, work = y.dtype, self.working_dtype
        if work is not None and y.dtype != work:
            y, physics = y.to(work), physics_in_dtype(physics, work)
        sigma_y = noise_sigma(physics, rows=self.row_noise)
        if not isinstance(sigma_y, float) and len(sigma_y) != y.shape[0]:
            raise ValueError(f"{self.name}: the physics has {len(sigma_y)} noise levels for "
                             f"{y.shape[0]} measurements")
        ctx = SolveContext(CountingPhysics(physics), CountingPrior(prior), sigma_y,
                           signal_shape(y, physics, prior), seed, callback, {})
        draws = []
        for rows, pass_ctx in self._passes(y, ctx, num_samples):
            draws.append(self._sample(rows, pass_ctx))
        rec = self._combine(draws, ctx, y.shape[0])
        rec.info = {**self._info(ctx, self._chains(num_samples, y.shape[0]), t0), **rec.info}
        with torch.no_grad():
            relative = relative_residual(physics, rec.mean, y)
            rec.info["residual"] = relative.tolist()
            rec.info["noise_chi"] = noise_chi(relative, y, ctx.sigma_y).tolist()
        if out_dtype != y.dtype:
            for name in ("samples", "mean", "std", "particles"):
                value = getattr(rec, name)
                if value is not None:
                    setattr(rec, name, value.to(out_dtype))
        return rec

    # -- hooks ---------------------------------------------------------------------------
    def _check(self, physics, prior) -> None:
        """Refuse what this solver cannot use (TypeError / ValueError naming the solver)."""
        if self.requires_linear:
            from deepinv.physics import LinearPhysics

            if not isinstance(physics, LinearPhysics):
                raise TypeError(f"{self.name} requires a deepinv LinearPhysics (A_adjoint), "
                                f"got {type(physics).__name__}")
        if self.requires_prior and prior is None:
            raise ValueError(f"{self.name} needs a prior (a diffrecon Prior, D(x, sigma))")

    def _passes(self, y: Tensor, ctx: SolveContext, num_samples: int
                ) -> Iterator[tuple[Tensor, SolveContext]]:
        """B == 1: chunks of ``batch_size`` samples (rows = samples of the one measurement);
        B > 1: one sample index at a time over all measurements (rows = measurements)."""
        entropy = measurement_entropy(ctx.seed, y.shape[0])
        if y.shape[0] == 1:
            rows_per_pass = max(1, int(self.options.batch_size))
            for start in range(0, num_samples, rows_per_pass):
                idx = range(start, min(num_samples, start + rows_per_pass))
                yield (y.expand(len(idx), *y.shape[1:]),
                       ctx.with_noise([(*entropy[0], i) for i in idx], y))
        else:
            for i in range(num_samples):
                yield y, ctx.with_noise([(*e, i) for e in entropy], y)

    def _sample(self, y: Tensor, ctx: SolveContext) -> Tensor:  # pragma: no cover
        """One pass: a draw per row of ``y`` (R, *signal_shape)."""
        raise NotImplementedError

    def _combine(self, draws: list[Tensor], ctx: SolveContext, batch: int) -> Reconstruction:
        """Equally weighted draws -> samples (S, B, ...): passes over samples (B == 1) are
        concatenated, passes over measurements (B > 1) stacked."""
        samples = torch.cat(draws, 0).unsqueeze(1) if batch == 1 else torch.stack(draws, 0)
        return Reconstruction.from_samples(samples.detach())

    def _sigmas(self, prior, device) -> Tensor:
        """The noise levels of the options' schedule (``schedules.solver_sigmas``: schedule,
        steps, sigma_min / sigma_max or the prior's), on ``device``."""
        o = self.options
        return solver_sigmas(o.schedule, o.steps, prior, o.sigma_min, o.sigma_max).to(device)

    def _chains(self, num_samples: int, batch: int) -> int:
        """Independent chains the denoiser rows are shared by (NFE = rows / chains)."""
        return num_samples * batch

    def _info(self, ctx: SolveContext, chains: int, t0: float) -> dict[str, Any]:
        return {
            "solver": self.name,
            "options": {k: (v if isinstance(v, int | float | str | bool | type(None)) else str(v))
                        for k, v in dataclasses.asdict(self.options).items()},
            "nfe": ctx.prior.rows // max(chains, 1),
            "denoiser_calls": ctx.prior.calls,
            "denoiser_rows": ctx.prior.rows,
            "forward_applications": ctx.physics.forward_calls,
            "adjoint_applications": ctx.physics.adjoint_calls,
            "wall_time_s": time.perf_counter() - t0,
            **ctx.diagnostics,
        }
