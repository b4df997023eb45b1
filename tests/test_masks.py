"""k-space masks: fastMRI 1D masks (properties, determinism, bit-for-bit vs fastmri when it
is installed), sigpy Poisson-disc masks, acceleration."""

from __future__ import annotations

import numpy as np
import pytest

from diffrecon.operators import acceleration_of, fastmri_mask, poisson_mask

KINDS = ["random", "equispaced", "equispaced_fraction"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("width", [368, 321])
def test_fastmri_mask_centre_and_acceleration(kind, width):
    for seed in range(5):
        m = fastmri_mask((640, width), 0.08, 4, kind, seed=seed)
        assert m.shape == (width,) and m.dtype == bool
        n_low = round(width * 0.08)
        start = (width - n_low + 1) // 2
        assert m[start:start + n_low].all()
        acc = acceleration_of(m)
        if kind == "equispaced":  # fastMRI: the centre adds lines, so acc < nominal
            assert 3.0 < acc <= 4.0
        elif kind == "equispaced_fraction":  # spacing adjusted to hit W / 4 lines
            assert abs(acc / 4 - 1) < 0.05
        else:  # Bernoulli columns: expected W / 4 lines
            assert abs(acc / 4 - 1) < 0.25


@pytest.mark.parametrize("kind", KINDS)
def test_fastmri_mask_deterministic_given_seed(kind):
    a = fastmri_mask((1, 640, 368), [0.08, 0.04], [4, 8], kind, seed=(3, 1, 4))
    b = fastmri_mask((1, 640, 368), [0.08, 0.04], [4, 8], kind, seed=(3, 1, 4))
    np.testing.assert_array_equal(a, b)
    masks = {fastmri_mask(368, [0.08, 0.04], [4, 8], kind, seed=s).tobytes() for s in range(8)}
    assert len(masks) > 1  # seeds matter (pair choice and/or columns)
    assert fastmri_mask(368, 0.08, 4, kind, seed=None).shape == (368,)


def test_fastmri_mask_validation():
    with pytest.raises(ValueError):
        fastmri_mask(368, [0.08, 0.04], [4], "random", seed=0)
    with pytest.raises(ValueError):
        fastmri_mask(368, 0.08, 4, "magic", seed=0)
    with pytest.raises(ValueError):
        fastmri_mask(368, 0.08, 2.5, "equispaced", seed=0)
    assert fastmri_mask(368, 0.08, 2.5, "random", seed=0).sum() > 368 / 3
    with pytest.raises(ValueError):
        acceleration_of(np.zeros(8))


def test_fastmri_mask_bit_for_bit():
    subsample = pytest.importorskip("fastmri.data.subsample")
    classes = {"random": subsample.RandomMaskFunc, "equispaced": subsample.EquiSpacedMaskFunc,
               "equispaced_fraction": subsample.EquispacedMaskFractionFunc}
    for kind, cls in classes.items():
        for width in (368, 372, 321, 33):
            for seed in (0, 1, 42, (1, 2, 3), tuple(map(ord, "file1000001.h5"))):
                for cfs, accs in (([0.08], [4]), ([0.08, 0.04], [4, 8])):
                    ref, _ = cls(cfs, accs)((1, 640, width, 2), seed=seed)
                    ours = fastmri_mask((1, 640, width), cfs, accs, kind, seed=seed)
                    np.testing.assert_array_equal(ours, ref.numpy().reshape(-1).astype(bool),
                                                  err_msg=f"{kind} {width} {seed} {accs}")
        any_combo = cls([0.08, 0.04], [4, 8, 6], allow_any_combination=True)
        for seed in range(6):
            ref, _ = any_combo((1, 640, 368, 2), seed=seed)
            ours = fastmri_mask(368, [0.08, 0.04], [4, 8, 6], kind, seed=seed,
                                allow_any_combination=True)
            np.testing.assert_array_equal(ours, ref.numpy().reshape(-1).astype(bool))
        ref, _ = cls([0.08], [4])((1, 64, 64, 2), offset=1, seed=5)
        ours = fastmri_mask(64, 0.08, 4, kind, seed=5, offset=1)
        np.testing.assert_array_equal(ours, ref.numpy().reshape(-1).astype(bool))


def test_poisson_mask():
    m = poisson_mask((64, 64), 4, calib=(12, 12), seed=0)
    assert m.shape == (64, 64) and m.dtype == bool
    assert abs(acceleration_of(m) / 4 - 1) < 0.10
    assert m[26:38, 26:38].all()  # calibration square fully sampled
    np.testing.assert_array_equal(m, poisson_mask((64, 64), 4, calib=(12, 12), seed=0))
    m8 = poisson_mask((64, 48), 8, calib=(8, 8), seed=3)
    assert m8.shape == (64, 48) and abs(acceleration_of(m8) / 8 - 1) < 0.10
    with pytest.raises(ValueError):
        poisson_mask((64,), 4)
