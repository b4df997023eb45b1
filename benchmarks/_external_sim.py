"""Independent scan simulators of the held-out benchmark (``benchmarks/external.py``).

Nothing here imports diffrecon: the scans are made with numpy, scipy, sigpy and scikit-image
only (h5py writes them, the standard library's ``xml.etree`` writes the ISMRMRD header), in
the layouts documented in ``diffrecon.datasets.{fastmri,ct,images}``. The ground truth never
goes into a scan file; the caller keeps it (``external.py`` stores it beside the scans).

Held-out TEST images (``/work/scratch/splits.md``; never used to train, tune or select):

* anatomy: dipy ``t1_coronal_slice.npy`` (256 x 256 T1), matplotlib ``s1045.ima.gz`` (256 x
  256 sagittal head T1, 8-bit values stored in the high byte of little-endian uint16), dipy
  ``S0_10slices.nii.gz`` slices 2..7 (128 x 128 b0 EPI);
* photographs: scikit-image ``camera``, ``astronaut`` and ``chelsea`` and sklearn
  ``china.jpg`` (luminance by ``skimage.color.rgb2gray``, centre-cropped square).

Models (every image is float64 in [0, 1] before scaling):

* MRI: x = |anatomy| exp(i phi), phi a smooth random phase (low-pass Fourier noise, peak
  |phi| ~ pi); coil maps ``sigpy.mri.birdcage_maps`` (RSS-normalised, so the RSS of the
  noise-free coil images is |x|: the reference); k-space = centred orthonormal 2D FFT of the
  coil images (fastMRI ``fft2c``), complex Gaussian noise of per-component std
  sigma = rms(k) 10^(-snr_db / 20), then a 1D fastMRI-style mask on ky (:func:`fastmri_mask`)
  zeroes the unsampled lines. Readout oversampling puts the image in the middle of a field of
  view ``oversample`` times longer along kx; reconSpace stays the image size.
* CT: attenuation per pixel mu = image * mu_max * pixel_size (mu_max in 1/mm), sinogram =
  ``skimage.transform.radon(mu, theta_deg, circle=False)`` (line integrals in pixel units)
  transposed to (angles, detectors), plus Gaussian noise; ``angles`` = radians(theta_deg).
  skimage's radon is diffrecon's parallel-beam geometry (same detector count ceil(sqrt(2) N),
  angle origin and direction, rotation centre pixel N // 2) only when ceil(sqrt(2) N) is
  odd: for an even count diffrecon (deepinv) rotates about (N - 1) / 2, half a pixel off
  (e.g. N = 128: 5% relative difference). Images are therefore zero-padded at the bottom /
  right to the next N with an odd count (:func:`ct_size`: 128 -> 129, 256 stays).
* Deblur: y = k * x with mirror boundary (``scipy.ndimage.convolve`` mode "mirror", edge not
  repeated), k the sampled isotropic Gaussian of std ``width`` px on a (2 ceil(3 width) +
  1)^2 grid normalised to sum 1, plus Gaussian noise. (A 'valid' boundary was tried: the
  half-observed 6 px border band then dominates every method's error.)
* SR: y = D x D^T with D the separable antialiased Keys bicubic decimation (a = -0.5, kernel
  stretched by the factor, low-res pixel j centred at factor j + (factor - 1) / 2, weights
  normalised to sum 1, mirror ("reflect", edge not repeated) boundary), plus Gaussian noise.
"""

from __future__ import annotations

import gzip
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np

ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"
ANATOMY = ("t1_coronal", "s1045_sagittal") + tuple(f"S0_epi_{k}" for k in range(2, 8))
PHOTOS = ("camera", "astronaut", "chelsea", "china")
HELD_OUT = {
    "t1_coronal": "dipy data/files/t1_coronal_slice.npy",
    "s1045_sagittal": "matplotlib mpl-data/sample_data/s1045.ima.gz",
    "S0_epi": "dipy data/files/S0_10slices.nii.gz slices 2-7",
    "camera": "skimage.data.camera", "astronaut": "skimage.data.astronaut (grey)",
    "chelsea": "skimage.data.chelsea (grey)", "china": "sklearn china.jpg (grey)",
}


# ------------------------------------------------------------------------------ test images
def _dipy_file(name: str) -> Path:
    import dipy

    return Path(dipy.__file__).resolve().parent / "data" / "files" / name


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    if img.shape == (size, size):
        return img
    return resize(img, (size, size), order=3, anti_aliasing=True, mode="reflect")


def _square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    s = min(h, w)
    return img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def _unit(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float64)
    img = img - min(float(img.min()), 0.0)
    return np.clip(img / img.max(), 0.0, 1.0)


