"""The conformal maths of interval calibration (see ``diffrecon.calibration``): the spread
``u``, the normalised scores and the conformal-risk-control threshold. Arrays only: no file,
no run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from statistics import NormalDist

import numpy as np

LEVELS = (0.8, 0.9, 0.95)
UNITS = ("slice", "scan")


def posterior_std(mean, std_or_samples) -> np.ndarray:
    """The pointwise std (float64, shape of ``mean`` (slices, ...)) from a std map of that
    shape or from draws (slices, n_samples, ...) (unbiased, as ``Reconstruction``)."""
    mean = np.asarray(mean)
    a = np.asarray(std_or_samples, dtype=np.float64)
    if a.shape == mean.shape:
        if np.any(a < 0):
            raise ValueError("std has negative entries")
        return a
    if a.ndim == mean.ndim + 1 and a.shape[0] == mean.shape[0] and a.shape[2:] == mean.shape[1:]:
        return a.std(axis=1, ddof=1) if a.shape[1] > 1 else np.zeros(mean.shape)
    raise ValueError(f"std/samples of shape {a.shape} match neither the mean {mean.shape} nor "
                     f"(slices, n_samples, ...) draws")


def pooled_std(std, smooth: float = 0.0) -> np.ndarray:
    """``sqrt(G_smooth * std^2)``: the variance averaged over a Gaussian window of std
    ``smooth`` pixels on the last two axes (edges: nearest; 0: ``std`` itself), float64.
    A std from K draws has K - 1 degrees of freedom per pixel; pooling neighbours steadies
    it where the error's scale varies slowly (2 draws: 1 degree of freedom, whose small
    values would otherwise set the multiplier)."""
    std = np.asarray(std, dtype=np.float64)
    if not (smooth >= 0 and math.isfinite(smooth)):
        raise ValueError(f"smooth must be a finite number >= 0, got {smooth!r}")
    if smooth == 0 or std.ndim < 2:
        return std
    from scipy.ndimage import gaussian_filter

    sigma = (0.0,) * (std.ndim - 2) + (float(smooth),) * 2
    return np.sqrt(gaussian_filter(std ** 2, sigma, mode="nearest"))


def spread(mean, std, floor: float, smooth: float = 0.0) -> np.ndarray:
    """``u = pooled_std(std, smooth) + floor * max|mean|`` (max per slice over all other
    axes), float64."""
    mean = np.asarray(mean, dtype=np.float64)
    peak = np.abs(mean).reshape(mean.shape[0], -1).max(axis=1)
    return pooled_std(std, smooth) + floor * peak.reshape((-1,) + (1,) * (mean.ndim - 1))


def scores(reference, mean, u) -> np.ndarray:
    """Normalised residual ``|reference - mean| / u`` (0 where both vanish, inf where only
    ``u`` does)."""
    err = np.abs(np.asarray(reference, dtype=np.float64) - np.asarray(mean, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        s = err / u
    s[err == 0] = 0.0
    return s


def foreground(reference, fraction: float) -> np.ndarray:
    """Boolean mask of ``reference > fraction * max(reference)`` per slice (slices, ...)."""
    ref = np.asarray(reference, dtype=np.float64)
    peak = ref.reshape(ref.shape[0], -1).max(axis=1)
    return ref > fraction * peak.reshape((-1,) + (1,) * (ref.ndim - 1))


def _alpha(level: float) -> Fraction:
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level {level:g} is not in (0, 1)")
    return 1 - Fraction(level).limit_denominator(10 ** 9)


def min_units(level: float) -> int:
    """Fewest calibration units for which level ``level`` is attainable: ceil(1/alpha) - 1."""
    return math.ceil(1 / _alpha(level)) - 1


def risk_thresholds(unit_scores: Sequence[np.ndarray], levels: Sequence[float]
                    ) -> dict[float, float]:
    """Conformal risk control for the loss ``L_i(lam) = mean(unit_scores[i] > lam)``:
    ``lam_hat = min{lam : (sum_i L_i(lam) + 1) / (n + 1) <= 1 - level}`` per level (a score
    of the calibration set). With one score per unit: the ceil((n + 1) level)-th smallest.
    Raises ``ValueError`` when ``n < min_units(level)``."""
    n = len(unit_scores)
    sizes = [np.size(s) for s in unit_scores]
    if n == 0 or min(sizes) == 0:
        raise ValueError("every calibration unit needs at least one scored pixel")
    s = np.concatenate([np.ravel(x) for x in unit_scores]).astype(np.float64)
    w = np.concatenate([np.full(k, 1.0 / k) for k in sizes])
    order = np.argsort(-s, kind="stable")
    s_desc = s[order]
    heavier = np.concatenate([[0.0], np.cumsum(w[order])])  # loss mass of the k largest
    out = {}
    for level in levels:
        budget = float(_alpha(level) * (n + 1) - 1)  # sum_i L_i(lam) may not exceed this
        if budget < 0:
            raise ValueError(f"level {float(level):g} needs at least {min_units(level)} "
                             f"calibration units, got {n}")
        k = int(np.searchsorted(heavier, budget + 1e-9 * n, side="right")) - 1
        out[float(level)] = float(s_desc[min(k, s.size - 1)])
    return out


def z_score(level: float) -> float:
    """Half-width in stds of the central Gaussian interval at ``level`` (1.645 at 0.9)."""
    return NormalDist().inv_cdf(0.5 + float(level) / 2)
