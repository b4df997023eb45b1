"""Calibration through the command line and the pipeline: calibrate -> run --calibration ->
evaluate / view round trip on simulated CT scans (DDS with the exact ellipse-GMM prior),
refusal of a mismatched task before any work, bad calibrate inputs, and evaluate's data
range against fastMRI's own evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffrecon import calibration as C
from diffrecon import pipeline
from diffrecon.cli.main import app
from diffrecon.datasets.io import read_result, write_result
from diffrecon.datasets.simulate import simulate_ct, simulate_mri
from diffrecon.errors import InputError
from diffrecon.metrics import coverage_report, evaluate_file, load_reference
from diffrecon.pipeline.calibrate import result_task

runner = CliRunner()
RUN = {"solver": "dds", "steps": 10, "samples": 4}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args):
    res = cli(*args)
    assert res.exit_code == 0, (args, res.stdout, res.stderr)
    return res


def refused(res, *words):
    """Exit 2 with one stderr line containing ``words``."""
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffrecon: error: "), res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def study(tmp_path_factory, ellipse_gmm):
    """Two calibration CT scans (6 slices each, 12 views), their DDS results (10 steps,
    4 draws, exact ellipse-GMM prior), a 4-slice test scan and the calibration file."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("calstudy")
    (d / "cal").mkdir()
    (d / "res").mkdir()
    _, gmm = ellipse_gmm
    for i in range(2):
        simulate_ct(d / "cal" / f"s{i}.h5", size=32, slices=6, views=12, seed=10 + i)
        pipeline.reconstruct_file(d / "cal" / f"s{i}.h5", d / "res" / f"s{i}.h5", prior=gmm,
                                  **RUN)
    simulate_ct(d / "test.h5", size=32, slices=4, views=12, seed=20)
    ok("calibrate", d / "cal", d / "res", "-o", d / "cal.json", "--levels", "0.8,0.9")
    yield d, gmm
    torch.set_num_threads(before)


