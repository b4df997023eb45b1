"""Conformal calibration of pixel intervals (diffrecon.calibration) and coverage metrics."""

import json
import math

import numpy as np
import pytest
import torch

from diffrecon import calibration as C
from diffrecon.errors import InputError
from diffrecon.metrics import coverage_report

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the conformal threshold
def test_split_conformal_quantile_by_hand():
    # one pixel per unit: the ceil((n + 1) level)-th smallest of n = 10 scores
    # sorted: 0.1 0.3 0.5 0.7 0.9 1.2 1.5 1.9 2.5 3.1
    s = [0.3, 1.2, 0.7, 2.5, 1.9, 0.1, 0.9, 1.5, 3.1, 0.5]
    units = [np.array([v]) for v in s]
    got = C.risk_thresholds(units, [0.5, 0.8, 0.9])
    assert got == {0.5: 1.2, 0.8: 2.5, 0.9: 3.1}  # ceil(5.5) = 6th, ceil(8.8) = 9th, 10th
    assert C.min_units(0.95) == 19 and C.min_units(0.9) == 9 and C.min_units(0.8) == 4
    with pytest.raises(ValueError, match="level 0.95 needs at least 19 calibration units, got 10"):
        C.risk_thresholds(units, [0.95])
    # n = 9, level 0.9: (n + 1) alpha = 1 exactly (no float slack): the maximum
    assert C.risk_thresholds(units[:9], [0.9]) == {0.9: 3.1}


def test_risk_control_by_hand_unequal_pixel_counts():
    # n = 4 units, level 0.5: sum_i L_i(lam) <= 0.5 * 5 - 1 = 1.5.  Unit 0 has one pixel
    # (loss 1 when it is missed), the others two (1/2 each).
    units = [np.array([0.7]), np.array([0.2, 0.8]), np.array([0.3, 0.6]), np.array([0.5, 0.9])]
    # lam = 0.6: missed 0.7 (1) + 0.8 (1/2) + 0.9 (1/2) = 2 > 1.5; lam = 0.7: 0.8 + 0.9 -> 1
    assert C.risk_thresholds(units, [0.5]) == {0.5: 0.7}
    # without unit 0's heavy pixel: lam = 0.6 leaves 0.8, 0.9 and 0.7 (1/2 each) = 1.5
    units[0] = np.array([0.7, 0.1])
    assert C.risk_thresholds(units, [0.5]) == {0.5: 0.6}
    ties = [np.array([1.0, 1.0])] * 4  # ties: the tied value itself covers everything
    assert C.risk_thresholds(ties, [0.5]) == {0.5: 1.0}


@pytest.mark.parametrize("pixels", [1, 16, 64])
def test_leave_one_out_risk_never_exceeds_alpha(pixels):
    """The CRC argument is deterministic: for ANY n + 1 units, the average over i of unit
    i's miscoverage at the threshold fitted on the other n is <= alpha (with one pixel per
    unit and (n + 1) alpha an integer it is exactly alpha); it is also >= alpha - 2/(n+1)."""
    rng = np.random.default_rng(pixels)
    n, level = 19, 0.9
    for _ in range(5):
        units = [np.abs(rng.standard_normal(pixels)) * rng.uniform(0.5, 2) for _ in range(n + 1)]
        miss = [np.mean(units[i] > C.risk_thresholds(units[:i] + units[i + 1:], [level])[level])
                for i in range(n + 1)]
        if pixels == 1:
            assert np.mean(miss) == pytest.approx(0.1, abs=1e-15)
        assert 0.1 - 2 / (n + 1) <= np.mean(miss) <= 0.1 + 1e-15


