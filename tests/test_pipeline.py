"""The reconstruction pipeline: normalisation, MRI masks and coil maps, provenance,
batch/slice invariance, resumability and the out-of-memory retry."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from _shared import IsoGaussian

from diffrecon import pipeline
from diffrecon.datasets.fastmri import mask_seed_from_filename, read_mri_scan
from diffrecon.datasets.io import read_result, sha256_file
from diffrecon.datasets.simulate import simulate_ct, simulate_mri
from diffrecon.errors import InputError
from diffrecon.metrics import evaluate_file
from diffrecon.operators.masks import fastmri_mask
from diffrecon.pipeline.run import smaller_batches
from diffrecon.problems import format_slices, parse_slices
from diffrecon.problems.calib import calibrate_file
from diffrecon.problems.info import describe_file
from diffrecon.problems.mri import acs_width


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    d = tmp_path_factory.mktemp("scans")
    return {
        "mri": simulate_mri(d / "mri.h5", size=32, slices=3, coils=4, acceleration=4,
                            center_fraction=0.16, noise=0.002, seed=1),
        "full": simulate_mri(d / "full.h5", size=32, slices=1, coils=4, fully_sampled=True,
                             seed=2),
        "ct": simulate_ct(d / "ct.h5", size=32, slices=2, views=30, seed=3),
    }


def test_parse_slices():
    assert parse_slices("0,2,5-7") == [0, 2, 5, 6, 7]
    assert parse_slices(None) is None
    with pytest.raises(InputError, match="--slices"):
        parse_slices("x")


def test_mri_dds_result_layout_and_provenance(tmp_path, scans):
    out = tmp_path / "r.h5"
    s = pipeline.reconstruct_file(scans["mri"], out, solver="dds", prior=IsoGaussian(),
                                  steps=8, samples=2, seed=5, device="cpu", save_samples=True)
    assert s["status"] == "done" and s["nfe"] == 8
    res = read_result(out)
    assert res.reconstruction.shape == (3, 32, 32) and res.reconstruction.dtype == np.float32
    assert res.samples.shape == (3, 2, 32, 32)
    np.testing.assert_allclose(res.reconstruction, np.abs(res.complex), rtol=1e-5, atol=1e-12)
    a = res.attrs
    assert a["solver"] == "dds" and a["prior"] == "iso-gaussian" and a["seed"] == 5
    assert a["prior_sha256"] == IsoGaussian().checksum and len(a["prior_sha256"]) == 64
    assert a["input_sha256"] == sha256_file(scans["mri"])
    acs = acs_width(read_mri_scan(scans["mri"]).mask)
    assert a["coil_maps_source"] == "espirit" and a["espirit"]["calib_width"] == min(24, acs)
    assert a["torch_version"] == str(torch.__version__) and a["solver_options"]["steps"] == 8
    assert list(a["slices"]) == [0, 1, 2] and a["nfe"] == 8 and a["wall_time_s"] > 0
    # ||A mean - y|| / ||y|| per slice, in (0, 1) for a data-consistent mean of noisy data
    assert a["data_residual_per_slice"].shape == (3,)
    assert ((a["data_residual_per_slice"] > 0) & (a["data_residual_per_slice"] < 0.2)).all()
    # std is the pointwise spread of the two draws (complex std), positive inside the object
    assert (res.std > 0).mean() > 0.5
    # reconstruction is on the scale of reconstruction_rss (not of the prior)
    with h5py.File(scans["mri"]) as f:
        rss = f["reconstruction_rss"][()]
    ratio = np.median(res.reconstruction[rss > 0.3 * rss.max()] / rss[rss > 0.3 * rss.max()])
    assert 0.7 < ratio < 1.3
    # averaging posterior draws reduces the error: the mean beats every single draw
    m = evaluate_file(out, scans["mri"])
    draws = [evaluate_file(type(res)(res.samples[:, i], res.std, path=out, attrs=res.attrs),
                           scans["mri"])["psnr"] for i in range(2)]
    assert m["psnr"] > max(draws) + 0.5, (m["psnr"], draws)


def test_smc_lineages_recorded_and_degenerate_clouds_warned(tmp_path, scans):
    out = tmp_path / "smc.h5"
    s = pipeline.reconstruct_file(scans["mri"], out, solver="smc", prior=IsoGaussian(),
                                  steps=8, samples=2, seed=0, device="cpu",
                                  solver_options={"num_particles": 8})
    lineages = list(read_result(out).attrs["smc_lineages_per_slice"])
    assert len(lineages) == 3 and all(1 <= c <= 8 for c in lineages)
    weak = [k for k, c in enumerate(lineages) if c < pipeline.degenerate_below(8)]
    # 8 particles against ~1000 k-space samples: the cloud collapses to one lineage
    assert weak, lineages
    smc = [w for w in s["warnings"] if "weight degeneracy" in w]  # (+ the prior-fit warning)
    assert len(smc) == 1 and f"SMC slices {format_slices(weak)}:" in smc[0]
    assert format_slices([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and format_slices([]) == "none"
    dds = pipeline.reconstruct_file(scans["mri"], tmp_path / "dds.h5", solver="dds",
                                    prior=IsoGaussian(), steps=3, device="cpu")
    assert dds["warnings"] == [] and "smc_lineages_per_slice" not in read_result(
        tmp_path / "dds.h5").attrs


def test_slices_independent_of_selection(tmp_path, scans):
    kw = dict(solver="dds", prior=IsoGaussian(channels=1), steps=5, seed=1, device="cpu")
    pipeline.reconstruct_file(scans["ct"], tmp_path / "all.h5", **kw)
    pipeline.reconstruct_file(scans["ct"], tmp_path / "one.h5", slices="1", **kw)
    full, one = read_result(tmp_path / "all.h5"), read_result(tmp_path / "one.h5")
    np.testing.assert_array_equal(full.reconstruction[1], one.reconstruction[0])
    assert list(one.attrs["slices"]) == [1]
    pipeline.reconstruct_file(scans["ct"], tmp_path / "bs.h5", batch_size=1, **kw)
    np.testing.assert_array_equal(read_result(tmp_path / "bs.h5").reconstruction,
                                  full.reconstruction)


def test_retrospective_mask_seeded_from_file_name(tmp_path, scans):
    with pytest.raises(InputError, match="--acceleration"):
        pipeline.reconstruct_file(scans["full"], tmp_path / "x.h5", solver="dds",
                                  prior=IsoGaussian(), steps=2)
    assert not (tmp_path / "x.h5").exists()
    out = tmp_path / "r.h5"
    pipeline.reconstruct_file(scans["full"], out, solver="dds", prior=IsoGaussian(), steps=3,
                              acceleration=4, center_fraction=0.25, mask_type="equispaced")
    a = read_result(out).attrs
    ks = read_mri_scan(scans["full"]).kspace
    expect = fastmri_mask(ks.shape, [0.25], [4], kind="equispaced",
                          seed=mask_seed_from_filename(scans["full"]))
    np.testing.assert_array_equal(np.asarray(a["mask"], bool), expect)
    assert a["acceleration"] == 4.0 and a["mask_type"] == "equispaced"
    with pytest.raises(InputError, match="already undersampled"):
        pipeline.reconstruct_file(scans["mri"], tmp_path / "y.h5", solver="dds",
                                  prior=IsoGaussian(), acceleration=4)


def test_resume_skip_conflict_overwrite_and_stale_tmp(tmp_path, scans):
    out = tmp_path / "r.h5"
    kw = dict(solver="dds", prior=IsoGaussian(channels=1), steps=3, device="cpu")
    stale = tmp_path / "r.h5.tmp-999999999"
    stale.write_bytes(b"partial garbage")
    assert pipeline.reconstruct_file(scans["ct"], out, **kw)["status"] == "done"
    assert not stale.exists()
    before = out.read_bytes()
    assert pipeline.reconstruct_file(scans["ct"], out, **kw)["status"] == "skipped"
    assert pipeline.reconstruct_file(scans["ct"], out, batch_size=1, **kw)["status"] == "skipped"
    with pytest.raises(InputError, match="--overwrite"):
        pipeline.reconstruct_file(scans["ct"], out, seed=9, **kw)
    assert out.read_bytes() == before
    s = pipeline.reconstruct_file(scans["ct"], out, seed=9, overwrite=True, **kw)
    assert s["status"] == "done" and read_result(out).attrs["seed"] == 9
    # a non-result file at the output path is never silently replaced
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="not a diffrecon result"):
        pipeline.reconstruct_file(scans["ct"], junk, **kw)


def test_reconstruct_many_directory_and_failure_isolation(tmp_path, scans):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a.h5", "b.h5"):
        (d / name).write_bytes(open(scans["ct"], "rb").read())
    (d / "c.h5").write_bytes(b"garbage")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"c\.h5.*1 of 3 inputs failed"):
        pipeline.reconstruct_many([d], out, solver="dds", prior=IsoGaussian(channels=1),
                                  steps=2)
    assert sorted(p.name for p in out.iterdir()) == ["a_recon.h5", "b_recon.h5"]
    (d / "c.h5").unlink()
    res = pipeline.reconstruct_many([d], out, solver="dds", prior=IsoGaussian(channels=1),
                                    steps=2)
    assert [r["status"] for r in res] == ["skipped", "skipped"]


def test_oom_halves_batch_and_tells(monkeypatch, tmp_path, scans):
    from diffrecon.recon.dds import DDSSolver

    real_solve, tried = DDSSolver.solve, []

    def solve(self, *args, **kw):  # out of memory above 2 rows per pass
        tried.append(self.options.batch_size)
        if self.options.batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_solve(self, *args, **kw)

    monkeypatch.setattr(DDSSolver, "solve", solve)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    events = []
    out = tmp_path / "r.h5"
    pipeline.reconstruct_file(scans["ct"], out, solver="dds", prior=IsoGaussian(channels=1),
                              steps=2, solver_options={"batch_size": 8}, slices=[0],
                              progress=events.append)
    assert tried == [8, 4, 2]
    assert [e["text"] for e in events if e["event"] == "message"] == [
        "ct.h5: CUDA out of memory; retrying with --option batch_size=4 (samples per pass)",
        "ct.h5: CUDA out of memory; retrying with --option batch_size=2 (samples per pass)"]
    assert read_result(out).attrs["solver_options"]["batch_size"] == 2  # what ran
    with pytest.raises(RuntimeError, match="even with one slice and one sample"):
        smaller_batches(DDSSolver(batch_size=1), "f.h5", None)


def test_describe_and_calibrate(tmp_path, scans):
    d = describe_file(scans["mri"])
    assert d["modality"] == "mri" and d["coils"] == 4 and d["slices"] == 3
    assert d["acceleration"] == pytest.approx(32 / read_mri_scan(scans["mri"]).mask.sum())
    assert d["noise_sigma"] == pytest.approx(0.002 * 1e-4)
    json.dumps(d)
    side = tmp_path / "maps.h5"
    s = calibrate_file(scans["mri"], side)
    assert s["shape"] == [3, 4, 32, 32]
    scan_copy = tmp_path / "scan.h5"
    scan_copy.write_bytes(open(scans["mri"], "rb").read())
    calibrate_file(scan_copy)
    with h5py.File(scan_copy) as f, h5py.File(side) as g:
        np.testing.assert_array_equal(f["coil_maps"][()], g["coil_maps"][()])
        assert "kspace" in f and "reconstruction_rss" in f
    with pytest.raises(InputError, match="already holds"):
        calibrate_file(scan_copy)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_acs_width_1d_and_2d_masks():
    from diffrecon.operators import poisson_mask

    cols = np.zeros(32, bool)
    cols[13:19] = True
    cols[::4] = True
    assert acs_width(cols) == 7  # 12..19 contiguous (12 sampled by ::4)
    assert acs_width(np.broadcast_to(cols, (32, 32))) == 7
    square = np.zeros((32, 32), bool)
    square[11:21, 11:21] = True
    square[0, ::3] = True
    assert acs_width(square) == 10
    pm = poisson_mask((64, 64), 6, calib=(12, 12), seed=0)
    assert acs_width(pm) >= 12


def test_volume_solver_refused_by_run_before_any_work(tmp_path, one_line_error):
    """dds3d couples the slices of one volume; run solves slices independently, so it
    refuses it up front (it crashed with an internal error inside the CT projector)."""
    from typer.testing import CliRunner

    from diffrecon.cli.main import app
    from diffrecon.datasets.simulate import simulate_ct

    scan = simulate_ct(tmp_path / "ct.h5", size=16, slices=2, seed=0)
    res = CliRunner().invoke(app, ["run", str(scan), "-o", str(tmp_path / "o.h5"),
                                   "--solver", "dds3d", "--steps", "2"])
    one_line_error(res, "--solver dds3d", "Python API")
    assert not (tmp_path / "o.h5").exists()
