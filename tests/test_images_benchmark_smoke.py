"""Smoke test of benchmarks/images.py: ``--quick`` runs in-process (one 32 px MRI 4x and one
CT 30-view slice, DDS 10 steps x 4 draws plus baselines) and prints tables with finite
numbers; plus closed-form checks of the deepinv denoiser wrapper and of the coverage score."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from benchmarks import common, images
from benchmarks._images_deepinv import UnitDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")


def table_after(text: str, heading: str) -> list[dict[str, str]]:
    rest = text[text.index(heading) + len(heading):]
    cols, rows = common.parse_table(rest)
    assert cols, f"no table after {heading!r}"
    return [dict(zip(cols, r, strict=True)) for r in rows]


def test_quick_run_tables_are_finite(tmp_path):
    text = images.main(["--quick", "--out", str(tmp_path)])
    for task in images.QUICK_TASKS:
        rows = table_after(text, f"### {task}:")
        labels = [r["solver"] for r in rows]
        assert "DDS 10 x4" in labels and len(rows) >= 3
        for r in rows:
            assert "failed" not in r["PSNR"], r
            psnr, ssim, nmse = (float(r[k].split("±")[0]) for k in ("PSNR", "SSIM", "NMSE"))
            assert math.isfinite(psnr) and 5 < psnr < 60
            assert -1 <= ssim <= 1 and 0 <= nmse < 2
        assert (tmp_path / f"{task}.png").stat().st_size < 300_000
        saved = json.loads((tmp_path / f"{task}.json").read_text())
        assert saved["seed"] >= common.SEED0 and saved["size"] == 32
    summary = table_after(text, "### Best diffusion solver vs best classical baseline")
    assert [r["task"] for r in summary] == list(images.QUICK_TASKS)
    assert all(math.isfinite(float(r["ΔPSNR (dB)"])) for r in summary)
    cov = table_after(text, "### Coverage")
    assert len(cov) == 2 and all(0 <= float(r["coverage (nominal 0.90)"]) <= 1 for r in cov)
    assert (tmp_path / "tables.md").read_text().strip() == text.strip()


def test_unit_denoiser_is_exact_for_a_gaussian_prior():
    """x ~ N(0, 1) on data range (-1, 1) -> u = (x + 1) / 2 ~ N(1/2, 1/4): the wrapper must
    return the exact [0, 1]-unit posterior mean 1/2 + (1/4) / (1/4 + s^2) (v - 1/2)."""
    from diffrecon.priors.base import Prior

    class StdNormal(Prior):
        data_range = (-1.0, 1.0)

        def _denoise(self, x, sigma):
            return x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2)

    den = UnitDenoiser(StdNormal())
    v = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for s in (0.05, 0.5, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)):
        st = torch.as_tensor(s, dtype=torch.float64).reshape(-1, 1, 1, 1)
        exact = 0.5 + 0.25 / (0.25 + st ** 2) * (v - 0.5)
        torch.testing.assert_close(den(v, s), exact, rtol=1e-6, atol=1e-6)


def test_coverage_of_calibrated_gaussian_errors():
    task = images.TASKS["ct-30"]
    rng = np.random.default_rng(7)
    gt = rng.uniform(0.2, 1.0, size=(2, 1, 64, 64))
    sd = np.full_like(gt, 0.05)
    mean = gt + sd * rng.standard_normal(gt.shape)
    s = images.scores(task, gt, mean, sd, samples=4)
    assert abs(s["coverage"] - 0.899) < 0.02 and abs(s["std_over_rmse"] - 1) < 0.05
    s_narrow = images.scores(task, gt, mean, sd / 4, samples=4)
    assert s_narrow["coverage"] < 0.45
    assert "coverage" not in images.scores(task, gt, mean, sd, samples=1)
