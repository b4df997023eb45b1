"""Issue 17: one SMC cloud's particles spread over processes (``recon.smc_spread``, ``diffrecon
run --spread particles`` under torchrun) give the bits of one process: mean, particles,
weights, samples, ESS, lineages and log Z, whatever the proposal.

The API runs are two forked children of this process joined by a gloo group through a
FileStore (no launcher, no fresh interpreter); the command-line run is torchrun with 2
ranks against the same run in this process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from diffrecon.operators import mri
from diffrecon.priors.base import Prior
from diffrecon.recon.smc import SMCSolver
from diffrecon.recon.smc_spread import ParticleGroup

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux",
                                 reason="forks processes (Linux)")]

FIELDS = ("mean", "std", "particles", "log_weights", "samples")
INFO = ("ess", "resampled", "final_ess", "log_normalizer", "eves", "lineages")


class ConvPrior(Prior):
    """A shrinkage denoiser plus a fixed random 3x3 convolution (a network's kind of
    arithmetic; at this size its bits do not depend on the batch, the real priors' may)."""

    def __init__(self):
        super().__init__()
        self.name, self.channels = "conv-test", 2
        self.data_range, self.sigma_min, self.sigma_max = (-1.0, 1.0), 0.01, 5.0
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape,
                                               generator=torch.Generator().manual_seed(0)) / 9)

    def _denoise(self, x, sigma):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        shrunk = x * 0.25 / (0.25 + s ** 2)
        return shrunk + 0.1 * self.conv(shrunk.float()).to(x.dtype) / (1 + s)


def _problem():
    """Two 16 x 16 two-coil 4x MRI measurements of a smooth image."""
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(2, 16, 16, dtype=torch.complex64, generator=g)
    maps = maps / maps.abs().square().sum(0).sqrt()
    mask = torch.zeros(16)
    mask[::4] = 1
    mask[6:10] = 1
    physics = mri(mask, maps, noise_sigma=0.05)
    x = torch.nn.functional.avg_pool2d(torch.randn(2, 2, 16, 16, generator=g), 3, 1, 1)
    return physics.A(x) + 0.05 * torch.randn(physics.A(x).shape, generator=g), physics


def _solve(options: dict, group: ParticleGroup | None):
    y, physics = _problem()
    solver = SMCSolver(**options)
    if group is not None:
        solver = solver.spread_over(group)
    rec = solver.solve(y, physics, ConvPrior(), num_samples=6, seed=5)
    return ({k: getattr(rec, k) for k in FIELDS}, {k: rec.info[k] for k in INFO},
            rec.info["nfe"])