# ------------------------------------------------------------------ exact Gaussian posterior
@pytest.fixture(scope="module")
def gaussian_slices():
    """200 8x8 'slices' x ~ N(0.5, C) (correlation length 1.5 px) seen through a random
    32 x 64 matrix with noise 0.05; diffrecon's exact Gaussian posterior gives mean and std."""
    from diffrecon.operators import matrix
    from diffrecon.priors.analytic import Gaussian

    size, n = 8, 200
    d = size * size
    r = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1)
    r = r.reshape(-1, 2).double()
    cov = 0.01 * torch.exp(-torch.cdist(r, r) ** 2 / (2 * 1.5 ** 2)) + 1e-4 * torch.eye(d)
    prior = Gaussian(torch.full((d,), 0.5), cov)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    physics = matrix(a, noise_sigma=0.05)
    x = prior.sample(n, generator=g)
    y = x @ a.T + 0.05 * torch.randn(n, 32, generator=g, dtype=torch.float64)
    # the posterior mean is affine in y: m(y) = m(0) + sum_j y_j (m(e_j) - m(0))
    post0 = prior.posterior(physics, torch.zeros(32, dtype=torch.float64))
    gain = torch.stack([prior.posterior(physics, e).means[0] for e in torch.eye(32).double()])
    gain = gain - post0.means
    mean = (post0.means + y @ gain).numpy().reshape(n, size, size)
    np.testing.assert_allclose(mean[7].ravel(), prior.posterior(physics, y[7]).means[0],
                               atol=1e-12)
    var = torch.diagonal(post0.covariances.reshape(d, d)).numpy()
    std = np.broadcast_to(np.sqrt(var).reshape(1, size, size), mean.shape).copy()
    return x.numpy().reshape(n, size, size), mean, std


def test_misscaled_std_recalibrated_on_held_out_slices(gaussian_slices):
    ref, mean, std = gaussian_slices
    cal, test = slice(0, 100), slice(100, 200)
    wrong = 0.3 * std  # a solver whose std is a third of the true posterior std
    c = C.calibrate(ref[cal], mean[cal], wrong[cal], floor=0.0, task={"solver": "exact"},
                    created="2000-01-01")
    assert c.n_units == c.n_slices == 100 and c.unit == "slice"
    wrong = wrong[test]
    for level, (lo, hi) in c.intervals(mean[test], wrong).items():
        z = C.z_score(level)
        before = coverage_report(ref[test], mean[test] - z * wrong, mean[test] + z * wrong)
        after = coverage_report(ref[test], lo, hi, mean[test], wrong)
        assert before["coverage"] < level - 0.35  # mis-scaled: 30-43% instead of 80-95%
        # E[coverage] in [level, level + 2/101]; +-0.02 for 6400 correlated test pixels
        assert level - 0.02 <= after["coverage"] <= level + 2 / 101 + 0.02
        assert c.scales[level] * 0.3 == pytest.approx(z, rel=0.06)  # undoes the 0.3
        assert after["std_rmse"] == pytest.approx(0.3, rel=0.05)
        assert after["width"] == pytest.approx(np.mean(hi - lo), rel=1e-12)
    assert c.diagnostics["coverage_calibrated"]["0.9"] >= 0.9
    assert c.diagnostics["coverage_gaussian"]["0.9"] < 0.5
    assert c.diagnostics["std_rmse"] == pytest.approx(0.3, rel=0.05)
    # the RMSE bound holds for about `level` of the held-out slices (binomial sd <= 0.04)
    rmse = np.sqrt(np.mean((mean[test] - ref[test]) ** 2, axis=(1, 2)))
    for level, bound in c.rmse_bounds(mean[test], wrong).items():
        assert bound.shape == (100,)
        assert level - 0.1 <= np.mean(rmse <= bound) <= 1.0


def test_exact_std_needs_no_scaling_and_samples_equal_std(gaussian_slices):
    ref, mean, std = gaussian_slices
    c = C.calibrate(ref[:100], mean[:100], std[:100], levels=(0.9,), floor=0.0)
    assert c.scales[0.9] == pytest.approx(C.z_score(0.9), rel=0.06)
    rng = np.random.default_rng(3)
    draws = mean[:40, None] + std[:40, None] * rng.standard_normal((40, 4, 8, 8))
    by_draws = C.calibrate(ref[:40], mean[:40], draws, levels=(0.9,))
    by_std = C.calibrate(ref[:40], mean[:40], draws.std(axis=1, ddof=1), levels=(0.9,))
    assert by_draws.scales == by_std.scales and by_draws.rmse_factors == by_std.rmse_factors
    lo, hi = by_draws.intervals(mean[:40].astype(np.float32), draws)[0.9]
    assert lo.dtype == np.float32 and lo.shape == (40, 8, 8)


