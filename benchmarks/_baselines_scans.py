"""Images and independently simulated scans of ``benchmarks/baselines_auto.py`` (sigpy,
scikit-image and numpy only; the validation / test image split and the simulators are
described in its docstring). A ``Case`` is one scan: the measurement, the physics with
``noise_model.sigma`` as ``diffrecon run`` sets it, a scorer and the reference method."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

F32 = torch.float32


# ----------------------------------------------------------------------------- images
def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    a = a - a.min()
    return a / a.max()


def _square(a: np.ndarray, n: int) -> np.ndarray:
    """Centre-crop to a square, resize to n x n (anti-aliased), scale to [0, 1]."""
    from skimage.transform import resize

    a = np.squeeze(a)
    h, w = a.shape
    s = min(h, w)
    a = a[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return _unit(resize(_unit(a), (n, n), anti_aliasing=True, order=3))


def _nifti(path, index, axis=2) -> np.ndarray:
    import nibabel as nib

    return np.take(np.asarray(nib.load(path).dataobj, dtype=np.float64), index, axis=axis)


def anatomy_images(split: str, n: int) -> list[tuple[str, np.ndarray]]:
    """Grey anatomy images in [0, 1], n x n (see the module docstring for the split)."""
    import dipy
    import nilearn

    dipy_files = Path(dipy.__file__).parent / "data" / "files"
    if split == "val":
        mni = (Path(nilearn.__file__).parent / "datasets" / "data"
               / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
        out = [("mni-ax80", _nifti(mni, 80, 2)), ("mni-cor120", _nifti(mni, 120, 1)),
               ("piesno-7", _nifti(dipy_files / "test_piesno.nii.gz", 7)),
               ("aniso-12", _nifti(dipy_files / "aniso_vox.nii.gz", 12))]
    else:
        import matplotlib

        s0 = [(f"S0-{k}", _nifti(dipy_files / "S0_10slices.nii.gz", k)) for k in (3, 6)]
        ima = Path(matplotlib.get_data_path()) / "sample_data" / "s1045.ima.gz"
        with gzip.open(ima) as f:
            head = np.frombuffer(f.read(), "<u2").reshape(256, 256).astype(np.float64)
        out = [("t1-coronal", np.load(dipy_files / "t1_coronal_slice.npy")), *s0,
               ("s1045", head)]
    return [(name, _square(np.rot90(a) if name.startswith(("mni", "S0", "piesno", "aniso"))
                           else a, n)) for name, a in out]


def photo_images(split: str, n: int) -> list[tuple[str, np.ndarray]]:
    """Grey photographs in [0, 1], n x n."""
    from skimage import color, data

    if split == "val":
        names = ("coins", "moon", "brick", "cell", "page")
        imgs = [(k, getattr(data, k)()) for k in names]
    else:
        from sklearn.datasets import load_sample_image

        imgs = [("camera", data.camera()), ("astronaut", color.rgb2gray(data.astronaut())),
                ("chelsea", color.rgb2gray(data.chelsea())),
                ("china", color.rgb2gray(load_sample_image("china.jpg")))]
    return [(k, _square(a, n)) for k, a in imgs]


# ----------------------------------------------------------------------------- scans
@dataclass
class Case:
    """One simulated scan: measurement, physics (noise_model.sigma as the pipeline sets it),
    a scorer (PSNR of a solver output (1, C, H, W)) and the reference method's PSNR."""

    task: str
    image: str
    y: torch.Tensor
    physics: object
    score: Callable[[torch.Tensor], float]
    reference: tuple[str, float]
    extra: dict = field(default_factory=dict)


def _psnr(ref: np.ndarray, x: np.ndarray) -> float:
    from diffrecon.metrics import psnr

    return psnr(ref, x)


def column_mask(n: int, accel: int, kind: str, rng) -> np.ndarray:
    """1D phase-encode mask (n,) bool with a fully sampled centre of round(0.32 n / accel)
    lines (8% at 4x, 4% at 8x), the rest random (uniform, expected n / accel lines in all)
    or equispaced."""
    n_low = int(round(0.32 * n / accel))
    mask = np.zeros(n, bool)
    lo = (n - n_low + 1) // 2
    mask[lo:lo + n_low] = True
    if kind == "random":
        prob = (n / accel - n_low) / (n - n_low)
        mask |= rng.uniform(size=n) < prob
    else:
        mask[rng.integers(accel)::accel] = True
    return mask


def _pipeline_noise(kspace, mask, unit, y) -> float:
    """The MRI noise level ``diffrecon run`` hands the solvers (see module docstring)."""
    from diffrecon.problems.mri import kspace_noise_sigma, model_mismatch_sigma

    return max(kspace_noise_sigma(kspace, mask), model_mismatch_sigma(unit, y))