def load_anatomy(name: str) -> np.ndarray:
    """A held-out anatomy image (H, W) float64 in [0, 1] at its native size (256 or 128);
    S0_epi_k are divided by the maximum of slices 2..7 together (one volume)."""
    if name == "t1_coronal":
        return _unit(np.load(_dipy_file("t1_coronal_slice.npy")))
    if name == "s1045_sagittal":
        import matplotlib

        raw = gzip.open(Path(matplotlib.get_data_path()) / "sample_data" / "s1045.ima.gz").read()
        return _unit(np.frombuffer(raw, "<u2").reshape(256, 256))
    if name.startswith("S0_epi_"):
        import nibabel

        vol = np.asarray(nibabel.load(_dipy_file("S0_10slices.nii.gz")).dataobj, np.float64)
        vol = vol[..., 2:8, 0] if vol.ndim == 4 else vol[..., 2:8]
        k = int(name.rsplit("_", 1)[1])
        return np.clip(vol[..., k - 2] / vol.max(), 0.0, 1.0)
    raise ValueError(f"unknown anatomy image {name!r}")


def load_photo(name: str, size: int) -> np.ndarray:
    """A held-out photograph, grey, centre-cropped square, resized to (size, size), [0, 1]."""
    from skimage import color, data

    if name == "china":
        from sklearn.datasets import load_sample_image

        rgb = load_sample_image("china.jpg")
    elif name in ("camera", "astronaut", "chelsea"):
        rgb = getattr(data, name)()
    else:
        raise ValueError(f"unknown photograph {name!r}")
    grey = color.rgb2gray(rgb) if rgb.ndim == 3 else np.asarray(rgb, np.float64) / 255.0
    return _unit(_resize(_square(grey), size))


def load_image(name: str, size: int | None = None) -> np.ndarray:
    """Anatomy (native size unless ``size``) or photograph (``size`` required) in [0, 1]."""
    if name in PHOTOS:
        return load_photo(name, size)
    img = load_anatomy(name)
    return img if size is None else _unit(_resize(img, size))


