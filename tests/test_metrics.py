"""fastMRI metric definitions and evaluation of result files against scans."""

import json

import h5py
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from diffrecon import metrics
from diffrecon.datasets.io import write_result
from diffrecon.errors import InputError


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 2.0, (3, 24, 24))
    gt[1] *= 0.25  # a dark slice: the VOLUME max is the data range of every slice
    pred = gt + 0.05 * rng.standard_normal(gt.shape)
    return gt, pred


def test_closed_forms(volume):
    gt, pred = volume
    mse = np.mean((gt - pred) ** 2)
    assert metrics.psnr(gt, pred) == pytest.approx(10 * np.log10(gt.max() ** 2 / mse), rel=1e-12)
    assert metrics.psnr(gt, pred, maxval=1.0) == pytest.approx(10 * np.log10(1 / mse), rel=1e-12)
    assert metrics.nmse(gt, pred) == pytest.approx(np.sum((gt - pred) ** 2) / np.sum(gt ** 2))
    ref = np.mean([structural_similarity(g, p, data_range=gt.max())
                   for g, p in zip(gt, pred, strict=True)])
    assert metrics.ssim(gt, pred) == pytest.approx(ref, rel=1e-12)
    assert metrics.ssim(gt, gt) == pytest.approx(1.0)
    assert metrics.nmse(gt, gt) == 0.0


def test_evaluate_arrays_per_slice_uses_volume_max(volume):
    gt, pred = volume
    m = metrics.evaluate_arrays(gt, pred)
    assert set(m) >= {"psnr", "ssim", "nmse", "per_slice", "volume"}
    assert len(m["per_slice"]) == 3
    s1 = m["per_slice"][1]
    mse1 = np.mean((gt[1] - pred[1]) ** 2)
    assert s1["psnr"] == pytest.approx(10 * np.log10(gt.max() ** 2 / mse1), rel=1e-12)
    assert m["psnr"] == pytest.approx(np.mean([s["psnr"] for s in m["per_slice"]]))
    assert m["volume"]["psnr"] == pytest.approx(metrics.psnr(gt, pred))
    assert m["ssim"] == pytest.approx(metrics.ssim(gt, pred))  # fastMRI ssim is a slice mean


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        metrics.psnr(np.ones((2, 4, 4)), np.ones((2, 4, 5)))


def _scan(path, rss, gt_complex):
    with h5py.File(path, "w") as f:
        f["kspace"] = np.ones((rss.shape[0], 2, *rss.shape[1:]), np.complex64)
        f["reconstruction_rss"] = rss.astype(np.float32)
        f["ground_truth_complex"] = gt_complex.astype(np.complex64)


def test_evaluate_file_mri_reference_kinds_and_slices(tmp_path):
    rng = np.random.default_rng(1)
    gtc = (rng.uniform(0.5, 1, (3, 16, 16)) * np.exp(1j * rng.uniform(0, 6, (3, 16, 16))))
    rss = np.abs(gtc) * 1.1  # a different reference, so the choice is visible
    scan = tmp_path / "scan.h5"
    _scan(scan, rss, gtc)
    rec = np.abs(gtc[[0, 2]]) + 0.01
    res = tmp_path / "res.h5"
    write_result(res, rec, np.zeros_like(rec), attrs={"slices": [0, 2], "solver": "x"})
    m_rss = metrics.evaluate_file(res, scan, "rss")
    m_cx = metrics.evaluate_file(res, scan, "complex")
    assert m_rss["reference"] == "reconstruction_rss"
    assert m_cx["reference"] == "ground_truth_complex"
    assert [s["slice"] for s in m_rss["per_slice"]] == [0, 2]
    expect = metrics.evaluate_arrays(np.abs(gtc[[0, 2]]), rec)
    assert m_cx["psnr"] == pytest.approx(expect["psnr"])
    assert m_rss["psnr"] < m_cx["psnr"]
    assert metrics.evaluate_file(res, scan)["reference"] == "reconstruction_rss"  # auto
    json.dumps(m_rss)  # JSON-serialisable


def test_evaluate_file_crops_to_reference_and_errors(tmp_path):
    rss = np.ones((1, 8, 8)) + np.arange(64).reshape(1, 8, 8) / 64
    scan = tmp_path / "scan.h5"
    _scan(scan, rss, rss)
    big = np.zeros((1, 12, 12))
    big[:, 2:10, 2:10] = rss
    res = tmp_path / "res.h5"
    write_result(res, big, big)
    assert metrics.evaluate_file(res, scan)["nmse"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(InputError, match="reference-kind"):
        metrics.evaluate_file(res, scan, "magic")
    bad = tmp_path / "res3.h5"
    write_result(bad, np.ones((2, 8, 8)), np.ones((2, 8, 8)))
    with pytest.raises(InputError, match="slices"):
        metrics.evaluate_file(bad, scan)
    with pytest.raises(InputError, match="result file"):
        metrics.evaluate_file(res, res)