def test_calibrate_run_evaluate_round_trip(study, tmp_path):
    d, gmm = study
    calib = C.Calibration.load(d / "cal.json")
    # the file holds what calibration.calibrate computes from the same arrays
    refs, means, stds = [], [], []
    for i in range(2):
        res = read_result(d / "res" / f"s{i}.h5")
        refs.append(load_reference(d / "cal" / f"s{i}.h5")[0])
        means.append(res.reconstruction)
        stds.append(res.std)
    direct = C.calibrate(refs, means, stds, (0.8, 0.9))
    assert calib.scales == direct.scales and calib.rmse_factors == direct.rmse_factors
    assert (calib.n_units, calib.n_slices, calib.unit) == (12, 12, "slice")
    # the task: what the results' provenance says, including the prior's weights
    assert calib.task == result_task(res.attrs)
    assert calib.task["modality"] == "ct" and calib.task["solver"] == "dds"
    assert calib.task["option.steps"] == 10 and calib.task["samples"] == 4
    assert calib.task["views"] == 12 and calib.task["prior_sha256"] == gmm.checksum
    assert "option.batch_size" not in calib.task
    # run with the calibration: intervals beside mean / std, recomputable bit for bit
    out = tmp_path / "test_recon.h5"
    pipeline.reconstruct_file(d / "test.h5", out, prior=gmm, calibration=d / "cal.json", **RUN)
    res = read_result(out)
    assert sorted(res.intervals) == [0.8, 0.9]
    for level, (lo, hi) in calib.intervals(res.reconstruction, res.std).items():
        assert np.array_equal(res.intervals[level][0], lo)
        assert np.array_equal(res.intervals[level][1], hi)
        assert lo.dtype == np.float32 and (hi > lo).all()
    assert res.attrs["calibration_file"] == "cal.json"
    assert list(res.attrs["calibration_scales"]) == [calib.scales[0.8], calib.scales[0.9]]
    # evaluate's coverage is the coverage computed directly from reference and intervals
    m = json.loads(ok("evaluate", out, "--reference", d / "test.h5", "--json").stdout)
    ref = load_reference(d / "test.h5")[0]
    for level in (0.8, 0.9):
        lo, hi = calib.intervals(res.reconstruction, res.std)[level]
        want = coverage_report(ref, lo, hi, res.reconstruction, res.std)
        got = m["coverage"][repr(level)]
        assert got["nominal"] == level
        assert got["coverage"] == want["coverage"]
        assert got["coverage_per_slice"] == want["coverage_per_slice"]
        assert got["width"] == pytest.approx(want["width"], rel=1e-12)
        assert got["std_rmse"] == pytest.approx(want["std_rmse"], rel=1e-12)
        rmse = np.sqrt(np.mean((res.reconstruction.astype(float) - ref) ** 2, axis=(1, 2)))
        bound = calib.rmse_bounds(res.reconstruction, res.std)[level]
        assert got["rmse_bound_held"] == np.mean(rmse <= bound)
    # the raw std is a third of the error (the prior does not fit these phantoms): its
    # Gaussian 80 / 90% intervals cover 0.28 / 0.34 of the held-out scan; calibrated on 12
    # slices, 0.91 / 0.99 (measured; n = 12 makes them conservative)
    assert m["coverage"]["0.8"]["std_rmse"] == pytest.approx(0.33, abs=0.05)
    for level, floor in ((0.8, 0.85), (0.9, 0.95)):
        z = C.z_score(level)
        raw = coverage_report(ref, res.reconstruction - z * res.std,
                              res.reconstruction + z * res.std)["coverage"]
        assert raw < 0.4 and m["coverage"][repr(level)]["coverage"] > floor
    text = ok("evaluate", out, "--reference", d / "test.h5").stdout
    assert "0.9 interval: coverage" in text and "RMSE bound holds on" in text
    # view shows the interval widths, labelled by scan slice
    png = tmp_path / "v.png"
    ok("view", out, "-o", png, "--reference", d / "test.h5", "--slice", 2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_task_mismatch_refused_before_any_work(study, ellipse_gmm, tmp_path, monkeypatch):
    d, gmm = study
    imgs, _ = ellipse_gmm

    def no_work(*a, **k):
        raise AssertionError("the scan was loaded before the calibration was checked")

    monkeypatch.setattr(pipeline.run, "load_problem", no_work)
    out = tmp_path / "o.h5"
    cal = d / "cal.json"
    for change, key in (({"steps": 12}, "option.steps"), ({"samples": 2}, "samples"),
                        ({"solver_options": {"eta": 0.5}}, "option.eta")):
        with pytest.raises(InputError, match=f"--calibration {cal}: calibrated for {key}="):
            pipeline.reconstruct_file(d / "test.h5", out, prior=gmm, calibration=cal,
                                      **{**RUN, **change})

    class Retrained(type(gmm)):  # same name and class, other weights
        def __init__(self, images):
            super().__init__(images, 1e-3)
            self.register_buffer("w", torch.ones(1))

    with pytest.raises(InputError, match="calibrated for prior_sha256="):
        pipeline.reconstruct_file(d / "test.h5", out, prior=Retrained(imgs), calibration=cal,
                                  **RUN)
    # the command line: one line naming the flag and the key, exit 2, no output
    line = refused(cli("run", d / "test.h5", "-o", out, "--solver", "fbp", "--calibration",
                       cal), "--calibration", "solver='dds'", "solver='fbp'")
    assert "calibrate for this task" in line
    mri = tmp_path / "mri.h5"
    simulate_mri(mri, size=16, slices=1, coils=2, acceleration=4, seed=0)
    refused(cli("run", mri, "-o", out, "--solver", "zero-filled", "--calibration", cal),
            "--calibration", "modality='ct'", "modality='mri'")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(cal.read_text()), "unit": "pixel"}))
    refused(cli("run", d / "test.h5", "-o", out, "--calibration", bad), "--calibration",
            "'unit'")
    refused(cli("run", d / "test.h5", "-o", out, "--calibration", tmp_path / "none.json"),
            "--calibration", "no such file")
    assert not out.exists()


