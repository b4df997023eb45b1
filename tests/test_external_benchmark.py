"""Smoke and consistency tests of the held-out benchmark (benchmarks/external.py and its
independent simulators benchmarks/_external_sim.py): the simulators' forward models equal
diffrecon's operators at float precision, the masks equal fastMRI's mask functions, the
oracle sweep finds the optimum, and a --quick run goes through the CLI end to end, scores,
caches and draws."""

from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest

from benchmarks import _external_sim as sim
from benchmarks import external


def tiny(name: str, size: int, **params) -> external.Task:
    t = external.quick_task(external.TASKS[name])
    g = external.Group("g", t.groups[0].images, size)
    return external.Task(t.name, t.modality, t.label, {**t.params, **params}, (g,))


@pytest.mark.parametrize("name,size,params", [
    ("mri-4x-rand-8c", 48, {}),
    ("mri-8x-equi-8c", 64, {"coils": 3, "oversample": 2}),   # readout oversampling
    ("ct-30", 48, {}),                                       # padded to 50 (odd detectors)
    ("ct-90deg", 64, {}),
    ("deblur-gauss2", 40, {}),
    ("sr-4x", 40, {}),
])
def test_independent_simulation_equals_diffrecon_operators(name, size, params):
    assert external.forward_error(tiny(name, size, **params), tiny(name, size).groups[0]) < 1e-6


def test_ct_size_gives_odd_detector_counts():
    assert [sim.ct_size(n) for n in (48, 64, 128, 129, 256)] == [50, 64, 129, 129, 256]
    assert all(math.ceil(math.sqrt(2) * sim.ct_size(n)) % 2 == 1 for n in range(16, 300))


class _Rng:
    """Stands in for a numpy generator: returns the given draws."""

    def __init__(self, uniform=None, offset=None):
        self.u, self.o = uniform, offset

    def uniform(self, size):
        return self.u[:size]

    def integers(self, low, high):
        assert 0 <= self.o < high
        return self.o

    def randint(self, n):  # fastMRI's choice among its (single) acceleration setting
        return 0


@pytest.mark.parametrize("cols,acc,cf", [(256, 4, 0.08), (320, 8, 0.04), (368, 4, 0.08)])
def test_masks_equal_fastmri_mask_functions(cols, acc, cf):
    sub = pytest.importorskip("fastmri.data.subsample")
    u = np.random.default_rng(cols).uniform(size=cols)
    ref = sub.RandomMaskFunc([cf], [acc])
    ref.rng = _Rng(uniform=u)
    want = ref((1, cols, 1))[0].numpy().reshape(-1).astype(bool)
    assert np.array_equal(sim.fastmri_mask(cols, acc, cf, "random", _Rng(uniform=u)), want)
    for offset in range(3):
        want = sub.EquispacedMaskFractionFunc([cf], [acc])((1, cols, 1), offset=offset)[0]
        mine = sim.fastmri_mask(cols, acc, cf, "equispaced", _Rng(offset=offset))
        assert np.array_equal(mine, want.numpy().reshape(-1).astype(bool))
        assert abs(cols / mine.sum() - acc) < 0.25


def test_log_sweep_finds_the_optimum_and_extends_past_edges():
    calls = []

    def f(v):
        calls.append(v)
        return -(math.log10(v) + 4.5) ** 2          # optimum at 10^-4.5, outside the grid

    best, scores = external.log_sweep(f, 1e-2, math.sqrt(10))
    assert best == pytest.approx(10 ** -4.5, rel=1e-2) and len(calls) == len(set(calls))
    assert min(scores) < best < max(scores)          # bracketed after extending
    best, _ = external.log_sweep(lambda v: -abs(v - 40), 30, 2.0, integer=True)
    assert best == 30                                # grid 8, 15, 30, 60, 120
    best, _ = external.log_sweep(lambda v: -v, 4, 2.0, integer=True)
    assert best == 1                                 # stops at the smallest integer


def test_quick_run_through_the_cli_scores_caches_and_draws(tmp_path, monkeypatch):
    argv = ["--quick", "--tasks", "ct-30,mri-4x-rand-8c", "--rows", "fbp,skimage-fbp,"
            "zero-filled", "--out", str(tmp_path)]
    text = external.main(argv)
    got = {(task, r[2]): r for task, r in _with_task(_table(text, "| task | held-out"))}
    psnr = {k: float(r[3]) for k, r in got.items()}
    assert set(psnr) == {("ct-30", "fbp"), ("ct-30", "skimage-fbp"),
                         ("mri-4x-rand-8c", "zero-filled")}
    assert 18 < psnr["ct-30", "fbp"] < 40 and 18 < psnr["ct-30", "skimage-fbp"] < 40
    assert 15 < psnr["mri-4x-rand-8c", "zero-filled"] < 40
    assert all(0 < float(r[4]) <= 1 and float(r[5]) >= 0 for r in got.values())
    summary = {r[0]: r for r in _table(text, "| task | default run")}
    assert set(summary) == {"ct-30", "mri-4x-rand-8c"}
    best = max(("fbp", "skimage-fbp"), key=lambda k: psnr["ct-30", k])
    assert summary["ct-30"][3] == f"{best} {psnr['ct-30', best]:.2f}"
    assert summary["ct-30"][1] == summary["ct-30"][2] == "-"     # no default / diffusion row
    fbp = float(text.split("FBP consistency: PSNR(")[1].split("= ")[1].split(" dB")[0])
    assert fbp > 30                                  # same geometry as skimage
    assert (tmp_path / "scans" / "mri-4x-rand-8c" / "quick48.h5").exists()
    assert (tmp_path / "ct-30.png").stat().st_size > 5000
    # no truth, no coil maps in the scans
    import h5py

    with h5py.File(tmp_path / "scans" / "mri-4x-rand-8c" / "quick48.h5") as f:
        assert set(f) == {"kspace", "mask", "ismrmrd_header"}
    # a rerun is served from the cache: no subprocess at all, same table
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    assert _body(external.main(argv)) == _body(text)


def _no_subprocess(*a, **k):
    raise AssertionError(f"cached rerun started a subprocess: {a}")


def _table(text: str, head: str) -> list[list[str]]:
    """Body rows (cells) of the markdown table starting at the line ``head``."""
    lines = text[text.index(head):].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _with_task(rows):
    task = None
    for r in rows:
        task = r[0] or task
        yield task, r


def _body(text: str) -> str:
    return text[text.index("| task | held-out"):]
