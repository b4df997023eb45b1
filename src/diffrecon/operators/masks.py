"""k-space sampling masks: fastMRI's 1D Cartesian masks (bit-for-bit, given the seed),
2D variable-density Poisson-disc masks (sigpy) and the acceleration of a mask."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FASTMRI_KINDS = ("random", "equispaced", "equispaced_fraction")


def fastmri_mask(shape, center_fractions: Sequence[float] | float,
                 accelerations: Sequence[int] | int, kind: str = "random", seed=None,
                 *, offset: int | None = None, allow_any_combination: bool = False) -> np.ndarray:
    """1D column mask over the phase-encode (last) axis, bool (W,).

    Reproduces fastMRI's ``RandomMaskFunc`` / ``EquiSpacedMaskFunc`` /
    ``EquispacedMaskFractionFunc`` (fastmri 0.3.0, ``fastmri/data/subsample.py``): with the
    same ``seed`` (int or tuple of ints, as fastMRI derives from a file name), ``shape``
    (..., H, W) here gives the mask of ``MaskFunc(...)(tuple(shape) + (2,), offset, seed)``.
    The RNG is ``np.random.RandomState(seed)``: one ``randint`` picks the (centre fraction,
    acceleration) pair (``choice`` twice if ``allow_any_combination``), then the kind draws
    its columns (uniform draws, or an equispaced offset). ``seed=None`` draws a fresh mask.
    Centre: round(W * centre_fraction) columns starting at (W - n_low + 1) // 2.
    """
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    num_cols = int(shape[-1])
    cfs = [center_fractions] if np.isscalar(center_fractions) else list(center_fractions)
    accs = [accelerations] if np.isscalar(accelerations) else list(accelerations)
    if not cfs or (len(cfs) != len(accs) and not allow_any_combination):
        raise ValueError("fastmri_mask: center_fractions and accelerations must have the same "
                         "non-zero length.")
    if kind not in FASTMRI_KINDS:
        raise ValueError(f"fastmri_mask: unknown kind {kind!r}; valid: "
                         f"{', '.join(FASTMRI_KINDS)}.")
    rng = np.random.RandomState(seed)
    if allow_any_combination:
        cf, acc = rng.choice(cfs), rng.choice(accs)
    else:
        i = rng.randint(len(cfs))
        cf, acc = cfs[i], accs[i]
    n_low = round(num_cols * cf)
    mask = np.zeros(num_cols, dtype=bool)
    pad = (num_cols - n_low + 1) // 2
    mask[pad:pad + n_low] = True
    if kind == "random":
        prob = (num_cols / acc - n_low) / (num_cols - n_low)
        mask |= rng.uniform(size=num_cols) < prob
    elif kind == "equispaced":
        if acc != int(acc):
            raise ValueError(f"fastmri_mask: kind 'equispaced' needs an integer acceleration, "
                             f"got {acc!r}.")
        acc = int(acc)
        if offset is None:
            offset = rng.randint(0, high=round(acc))
        mask[offset::acc] = True
    else:  # equispaced_fraction: spacing adjusted so that W / acc columns are kept in total
        spacing = (acc * (n_low - num_cols)) / (n_low * acc - num_cols)
        if offset is None:
            offset = rng.randint(0, high=round(spacing))
        cols = np.around(np.arange(offset, num_cols - 1, spacing)).astype(np.uint)
        mask[cols] = True
    return mask


def poisson_mask(shape: tuple[int, int], acceleration: float, calib=(24, 24),
                 seed: int = 0) -> np.ndarray:
    """2D variable-density Poisson-disc mask, bool (H, W), via ``sigpy.mri.poisson`` (fully
    sampled ``calib`` centre, corners cropped); sigpy iterates until the acceleration is
    within 10% of the target."""
    from sigpy.mri import poisson

    if len(shape) != 2 or acceleration < 1:
        raise ValueError(f"poisson_mask: need shape (H, W) and acceleration >= 1, got {shape}, "
                         f"{acceleration}.")
    m = poisson(tuple(int(s) for s in shape), float(acceleration), calib=tuple(calib),
                dtype=np.complex64, seed=int(seed))
    return np.abs(m) > 0


def acceleration_of(mask) -> float:
    """Acceleration = number of entries / number of sampled entries (1D or 2D mask)."""
    m = np.asarray(mask)
    n = np.count_nonzero(m)
    if n == 0:
        raise ValueError("acceleration_of: the mask samples nothing.")
    return m.size / n