# ------------------------------------------------------------------------------ MRI
def fft2c(x: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2D FFT over the last two axes (fastMRI ``fft2c``)."""
    x = np.fft.ifftshift(x, axes=(-2, -1))
    return np.fft.fftshift(np.fft.fft2(x, norm="ortho"), axes=(-2, -1))


def smooth_phase(shape: tuple[int, int], rng: np.random.Generator, peak: float = math.pi,
                 cutoff: int = 3) -> np.ndarray:
    """Smooth random phase (radians): real part of the inverse FFT of complex Gaussian
    coefficients on the |k| <= ``cutoff`` lowest frequencies, scaled to max |phi| = peak."""
    h, w = shape
    coef = np.zeros(shape, np.complex128)
    ky = np.fft.fftfreq(h) * h
    kx = np.fft.fftfreq(w) * w
    low = (np.abs(ky)[:, None] <= cutoff) & (np.abs(kx)[None, :] <= cutoff)
    coef[low] = rng.standard_normal(low.sum()) + 1j * rng.standard_normal(low.sum())
    phi = np.fft.ifft2(coef).real
    return phi * (peak / np.abs(phi).max())


def fastmri_mask(num_cols: int, acceleration: int, center_fraction: float, kind: str,
                 rng: np.random.Generator) -> np.ndarray:
    """1D Cartesian mask (num_cols,) bool, following fastMRI's mask definitions:
    round(num_cols * center_fraction) central lines always kept (starting at
    (num_cols - n_low + 1) // 2); "random": every other line kept with probability
    (num_cols / acceleration - n_low) / (num_cols - n_low); "equispaced": lines at
    round(offset + j * a') with a' = acceleration (n_low - num_cols) / (n_low acceleration -
    num_cols) and a random integer offset in [0, round(a')), so that about num_cols /
    acceleration lines are kept in total."""
    n_low = int(round(num_cols * center_fraction))
    mask = np.zeros(num_cols, bool)
    pad = (num_cols - n_low + 1) // 2
    mask[pad:pad + n_low] = True
    if kind == "random":
        prob = (num_cols / acceleration - n_low) / (num_cols - n_low)
        mask |= rng.uniform(size=num_cols) < prob
    elif kind == "equispaced":
        step = acceleration * (n_low - num_cols) / (n_low * acceleration - num_cols)
        offset = int(rng.integers(0, round(step)))
        lines = np.around(np.arange(offset, num_cols - 1, step)).astype(int)
        mask[lines] = True
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return mask


def simulate_mri(images: np.ndarray, *, coils: int, acceleration: int, center_fraction: float,
                 mask_kind: str, snr_db: float, seeds, mask_seed: int, oversample: int = 1
                 ) -> dict:
    """Multi-coil Cartesian MRI of magnitude ``images`` (S, H, W) in [0, 1]; slice i draws its
    phase and noise from ``seeds[i]``, the volume's one mask from ``mask_seed``.

    Returns kspace complex64 (S, coils, oversample H, W), mask bool (W,), reference float32
    (S, H, W) = |x| (RSS of the noise-free coil images at reconSpace), noise_sigma (per
    real component, k-space units, the largest over slices), the recon size (H, W), and for
    checks only (never written to the scan) the complex images ``x`` (S, oversample H, W) and
    the coil ``maps``."""
    from sigpy.mri import birdcage_maps

    s, h, w = images.shape
    hx = oversample * h
    maps = birdcage_maps((coils, hx, w), r=1.5).astype(np.complex128)
    top = (hx - h) // 2
    mask = fastmri_mask(w, acceleration, center_fraction, mask_kind,
                        np.random.default_rng(mask_seed))
    ks = np.empty((s, coils, hx, w), np.complex64)
    xs = np.zeros((s, hx, w), np.complex128)
    sigmas = []
    for i in range(s):
        rng = np.random.default_rng(seeds[i])
        xs[i, top:top + h] = images[i] * np.exp(1j * smooth_phase((h, w), rng))
        k = fft2c(maps * xs[i])
        sigma = float(np.sqrt(np.mean(np.abs(k) ** 2) / 2) * 10 ** (-snr_db / 20))
        k += sigma * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
        ks[i] = k * mask
        sigmas.append(sigma)
    return {"kspace": ks, "mask": mask, "maps": maps, "x": xs,
            "reference": images.astype(np.float32), "noise_sigma": max(sigmas),
            "recon_size": (h, w), "num_low_frequency": int(round(w * center_fraction))}


def ismrmrd_header(encoded: tuple[int, int], recon: tuple[int, int],
                   fov_mm: tuple[float, float]) -> bytes:
    """Minimal ISMRMRD XML: encodedSpace / reconSpace matrixSize and fieldOfView_mm (x = kx
    readout, y = ky phase encoding), cartesian trajectory, kspace_encoding_step_1 limits."""
    ET.register_namespace("", ISMRMRD_NS)

    def sub(parent, tag, text=None):
        el = ET.SubElement(parent, f"{{{ISMRMRD_NS}}}{tag}")
        if text is not None:
            el.text = str(text)
        return el

    root = ET.Element(f"{{{ISMRMRD_NS}}}ismrmrdHeader")
    enc = sub(root, "encoding")
    ex, ey = encoded
    scale = ex / recon[0]
    for space, (mx, my), (fx, fy) in (("encodedSpace", encoded, (fov_mm[0] * scale, fov_mm[1])),
                                      ("reconSpace", recon, fov_mm)):
        el = sub(enc, space)
        size = sub(el, "matrixSize")
        for a, v in zip("xyz", (mx, my, 1), strict=True):
            sub(size, a, v)
        fov = sub(el, "fieldOfView_mm")
        for a, v in zip("xyz", (fx, fy, 5.0), strict=True):
            sub(fov, a, f"{v:g}")
    sub(enc, "trajectory", "cartesian")
    lim = sub(sub(enc, "encodingLimits"), "kspace_encoding_step_1")
    for k, v in (("minimum", 0), ("maximum", ey - 1), ("center", ey // 2)):
        sub(lim, k, v)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_mri(path: Path, sim: dict, *, acceleration: int, patient_id: str,
              pixel_mm: float = 1.0) -> None:
    """fastMRI test-style file: kspace, mask, ismrmrd_header, attrs (no maps, no truth)."""
    ks = sim["kspace"]
    h, w = sim["recon_size"]
    xml = ismrmrd_header(ks.shape[-2:], (h, w), (h * pixel_mm, w * pixel_mm))
    with _atomic(path) as f:
        f.create_dataset("kspace", data=ks)
        f.create_dataset("mask", data=sim["mask"])
        f.create_dataset("ismrmrd_header", data=np.bytes_(xml))
        f.attrs.update({"acquisition": "AXT1", "patient_id": patient_id,
                        "acceleration": int(acceleration),
                        "num_low_frequency": int(sim["num_low_frequency"])})


# ------------------------------------------------------------------------------ CT
def ct_size(n: int) -> int:
    """Smallest N >= n whose skimage / diffrecon detector count ceil(sqrt(2) N) is odd."""
    while math.ceil(math.sqrt(2) * n) % 2 == 0:
        n += 1
    return n


def simulate_ct(images: np.ndarray, *, views: int, angle_range_deg: float, noise: float,
                seeds, mu_max_per_mm: float = 0.04, pixel_mm: float = 1.0) -> dict:
    """Parallel-beam sinograms of attenuation maps mu = image * mu_max * pixel_size (per
    pixel) with skimage's radon, images zero-padded to ``ct_size``; returns sinogram float32
    (S, views, detectors), angles (radians), reference float32 (S, N', N') (attenuation per
    pixel), attrs."""
    from skimage.transform import radon

    n0 = images.shape[-1]
    pad = ct_size(n0) - n0
    mu = np.pad(images, ((0, 0), (0, pad), (0, pad))) * (mu_max_per_mm * pixel_mm)
    theta = np.arange(views) * (angle_range_deg / views)
    sino = np.stack([radon(m, theta=theta, circle=False).T for m in mu])
    sino = sino + noise * _noise(sino.shape, seeds)
    n = mu.shape[-1]
    return {"sinogram": sino.astype(np.float32), "angles": np.deg2rad(theta),
            "theta_deg": theta, "reference": mu.astype(np.float32),
            "attrs": {"geometry": "parallel", "n_detectors": int(sino.shape[-1]),
                      "image_size": int(n), "pixel_size": float(pixel_mm),
                      "noise_sigma": float(noise)}}


def write_ct(path: Path, sim: dict) -> None:
    with _atomic(path) as f:
        f.create_dataset("sinogram", data=sim["sinogram"])
        f.create_dataset("angles", data=sim["angles"])
        f.attrs.update(sim["attrs"])


# ------------------------------------------------------------------------------ images
def gaussian_kernel(width: float) -> np.ndarray:
    """Sampled isotropic Gaussian, std ``width`` px, (2 ceil(3 width) + 1)^2, sum 1."""
    r = math.ceil(3 * width)
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / width) ** 2)
    k = np.outer(g, g)
    return k / k.sum()


def keys_cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel."""
    t = np.abs(t)
    return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                    np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))


def bicubic_decimation(n: int, factor: int) -> np.ndarray:
    """(n / factor, n) matrix of antialiased bicubic decimation with mirror boundary."""
    m = n // factor
    d = np.zeros((m, n))
    for j in range(m):
        c = factor * j + (factor - 1) / 2
        taps = np.arange(math.floor(c - 2 * factor), math.ceil(c + 2 * factor) + 1)
        wts = keys_cubic((taps - c) / factor)
        wts = wts / wts.sum()
        idx = np.where(taps < 0, -taps, np.where(taps >= n, 2 * (n - 1) - taps, taps))
        np.add.at(d[j], idx, wts)
    return d


def simulate_blur(images: np.ndarray, *, width: float, noise: float, seeds) -> dict:
    """Gaussian blur with mirror boundary (``scipy.ndimage.convolve`` mode "mirror" = edge
    not repeated = diffrecon / torch "reflect"): y (S, 1, H, W)."""
    from scipy.ndimage import convolve

    k = gaussian_kernel(width)
    y = np.stack([convolve(x, k, mode="mirror") for x in images])[:, None]
    y = y + noise * _noise(y.shape, seeds)
    return {"measurement": y.astype(np.float32), "reference": images[:, None].astype(np.float32),
            "attrs": {"operator": "blur", "kernel_type": "gaussian", "kernel_width": float(width),
                      "kernel_size": int(k.shape[0]), "boundary": "reflect",
                      "noise_sigma": float(noise)}}


def simulate_sr(images: np.ndarray, *, factor: int, noise: float, seeds) -> dict:
    """Antialiased bicubic decimation by ``factor`` (mirror boundary): y (S, 1, H/f, W/f)."""
    _, h, w = images.shape
    dh, dw = bicubic_decimation(h, factor), bicubic_decimation(w, factor)
    y = np.einsum("ih,shw,jw->sij", dh, images, dw)[:, None]
    y = y + noise * _noise(y.shape, seeds)
    return {"measurement": y.astype(np.float32), "reference": images[:, None].astype(np.float32),
            "attrs": {"operator": "superres", "factor": int(factor), "kind": "bicubic",
                      "boundary": "reflect", "image_size": np.asarray([h, w], np.int64),
                      "noise_sigma": float(noise)}}


def write_image(path: Path, sim: dict) -> None:
    with _atomic(path) as f:
        f.create_dataset("measurement", data=sim["measurement"])
        f.attrs.update(sim["attrs"])


# ------------------------------------------------------------------------------ plumbing
def _noise(shape, seeds) -> np.ndarray:
    """Standard normal array of ``shape``; slice i (axis 0) drawn from ``seeds[i]``."""
    return np.stack([np.random.default_rng(sd).standard_normal(shape[1:])
                     for sd in list(seeds)[:shape[0]]])


class _atomic:
    """h5py file written to ``<path>.tmp-<pid>`` and renamed over ``path`` on success."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")

    def __enter__(self) -> h5py.File:
        self.f = h5py.File(self.tmp, "w", track_order=False)
        return self.f

    def __exit__(self, kind, *_):
        self.f.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
        return False
