"""``calibrate``: a ``Calibration`` from scans whose reference image is known (conformal risk
control over slices or scans, see ``diffrecon.calibration``), with calibration-set
diagnostics."""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .conformal import (
    LEVELS,
    UNITS,
    _alpha,
    foreground,
    posterior_std,
    risk_thresholds,
    scores,
    spread,
    z_score,
)
from .record import Calibration


def _scans(x) -> list[np.ndarray]:
    """An array (slices, ...) -> [array]; a sequence of per-scan arrays -> list of arrays."""
    if isinstance(x, np.ndarray) or not isinstance(x, Sequence):
        return [np.asarray(x)]
    return [np.asarray(a) for a in x]


def calibrate(references, means, stds_or_samples, levels: Sequence[float] = LEVELS, *,
              unit: str = "slice", foreground: float | None = None, floor: float = 1e-3,
              smooth: float = 0.0, task: Mapping[str, Any] | None = None, created: str | None = None
              ) -> Calibration:
    """Calibrate interval multipliers on scans with known references.

    ``references``, ``means``: arrays (slices, ...) in scan units, or sequences of such
    arrays, one per scan (shapes may differ between scans); ``stds_or_samples`` the same
    with each std of its mean's shape or draws (slices, n_samples, ...). ``unit`` 'slice' or
    'scan' (the exchangeable unit; 'scan' counts each array of the sequences as one unit).
    ``foreground``: count only pixels above this fraction of each slice's reference maximum.
    ``floor``, ``smooth`` (pixels): the spread ``u`` (:func:`~.conformal.spread`).
    ``task``: the key the calibration applies to (strings, numbers, booleans, None).
    Raises ``ValueError`` on inconsistent input or too few units for a level.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if not (floor >= 0 and math.isfinite(floor)):
        raise ValueError(f"floor must be a finite number >= 0, got {floor!r}")
    if not (smooth >= 0 and math.isfinite(smooth)):
        raise ValueError(f"smooth must be a finite number >= 0, got {smooth!r}")
    if foreground is not None and not 0 <= foreground < 1:
        raise ValueError(f"foreground must be in [0, 1), got {foreground!r}")
    levels = tuple(sorted({float(lv) for lv in levels}))
    for lv in levels:
        _alpha(lv)
    refs, mus, sds = _scans(references), _scans(means), _scans(stds_or_samples)
    if not len(refs) == len(mus) == len(sds):
        raise ValueError(f"{len(refs)} references, {len(mus)} means and {len(sds)} "
                         f"stds/samples: one of each per scan")
    pixel_units, ratio_units, reports = [], [], []
    for i, (ref, mu, sd) in enumerate(zip(refs, mus, sds, strict=True)):
        if ref.shape != mu.shape or ref.ndim < 3:
            raise ValueError(f"scan {i}: reference {ref.shape} and mean {mu.shape} must have "
                             f"one shape (slices, H, W) or (slices, C, H, W)")
        ref, mu = ref.astype(np.float64), mu.astype(np.float64)
        std = posterior_std(mu, sd)
        if not (np.isfinite(ref).all() and np.isfinite(mu).all() and np.isfinite(std).all()):
            raise ValueError(f"scan {i}: reference, mean and std must be finite")
        u = spread(mu, std, floor, smooth)
        mask = _mask(ref, foreground)
        if not mask.reshape(len(mask), -1).any(axis=1).all():
            raise ValueError(f"scan {i}: a slice has no pixel above the foreground fraction")
        s = scores(ref, mu, u)
        per_slice = [si[mi] for si, mi in zip(s, mask, strict=True)]
        # per-slice RMSE / sqrt(mean u^2) over all pixels: the quality-bound score
        ratio = scores(np.sqrt(np.mean((ref - mu).reshape(len(ref), -1) ** 2, axis=1)), 0.0,
                       np.sqrt(np.mean(u.reshape(len(ref), -1) ** 2, axis=1)))
        if unit == "slice":
            pixel_units += per_slice
            ratio_units += list(ratio)
        else:
            pixel_units.append(np.concatenate(per_slice))
            ratio_units.append(ratio.max())
        reports.append((ref, mu, std, u, mask))
    scales = risk_thresholds(pixel_units, levels)
    rmse = risk_thresholds([np.array([r]) for r in ratio_units], levels)
    bad = [lv for lv in levels if not (math.isfinite(scales[lv]) and math.isfinite(rmse[lv]))]
    if bad:
        raise ValueError(f"level {bad[0]:g}: infinite multiplier (the std is zero where the "
                         f"mean is wrong); use floor > 0")
    diagnostics = _diagnostics(reports, scales)
    return Calibration(scales=scales, rmse_factors=rmse, floor=float(floor),
                       smooth=float(smooth), unit=unit,
                       n_units=len(pixel_units), n_slices=sum(len(r) for r in refs),
                       foreground=foreground, task=dict(task or {}),
                       created=created or datetime.date.today().isoformat(),
                       diagnostics=diagnostics)


def _mask(ref: np.ndarray, fraction: float | None) -> np.ndarray:
    return np.ones(ref.shape, dtype=bool) if fraction is None else foreground(ref, fraction)


def _diagnostics(reports, scales: Mapping[float, float]) -> dict[str, Any]:
    """Calibration-set coverage (mean over slices) of ``mean +- z std`` (before) and of the
    calibrated intervals (after, in-sample), their mean width (scan units), and the ratio
    sqrt(mean std^2) / RMSE over the counted pixels (None when the mean is exact)."""
    from diffrecon.metrics import coverage_report

    gauss: dict[float, list] = {lv: [] for lv in scales}
    cal: dict[float, list] = {lv: [] for lv in scales}
    width = dict.fromkeys(scales, 0.0)
    sq_std = sq_err = 0.0
    npix = 0
    for ref, mu, std, u, mask in reports:
        for lv, lam in scales.items():
            z = z_score(lv)
            gauss[lv] += coverage_report(ref, mu - z * std, mu + z * std,
                                         mask=mask)["coverage_per_slice"]
            c = coverage_report(ref, mu - lam * u, mu + lam * u, mask=mask)
            cal[lv] += c["coverage_per_slice"]
            width[lv] += c["width"] * int(mask.sum())
        sq_std += float(np.sum(std[mask] ** 2))
        sq_err += float(np.sum((ref[mask] - mu[mask]) ** 2))
        npix += int(mask.sum())
    return {"coverage_gaussian": {repr(lv): float(np.mean(gauss[lv])) for lv in scales},
            "coverage_calibrated": {repr(lv): float(np.mean(cal[lv])) for lv in scales},
            "width_calibrated": {repr(lv): width[lv] / npix for lv in scales},
            "std_rmse": math.sqrt(sq_std / sq_err) if sq_err > 0 else None}
