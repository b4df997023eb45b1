"""Image-quality metrics with the fastMRI definitions, and evaluation of a result file.

fastMRI (``fastmri/evaluate.py``, Zbontar et al. 2018) scores a VOLUME (slices, H, W):

* ``nmse = ||gt - pred||^2 / ||gt||^2`` over the volume;
* ``psnr`` = skimage ``peak_signal_noise_ratio`` over the volume with ``data_range = gt.max()``;
* ``ssim`` = mean over slices of skimage ``structural_similarity`` (7x7 uniform window), each
  slice with the VOLUME's ``data_range = gt.max()``.

:func:`evaluate_file` reports those volume figures under ``"volume"`` and, at the top level,
the mean over slices of the per-slice figures (each slice still uses the volume maximum as
its data range, so a dark slice is not flattered). The volume is the WHOLE reference volume
of the scan, whatever slices the result holds (fastMRI scores whole volumes): a result of
some slices gets the data range fastMRI would use for them. When the result holds
calibrated intervals (``run --calibration``) it also reports their coverage
(:func:`coverage_report`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffrecon.errors import InputError

REFERENCE_KINDS = ("auto", "rss", "complex")


def _pair(gt, pred) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if gt.shape != pred.shape:
        raise ValueError(f"shape mismatch: reference {gt.shape} vs prediction {pred.shape}")
    return gt, pred


def nmse(gt, pred) -> float:
    """Normalised MSE ||gt - pred||^2 / ||gt||^2 over all entries."""
    gt, pred = _pair(gt, pred)
    return float(np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2)


def psnr(gt, pred, maxval: float | None = None) -> float:
    """PSNR (dB) over all entries with data range ``maxval`` (default ``gt.max()``)."""
    gt, pred = _pair(gt, pred)
    maxval = float(gt.max()) if maxval is None else float(maxval)
    if not np.any(gt != pred):
        return float("inf")
    return float(peak_signal_noise_ratio(gt, pred, data_range=maxval))


def ssim(gt, pred, maxval: float | None = None) -> float:
    """Mean over slices of skimage SSIM; ``gt``/``pred`` (slices, H, W) or (slices, C, H, W)
    (channels averaged), data range ``maxval`` (default ``gt.max()`` of the volume)."""
    gt, pred = _pair(gt, pred)
    if gt.ndim == 2:
        gt, pred = gt[None], pred[None]
    if gt.ndim not in (3, 4):
        raise ValueError(f"ssim expects (slices, H, W) or (slices, C, H, W), got {gt.shape}")
    maxval = float(gt.max()) if maxval is None else float(maxval)
    return float(np.mean([_ssim2d(g, p, maxval) for g, p in zip(gt, pred, strict=True)]))


def _ssim2d(gt: np.ndarray, pred: np.ndarray, maxval: float) -> float:
    kw: dict[str, Any] = {"data_range": maxval}
    if min(gt.shape[-2:]) < 7:  # skimage's default 7x7 window needs 7 pixels
        kw["win_size"] = min(gt.shape[-2:]) // 2 * 2 + 1 if min(gt.shape[-2:]) >= 3 else 1
    if gt.ndim == 3:
        kw["channel_axis"] = 0
    return float(structural_similarity(gt, pred, **kw))


def evaluate_arrays(reference, prediction, data_range: float | None = None
                    ) -> dict[str, Any]:
    """Metrics of a (slices, H, W) or (slices, C, H, W) prediction against a reference of
    the same shape: per-slice values and their mean (top level), fastMRI volume values.
    ``data_range``: PSNR / SSIM data range (default: ``reference.max()``; give the whole
    volume's maximum when ``reference`` holds some of its slices)."""
    gt, pred = _pair(reference, prediction)
    if gt.ndim == 2:
        gt, pred = gt[None], pred[None]
    maxval = float(gt.max()) if data_range is None else float(data_range)
    if not maxval > 0:
        raise ValueError("reference maximum must be positive for PSNR/SSIM")
    per_slice = []
    for i, (g, p) in enumerate(zip(gt, pred, strict=True)):
        err = float(np.sum((g - p) ** 2))
        ref = float(np.sum(g ** 2))
        per_slice.append({
            "slice": i,
            "psnr": float(peak_signal_noise_ratio(g, p, data_range=maxval)) if err > 0
            else float("inf"),
            "ssim": _ssim2d(g, p, maxval),
            "nmse": err / ref if ref > 0 else float("nan"),
        })
    out: dict[str, Any] = {k: float(np.mean([s[k] for s in per_slice]))
                           for k in ("psnr", "ssim", "nmse")}
    out["volume"] = {"psnr": psnr(gt, pred, maxval), "ssim": ssim(gt, pred, maxval),
                     "nmse": nmse(gt, pred)}
    out["data_range"] = maxval
    out["per_slice"] = per_slice
    return out


def load_reference(reference_path: str | os.PathLike, kind: str = "auto",
                   slices=None) -> tuple[np.ndarray, str]:
    """The ground truth in a scan file, as a float array (slices, H, W) (or with channels).

    MRI: ``kind='rss'`` reads ``reconstruction_rss``; ``'complex'`` the magnitude of
    ``ground_truth_complex`` (the complex / MVUE image); ``'auto'`` takes RSS when present.
    CT: ``ground_truth``; images: ``image``. Returns (array, description of the source).
    """
    from diffrecon.datasets.io import detect_modality, open_h5_checked, read_array

    if kind not in REFERENCE_KINDS:
        raise InputError(f"--reference-kind {kind!r} is not valid; expected one of "
                         f"{', '.join(REFERENCE_KINDS)}")
    path = Path(reference_path)
    modality = detect_modality(path)
    if modality == "result":
        raise InputError(f"{path}: is a result file, expected the scan that holds the ground "
                         f"truth as --reference")
    with open_h5_checked(path) as f:
        if modality == "mri":
            order = {"auto": ("reconstruction_rss", "ground_truth_complex"),
                     "rss": ("reconstruction_rss",),
                     "complex": ("ground_truth_complex",)}[kind]
            name = next((n for n in order if n in f), None)
            if name is None:
                raise InputError(f"{path}: no reference dataset {' or '.join(map(repr, order))}"
                                 f" for --reference-kind {kind}")
            kinds = "c" if name == "ground_truth_complex" else "f"
        else:
            name = "ground_truth" if modality == "ct" else "image"
            kinds = "f"
        arr = read_array(f, name, kinds=kinds, ndim=(3, 4) if modality == "image" else 3)
    arr = np.abs(arr) if kinds == "c" else arr
    return select_slices(arr, slices, path).astype(np.float64), name


def select_slices(volume: np.ndarray, slices, path) -> np.ndarray:
    """``volume[slices]`` (None: all); ``InputError`` naming ``path`` when out of range."""
    if slices is None:
        return volume
    idx = np.asarray(slices, dtype=int)
    if idx.size and (idx.max() >= volume.shape[0]):
        raise InputError(f"{path}: result refers to slice {int(idx.max())} but the "
                         f"reference has {volume.shape[0]} slices")
    return volume[idx]


def result_slices(attrs) -> list[int] | None:
    """The scan slice numbers a result holds (its ``slices`` attribute), None if absent."""
    slices = attrs.get("slices")
    if isinstance(slices, np.ndarray | list | tuple):
        return [int(s) for s in np.ravel(slices)]
    return None


def paired_result(result, reference, reference_kind: str = "auto", index=None
                  ) -> dict[str, Any]:
    """A result and its reference on one grid, as ``evaluate`` and ``calibrate`` score them.

    ``result`` is a path or a ``diffrecon.datasets.io.Result``; ``reference`` the scan's
    path. Returns ``{"result", "reference", "mean", "std", "intervals", "slices",
    "data_range", "name"}``: float64 arrays (slices, ...) of the reference slices the result
    holds (its ``slices`` attribute), the reconstruction, std and intervals ({level: (lower,
    upper)}) centre-cropped to the reference when larger (fastMRI), the scan slice numbers
    (None: all), the maximum of the WHOLE reference volume and the reference dataset's name.
    ``index``: read only these positions of a result file's slice axis (sorted; ``slices``
    then lists their scan slice numbers).
    """
    from diffrecon.datasets.fastmri import center_crop
    from diffrecon.datasets.io import Result, read_result

    if isinstance(result, Result):
        res, index = result, None
    else:
        res = read_result(result, index, samples=False)
    slices = result_slices(res.attrs)
    if index is not None:
        slices = [slices[i] for i in index] if slices is not None else [int(i) for i in index]
    volume, name = load_reference(reference, reference_kind)
    if volume.size == 0 or not volume.max() > 0:
        raise InputError(f"{reference}: reference '{name}' has no positive values")
    gt = select_slices(volume, slices, reference)
    pred = np.asarray(res.reconstruction, dtype=np.float64)
    if pred.shape[0] != gt.shape[0]:
        raise InputError(f"{res.path}: result has {pred.shape[0]} slices but reference "
                         f"{reference} has {gt.shape[0]}")
    if pred.ndim != gt.ndim:
        raise InputError(f"{res.path}: reconstruction shape {pred.shape} does not match "
                         f"reference '{name}' shape {gt.shape}")
    shape = pred.shape

    def crop(a):
        a = np.asarray(a, dtype=np.float64)
        return center_crop(a, gt.shape[-2:]) if a.shape[-2:] != gt.shape[-2:] else a

    pred = crop(pred)
    if pred.shape != gt.shape:
        raise InputError(f"{res.path}: reconstruction shape {shape} does not match "
                         f"reference '{name}' shape {gt.shape}")
    return {"result": res, "reference": gt, "mean": pred, "std": crop(res.std),
            "intervals": {lv: (crop(lo), crop(hi)) for lv, (lo, hi) in res.intervals.items()},
            "slices": slices, "data_range": float(volume.max()), "name": name}


def evaluate_file(result, reference, reference_kind: str = "auto") -> dict[str, Any]:
    """Score a result file against the ground truth in its scan file.

    ``result`` is a path (or a ``diffrecon.datasets.io.Result``); ``reference`` the scan's
    path. Slices recorded in the result's ``slices`` attribute select the reference slices;
    the data range is the maximum of the whole reference volume (fastMRI); a larger
    reconstruction is centre-cropped to the reference (fastMRI). Returns ``{"psnr", "ssim",
    "nmse", "per_slice", "volume", "data_range", "reference", ...}`` and, when the result
    holds calibrated intervals, ``"coverage"``: {level: :func:`coverage_report` (over the
    pixels the calibration counted: above its ``foreground`` fraction of each slice's
    reference maximum, else all) with ``nominal`` and ``foreground`` added, and
    ``rmse_bound_held``, the fraction of slices whose
    RMSE is within the calibrated bound the result records (same grid only)}.
    """
    p = paired_result(result, reference, reference_kind)
    res, gt, pred, slices = p["result"], p["reference"], p["mean"], p["slices"]
    out = evaluate_arrays(gt, pred, p["data_range"])
    out["reference"] = p["name"]
    out["result"] = str(res.path) if res.path else None
    if slices is not None:
        for s, idx in zip(out["per_slice"], slices, strict=True):
            s["slice"] = idx
    if p["intervals"]:
        fg, mask = counted_pixels(res.attrs, gt)
        out["coverage"] = {
            repr(lv): {"nominal": lv, "foreground": fg,
                       **coverage_report(gt, lo, hi, pred, p["std"], mask=mask)}
            for lv, (lo, hi) in sorted(p["intervals"].items())}
        bound = np.atleast_2d(np.asarray(res.attrs.get("calibration_rmse_bound", []), float))
        levels = np.ravel(res.attrs.get("calibration_levels", []))
        if bound.shape == (len(levels), len(gt)) and res.reconstruction.shape == gt.shape:
            rmse = np.sqrt(np.mean((pred - gt).reshape(len(gt), -1) ** 2, axis=1))
            for lv, b in zip(levels, bound, strict=True):
                if repr(float(lv)) in out["coverage"]:  # fraction of slices within the bound
                    out["coverage"][repr(float(lv))]["rmse_bound_held"] = float(
                        np.mean(rmse <= b))
    return out


def counted_pixels(attrs, reference) -> tuple[float | None, np.ndarray | None]:
    """The pixels a result's calibration counted (``evaluate`` and ``view`` alike): (its
    ``calibration_foreground`` fraction, the mask of reference pixels above that fraction
    of their slice's maximum), or (None, None) for every pixel (no foreground recorded,
    or a slice without foreground). ``reference`` (slices, ...)."""
    from diffrecon.calibration import foreground

    fg = attrs.get("calibration_foreground")
    if fg is None:
        return None, None
    mask = foreground(reference, float(fg))
    if not mask.reshape(len(reference), -1).any(axis=1).all():
        return None, None
    return float(fg), mask


def coverage_report(reference, lower, upper, mean=None, std=None, mask=None) -> dict[str, Any]:
    """Interval diagnostics against a known reference; every array (slices, ...) of one
    shape, ``mask`` (boolean) selects the pixels that count (default: all).

    ``coverage``: mean over slices of the fraction of counted reference pixels with
    ``lower <= reference <= upper`` (the quantity ``diffrecon.calibration`` controls);
    ``coverage_per_slice``; ``width``: mean of ``upper - lower`` over counted pixels (scan
    units); ``relative_width``: ``width / max(reference)``; with ``mean`` and ``std``,
    ``std_rmse``: sqrt(mean std^2) / sqrt(mean (mean - reference)^2) over counted pixels
    (1: the std has the size of the actual error; None when the mean is exact).
    """
    ref = np.asarray(reference, dtype=np.float64)
    lo, hi = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    m = np.ones(ref.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if ref.ndim < 2 or not ref.shape == lo.shape == hi.shape == m.shape:
        raise ValueError(f"coverage_report: reference {ref.shape}, lower {lo.shape}, upper "
                         f"{hi.shape} and mask {m.shape} must share one shape (slices, ...)")
    inside = ((lo <= ref) & (ref <= hi)).reshape(len(ref), -1)
    counted = m.reshape(len(ref), -1)
    n = counted.sum(axis=1)
    if not n.all():
        raise ValueError("coverage_report: a slice has no counted pixel")
    per_slice = [float(v) for v in (inside & counted).sum(axis=1) / n]
    out: dict[str, Any] = {"coverage": float(np.mean(per_slice)),
                           "coverage_per_slice": per_slice,
                           "width": float(np.mean((hi - lo)[m]))}
    out["relative_width"] = out["width"] / float(ref.max()) if ref.max() > 0 else None
    if mean is not None and std is not None:
        err2 = float(np.mean((np.asarray(mean, dtype=np.float64)[m] - ref[m]) ** 2))
        sd2 = float(np.mean(np.asarray(std, dtype=np.float64)[m] ** 2))
        out["std_rmse"] = float(np.sqrt(sd2 / err2)) if err2 > 0 else None
    return out
