"""The slice pool of the calibrated-interval benchmark (``benchmarks/coverage_external.py``).

Every slice is an independent held-out image (never used to train the shipped priors),
square, resized to ``SIZE`` px, in [0, 1], and is simulated by ``benchmarks/_external_sim``
(numpy / sigpy / scikit-image, no diffrecon code) into its own scan file with the task's
acquisition (its own MRI phase, noise and mask seed; CT noise seed). Sources:

* ``aniso`` (VALIDATION): dipy ``aniso_vox.nii.gz`` slices 3-20 (T1, 4 mm voxels; the
  slices whose brain covers >= 20% of the field). dipy ``ascm_out_test.nii.gz`` is the
  ASCM-denoised copy of this volume (correlation 0.94): not used.
* ``piesno`` (VALIDATION): dipy ``test_piesno.nii.gz`` slices 2-13 (diffusion-weighted;
  slices 0-1 hold single hot pixels 5x brighter than the rest of the volume).
* ``s0`` (TEST): dipy ``S0_10slices.nii.gz`` slices 2-7 (b0 EPI, 128 px).
* ``anat`` (TEST): dipy ``t1_coronal_slice.npy`` and matplotlib ``s1045.ima.gz`` (256 px).
* ``ex4d`` (independent, real EPI): nibabel ``tests/data/example4d.nii.gz``, volume 0,
  slices 0-23 (128 x 96, centre-cropped to 96 x 96).

Each slice is divided by its own maximum (S0 slices: by the maximum of slices 2-7, as in
``_external_sim.load_anatomy``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import _external_sim as sim
from benchmarks._external_tasks import TASKS, Group, seed_of, sim_kwargs

SIZE = 128
SOURCES = {
    "aniso": tuple(f"aniso_{k}" for k in range(3, 21)),
    "piesno": tuple(f"piesno_{k}" for k in range(2, 14)),
    "s0": tuple(f"S0_epi_{k}" for k in range(2, 8)),
    "anat": ("t1_coronal", "s1045_sagittal"),
    "ex4d": tuple(f"ex4d_{k}" for k in range(24)),
}
SPLIT = {"aniso": "VALIDATION", "piesno": "VALIDATION", "s0": "TEST", "anat": "TEST",
         "ex4d": "independent (nibabel test data)"}
POOL = tuple(n for names in SOURCES.values() for n in names)


def source_of(name: str) -> str:
    return next(s for s, names in SOURCES.items() if name in names)


def _volume_slice(path: Path, k: int) -> np.ndarray:
    import nibabel

    vol = np.asarray(nibabel.load(path).dataobj, np.float64)
    vol = vol[..., 0] if vol.ndim == 4 else vol
    return np.rot90(vol[:, :, k])


def load_slice(name: str, size: int = SIZE) -> np.ndarray:
    """A pool slice (size, size) float64 in [0, 1]."""
    stem, _, k = name.rpartition("_")
    if stem in ("aniso", "piesno"):
        file = {"aniso": "aniso_vox.nii.gz", "piesno": "test_piesno.nii.gz"}[stem]
        img = _volume_slice(sim._dipy_file(file), int(k))
    elif stem == "ex4d":
        import nibabel

        img = _volume_slice(Path(nibabel.__file__).parent / "tests" / "data"
                            / "example4d.nii.gz", int(k))
    else:
        return sim.load_image(name, size)
    return sim._unit(sim._resize(sim._square(sim._unit(img)), size))


def simulate_slice(task_name: str, name: str, out: Path, size: int = SIZE
                   ) -> tuple[Path, Path]:
    """Write (once) the scan file of one pool slice for a task and its reference (.npy)."""
    task = TASKS[task_name]
    scan = out / "scans" / task_name / f"{name}.h5"
    ref = out / "scans" / task_name / f"{name}.npy"
    if scan.exists() and ref.exists():
        return scan, ref
    scan.parent.mkdir(parents=True, exist_ok=True)
    img = load_slice(name, size)[None]
    kw = sim_kwargs(task, Group(f"pool-{name}", (name,), size), (name,))
    kw["seeds"] = [seed_of(task_name, "pool", name)]
    if task.modality == "mri":
        s = sim.simulate_mri(img, **kw)
        sim.write_mri(scan, s, acceleration=task.params["acceleration"], patient_id=name,
                      pixel_mm=256.0 / size)
    elif task.modality == "ct":
        s = sim.simulate_ct(img, pixel_mm=task.params["fov_mm"] / size, **kw)
        sim.write_ct(scan, s)
    else:
        raise SystemExit(f"{task_name}: only MRI and CT tasks are calibrated here")
    tmp = ref.with_name(ref.stem + ".tmp.npy")
    np.save(tmp, s["reference"])
    tmp.replace(ref)
    return scan, ref
