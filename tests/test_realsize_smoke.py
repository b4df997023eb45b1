"""Smoke test of benchmarks/realsize.py --quick: it runs, prints its tables, and the checks it
reports hold (fastMRI reads the file it writes, readout crop exact, compressed / coarse
ESPIRiT close to full resolution, CT operators match the analytic phantom); the whole-run
and per-step parts give consistent splits."""

from __future__ import annotations

import pytest

pytest.importorskip("fastmri")
pytest.importorskip("nibabel")
from benchmarks import common, realsize  # noqa: E402 - after the importorskips


def test_realsize_quick(capsys):
    report = realsize.main(["--quick", "--parts", "setup"])
    assert report in capsys.readouterr().out
    assert "target max |diff| 0.0e+00" in report  # fastMRI SliceDataset: same target
    cols, rows = common.parse_table(report[report.index("| step |"):])
    steps = {r[0]: r for r in rows}
    crop = next(r for k, r in steps.items() if k.startswith("readout crop"))
    assert float(crop[2].split()[-1]) < 1e-6  # relative to fastMRI's transforms
    cols, rows = common.parse_table(report[report.index("| maps |"):])
    nrmse = {r[0]: float(r[1]) for r in rows}
    assert nrmse["grid 48, 8 coils (8)"] < 1e-3
    cols, rows = common.parse_table(report[report.index("| geometry |"):])
    assert [r[0] for r in rows] == ["parallel", "fan (curved)"]
    for r in rows:
        row = dict(zip(cols, r, strict=True))
        assert float(row["A vs analytic (rel L2)"]) < 0.03
        assert float(row["FBP(analytic) PSNR dB"]) > 24


def test_realsize_quick_whole_runs(capsys):
    report = realsize.main(["--quick", "--parts", "mri-run", "ct-run", "step-split",
                            "--ct-geometries", "parallel", "--ct-steps", "2"])
    cols, rows = common.parse_table(report[report.index("| run |"):])
    runs = [dict(zip(cols, r, strict=True)) for r in rows]
    assert [r["NFE"] for r in runs] == ["3", "2"]
    for r in runs:
        whole, setup, network = (float(r[k]) for k in ("whole s", "set-up s", "network s"))
        assert 0 < setup < whole and 0 < network < whole
        assert float(r["whole / bare"]) > 1 and 0 < float(r["peak RSS GB"]) < 3
    extrapolated = next(k for k in cols if k.startswith("whole / bare (") and "extrap" in k)
    assert float(runs[1][extrapolated]) > 1  # CT ran 2 of the default run's steps
    cols, rows = common.parse_table(report[report.index("| problem |"):])
    steps = {r[0]: dict(zip(cols, r, strict=True)) for r in rows}
    assert all(float(s["step / network"]) > 1 for s in steps.values())