def test_intervals_formula_and_scan_unit():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 1, (30, 4, 4))
    mean = ref + 0.1 * rng.standard_normal(ref.shape)
    std = np.full(ref.shape, 0.05)
    c = C.calibrate(ref, mean, std, levels=(0.8,), floor=0.01)
    lo, hi = c.intervals(mean, std)[0.8]
    u = std + 0.01 * np.abs(mean).max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(hi - mean, c.scales[0.8] * u, rtol=1e-12)
    np.testing.assert_allclose(mean - lo, c.scales[0.8] * u, rtol=1e-12)
    # one slice per scan: scan unit == slice unit; 3 scans of 10 slices: 3 units (< 4)
    per_scan = C.calibrate(list(ref[:, None]), list(mean[:, None]), list(std[:, None]),
                           levels=(0.8,), unit="scan", floor=0.01)
    assert per_scan.scales == c.scales and per_scan.n_units == 30
    with pytest.raises(ValueError, match="needs at least 4 calibration units, got 3"):
        C.calibrate([ref[:10], ref[10:20], ref[20:]], [mean[:10], mean[10:20], mean[20:]],
                    [std[:10], std[10:20], std[20:]], levels=(0.8,), unit="scan")
    with pytest.raises(ValueError, match="level 0.7 is not calibrated; calibrated levels: 0.8"):
        c.intervals(mean, std, levels=(0.7,))


def test_foreground_counts_only_the_mask():
    ref = np.zeros((10, 4, 4))
    ref[:, 1:3, 1:3] = 1.0  # 4 foreground pixels of 16
    mean = ref.copy()
    mean[:, 0, 0] = 5.0  # background error the foreground calibration must ignore
    std = np.full(ref.shape, 0.1)
    mean[:, 1, 1] += 0.1 * np.arange(10)  # foreground errors 0, 0.1, ..., 0.9
    c = C.calibrate(ref, mean, std, levels=(0.8,), foreground=0.5, floor=0.0)
    # per slice one of 4 foreground pixels has score |err| / 0.1 = i; budget 0.2 * 11 - 1
    # = 1.2 of loss, each miss costs 1/4: at most 4 misses -> lam = the 5th largest = 5
    assert c.scales[0.8] == pytest.approx(5.0)
    assert c.foreground == 0.5


def test_calibrate_rejects_bad_input():
    ref = np.ones((10, 4, 4))
    with pytest.raises(ValueError, match=r"scan 0: reference \(10, 4, 4\) and mean \(10, 4, 3\)"):
        C.calibrate(ref, np.ones((10, 4, 3)), np.ones((10, 4, 3)))
    with pytest.raises(ValueError, match="match neither the mean"):
        C.calibrate(ref, ref, np.ones((10, 3, 4, 3)))
    bad = ref.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="must be finite"):
        C.calibrate(ref, bad, ref)
    with pytest.raises(ValueError, match="unit must be one of slice, scan"):
        C.calibrate(ref, ref, ref, unit="pixel")
    with pytest.raises(ValueError, match="level 1 is not in"):
        C.calibrate(ref, ref, ref, levels=(1.0,))
    zero = np.zeros((10, 4, 4))
    with pytest.raises(ValueError, match="infinite multiplier"):
        C.calibrate(ref, zero, zero, levels=(0.8,), floor=0.0)


# ------------------------------------------------------------------ file format
@pytest.fixture
def calib():
    rng = np.random.default_rng(1)
    ref = rng.uniform(0, 1, (25, 6, 6))
    mean = ref + 0.05 * rng.standard_normal(ref.shape)
    task = {"modality": "mri", "solver": "dds", "steps": 50, "num_samples": 4,
            "prior": "mri", "prior_sha256": "ab" * 32, "acceleration": 4, "views": None}
    return C.calibrate(ref, mean, np.full(ref.shape, 0.02), task=task, created="2025-01-02")


