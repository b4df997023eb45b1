"""The training families: determinism, conventions, held-out splits."""

import numpy as np
import pytest

from diffrecon.errors import InputError
from diffrecon.training import data, photos, report, synthetic


@pytest.mark.parametrize("family", ["natural", "ellipses", "mri-phantoms"])
def test_batches_are_deterministic_per_image(family):
    a = data.make_batch(family, 3, 4, 32, seed=1)
    b = data.make_batch(family, 3, 4, 32, seed=1)
    channels = data.family_channels(family)
    assert a.shape == (4, channels, 32, 32) and a.dtype == np.float32
    assert np.array_equal(a, b) and np.isfinite(a).all()
    # image i depends only on (seed, step, i): a shorter batch is a prefix
    assert np.array_equal(data.make_batch(family, 3, 2, 32, seed=1), a[:2])
    assert not np.array_equal(data.make_batch(family, 4, 4, 32, seed=1), a)
    assert not np.array_equal(data.make_batch(family, 3, 4, 32, seed=2), a)


def test_whole_canvas_is_normalised_to_the_declared_reference():
    # crop == canvas: the coarse-grid level and the full-resolution level agree closely,
    # and the gain stays in GAIN_RANGE (mean = INTENSITY_REFERENCE)
    levels = []
    for i in range(12):
        rng = np.random.default_rng([9, i])
        img = data.draw_crop("natural", 96, 96, rng)
        levels.append(data.reference_level(np.abs(img[0])))
    lo, hi = data.GAIN_RANGE
    assert lo * 0.85 < min(levels) and max(levels) < hi * 1.15
    assert data.INTENSITY_REFERENCE == pytest.approx(0.5 * (lo + hi), abs=0.01)


def test_complex_family_has_phase_and_zero_mean():
    b = data.make_batch("mri-phantoms", 0, 8, 32, seed=0)
    mag = np.sqrt((b**2).sum(1))
    assert mag.max() <= 1.0 + 1e-5
    assert np.abs(b[:, 1]).max() > 0.1          # imaginary channel carries signal


def test_test_photos_are_not_training_photos():
    train = photos.training_photos()
    assert len(train) >= 15
    for name in photos.TEST_PHOTOS:
        test = photos.test_photo(name)
        assert not any(t.shape == test.shape and np.allclose(t, test) for t in train), name


def test_dead_leaves_and_bodies_are_valid_images():
    rng = np.random.default_rng(0)
    leaves = synthetic.dead_leaves(64, rng, r_min=0.02, r_max=0.5)
    assert leaves.shape == (64, 64) and 0 <= leaves.min() and leaves.max() <= 1
    assert len(np.unique(leaves)) > 10          # many leaves, not a flat canvas
    body = synthetic.body_section(64, np.random.default_rng(1))
    assert body[0, 0] == 0 and 0.8 < np.median(body[body > 0.5]) < 1.2   # air, soft tissue


def test_smooth_phase_is_a_function_of_canvas_coordinates():
    phase = synthetic.smooth_phase(np.random.default_rng(3))
    rows = np.arange(64, dtype=float)
    full = phase(rows, rows, 64)
    window = phase(rows[10:20], rows[30:45], 64)
    assert np.allclose(full[10:20, 30:45], window, atol=1e-5)


def test_heldout_images_follow_the_prior_convention():
    imgs = report.heldout_images("photos", 1, 0.9)
    assert set(imgs) == set(photos.TEST_PHOTOS)
    for img in imgs.values():
        assert data.reference_level(img[0]) == pytest.approx(0.9, rel=1e-5)
    two = report.heldout_images("photos", 2, 0.9)
    mag = np.sqrt((two["camera"] ** 2).sum(0))
    assert data.reference_level(mag) == pytest.approx(0.9, rel=1e-5)
    assert report.psnr(two["camera"] + 0.01, two["camera"]) == pytest.approx(
        10 * np.log10(mag.max() ** 2 / 2e-4), abs=1e-3)


def test_bad_training_files_are_input_errors(tmp_path):
    import h5py

    with pytest.raises(InputError, match=r"nope\.h5.* does not exist"):
        data.load_h5_images([tmp_path / "nope.h5"])
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["kspace"] = np.zeros((2, 8, 8), np.complex64)
    with pytest.raises(InputError, match=r"other\.h5' has no 'image' dataset"):
        data.load_h5_images([tmp_path / "other.h5"])