def mri_case(image: str, mag: np.ndarray, *, coils: int, accel: int, kind: str, noise: float,
             seed: int, task: str = "mri") -> Case:
    """Multi-coil Cartesian MRI (see module docstring); ``noise`` = k-space std per real
    component relative to the image maximum (= the image-domain noise std per coil)."""
    import sigpy as sp
    import sigpy.mri

    from diffrecon import operators
    from diffrecon.operators.coils import estimate_coil_maps
    from diffrecon.operators.mri import kspace_to_tensor
    from diffrecon.recon.baselines import ZeroFilledSolver, rss_zero_filled

    rng = np.random.default_rng(seed)
    n = mag.shape[0]
    yy, xx = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    c = rng.normal(size=5)
    phase = c[0] * xx + c[1] * yy + 0.5 * (c[2] * xx * yy + c[3] * xx ** 2 + c[4] * yy ** 2)
    img = mag * np.exp(1j * np.pi / 2 * phase)
    maps = sigpy.mri.birdcage_maps((coils, n, n), r=1.3 + 0.4 * rng.uniform())
    full = sp.fft(maps * img, axes=(-2, -1))
    ref = np.sqrt((np.abs(maps * img) ** 2).sum(0))
    mask = column_mask(n, accel, kind, rng)
    k = full + noise * (rng.normal(size=full.shape) + 1j * rng.normal(size=full.shape))
    k = (k * mask).astype(np.complex64)
    from diffrecon.problems.mri_coils import calibration_params

    est, _ = estimate_coil_maps(k, **calibration_params(k.shape, mask, task), mask=mask)
    y = kspace_to_tensor(k[None])
    unit = operators.mri(mask, est, img_size=(n, n))
    sigma = _pipeline_noise(k[None], mask, unit, y)
    phys = operators.mri(mask, est, img_size=(n, n), noise_sigma=sigma)

    def score(x):
        return _psnr(ref, x[0].double().square().sum(0).sqrt().numpy())

    zf = max(score(ZeroFilledSolver().solve(y, phys).mean),
             _psnr(ref, rss_zero_filled(k).double().numpy()))
    return Case(task, image, y, phys, score, ("zero-filled", zf),
                {"sigma": sigma, "sigma_true": noise})


def ct_case(image: str, att: np.ndarray, *, views: int, angle_range: float, noise: float,
            seed: int, task: str = "ct") -> Case:
    """Parallel-beam CT: scikit-image radon (circle=False) of the attenuation image,
    ``views`` angles over ``angle_range`` degrees, noise std = ``noise`` x sinogram max."""
    from skimage.transform import radon

    from diffrecon import operators
    from diffrecon.recon.baselines import FBPSolver

    rng = np.random.default_rng(seed)
    n = att.shape[0]
    theta = np.arange(views) * (angle_range / views)
    sino = radon(att, theta=theta, circle=False)
    sigma = noise * float(sino.max())
    sino = sino + sigma * rng.normal(size=sino.shape)
    y = torch.from_numpy(sino).to(F32)[None, None]
    phys = operators.ct(n, angles=np.radians(theta), noise_sigma=sigma)

    def score(x):
        return _psnr(att, x[0, 0].double().numpy())

    return Case(task, image, y, phys, score, ("fbp", score(FBPSolver().solve(y, phys).mean)),
                {"sigma": sigma, "sigma_true": sigma})


def deblur_case(image: str, a: np.ndarray, *, width: float, noise: float, seed: int,
                task: str = "deblur") -> Case:
    """scikit-image Gaussian filter (std ``width`` px, periodic) + N(0, noise^2)."""
    from skimage.filters import gaussian

    from diffrecon import operators

    rng = np.random.default_rng(seed)
    b = gaussian(a, sigma=width, mode="wrap") + noise * rng.normal(size=a.shape)
    y = torch.from_numpy(b).to(F32)[None, None]
    phys = operators.blur("gaussian", width=width, boundary="circular", noise_sigma=noise)

    def score(x):
        return _psnr(a, x[0, 0].double().numpy())

    return Case(task, image, y, phys, score, ("measurement", _psnr(a, b)),
                {"sigma": noise, "sigma_true": noise})


def sr_case(image: str, a: np.ndarray, *, factor: int, noise: float, seed: int,
            task: str = "sr") -> Case:
    """scikit-image ``downscale_local_mean`` (box average) by ``factor`` + N(0, noise^2)."""
    from skimage.transform import downscale_local_mean, resize

    from diffrecon import operators

    rng = np.random.default_rng(seed)
    lr = downscale_local_mean(a, (factor, factor))
    lr = lr + noise * rng.normal(size=lr.shape)
    y = torch.from_numpy(lr).to(F32)[None, None]
    phys = operators.superres(factor, img_size=(1, *a.shape), kind="box", noise_sigma=noise)

    def score(x):
        return _psnr(a, x[0, 0].double().numpy())

    up = max(_psnr(a, np.kron(lr, np.ones((factor, factor)))),
             _psnr(a, resize(lr, a.shape, order=3)))
    return Case(task, image, y, phys, score, ("upsampled", up),
                {"sigma": noise, "sigma_true": noise})