def test_round_trip(tmp_path, calib):
    path = calib.save(tmp_path / "calib.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.json"]  # no temporary left
    d = json.loads(path.read_text())
    assert d["format"] == "diffrecon-calibration" and d["version"] == 1
    assert d["method"] == "conformal-risk-control" and set(d["scales"]) == {"0.8", "0.9", "0.95"}
    assert d["task"]["acceleration"] == 4 and d["created"] == "2025-01-02"
    back = C.Calibration.load(path)
    assert back == calib
    calib.save(path)
    assert path.read_text() == json.dumps(d, indent=2, sort_keys=True) + "\n"  # deterministic
    back.check_task(dict(calib.task))
    with pytest.raises(InputError, match=r"^run: calibrated for acceleration=4, this run has "
                                         r"acceleration=8; calibrate for this task$"):
        back.check_task({**calib.task, "acceleration": 8}, where="run")
    with pytest.raises(InputError, match="calibrated for solver='dds', this run has solver=None"):
        back.check_task({k: v for k, v in calib.task.items() if k != "solver"})
    with pytest.raises(InputError, match="output directory"):
        calib.save(tmp_path / "missing" / "c.json")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("format"), "key 'format' must be 'diffrecon-calibration'"),
    (lambda d: d.update(version=2), "key 'version' is 2, this diffrecon reads 1"),
    (lambda d: d.update(method="rcps"), "key 'method' is 'rcps'"),
    (lambda d: d.pop("scales"), "key 'scales' must be a non-empty mapping"),
    (lambda d: d["scales"].update({"x": 1.0}), "key 'scales' has level 'x' that is not a number"),
    (lambda d: d["scales"].update({"1.5": 1.0}), "key 'scales' has level '1.5' outside"),
    (lambda d: d["scales"].update({"0.9": -1}), "key 'scales.0.9' must be a finite number"),
    (lambda d: d["rmse_factors"].pop("0.8"), "key 'rmse_factors' must have the same levels"),
    (lambda d: d.update(unit="pixel"), "key 'unit' must be one of slice, scan"),
    (lambda d: d.update(n_units=0), "key 'n_units' must be a positive integer"),
    (lambda d: d.update(floor="0.1"), "key 'floor' must be a finite number"),
    (lambda d: d.update(task={"prior": [1]}), "key 'task' must map names to strings"),
])
def test_load_validation(tmp_path, calib, edit, message):
    d = calib.to_dict()
    edit(d)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(d))
    with pytest.raises(InputError, match=f"^{path}: " + message.replace(".", r"\.")):
        C.Calibration.load(path)


def test_load_bad_files(tmp_path):
    with pytest.raises(InputError, match="no-such.json: no such file"):
        C.Calibration.load(tmp_path / "no-such.json")
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(InputError, match=r"t\.json: not a calibration file"):
        C.Calibration.load(tmp_path / "t.json")
    (tmp_path / "l.json").write_text("[1, 2]")
    with pytest.raises(InputError, match=r"l\.json: key 'format'"):
        C.Calibration.load(tmp_path / "l.json")