def test_calibrate_bad_inputs(study, tmp_path):
    d, _ = study
    out = tmp_path / "c.json"
    refused(cli("calibrate", d / "cal", "-o", out), "no result files")
    refused(cli("calibrate", d / "res", "-o", out), "s0.h5", "not among the inputs")
    refused(cli("calibrate", d / "cal", d / "res", "-o", out), "--levels 0.95",
            "needs at least 19", "got 12")
    refused(cli("calibrate", d / "cal", d / "res", "-o", out, "--levels", "0.9,90"),
            "--levels")
    refused(cli("calibrate", d / "cal", d / "res", "-o", out, "--levels", "0.9", "--unit",
                "scan"), "--levels 0.9", "9 calibration scans, got 2")
    refused(cli("calibrate", d / "cal", d / "res", "-o", d / "cal.json", "--levels", "0.9"),
            "exists")
    # results of another task cannot be mixed in
    other = tmp_path / "other"
    other.mkdir()
    ok("run", d / "cal" / "s0.h5", "-o", other / "fbp.h5", "--solver", "fbp", "--quiet")
    refused(cli("calibrate", d / "cal", d / "res", other, "-o", out, "--levels", "0.9"),
            "solver=", "calibrate one task at a time")
    # a scan that is not the one reconstructed (same name, other content)
    fake = tmp_path / "fake"
    fake.mkdir()
    for i in range(2):
        simulate_ct(fake / f"s{i}.h5", size=32, slices=6, views=12, seed=99)
    refused(cli("calibrate", fake, d / "res", "-o", out, "--levels", "0.9"), "checksum")
    assert not out.exists()


def test_evaluate_data_range_is_the_whole_volume_as_fastmri(tmp_path):
    """A result of some slices is scored with the maximum of the WHOLE reference volume:
    the numbers fastMRI's evaluation gives for those slices of the full volume."""
    fm = pytest.importorskip("fastmri.evaluate")
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.0, 1.0, (4, 24, 24)) * np.array([1.0, 0.4, 0.5, 3.0])[:, None, None]
    pred = gt + rng.normal(0, 0.05, gt.shape)
    scan = tmp_path / "scan.h5"
    simulate_mri(scan, size=24, slices=4, coils=2, acceleration=4, seed=0)
    import h5py

    with h5py.File(scan, "a") as f:
        del f["reconstruction_rss"]
        f["reconstruction_rss"] = gt.astype(np.float32)
    gt = gt.astype(np.float32).astype(np.float64)
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    write_result(full, pred, np.zeros_like(pred), attrs={"slices": [0, 1, 2, 3]})
    write_result(part, pred[1:3], np.zeros((2, 24, 24)), attrs={"slices": [1, 2]})
    pred = pred.astype(np.float32).astype(np.float64)
    mf, mp = evaluate_file(full, scan), evaluate_file(part, scan)
    # the whole volume: fastMRI's volume figures
    assert mf["volume"]["psnr"] == pytest.approx(float(fm.psnr(gt, pred)), abs=1e-9)
    assert mf["volume"]["ssim"] == pytest.approx(fm.ssim(gt, pred).item(), abs=1e-9)
    assert mf["volume"]["nmse"] == pytest.approx(float(fm.nmse(gt, pred)), rel=1e-9)
    # slices 1, 2 alone: the volume's data range, so each slice scores as in the full result
    assert mp["data_range"] == mf["data_range"] == pytest.approx(gt.max())
    assert [s["slice"] for s in mp["per_slice"]] == [1, 2]
    for s in mp["per_slice"]:
        k = s["slice"]
        assert s == mf["per_slice"][k]
        assert s["psnr"] == pytest.approx(
            float(fm.psnr(gt[k:k + 1], pred[k:k + 1], maxval=gt.max())), abs=1e-9)
        assert s["ssim"] == pytest.approx(
            fm.ssim(gt[k:k + 1], pred[k:k + 1], maxval=gt.max()).item(), abs=1e-9)
    # the data range of the held slices alone (the old behaviour) is 15.6 dB lower here
    sub = float(fm.psnr(gt[1:3], pred[1:3]))
    assert mp["volume"]["psnr"] - sub == pytest.approx(20 * np.log10(gt.max() / gt[1:3].max()))
    assert mp["volume"]["psnr"] - sub > 15


