"""Slices of one volume solved together (``run --batch-size N``, ``pipeline.reconstruct_file``,
``problems.Problem.stack``): the same results as slice by slice, per-slice coil maps and
noise levels, the out-of-memory fallback, and resuming a run killed inside a batch.

With an elementwise prior (no convolution) batching is exact: results are bit-identical for
every batch size, so the stacked operators, the per-row noise levels and the per-slice seeds
are exactly those of the single-slice solves. With a shipped network prior, batched
convolutions round differently, and results agree to float rounding: max |difference| /
image peak between --batch-size 1 and 3 was 3.3e-6 (MRI) and 6.0e-6 / 4.6e-6 (CT) after 4 /
100 DDS steps on these volumes (it does not grow with the steps); the assertions allow
1e-4. Reruns with the same batch size are bit-identical."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from _shared import IsoGaussian

from diffrecon import pipeline, priors
from diffrecon.datasets.io import read_result
from diffrecon.datasets.simulate import simulate_ct, simulate_mri
from diffrecon.errors import InputError
from diffrecon.problems import load_problem
from diffrecon.recon import get_solver
from diffrecon.recon.common import noise_sigma
from diffrecon.recon.dds import DDSSolver

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    d = tmp_path_factory.mktemp("volumes")
    mri = simulate_mri(d / "mri.h5", size=32, slices=3, coils=4, acceleration=4,
                       center_fraction=0.16, noise=0.002, seed=5)
    with h5py.File(mri, "a") as f:  # ESPIRiT per slice: every slice gets its own maps
        if "coil_maps" in f:
            del f["coil_maps"]
    return {"mri": mri, "ct": simulate_ct(d / "ct.h5", size=32, slices=2, views=30, seed=6)}


def _run(scan, out, **kw):
    pipeline.reconstruct_file(scan, out, device="cpu", seed=4, **kw)
    return read_result(out)


def test_stacked_operator_is_the_slices_operators(volumes):
    problem = load_problem(volumes["mri"], IsoGaussian(), device="cpu")
    maps = [p.coil_maps for p in problem.physics]
    assert not torch.equal(maps[0], maps[1])  # per-slice coil maps ...
    levels = [noise_sigma(p) for p in problem.physics]
    assert len(set(levels)) == 3  # ... and per-slice noise levels (prior units)
    assert problem.batches([0, 1, 2], 2) == [[0, 1], [2]]
    y, phys = problem.stack([0, 1, 2])
    assert noise_sigma(phys, rows=True) == tuple(levels)
    with pytest.raises(ValueError, match="per-measurement"):
        noise_sigma(phys)
    x = torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    for j in range(3):
        assert torch.equal(y[j:j + 1], problem.measurements[j])
        assert torch.equal(phys.A(x)[j:j + 1], problem.physics[j].A(x[j:j + 1]))
        assert torch.equal(phys.A_adjoint(y)[j:j + 1], problem.physics[j].A_adjoint(y[j:j + 1]))


@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_dds_on_stacked_slices_is_the_single_slice_solves(volumes, modality):
    prior = IsoGaussian(channels=2 if modality == "mri" else 1)
    problem = load_problem(volumes[modality], prior, device="cpu")
    n = len(problem.slices)
    solver = DDSSolver(steps=5)
    y, phys = problem.stack(list(range(n)))
    both = solver.solve(y, phys, prior, num_samples=2, seed=[(4, k) for k in range(n)])
    for j in range(n):
        one = solver.solve(problem.measurements[j], problem.physics[j], prior, num_samples=2,
                           seed=[(4, j)])
        assert torch.equal(both.samples[:, j], one.samples[:, 0])
        np.testing.assert_equal(both.info["noise_chi"][j], one.info["noise_chi"][0])  # NaN:
        np.testing.assert_equal(both.info["residual"][j], one.info["residual"][0])  # noiseless
    assert both.info["nfe"] == 5
    with pytest.raises(ValueError, match="per-measurement"):  # solvers without row_noise
        get_solver("reddiff", steps=2).solve(y, phys, prior)


@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_batch_sizes_bit_identical_with_elementwise_prior(tmp_path, volumes, modality):
    prior = IsoGaussian(channels=2 if modality == "mri" else 1)
    kw = dict(solver="dds", prior=prior, steps=6, samples=2)
    one = _run(volumes[modality], tmp_path / "b1.h5", batch_size=1, **kw)
    assert list(one.attrs["slice_batch_per_slice"]) == [1] * len(one.attrs["slices"])
    for size in (2, 3):
        res = _run(volumes[modality], tmp_path / f"b{size}.h5", batch_size=size, **kw)
        n = len(res.attrs["slices"])
        expect = [min(size, n)] * min(size, n) + [n - size] * max(0, n - size)
        assert list(res.attrs["slice_batch_per_slice"]) == expect
        np.testing.assert_array_equal(res.reconstruction, one.reconstruction)
        np.testing.assert_array_equal(res.std, one.std)
        np.testing.assert_array_equal(res.attrs["noise_chi_per_slice"],
                                      one.attrs["noise_chi_per_slice"])
        np.testing.assert_array_equal(res.attrs["data_residual_per_slice"],
                                      one.attrs["data_residual_per_slice"])
    # a sabotaged stack (slice 0's coil maps / noise level for every slice) is caught
    if modality == "mri":
        problem = load_problem(volumes["mri"], prior, device="cpu")
        y, phys = problem.stack([0, 1, 2])
        phys.coil_maps = phys.coil_maps[:1].expand_as(phys.coil_maps).clone()
        assert not torch.equal(phys.A_adjoint(y)[1:2],
                               problem.physics[1].A_adjoint(problem.measurements[1]))


@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_batch_sizes_agree_with_network_prior(tmp_path, volumes, modality):
    kw = dict(solver="dds", prior=priors.load(modality), steps=4)
    one = _run(volumes[modality], tmp_path / "b1.h5", batch_size=1, **kw)
    three = _run(volumes[modality], tmp_path / "b3.h5", batch_size=3, **kw)
    peak = np.abs(one.reconstruction).max()
    diff = np.abs(three.reconstruction - one.reconstruction).max() / peak
    assert diff <= 1e-4, diff
    again = _run(volumes[modality], tmp_path / "b3-again.h5", batch_size=3, **kw)
    np.testing.assert_array_equal(again.reconstruction, three.reconstruction)  # reruns: bits


def test_solvers_without_row_noise_solve_slice_by_slice(tmp_path, volumes):
    res = _run(volumes["ct"], tmp_path / "tv.h5", solver="tv", batch_size=3)
    assert list(res.attrs["slice_batch_per_slice"]) == [1, 1]
    res = _run(volumes["ct"], tmp_path / "rd.h5", solver="reddiff",
               prior=IsoGaussian(channels=1), steps=2, batch_size=3)
    assert list(res.attrs["slice_batch_per_slice"]) == [1, 1]


def test_oom_halves_the_slice_batch_first(monkeypatch, tmp_path, volumes):
    real_solve, tried = DDSSolver.solve, []

    def solve(self, y, *args, **kw):  # out of memory above 1 slice or 2 samples per pass
        tried.append((y.shape[0], self.options.batch_size))
        if y.shape[0] > 1 or self.options.batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_solve(self, y, *args, **kw)

    monkeypatch.setattr(DDSSolver, "solve", solve)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    events = []
    res = _run(volumes["mri"], tmp_path / "r.h5", solver="dds", prior=IsoGaussian(), steps=2,
               batch_size=4, samples=4, solver_options={"batch_size": 4},
               progress=events.append)
    assert tried[:4] == [(3, 4), (1, 4), (1, 2), (1, 2)]
    assert [e["text"] for e in events if "CUDA" in e.get("text", "")] == [
        "mri.h5: CUDA out of memory; retrying with --batch-size 1 (slices)",
        "mri.h5: CUDA out of memory; retrying with --option batch_size=2 (samples per pass)"]
    assert list(res.attrs["slice_batch_per_slice"]) == [1, 1, 1]
    assert res.attrs["solver_options"]["batch_size"] == 2  # what ran


def test_killed_batch_resumes(monkeypatch, tmp_path, volumes):
    kw = dict(solver="dds", prior=IsoGaussian(), steps=3, batch_size=2)
    clean = _run(volumes["mri"], tmp_path / "clean.h5", **kw)
    out = tmp_path / "r.h5"
    real_solve, calls = DDSSolver.solve, []

    def killed(self, y, *args, **kw):  # killed inside the second batch (slice 2)
        calls.append(y.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_solve(self, y, *args, **kw)

    monkeypatch.setattr(DDSSolver, "solve", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(volumes["mri"], out, **kw)
    assert calls == [2, 1] and not out.exists()
    assert not list(tmp_path.glob("r.h5.tmp-*"))
    monkeypatch.setattr(DDSSolver, "solve", real_solve)
    res = _run(volumes["mri"], out, **kw)
    np.testing.assert_array_equal(res.reconstruction, clean.reconstruction)
    # the batch size is not part of the fingerprint: a complete result is kept
    s = pipeline.reconstruct_file(volumes["mri"], out, device="cpu", seed=4,
                                  **{**kw, "batch_size": 3})
    assert s["status"] == "skipped"
    with pytest.raises(InputError, match="--batch-size"):
        pipeline.RunOptions(batch_size=0)


def test_cli_batch_size_means_slices(tmp_path, volumes):
    from typer.testing import CliRunner

    from diffrecon.cli.main import app

    outs = {}
    for size in (1, 3):
        outs[size] = tmp_path / f"cli{size}.h5"
        res = CliRunner().invoke(app, ["run", str(volumes["ct"]), "-o", str(outs[size]),
                                       "--steps", "3", "--batch-size", str(size), "--quiet"])
        assert res.exit_code == 0, res.output
    one, three = read_result(outs[1]), read_result(outs[3])
    assert list(three.attrs["slice_batch_per_slice"]) == [2, 2]
    assert three.attrs["solver"] == "dds" and three.attrs["solver_options"]["batch_size"] == 16
    peak = np.abs(one.reconstruction).max()
    assert np.abs(three.reconstruction - one.reconstruction).max() / peak <= 1e-4
