"""Conformal calibration of pixel intervals from a solver's posterior std (issue 17).

A diffusion solver's ``std`` map is a heuristic: too narrow when it comes from a few draws
or a degenerate particle cloud, and of the wrong size whenever the prior does not fit the
scan. Calibration rescales it, per task, from scans whose reference image is known.

**Interval and score.** For a slice with posterior mean ``m``, std ``s`` and reference ``x``
the interval at nominal level ``1 - alpha`` is ``m +- lam * u`` with the spread
``u = s + floor * max|m|`` (``max`` over the slice; the floor keeps intervals open where all
draws coincide). One multiplier ``lam`` per task and level: the calibrated std-based
intervals of Angelopoulos et al. (2022) and the multiplicative calibration of Conffusion
(Horwitz & Hoshen 2022). Per-pixel quantiles of the draws (Teneggi et al. 2023) are not used:
diffrecon runs draw 4-16 samples, whose tail quantiles are the sample extremes, while every
result file carries ``std``. Draws given instead of a std are reduced to their std (ddof 1).

**Guarantee (conformal risk control, Angelopoulos et al. 2024).** Pixels of one image are
not exchangeable (neighbours share their errors); images drawn independently from the same
population are. The unit is therefore a slice (``unit='slice'``) or a whole scan
(``unit='scan'``, the honest choice when slices of one scan are correlated), and its loss
``L_i(lam)`` is the fraction of its pixels that fall outside the interval (with a
foreground mask: of its foreground pixels; intervals are still drawn everywhere). With ``n``
calibration units, ``lam_hat`` is the smallest ``lam`` with
``(sum_i L_i(lam) + 1) / (n + 1) <= alpha``. For a new unit exchangeable with them,

    E[fraction of its pixels covered] >= 1 - alpha,

the expectation taken over the calibration set and the new unit. With one pixel per unit
this is split conformal prediction with the ``ceil((n + 1)(1 - alpha)) / n`` empirical
quantile. The procedure is tight: when scores have no ties, the expected coverage is also
below ``1 - alpha + 2 / (n + 1)`` up to one pixel's share (the CRC lower bound), so
``n >= 66`` units keep a calibrated 90% interval within 90-93% in expectation. It needs
``n >= 1 / alpha - 1`` units (19 for 95%).

**What it does not promise.** It is marginal: an average over units, not a statement about
a given pixel (a lesion may be missed while the slice is 90% covered) nor about a given
slice (one slice may be 70% covered, others 99%). It holds only for scans exchangeable with
the calibration scans: same anatomy / contrast population, scanner, acceleration, mask, noise
level, solver and its options (steps, number of draws), prior and its weights. A shift in
any of them (other hospital, pathology absent from the calibration set, another
acceleration) voids it; the calibration file records the task it applies to so the pipeline
can refuse a mismatched run. It is not a Bayesian credible interval and says nothing of the
posterior's shape; the intervals are symmetric around the mean.

**Quality bound.** Per slice, the ratio ``RMSE(m, x) / sqrt(mean u^2)`` (all pixels) is
calibrated by split conformal prediction (in the spirit of Wen, Ahmad & Schniter 2025, who
bound PSNR / SSIM from posterior samples): ``P(RMSE <= q * sqrt(mean u^2)) >= level`` for
a new slice (for ``unit='scan'``: for every slice of a new scan); a lower bound on PSNR.

References: A. N. Angelopoulos et al., "Image-to-image regression with distribution-free
uncertainty quantification and applications in imaging", ICML 2022 (arXiv:2202.05265);
A. N. Angelopoulos, S. Bates, A. Fisch, L. Lei, T. Schuster, "Conformal risk control",
ICLR 2024 (arXiv:2208.02814); E. Horwitz, Y. Hoshen, "Conffusion" (arXiv:2211.09795);
J. Teneggi et al., "How to trust your diffusion model", ICML 2023 (arXiv:2302.03791);
G. Kutiel et al., "Conformal prediction masks: visualizing uncertainty in medical imaging"
(2023; region masks, an alternative not implemented); J. Wen, R. Ahmad, P. Schniter,
"Conformal bounds on full-reference image quality for imaging inverse problems"
(arXiv:2505.09528).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from diffrecon.errors import InputError

FORMAT = "diffrecon-calibration"
VERSION = 1
METHOD = "conformal-risk-control"
SCORE = "|reference - mean| / (std + floor * max|mean| of the slice)"
LEVELS = (0.8, 0.9, 0.95)
UNITS = ("slice", "scan")


# ------------------------------------------------------------------------------ pieces
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


def spread(mean, std, floor: float) -> np.ndarray:
    """``u = std + floor * max|mean|`` (max per slice over all other axes), float64."""
    mean = np.asarray(mean, dtype=np.float64)
    peak = np.abs(mean).reshape(mean.shape[0], -1).max(axis=1)
    return np.asarray(std, dtype=np.float64) + floor * peak.reshape((-1,) + (1,) * (mean.ndim - 1))


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


def _scans(x) -> list[np.ndarray]:
    """An array (slices, ...) -> [array]; a sequence of per-scan arrays -> list of arrays."""
    if isinstance(x, np.ndarray) or not isinstance(x, Sequence):
        return [np.asarray(x)]
    return [np.asarray(a) for a in x]


# ------------------------------------------------------------------------------ calibration
@dataclass(frozen=True)
class Calibration:
    """Calibrated interval multipliers for one task (see the module docstring).

    scales: level -> lam, interval ``mean +- lam * u``; rmse_factors: level -> q, bound
    ``RMSE <= q * sqrt(mean u^2)`` per slice; floor: see :func:`spread`; unit, n_units,
    n_slices: the exchangeable unit and the calibration set's size; foreground: the mask
    fraction used (None: all pixels); task: what it applies to (modality, solver, options,
    prior name and checksum, acceleration / views, ...); diagnostics: calibration-set
    figures (Gaussian ``z * std`` coverage before, in-sample coverage after, std / RMSE).
    """

    scales: dict[float, float]
    rmse_factors: dict[float, float]
    floor: float
    unit: str
    n_units: int
    n_slices: int
    foreground: float | None = None
    task: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    diagnostics: dict[str, Any] = field(default_factory=dict)
    method: str = METHOD
    version: int = VERSION

    @property
    def levels(self) -> tuple[float, ...]:
        return tuple(sorted(self.scales))

    def intervals(self, mean, std_or_samples, levels: Sequence[float] | None = None
                  ) -> dict[float, tuple[np.ndarray, np.ndarray]]:
        """``{level: (lower, upper)}``, each of ``mean``'s shape and float dtype."""
        mean = np.asarray(mean)
        u = spread(mean, posterior_std(mean, std_or_samples), self.floor)
        dtype = mean.dtype if mean.dtype.kind == "f" else np.float64
        out = {}
        for level in self.levels if levels is None else levels:
            lam = self._get(self.scales, level)
            out[float(level)] = ((mean - lam * u).astype(dtype), (mean + lam * u).astype(dtype))
        return out

    def rmse_bounds(self, mean, std_or_samples, levels: Sequence[float] | None = None
                    ) -> dict[float, np.ndarray]:
        """``{level: (slices,) upper bounds on each slice's RMSE}`` in the mean's units."""
        mean = np.asarray(mean)
        u = spread(mean, posterior_std(mean, std_or_samples), self.floor)
        rms = np.sqrt(np.mean(u.reshape(u.shape[0], -1) ** 2, axis=1))
        return {float(lv): self._get(self.rmse_factors, lv) * rms
                for lv in (self.levels if levels is None else levels)}

    def _get(self, table: Mapping[float, float], level) -> float:
        for k, v in table.items():
            if math.isclose(k, float(level), abs_tol=1e-9):
                return v
        raise ValueError(f"level {float(level):g} is not calibrated; calibrated levels: "
                         f"{', '.join(f'{k:g}' for k in sorted(table))}")

    def check_task(self, task: Mapping[str, Any], where: str = "calibration") -> None:
        """Raise ``InputError`` naming the first key whose value differs from ``task``."""
        for key in sorted(set(self.task) | set(task)):
            a, b = self.task.get(key), task.get(key)
            if a != b:
                raise InputError(f"{where}: calibrated for {key}={a!r}, this run has "
                                 f"{key}={b!r}; calibrate for this task")

    # ------------------------------------------------------------------ file format
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": self.version, "method": self.method,
                "score": SCORE, "floor": self.floor,
                "scales": {repr(k): v for k, v in sorted(self.scales.items())},
                "rmse_factors": {repr(k): v for k, v in sorted(self.rmse_factors.items())},
                "unit": self.unit, "n_units": self.n_units, "n_slices": self.n_slices,
                "foreground": self.foreground, "task": dict(self.task),
                "created": self.created, "diagnostics": self.diagnostics}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON file atomically (``<path>.tmp-<pid>``, fsync, ``os.replace``)."""
        p = Path(path)
        if not p.parent.exists():
            raise InputError(f"{p}: output directory {p.parent} does not exist")
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
        tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, p)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Read and validate a calibration file; problems raise a one-line ``InputError``
        naming the file and the key."""
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{p}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{p}: not a calibration file ({exc})") from None
        return cls.from_dict(d, str(p))

    @classmethod
    def from_dict(cls, d: Any, where: str = "calibration") -> Calibration:
        def bad(key: str, what: str) -> InputError:
            return InputError(f"{where}: key '{key}' {what}")

        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise bad("format", f"must be {FORMAT!r}")
        if d.get("version") != VERSION:
            raise bad("version", f"is {d.get('version')!r}, this diffrecon reads {VERSION}")
        if d.get("method") != METHOD:
            raise bad("method", f"is {d.get('method')!r}, expected {METHOD!r}")

        def number(key: str, value: Any, lo: float = 0.0) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value < lo:
                raise bad(key, f"must be a finite number >= {lo:g}, got {value!r}")
            return float(value)

        def table(key: str) -> dict[float, float]:
            t = d.get(key)
            if not isinstance(t, dict) or not t:
                raise bad(key, "must be a non-empty mapping of level -> factor")
            out = {}
            for k, v in t.items():
                try:
                    level = float(k)
                except ValueError:
                    raise bad(key, f"has level {k!r} that is not a number") from None
                if not 0 < level < 1:
                    raise bad(key, f"has level {k!r} outside (0, 1)")
                out[level] = number(f"{key}.{k}", v)
            return out

        scales, rmse = table("scales"), table("rmse_factors")
        if set(scales) != set(rmse):
            raise bad("rmse_factors", "must have the same levels as 'scales'")
        if d.get("unit") not in UNITS:
            raise bad("unit", f"must be one of {', '.join(UNITS)}, got {d.get('unit')!r}")
        counts = {}
        for key in ("n_units", "n_slices"):
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(key, f"must be a positive integer, got {v!r}")
            counts[key] = v
        fg = d.get("foreground")
        if fg is not None:
            fg = number("foreground", fg)
        task = d.get("task", {})
        if not isinstance(task, dict) or not all(
                isinstance(v, str | int | float | bool) or v is None for v in task.values()):
            raise bad("task", "must map names to strings, numbers, booleans or null")
        created = d.get("created", "")
        if not isinstance(created, str):
            raise bad("created", "must be a date string")
        diag = d.get("diagnostics", {})
        if not isinstance(diag, dict):
            raise bad("diagnostics", "must be a mapping")
        return cls(scales=scales, rmse_factors=rmse, floor=number("floor", d.get("floor")),
                   unit=d["unit"], foreground=fg, task=task, created=created,
                   diagnostics=diag, **counts)


def calibrate(references, means, stds_or_samples, levels: Sequence[float] = LEVELS, *,
              unit: str = "slice", foreground: float | None = None, floor: float = 1e-3,
              task: Mapping[str, Any] | None = None, created: str | None = None
              ) -> Calibration:
    """Calibrate interval multipliers on scans with known references.

    ``references``, ``means``: arrays (slices, ...) in scan units, or sequences of such
    arrays, one per scan (shapes may differ between scans); ``stds_or_samples`` the same
    with each std of its mean's shape or draws (slices, n_samples, ...). ``unit`` 'slice' or
    'scan' (the exchangeable unit; 'scan' counts each array of the sequences as one unit).
    ``foreground``: count only pixels above this fraction of each slice's reference maximum.
    ``task``: the key the calibration applies to (strings, numbers, booleans, None).
    Raises ``ValueError`` on inconsistent input or too few units for a level.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if not (floor >= 0 and math.isfinite(floor)):
        raise ValueError(f"floor must be a finite number >= 0, got {floor!r}")
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
        u = spread(mu, std, floor)
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
    return Calibration(scales=scales, rmse_factors=rmse, floor=float(floor), unit=unit,
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
