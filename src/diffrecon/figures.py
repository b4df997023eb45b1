"""Figures of a reconstruction: the mean, |error| against a reference and the posterior std,
side by side per chosen slice, each with a colour bar; metrics in the title (matplotlib Agg,
no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def _display(x: np.ndarray) -> np.ndarray:
    """(H, W) or (C, H, W) -> a 2-D image (channels shown as their root sum of squares)."""
    x = np.asarray(x, dtype=np.float64)
    return np.sqrt((x ** 2).sum(0)) if x.ndim == 3 else x


def save_figure(result: str | os.PathLike | dict[str, Any], out_png: str | os.PathLike,
                reference: str | os.PathLike | np.ndarray | None = None,
                slices: list[int] | None = None, reference_kind: str = "auto",
                dpi: int = 100) -> Path:
    """Write a PNG with one row per slice: reconstruction | |error| | std.

    Args:
        result: a result file path, or a dict with ``reconstruction`` (slices, H, W) and
            optional ``std`` (same shape) arrays.
        out_png: output path (written via a temporary name, then renamed).
        reference: a scan file holding the ground truth, or an array like the
            reconstruction; without it the |error| column is omitted.
        slices: indices into the result's slices to show (default: the middle one).
        reference_kind: for MRI scans, 'auto', 'rss' or 'complex' (see ``metrics``).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from diffrecon import metrics

    title = ""
    if isinstance(result, dict):
        rec = np.asarray(result["reconstruction"], dtype=np.float64)
        std = result.get("std")
        label = result.get("label", "")
    else:
        from diffrecon.datasets.io import read_result

        res = read_result(result)
        rec = np.asarray(res.reconstruction, dtype=np.float64)
        std = res.std
        label = f"{Path(result).name}: {res.attrs.get('solver', '?')}"
    std = None if std is None else np.asarray(std, dtype=np.float64)
    if isinstance(reference, str | os.PathLike):
        scores = metrics.evaluate_file(result, reference, reference_kind) if not isinstance(
            result, dict) else None
        if scores is None:
            ref, _ = metrics.load_reference(reference, reference_kind)
        else:
            sl = res.attrs.get("slices")
            ref, _ = metrics.load_reference(reference, reference_kind,
                                            None if sl is None else list(np.ravel(sl)))
    elif reference is not None:
        ref, scores = np.asarray(reference, dtype=np.float64), None
    else:
        ref, scores = None, None
    if ref is not None:
        if ref.shape[-2:] != rec.shape[-2:]:
            from diffrecon.datasets.fastmri import center_crop

            rec = center_crop(rec, ref.shape[-2:])
            std = None if std is None else center_crop(std, ref.shape[-2:])
        if scores is None:
            scores = metrics.evaluate_arrays(ref, rec)
        title = (f"PSNR {scores['psnr']:.2f} dB  SSIM {scores['ssim']:.4f}  "
                 f"NMSE {scores['nmse']:.4g}")
    n = rec.shape[0]
    slices = [n // 2] if slices is None else [int(s) for s in slices]
    for s in slices:
        if not 0 <= s < n:
            raise ValueError(f"slice {s} out of range for {n} slices")
    columns = ["reconstruction"] + (["|error|"] if ref is not None else []) + (
        ["std"] if std is not None else [])
    fig, axes = plt.subplots(len(slices), len(columns), squeeze=False,
                             figsize=(3.2 * len(columns), 3.0 * len(slices) + 0.6))
    vmax = float(ref.max()) if ref is not None else float(np.abs(rec).max())
    for row, s in enumerate(slices):
        panels = {"reconstruction": (_display(rec[s]), "gray", 0.0, vmax)}
        if ref is not None:
            err = np.abs(_display(rec[s]) - _display(ref[s]))
            panels["|error|"] = (err, "magma", 0.0, float(err.max()) or 1.0)
        if std is not None:
            sd = _display(std[s])
            panels["std"] = (sd, "viridis", 0.0, float(sd.max()) or 1.0)
        for col, name in enumerate(columns):
            img, cmap, lo, hi = panels[name]
            ax = axes[row, col]
            im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
            note = " - 1 sample, no spread" if name == "std" and not img.any() else ""
            ax.set_title(f"{name} (slice {s}){note}", fontsize=9)
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("\n".join(t for t in (label, title) if t), fontsize=10)
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
