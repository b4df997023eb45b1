"""Conformal calibration of pixel intervals from a solver's posterior std (issue 17).

A diffusion solver's ``std`` map is a heuristic: too narrow when it comes from a few draws
or a degenerate particle cloud, and of the wrong size whenever the prior does not fit the
scan. Calibration rescales it, per task, from scans whose reference image is known.

**Interval and score.** For a slice with posterior mean ``m``, std ``s`` and reference ``x``
the interval at nominal level ``1 - alpha`` is ``m +- lam * u`` with the spread
``u = sqrt(G * s^2) + floor * max|m|`` (``max`` over the slice; the floor keeps intervals
open where all draws coincide; ``G`` a Gaussian window of std ``smooth`` pixels, default 0 =
none: a std from 2 draws has one degree of freedom per pixel, and pooling neighbours'
variance narrows the calibrated intervals at equal coverage, RESULTS.md 0c; any fixed rule
for ``u`` keeps the guarantee). One multiplier ``lam`` per task and level: the calibrated
std-based intervals of Angelopoulos et al. (2022) and the multiplicative calibration of Conffusion
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
quantile, and the rule is the weighted quantile of hierarchical conformal prediction (Lee,
Barber & Willett 2023; each slice's pixels weigh 1 / (its pixels x (n + 1))). It needs
``n >= 1 / alpha - 1`` units (19 for 95%).

**How conservative.** The ``+ 1`` is the worst case of a new slice that is wholly outside
(loss 1): when a slice's pixels are all covered or all missed together, the expected
coverage is exactly ``ceil((n + 1)(1 - alpha)) / (n + 1)``, and no rule valid for every
distribution can do better there. When a slice has many pixels whose misses are not all
shared, the calibration slices' mean coverage is held at ``1 - (alpha (n + 1) - 1) / n``
(= ``1 - alpha + (1 - alpha) / n``), and a new slice's expected coverage sits near it: about
94.5% for n = 20 at 90%, 93% for n = 30, 92% for n = 50 (measured on exchangeable splits in
RESULTS.md 0c). The CRC bound caps it at ``1 - alpha + 2 / (n + 1)``.

**What it does not promise.** It is marginal: an average over units, not a statement about
a given pixel (a lesion may be missed while the slice is 90% covered) nor about a given
slice (one slice may be 70% covered, others 99%). It holds only for scans exchangeable with
the calibration scans: same anatomy / contrast population, scanner, acceleration and mask
distribution, noise level, solver and its options (steps, number of draws), prior and its
weights. A shift in any of them (other hospital, pathology absent from the calibration set, another
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
ICLR 2024 (arXiv:2208.02814); Y. Lee, R. F. Barber, R. Willett, "Distribution-free
inference with hierarchical data" (arXiv:2306.06342); E. Horwitz, Y. Hoshen, "Conffusion"
(arXiv:2211.09795);
J. Teneggi et al., "How to trust your diffusion model", ICML 2023 (arXiv:2302.03791);
G. Kutiel et al., "Conformal prediction masks: visualizing uncertainty in medical imaging"
(2023; region masks, an alternative not implemented); J. Wen, R. Ahmad, P. Schniter,
"Conformal bounds on full-reference image quality for imaging inverse problems"
(arXiv:2505.09528).

Modules: ``conformal`` (spread, scores, the risk-control threshold), ``fit``
(:func:`calibrate`), ``record`` (:class:`Calibration`: intervals, RMSE bounds, the JSON file).
The run / calibrate / evaluate glue over result files is ``diffrecon.pipeline.calibrate``.
"""

from .conformal import (
    LEVELS,
    UNITS,
    foreground,
    min_units,
    pooled_std,
    posterior_std,
    risk_thresholds,
    scores,
    spread,
    z_score,
)
from .fit import calibrate
from .record import FORMAT, METHOD, SCORE, VERSION, Calibration

__all__ = ["FORMAT", "LEVELS", "METHOD", "SCORE", "UNITS", "VERSION", "Calibration",
           "calibrate", "foreground", "min_units", "pooled_std", "posterior_std", "risk_thresholds",
           "scores", "spread", "z_score"]
