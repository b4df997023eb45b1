"""The MRI pipeline on fastMRI-style files (issue 16): readout-oversampled k-space solved on
the reconSpace grid, coil compression by default above 8 coils, ESPIRiT maps cached by
input checksum + slice + parameters, calib --slices (partial side files), the cheaper
model-mismatch floor, and errors that need no computation raised before any."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest
import torch

from diffrecon.errors import InputError
from diffrecon.problems import load_problem
from diffrecon.problems import mri as M
from diffrecon.problems import mri_coils as MC

N = 48  # reconSpace N x N; k-space readout 2N (2x oversampled), ky N


def _phantom(n: int) -> np.ndarray:
    """Smooth complex test object (ellipses with a phase ramp), zero near the edges."""
    y, x = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    img = 1.0 * ((x / 0.7) ** 2 + (y / 0.85) ** 2 < 1)
    img += 0.5 * (((x - 0.2) / 0.25) ** 2 + ((y + 0.1) / 0.35) ** 2 < 1)
    img -= 0.3 * (((x + 0.3) / 0.2) ** 2 + ((y - 0.3) / 0.15) ** 2 < 1)
    return img * np.exp(1j * (0.8 * x - 0.5 * y))


def write_oversampled(path, coils: int, slices: int = 2, *, mask="file", maps=False):
    """A fastMRI-layout multi-coil file written with numpy / sigpy only: k-space (slices,
    coils, 2N, N) of an N x N object in a 2N-row field of view (readout oversampled 2x),
    reconSpace N x N, reconstruction_rss the RSS of the centre N rows. ``mask``: 'file' (a
    4x equispaced mask with 8 centre lines stored), 'full' (all lines, stored) or None
    (fully sampled, no mask dataset). ``maps``: store the true coil maps."""
    import sigpy.mri

    s = sigpy.mri.birdcage_maps((coils, 2 * N, N), r=1.2, dtype=np.complex128)
    s /= np.sqrt(np.sum(np.abs(s) ** 2, 0))
    ks, rss = [], []
    for j in range(slices):
        obj = np.zeros((2 * N, N), complex)
        obj[N // 2:N // 2 + N] = _phantom(N) * (1 + 0.1 * j)
        coil = s * obj
        ks.append(np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil, axes=(-2, -1)),
                                              norm="ortho"), axes=(-2, -1)))
        rss.append(np.sqrt(np.sum(np.abs(coil[:, N // 2:N // 2 + N]) ** 2, 0)))
    k = np.stack(ks)
    xml = (f'<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
           f"<encoding><encodedSpace><matrixSize><x>{2 * N}</x><y>{N}</y><z>1</z>"
           f"</matrixSize></encodedSpace><reconSpace><matrixSize><x>{N}</x><y>{N}</y>"
           f"<z>1</z></matrixSize></reconSpace><encodingLimits><kspace_encoding_step_1>"
           f"<minimum>0</minimum><maximum>{N - 1}</maximum><center>{N // 2}</center>"
           f"</kspace_encoding_step_1></encodingLimits></encoding></ismrmrdHeader>")
    with h5py.File(path, "w") as f:
        if mask is not None:
            m = np.ones(N, bool)
            if mask == "file":
                m = np.zeros(N, bool)
                m[::4] = True
                m[N // 2 - 4:N // 2 + 4] = True
            f["mask"] = m
            k = k * m
        f["kspace"] = k.astype(np.complex64)
        f["ismrmrd_header"] = xml.encode()
        f["reconstruction_rss"] = np.stack(rss).astype(np.float32)
        if maps:
            f["coil_maps"] = np.broadcast_to(s, k.shape).astype(np.complex64)
    return path


def _ls_magnitude(problem, j: int = 0, iters: int = 200) -> np.ndarray:
    """|least-squares image| of slice j in scan units, cropped as the result is."""
    from diffrecon.recon.common import cg

    phys, y = problem.physics[j], problem.measurements[j]
    x = cg(lambda v: phys.A_adjoint(phys.A(v)), phys.A_adjoint(y), iters=iters)
    x = problem.normalisers[j].from_prior(x[0].double()).numpy()
    return problem.scan_image(x)[0]


def test_oversampled_readout_solved_on_recon_grid_exactly(tmp_path):
    """Noiseless, fully sampled, true maps: the compressed, readout-cropped SENSE problem
    is N x N and its least-squares magnitude IS reconstruction_rss (to 1e-4)."""
    path = write_oversampled(tmp_path / "full.h5", coils=12, mask="full", maps=True)
    problem = load_problem(path, None, [1])
    y = problem.measurements[0]
    assert tuple(y.shape) == (1, 2, 8, N, N)  # 12 coils -> 8 virtual, 2N readout -> N
    assert problem.crop is None
    assert problem.meta["readout"] == f"cropped {2 * N} -> {N} (reconSpace)"
    cc = problem.meta["coil_compression"]
    assert cc["physical_coils"] == 12 and cc["virtual_coils"] == 8
    ref = h5py.File(path)["reconstruction_rss"][1]
    err = np.linalg.norm(_ls_magnitude(problem) - ref) / np.linalg.norm(ref)
    assert err < 1e-4, err
    off = load_problem(path, None, [1], coil_compression="off")
    assert off.measurements[0].shape[2] == 12
    err_off = np.linalg.norm(_ls_magnitude(off) - ref) / np.linalg.norm(ref)
    assert err_off < 1e-4, err_off


@pytest.mark.parametrize(("coils", "spec", "expected"), [
    (8, "auto", 8), (12, "auto", 8), (12, "off", 12), (12, 4, 4), (12, "5", 5), (12, 12, 12)])
def test_coil_compression_policy(tmp_path, coils, spec, expected):
    path = write_oversampled(tmp_path / f"c{coils}.h5", coils=coils, slices=1, maps=True)
    problem = load_problem(path, None, coil_compression=spec)
    assert problem.measurements[0].shape[2] == expected
    method = problem.meta["coil_compression"]["method"]
    assert (method == "none") == (expected == coils)


@pytest.mark.parametrize("spec", ["13", "-1", "two", 2.5])
def test_coil_compression_bad_values_name_the_flag(tmp_path, spec):
    path = write_oversampled(tmp_path / "c.h5", coils=12, slices=1, maps=True)
    with pytest.raises(InputError, match="--coil-compression"):
        load_problem(path, None, coil_compression=spec)


def test_espirit_cached_per_slice_and_reused(tmp_path, monkeypatch):
    """ESPIRiT on the compressed coils of the reconstruction grid, cached per slice: a
    later run reuses the slices it has (bit-identical maps, no ESPIRiT call), computes only
    the others; other parameters (compression) or another input are other keys."""
    path = write_oversampled(tmp_path / "scan.h5", coils=12, slices=3)
    cache = tmp_path / "cache"
    first = load_problem(path, None, [1], maps_cache=cache)
    assert first.meta["coil_maps_source"] == "espirit"
    assert first.meta["espirit"]["calib_width"] == 9  # centre lines 20-27 and 28 (::4)
    assert first.meta["espirit_cache"] == "0 of 1 slices reused"
    assert len(list(cache.glob("espirit-*.h5"))) == 1
    calls = []
    real = MC.espirit_slice
    monkeypatch.setattr(MC, "espirit_slice", lambda *a: calls.append(1) or real(*a))
    again = load_problem(path, None, [0, 1], maps_cache=cache)
    assert again.meta["espirit_cache"] == "1 of 2 slices reused" and len(calls) == 1
    maps_first = first.physics[0].coil_maps if hasattr(first.physics[0], "coil_maps") else None
    if maps_first is not None:
        assert torch.equal(maps_first, again.physics[1].coil_maps)
    assert torch.equal(first.measurements[0], again.measurements[1])
    np.testing.assert_array_equal(_ls_magnitude(first, 0, 30), _ls_magnitude(again, 1, 30))
    calls.clear()
    load_problem(path, None, [0, 1], maps_cache=cache)
    assert calls == []
    load_problem(path, None, [0], maps_cache=cache, coil_compression=6)
    assert len(calls) == 1
    # a cache file whose stored key differs is not trusted
    for f in cache.glob("espirit-*.h5"):
        with h5py.File(f, "r+") as h:
            h.attrs["key"] = "something else"
    calls.clear()
    load_problem(path, None, [0, 1], maps_cache=cache)
    assert len(calls) == 2


def test_espirit_maps_reconstruct_like_true_maps(tmp_path):
    """ESPIRiT (coarse grid, compressed coils) on the 4x file: least-squares SENSE within
    a few percent of reconstruction_rss inside the object."""
    path = write_oversampled(tmp_path / "scan.h5", coils=12, slices=1)
    problem = load_problem(path, None)
    ref = h5py.File(path)["reconstruction_rss"][0]
    support = ref > 0.2 * ref.max()
    mag = _ls_magnitude(problem, 0, 50)
    err = np.linalg.norm((mag - ref)[support]) / np.linalg.norm(ref[support])
    assert err < 0.05, err


def test_calib_slices_partial_side_file(tmp_path):
    from diffrecon.problems.calib import calibrate_file

    path = write_oversampled(tmp_path / "scan.h5", coils=6, slices=4)
    side = tmp_path / "maps.h5"
    s = calibrate_file(path, side, slices="3,1")
    assert s["slices"] == [1, 3] and s["shape"] == [2, 6, 2 * N, N]
    with h5py.File(side) as f:
        assert f["slices"][()].tolist() == [1, 3]
        stored = f["coil_maps"][()]
    got = M.read_coil_maps(side, (6, 2 * N, N), [3, 1])
    np.testing.assert_array_equal(got, stored[::-1])
    problem = load_problem(path, None, [3], coil_maps=side)
    assert problem.meta["coil_maps_source"] == "side file maps.h5"
    with pytest.raises(InputError, match=r"lacks scan slice\(s\) 0, 2"):
        load_problem(path, None, [0, 1, 2], coil_maps=side)
    with pytest.raises(InputError, match="--slices needs -o"):
        calibrate_file(path, None, slices=[0])


def test_model_mismatch_floor_matches_long_float64_fit(tmp_path):
    """The 20-iteration float32 floor is within 5% of (and not below) the 50-iteration
    float64 least-squares residual it replaces."""
    from diffrecon.recon.common import cg, physics_in_dtype

    path = write_oversampled(tmp_path / "scan.h5", coils=12, slices=1)
    problem = load_problem(path, None)
    phys, y = problem.physics[0], problem.measurements[0]
    p64, y64 = physics_in_dtype(phys, torch.float64), y.double()
    x = cg(lambda v: p64.A_adjoint(p64.A(v)), p64.A_adjoint(y64), iters=50)
    ref = float(((p64.A(x) - y64).pow(2).sum() / (y64 != 0).sum()).sqrt())
    got = M.model_mismatch_sigma(phys, y)
    assert ref > 0 and ref * (1 - 1e-3) <= got <= 1.05 * ref, (got, ref)


def test_errors_needing_no_computation_come_first(tmp_path, monkeypatch):
    """A fully sampled file without --acceleration (and other option misfits) fails in the
    plan: before the prior is loaded or any k-space is read."""
    from diffrecon.datasets import fastmri as F
    from diffrecon.pipeline import reconstruct_file
    from diffrecon.pipeline import run as R

    full = write_oversampled(tmp_path / "full.h5", coils=12, slices=1, mask=None)
    under = write_oversampled(tmp_path / "under.h5", coils=12, slices=1)

    def forbidden(*a, **k):
        raise AssertionError("expensive work before the option check")

    monkeypatch.setattr(F, "read_mri_scan", forbidden)
    monkeypatch.setattr(R, "load_prior", forbidden)
    cases = [(full, {}, "pass --acceleration"),
             (under, {"acceleration": 4}, "already undersampled"),
             (full, {"acceleration": 4, "mask_type": "bogus"}, "--mask-type"),
             (under, {"coil_compression": 20}, "--coil-compression"),
             (under, {"coil_maps": str(full)}, "no dataset 'coil_maps'")]
    for scan, extra, message in cases:
        t0 = time.perf_counter()
        with pytest.raises(InputError, match=message):
            reconstruct_file(scan, tmp_path / "out.h5", solver="dds", **extra)
        assert time.perf_counter() - t0 < 5


def test_result_records_crop_compression_and_cache(tmp_path):
    """A default run on the oversampled file: result (slices, N, N) on the rss scale, with
    the readout crop, the compression and the ESPIRiT cache in its provenance; a rerun
    into another file next to it reuses the cached maps."""
    from diffrecon.pipeline import reconstruct_file

    path = write_oversampled(tmp_path / "scan.h5", coils=12, slices=1)
    out = tmp_path / "res" / "a.h5"
    out.parent.mkdir()
    reconstruct_file(path, out, solver="cg-sense")
    with h5py.File(out) as f:
        rec, attrs = f["reconstruction"][()], dict(f.attrs)
        ref = h5py.File(path)["reconstruction_rss"][()]
    assert rec.shape == (1, N, N)
    support = ref > 0.2 * ref.max()
    assert np.linalg.norm((rec - ref)[support]) / np.linalg.norm(ref[support]) < 0.1
    assert "cropped 96 -> 48" in str(attrs["readout"])
    assert '"virtual_coils": 8' in str(attrs["coil_compression"]) or \
        "virtual_coils" in str(attrs["coil_compression"])
    assert "0 of 1" in str(attrs["espirit_cache"])
    reconstruct_file(path, out.with_name("b.h5"), solver="zero-filled")
    with h5py.File(out.with_name("b.h5")) as f:
        assert "1 of 1" in str(f.attrs["espirit_cache"])


def test_cli_calib_slices_and_run_flags(tmp_path):
    """`diffrecon calib --slices -o` then `run --coil-maps --slices --coil-compression`; a
    bad --coil-compression is one line, exit code 2."""
    from typer.testing import CliRunner

    from diffrecon.cli.main import app

    scan = write_oversampled(tmp_path / "scan.h5", coils=10, slices=3)
    side = tmp_path / "maps.h5"
    r = CliRunner().invoke(app, ["calib", str(scan), "-o", str(side), "--slices", "2"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "res.h5"
    r = CliRunner().invoke(app, ["run", str(scan), "-o", str(out), "--solver", "zero-filled",
                                 "--slices", "2", "--coil-maps", str(side),
                                 "--coil-compression", "6", "-q"])
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        assert f["reconstruction"].shape == (1, N, N)
        assert '"virtual_coils": 6' in f.attrs["coil_compression"]
        assert f.attrs["coil_maps_source"] == "side file maps.h5"
    bad = CliRunner().invoke(app, ["run", str(scan), "-o", str(tmp_path / "b.h5"),
                                   "--coil-compression", "many"])
    assert bad.exit_code == 2 and "--coil-compression 'many'" in bad.output


@pytest.mark.parametrize("band, calib, kernel", [((62, 68), 5, 2), ((61, 67), 6, 2),
                                                 ((60, 68), 8, 3), ((54, 74), 20, 6)])
def test_espirit_kernel_follows_the_square_sigpy_calibrates_on(band, calib, kernel):
    """The kernel rule reads the centred fully sampled square sigpy will use, not the ACS
    band: 6 lines 62..67 leave a 5-wide centred square (start 64 - 3 = 61 is unsampled)."""
    mask = np.zeros(128, bool)
    mask[band[0]:band[1]] = True
    mask[::8] = True
    assert MC.calibration_params((8, 128, 128), mask, "x") == {"calib_width": calib,
                                                               "kernel_width": kernel}


def test_espirit_maps_cover_the_object_with_a_narrow_calibration_region():
    """8x-style scan at 128 px with 6 ACS lines (a 5-wide centred square): the maps cover the
    whole object and coil-combine the true coil images to within 2%. With the 3-wide kernel
    the old rule chose there, the eigenvalue crop removed up to 70% of the object."""
    import sigpy.mri

    n = 128
    obj = _phantom(n)
    maps = sigpy.mri.birdcage_maps((8, n, n), r=1.5, dtype=np.complex128)
    coil_images = maps * obj
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil_images, axes=(-2, -1)),
                                         norm="ortho"), axes=(-2, -1))
    mask = np.zeros(n, bool)
    mask[62:68] = True
    mask[::8] = True
    est, params = MC.estimate_maps((kspace * mask)[None].astype(np.complex64), mask, "x")
    assert (params["calib_width"], params["kernel_width"]) == (5, 2)
    inside = np.abs(obj) > 0.1
    covered = np.sum(np.abs(est[0]) ** 2, 0) > 0.5
    assert covered[inside].all()
    combined = np.sum(np.conj(est[0]) * coil_images, 0)
    err = np.linalg.norm(np.abs(combined)[inside] - np.abs(obj)[inside])
    assert err / np.linalg.norm(obj[inside]) < 0.02
