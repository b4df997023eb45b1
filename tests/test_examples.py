"""The clinical-research example scripts run end to end on tiny inputs (so they cannot rot)."""

import csv
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mri_study_quick(tmp_path, capsys):
    mod = _load("mri_study")
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "per_slice.csv")))
    assert len(rows) == 2 * 2 * 2  # solvers x scans x slices
    assert {r["solver"] for r in rows} == {"cg-sense", "tv"}
    assert all(float(r["psnr"]) > 15 for r in rows)
    assert (tmp_path / "summary.png").stat().st_size > 3000
    # resumable: a rerun reuses every reconstruction
    assert mod.main(["--scans", str(tmp_path / "scans"), "--out", str(tmp_path)]) == 0
    assert "(skipped)" in capsys.readouterr().out


def test_ct_sweep_quick(tmp_path, capsys):
    mod = _load("ct_sweep")
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "psnr.csv")))
    psnr = {(int(r["views"]), r["solver"]): float(r["psnr"]) for r in rows}
    assert set(psnr) == {(8, "fbp"), (8, "tv"), (30, "fbp"), (30, "tv")}
    assert psnr[(30, "fbp")] > psnr[(8, "fbp")]  # more views, better FBP
    assert (tmp_path / "psnr.png").exists()
    assert "views |" in capsys.readouterr().out


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