# ------------------------------------------------------------------ coverage metrics
def test_coverage_report_by_hand():
    ref = np.array([[[0.0, 1.0], [2.0, 3.0]], [[1.0, 1.0], [1.0, 4.0]]])
    lo = np.array([[[0.0, 0.5], [2.5, 2.0]], [[0.0, 0.0], [0.0, 0.0]]])
    hi = lo + 1.0
    # slice 0: 0 in [0,1], 1 in [.5,1.5], 2 not in [2.5,3.5], 3 in [2,3]: 3/4; slice 1: 3/4
    out = coverage_report(ref, lo, hi)
    assert out["coverage_per_slice"] == [0.75, 0.75] and out["coverage"] == 0.75
    assert out["width"] == 1.0 and out["relative_width"] == 0.25
    assert "std_rmse" not in out
    mask = ref > 0.5  # drops slice 0's first pixel: slice 0 2/3
    out = coverage_report(ref, lo, hi, mean=ref + 0.2, std=np.full(ref.shape, 0.1), mask=mask)
    assert out["coverage_per_slice"] == [2 / 3, 0.75]
    assert out["std_rmse"] == pytest.approx(0.5, rel=1e-12)
    assert coverage_report(ref, lo, hi, ref, lo)["std_rmse"] is None  # exact mean
    with pytest.raises(ValueError, match="a slice has no counted pixel"):
        coverage_report(ref, lo, hi, mask=np.zeros(ref.shape, bool))
    with pytest.raises(ValueError, match="must share one shape"):
        coverage_report(ref, lo[:1], hi)


# ------------------------------------------------------------------ pooled std (smooth)
def test_pooled_std_closed_forms():
    std = np.full((2, 9, 9), 0.3)
    assert np.array_equal(C.pooled_std(std, 0.0), std)
    np.testing.assert_allclose(C.pooled_std(std, 2.0), 0.3, rtol=1e-12)  # a constant stays
    # a checkerboard of 0.1 / 0.5 pools to the rms sqrt((0.01 + 0.25) / 2) away from edges
    board = np.where(np.indices((40, 40)).sum(0) % 2 == 0, 0.1, 0.5)[None]
    np.testing.assert_allclose(C.pooled_std(board, 3.0)[0, 15:25, 15:25], math.sqrt(0.13),
                               rtol=1e-6)
    # slices do not mix: only the last two axes are smoothed
    two = np.stack([np.full((9, 9), 0.1), np.full((9, 9), 0.5)])
    np.testing.assert_allclose(C.pooled_std(two, 2.0), two, rtol=1e-12)
    with pytest.raises(ValueError, match="smooth must be a finite number >= 0"):
        C.pooled_std(std, -1.0)


def test_two_draw_std_pooled_keeps_coverage_with_narrower_intervals(gaussian_slices):
    """A std from 2 draws (1 degree of freedom per pixel): pooling it over 2 px keeps the
    held-out coverage at the level and narrows the intervals (the exact posterior std is
    the same at every slice, so pooling loses nothing here)."""
    ref, mean, std = gaussian_slices
    rng = np.random.default_rng(5)
    draws = mean[:, None] + std[:, None] * rng.standard_normal((200, 2, 8, 8))
    est = draws.std(axis=1, ddof=1)
    width = {}
    for smooth in (0.0, 2.0):
        c = C.calibrate(ref[:100], mean[:100], est[:100], (0.8, 0.9), floor=0.0, smooth=smooth)
        back = C.Calibration.from_dict(json.loads(json.dumps(c.to_dict())))
        assert back.smooth == smooth and back.intervals(mean[100:], est[100:])[0.9][0].tolist() \
            == c.intervals(mean[100:], est[100:])[0.9][0].tolist()
        for level, (lo, hi) in c.intervals(mean[100:], est[100:]).items():
            u = C.pooled_std(est[100:], smooth)
            np.testing.assert_allclose(hi - mean[100:], c.scales[level] * u, rtol=1e-9,
                                       atol=1e-15)
            cov = coverage_report(ref[100:], lo, hi)["coverage"]
            assert level - 0.02 <= cov <= level + 2 / 101 + 0.02, (smooth, level, cov)
            width[smooth, level] = float(np.mean(hi - lo))
    # measured: 0.49 -> 0.16 at 90%, 0.23 -> 0.12 at 80%
    assert width[2.0, 0.9] < 0.5 * width[0.0, 0.9] and width[2.0, 0.8] < 0.6 * width[0.0, 0.8]
    # a file written before 'smooth' existed reads as smooth 0
    d = c.to_dict()
    del d["smooth"]
    assert C.Calibration.from_dict(d).smooth == 0.0