def _child(rank: int, store: str, options: dict, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.FileStore(store, 2), rank=rank, world_size=2)
    try:
        torch.save(_solve(options, ParticleGroup.default()), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _two_ranks(tmp_path: Path, options: dict) -> list:
    """What each of two forked ranks returned."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    out = str(tmp_path / "rank")
    procs = [ctx.Process(target=_child, args=(r, str(tmp_path / "store"), options, out))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0, p.exitcode
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]


SPREAD_CASES = {
    "gaussian": dict(proposal="gaussian", cg_iters=6),
    "twisted": dict(proposal="twisted"),
    "bootstrap": dict(proposal="bootstrap"),
    "dds": dict(proposal="dds", steer_ess=0.5),  # in y's dtype (float32), gathers fit, log G
}


@pytest.mark.parametrize("proposal", sorted(SPREAD_CASES))
def test_two_processes_give_the_bits_of_one(tmp_path, proposal):
    """8 particles, 2 per chunk, 4 per rank, two measurements, 6 steps: the clouds resample
    (ESS falls below N/2), so weights, states and lineages cross the ranks."""
    options = dict(num_particles=8, chunk_size=2, steps=6, **SPREAD_CASES[proposal])
    one, info, nfe = _solve(options, None)
    assert sum(map(sum, info["resampled"])) >= 2, info["resampled"]
    for arrays, ranks_info, ranks_nfe in _two_ranks(tmp_path, options):
        for k in FIELDS:
            assert torch.equal(arrays[k], one[k]), k
        assert ranks_info == info
        assert ranks_nfe == nfe  # per particle, whatever the split
    # the check can fail: another seed's cloud differs
    other = SMCSolver(**options).solve(*_problem(), ConvPrior(), num_samples=6, seed=6)
    assert not torch.equal(other.mean, one["mean"])


def test_the_group_refuses_splits_that_would_change_the_bits():
    two = ParticleGroup(0, 2)
    SMCSolver(num_particles=8, chunk_size=2).spread_over(two)
    with pytest.raises(ValueError, match="num_particles=7 does not split over 2 processes"):
        SMCSolver(num_particles=7, chunk_size=1).spread_over(two)
    with pytest.raises(ValueError, match=r"chunk_size=256 does not divide the 4 particles .*"
                                         r"--option chunk_size=4"):
        SMCSolver(num_particles=8).spread_over(two)
    with pytest.raises(ValueError, match="use --option chunk_size=4 "):
        ParticleGroup(1, 3).check(24, 5)
    assert ParticleGroup(1, 3).rows(24) == slice(8, 16)
    assert SMCSolver(num_particles=8).spread_over(ParticleGroup()).group is None  # 1 process


# ------------------------------------------------------------------------ a rank dies

def _dying_child(rank: int, store: str, out: str) -> None:
    """Rank 1 exits at step 2 of its solve; rank 0 writes what stopped it."""
    from diffrecon.errors import RankLost
    from diffrecon.pipeline.peers import Peers
    from diffrecon.pipeline.spread import ParticleShard

    torch.set_num_threads(1)
    fs = torch.distributed.FileStore(store, 2)
    torch.distributed.init_process_group("gloo", store=fs, rank=rank, world_size=2)
    peers = Peers(rank, 2, 30.0, store=fs)
    solver = ParticleShard(rank, 2, peers).solver(SMCSolver(num_particles=8, chunk_size=2,
                                                            steps=50))

    def callback(fields):
        if rank == 1 and fields["i"] == 2:
            os._exit(3)

    try:
        solver.solve(*_problem(), ConvPrior(), seed=5, callback=callback)
        Path(out).write_text("finished")
    except RankLost as exc:
        Path(out).write_text(str(exc))
    os._exit(0)


def test_a_rank_that_dies_inside_the_solve_stops_the_other_with_one_line(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    out = tmp_path / "rank0.txt"
    procs = [ctx.Process(target=_dying_child, args=(r, str(tmp_path / "store"), str(out)))
             for r in range(2)]
    for p in procs:
        p.start()
    procs[0].join(120)
    assert procs[0].exitcode == 0, procs[0].exitcode
    text = out.read_text()
    assert f"rank 0: stopping because rank 1 (pid {procs[1].pid}) has died" in text, text
    procs[1].join(10)
    assert procs[1].exitcode == 3


# ------------------------------------------------------------------------ command line

RUN = ["--solver", "smc", "--prior", "phantom-mri", "--option", "num_particles=4",
       "--option", "chunk_size=2", "--steps", "4", "--device", "cpu"]


def _contents(path: Path) -> tuple[dict, dict]:
    """A result file's datasets (bytes) and attributes, less its timings."""
    data = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: data.__setitem__(name, obj[()].tobytes())
                     if isinstance(obj, h5py.Dataset) else None)
        attrs = {k: str(v) for k, v in f.attrs.items() if not k.endswith("time_s")}
    return data, attrs


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun test on Linux")
def test_torchrun_two_ranks_write_the_bits_of_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m diffrecon run SCAN --spread particles` (4 particles of
    the phantom-mri network prior, 2 per rank, 2 slices) writes the file one process writes:
    every dataset bit for bit and every attribute but the timings."""
    from diffrecon.datasets.simulate import simulate_mri
    from diffrecon.pipeline import reconstruct_many

    scan = tmp_path / "s.h5"
    simulate_mri(scan, size=32, slices=2, coils=2, acceleration=4, center_fraction=0.2,
                 noise=0.01, seed=0, with_coil_maps=True)
    reconstruct_many([scan], tmp_path / "one.h5", solver="smc", prior="phantom-mri",
                     solver_options={"num_particles": 4, "chunk_size": 2}, steps=4,
                     device="cpu", spread="particles")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "diffrecon", "run", str(scan), "-o",
                          str(tmp_path / "two.h5"), *RUN, "--spread", "particles", "--quiet"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = _contents(tmp_path / "one.h5"), _contents(tmp_path / "two.h5")
    assert {"reconstruction", "std", "reconstruction_complex"} <= set(one[0])
    assert one == two
    assert "spread" not in one[1]  # not part of the result: the bits are the same


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory) -> Path:
    from diffrecon.datasets.simulate import simulate_mri

    scan = tmp_path_factory.mktemp("scan") / "s.h5"
    simulate_mri(scan, size=16, slices=1, coils=2, acceleration=4, center_fraction=0.25,
                 seed=0, with_coil_maps=True)
    return scan


@pytest.mark.parametrize(("args", "needles"), [
    (["--solver", "dds"], ["--spread particles", "needs --solver smc, got --solver dds"]),
    ([], ["needs --solver smc, got --solver default"]),
    (["--solver", "smc", "--spread", "halves"], ["--spread 'halves' is not valid"]),
])
def test_spread_flag_refuses_what_it_cannot_do(tmp_path, small_scan, one_line_error,
                                               file_sha, args, needles):
    from typer.testing import CliRunner

    from diffrecon.cli.main import app

    scan = small_scan
    before = file_sha(scan)
    spread = [] if "--spread" in args else ["--spread", "particles"]
    res = CliRunner().invoke(app, ["run", str(scan), "-o", str(tmp_path / "o.h5"), *args,
                                   *spread])
    one_line_error(res, *needles)
    assert not (tmp_path / "o.h5").exists() and file_sha(scan) == before


@pytest.mark.parametrize(("options", "needle"), [
    (["num_particles=5", "chunk_size=1"], "num_particles=5 does not split over 2 processes"),
    (["num_particles=64"], "chunk_size=256 does not divide the 32 particles per process "
                           "(num_particles=64 over 2); use --option chunk_size=32"),
])
def test_particles_that_do_not_split_over_the_ranks_are_refused_before_any_work(
        tmp_path, small_scan, monkeypatch, one_line_error, file_sha, options, needle):
    """Under torchrun (WORLD_SIZE 2), before the process group starts or a file is read."""
    from typer.testing import CliRunner

    from diffrecon.cli.main import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    opts = [a for o in options for a in ("--option", o)]
    before = file_sha(small_scan)
    res = CliRunner().invoke(app, ["run", str(small_scan), "-o", str(tmp_path / "o.h5"),
                                   "--solver", "smc", *opts, "--spread", "particles"])
    one_line_error(res, "--spread particles: smc: option", needle)
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "o.h5").exists() and file_sha(small_scan) == before
