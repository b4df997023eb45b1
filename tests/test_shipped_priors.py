"""The shipped default priors: names, declared conventions, and their denoising quality on
held-out real anatomy (TEST split, never trained on), at the values of their model cards."""

from __future__ import annotations

import pytest

from diffrecon import priors
from diffrecon.pipeline import DEFAULT_PRIORS
from diffrecon.training.report import denoising_report


def test_defaults_are_shipped_and_aliases_share_weights():
    assert set(DEFAULT_PRIORS.values()) <= set(priors.available())
    gray = priors.load("gray")
    for alias in ("ct", "natural"):
        p = priors.load(alias)
        assert p.name == "gray" and p.checksum == gray.checksum
    mri = priors.load("mri")
    assert (mri.channels, gray.channels) == (2, 1)
    assert mri.intensity_reference == gray.intensity_reference == 0.9


@pytest.mark.parametrize("name, floor_db", [("mri", 34.6), ("gray", 35.85)])
def test_denoises_held_out_anatomy_as_its_card_says(name, floor_db):
    """sigma 0.1 on the first 2 held-out anatomy images: 34.85 (mri) and 36.09 (gray) dB when
    shipped (the cards: 35.38 and 36.50 on all 8); floors 0.25 dB below."""
    rep = denoising_report(priors.load(name), "anatomy", sigmas=(0.1,), baseline=False, limit=2)
    assert rep["prior"][0] > floor_db, rep
    assert rep["prior"][0] > rep["noisy"][0] + 10


def test_default_run_is_dds_with_the_pipeline_step_count():
    from diffrecon.pipeline.options import DEFAULT_STEPS, RunOptions, default_solver, make_solver

    name = default_solver("mri")
    assert name == "dds" and DEFAULT_STEPS["dds"] == 100
    assert make_solver(name, RunOptions()).options.steps == 100
    assert make_solver(name, RunOptions(steps=7)).options.steps == 7
    assert make_solver(name, RunOptions(solver_options={"steps": 9})).options.steps == 9
    assert make_solver("dps", RunOptions()).options.steps != 100  # the others keep theirs


@pytest.mark.parametrize("solver, samples, expected", [(None, None, 4), ("dds", None, 4),
                                                       ("dds", 1, 1), ("tv", None, 1),
                                                       ("reddiff", None, 1), ("dds", 3, 3)])
def test_default_draws_resolved_per_solver_and_recorded(tmp_path, solver, samples, expected):
    """A run without --samples takes the solver's DEFAULT_SAMPLES (DDS: the mean of 4
    draws), records the resolved count in the result and in its resume digest; the std
    map is the draws' spread (zero for one draw or a classical solver)."""
    import h5py
    import numpy as np

    from diffrecon.datasets.simulate import simulate_mri
    from diffrecon.pipeline import reconstruct_file
    from diffrecon.pipeline.options import RunOptions
    from diffrecon.pipeline.run import plan_run

    scan = simulate_mri(tmp_path / "scan.h5", size=16, slices=1, coils=2, center_fraction=0.3,
                        seed=0)
    plan = plan_run(scan, tmp_path / "out.h5", RunOptions(solver=solver, samples=samples))
    assert plan.options.samples == plan.settings["samples"] == expected
    if samples is None and solver in (None, "tv"):
        reconstruct_file(scan, tmp_path / "out.h5", solver=solver,
                         steps=None if solver else 3, device="cpu")
        with h5py.File(tmp_path / "out.h5") as f:
            assert int(f.attrs["num_samples"]) == expected
            std = f["std"][()]
            assert np.isfinite(std).all() and (std.max() > 0) == (expected > 1)
        one = plan_run(scan, tmp_path / "out.h5", RunOptions(solver=solver, samples=1))
        assert (one.digest == plan.digest) == (expected == 1)  # resume tells them apart
