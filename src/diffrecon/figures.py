"""Figures of a reconstruction: the mean, |error| against a reference, the posterior std and
the width of each calibrated interval, side by side per chosen slice, each with a colour bar
(matplotlib Agg, no display needed).

Slices are named by their SCAN slice numbers (a result records which slices of its scan it
holds). Only the chosen slices are read and scored, so a figure of one slice costs the same
for a 2-slice and a 200-slice result; the reference volume is read whole, for fastMRI's data
range (its maximum).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffrecon.problems.problem import format_slices


def _display(x: np.ndarray) -> np.ndarray:
    """(H, W) or (C, H, W) -> a 2-D image (channels shown as their root sum of squares)."""
    x = np.asarray(x, dtype=np.float64)
    return np.sqrt((x ** 2).sum(0)) if x.ndim == 3 else x


def result_positions(path: str | os.PathLike, slices: Sequence[int] | None
                     ) -> tuple[list[int], list[int]]:
    """(positions in the result, scan slice numbers) of the requested SCAN slices of a
    result file (default: its middle slice); ``ValueError`` names the slices it holds."""
    from diffrecon.datasets.io import attrs_to_dict, open_h5_checked, read_array
    from diffrecon.metrics import result_slices

    with open_h5_checked(path) as f:
        if "reconstruction" not in f:
            read_array(f, "reconstruction", kinds="f", ndim=(3, 4))  # raises, naming it
        n = int(f["reconstruction"].shape[0])
        held = result_slices(attrs_to_dict({"slices": f.attrs["slices"]})) \
            if "slices" in f.attrs else None
    held = list(range(n)) if held is None or len(held) != n else held
    if slices is None:
        return [n // 2], [held[n // 2]]
    where = {k: i for i, k in enumerate(held)}
    missing = [int(s) for s in slices if int(s) not in where]
    if missing:
        raise ValueError(f"scan slice {missing[0]} is not in this result, which holds scan "
                         f"slices {format_slices(held)}")
    scan = sorted({int(s) for s in slices})
    return [where[k] for k in scan], scan


def save_figure(result: str | os.PathLike | dict[str, Any], out_png: str | os.PathLike,
                reference: str | os.PathLike | np.ndarray | None = None,
                slices: Sequence[int] | None = None, reference_kind: str = "auto",
                dpi: int = 100) -> Path:
    """Write a PNG with one row per slice: reconstruction | |error| | std | interval widths.

    Args:
        result: a result file path, or a dict with ``reconstruction`` (slices, H, W) and
            optional ``std`` (same shape), ``intervals`` ({level: (lower, upper)}),
            ``slices`` (scan slice numbers) and ``label``.
        out_png: output path (written via a temporary name, then renamed).
        reference: a scan file holding the ground truth, or an array like the
            reconstruction; without it the |error| column and metrics are omitted.
        slices: SCAN slice numbers to show (default: the result's middle slice).
        reference_kind: for MRI scans, 'auto', 'rss' or 'complex' (see ``metrics``).

    Metrics (per row): PSNR / SSIM with the whole reference volume's maximum as data range
    (fastMRI), and the fraction of reference pixels inside each interval (those the
    calibration counted, as ``evaluate``: ``metrics.counted_pixels``).
    """
    from diffrecon import metrics

    data_range = None
    if isinstance(result, dict):
        rec = np.asarray(result["reconstruction"], dtype=np.float64)
        held = list(result.get("slices") or range(len(rec)))
        std = result.get("std")
        intervals = dict(result.get("intervals") or {})
        label, attrs = result.get("label", ""), {}
        pos = [len(rec) // 2] if slices is None else [held.index(int(s)) for s in slices
                                                      if int(s) in held]
        if slices is not None and len(pos) != len(set(slices)):
            raise ValueError(f"slices {list(slices)} are not all in {format_slices(held)}")
        scan = [held[i] for i in pos]
        rec = rec[pos]
        std = None if std is None else np.asarray(std, dtype=np.float64)[pos]
        intervals = {lv: (np.asarray(lo)[pos], np.asarray(hi)[pos])
                     for lv, (lo, hi) in intervals.items()}
        if isinstance(reference, str | os.PathLike):
            raise ValueError("a reference file needs a result file, not arrays")
        ref = None if reference is None else np.asarray(reference, dtype=np.float64)[pos]
    else:
        pos, scan = result_positions(result, slices)
        if isinstance(reference, str | os.PathLike):
            p = metrics.paired_result(result, reference, reference_kind, index=pos)
            res, ref, rec, std = p["result"], p["reference"], p["mean"], p["std"]
            intervals, data_range = p["intervals"], p["data_range"]
        else:
            from diffrecon.datasets.io import read_result

            res = read_result(result, pos, samples=False)
            rec, std, intervals = res.reconstruction, res.std, res.intervals
            ref = None if reference is None else np.asarray(reference, dtype=np.float64)[pos]
        label, attrs = f"{Path(result).name}: {res.attrs.get('solver', '?')}", res.attrs
    rec = np.asarray(rec, dtype=np.float64)
    std = None if std is None else np.asarray(std, dtype=np.float64)
    if ref is not None and ref.shape != rec.shape:
        from diffrecon.datasets.fastmri import center_crop

        rec, std = (None if a is None else center_crop(a, ref.shape[-2:]) for a in (rec, std))
        intervals = {lv: tuple(center_crop(np.asarray(b), ref.shape[-2:]) for b in pair)
                     for lv, pair in intervals.items()}
    if ref is not None and data_range is None:
        data_range = float(ref.max())
    fg, counted = (None, None) if ref is None else metrics.counted_pixels(attrs, ref)
    return _draw(out_png, rec, std, ref, intervals, scan, label, data_range, dpi, fg, counted)


def _draw(out_png, rec, std, ref, intervals, scan, label, data_range, dpi, fg=None,
          counted=None) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from diffrecon import metrics

    levels = sorted(intervals)
    columns = ["reconstruction"] + (["|error|"] if ref is not None else []) + (
        ["std"] if std is not None else []) + [f"{lv:g} interval width" for lv in levels]
    fig, axes = plt.subplots(len(scan), len(columns), squeeze=False,
                             figsize=(3.2 * len(columns), 3.0 * len(scan) + 0.6))
    vmax = data_range if data_range is not None else float(np.abs(rec).max())
    widths = {lv: np.asarray(hi, np.float64) - np.asarray(lo, np.float64)
              for lv, (lo, hi) in intervals.items()}
    wmax = max([float(w.max()) for w in widths.values()] + [0.0]) or 1.0
    for row, k in enumerate(scan):
        panels = {"reconstruction": (_display(rec[row]), "gray", 0.0, vmax, "")}
        if ref is not None:
            err = np.abs(_display(rec[row]) - _display(ref[row]))
            m = metrics.evaluate_arrays(ref[row][None], rec[row][None], data_range)
            panels["|error|"] = (err, "magma", 0.0, float(err.max()) or 1.0,
                                 f"\nPSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}")
        if std is not None:
            sd = _display(std[row])
            panels["std"] = (sd, "viridis", 0.0, float(sd.max()) or 1.0,
                             " - 1 sample, no spread" if not sd.any() else "")
        for lv in levels:
            note = ""
            if ref is not None:
                lo, hi = (b[row][None] for b in intervals[lv])
                mask = None if counted is None else counted[row][None]
                cov = metrics.coverage_report(ref[row][None], lo, hi, mask=mask)["coverage"]
                where = "" if fg is None else f" > {fg:g} max"
                note = f"\ncovers {100 * cov:.1f}% of the reference{where}"
            panels[f"{lv:g} interval width"] = (_display(widths[lv][row]), "cividis", 0.0,
                                                wmax, note)
        for col, name in enumerate(columns):
            img, cmap, lo, hi, note = panels[name]
            ax = axes[row, col]
            im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
            ax.set_title(f"{name} (scan slice {k}){note}", fontsize=9)
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    note = "" if data_range is None else f"data range {data_range:.4g} (reference volume max)"
    fig.suptitle("\n".join(t for t in (label, note) if t), fontsize=10)
    fig.tight_layout()
    out = Path(out_png)
    if not out.parent.exists():
        plt.close(fig)
        from diffrecon.errors import InputError

        raise InputError(f"{out}: output directory {out.parent} does not exist")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return out