def test_view_names_scan_slices_and_reads_only_those(tmp_path, monkeypatch):
    from diffrecon import figures
    from diffrecon.datasets import io

    rng = np.random.default_rng(1)
    rec = rng.uniform(0, 1, (3, 16, 16))
    res = tmp_path / "r.h5"
    write_result(res, rec, np.full_like(rec, 0.1), attrs={"slices": [4, 6, 9]},
                 intervals={0.9: (rec - 0.2, rec + 0.2)})
    assert figures.result_positions(res, [9, 4]) == ([0, 2], [4, 9])
    assert figures.result_positions(res, None) == ([1], [6])
    with pytest.raises(ValueError, match="scan slice 5 is not in this result, which holds "
                                         "scan slices 4, 6, 9"):
        figures.result_positions(res, [5])
    reads = []
    real = io.read_result
    monkeypatch.setattr(io, "read_result", lambda p, index=None, samples=True: reads.append(
        (index, samples)) or real(p, index, samples))
    ok("view", res, "-o", tmp_path / "f.png", "--slice", 6)
    assert reads == [([1], False)]
    refused(cli("view", res, "-o", tmp_path / "g.png", "--slice", 0), "scan slice 0",
            "4, 6, 9")
    part = io.read_result(res, [2])
    assert part.reconstruction.shape == (1, 16, 16) and list(part.intervals) == [0.9]
    np.testing.assert_array_equal(part.intervals[0.9][1], (rec[2:] + 0.2).astype(np.float32))


def test_random_masks_of_one_nominal_acceleration_are_one_task(tmp_path, monkeypatch):
    """fastMRI-style files each draw their own random mask: the task is the files' nominal
    acceleration (their 'acceleration' attribute), not each mask's sampled fraction, so
    scans with different masks calibrate together and a new scan runs with the file; the
    evaluated coverage counts the calibration's foreground pixels, and view's the same."""
    import h5py

    cal, res = tmp_path / "cal", tmp_path / "res"
    cal.mkdir()
    res.mkdir()
    realised = set()
    for seed in range(3):
        simulate_mri(cal / f"s{seed}.h5", size=24, slices=2, coils=2, acceleration=4,
                     seed=seed, noise=0.01, with_coil_maps=True)
        with h5py.File(cal / f"s{seed}.h5") as f:
            realised.add(round(f["mask"].size / f["mask"][()].sum(), 4))
    assert len(realised) > 1  # the masks differ (24 lines: 3.43x, 4.0x, ...)
    ok("run", cal, "-o", res, "--solver", "zero-filled", "--quiet")
    out = tmp_path / "c.json"
    ok("calibrate", cal, res, "-o", out, "--levels", "0.8", "--foreground", "0.05")
    calib = C.Calibration.load(out)
    assert calib.task["acceleration"] == 4.0 and calib.n_units == 6
    test = tmp_path / "t.h5"
    simulate_mri(test, size=24, slices=2, coils=2, acceleration=4, seed=7, noise=0.01,
                 with_coil_maps=True)
    recon = tmp_path / "t_recon.h5"
    ok("run", test, "-o", recon, "--solver", "zero-filled", "--quiet", "--calibration", out)
    r = read_result(recon)
    assert r.attrs["calibration_foreground"] == 0.05 and list(r.intervals) == [0.8]
    m = evaluate_file(recon, test)["coverage"]["0.8"]
    ref = load_reference(test)[0]
    lo, hi = r.intervals[0.8]
    want = coverage_report(ref, lo, hi, mask=C.foreground(ref, 0.05))
    assert m["foreground"] == 0.05
    assert m["coverage_per_slice"] == want["coverage_per_slice"]
    assert m["coverage"] != coverage_report(ref, lo, hi)["coverage"]
    import matplotlib.axes

    titles = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, text, **kw: titles.append(text))
    ok("view", recon, "-o", tmp_path / "v.png", "--reference", test)  # middle slice: 1
    note = f"covers {100 * want['coverage_per_slice'][1]:.1f}% of the reference > 0.05 max"
    assert any(note in t for t in titles), titles
