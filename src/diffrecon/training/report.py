"""Denoising reports and model cards for trained priors.

Held-out evaluation images (never trained on; the split is stated in each card):

- ``anatomy``: real anatomy of other subjects than the training template — dipy's T1
  coronal slice, six slices of dipy's b0 volume (``S0_10slices``), matplotlib's sagittal head
  (``s1045.ima``). MRI: magnitude times a fixed smooth phase; CT: used as attenuation maps.
- ``photos``: scikit-image's camera, astronaut, chelsea and scikit-learn's china (grey).
- ``phantoms``: the ``test`` split of diffrecon's phantom families (for regression against
  the earlier phantom priors).

Every image is normalised with :func:`diffrecon.training.data.reference_level` to the
prior's ``intensity_reference`` (the convention the priors train in). PSNR uses fastMRI's
definition: peak = max |reference|, MSE of the (complex) error per pixel.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from diffrecon import metrics
from diffrecon.problems.normalise import intensity_reference
from diffrecon.training import data, photos, synthetic

SIGMAS = (0.02, 0.05, 0.1, 0.2, 0.5)


def heldout_anatomy() -> dict[str, np.ndarray]:
    """Real anatomy images (name -> (H, W) float32 >= 0) of subjects outside the training
    data (packages dipy and matplotlib; no download)."""
    import dipy
    import matplotlib
    import nibabel as nib

    files = Path(dipy.__file__).parent / "data" / "files"
    out = {"dipy-t1-coronal": np.load(files / "t1_coronal_slice.npy")}
    b0 = np.asarray(nib.load(files / "S0_10slices.nii.gz").get_fdata())[..., 0]
    for k in range(2, 8):
        out[f"dipy-b0-{k}"] = b0[:, :, k].T[::-1]
    raw = gzip.open(Path(matplotlib.__file__).parent / "mpl-data" / "sample_data"
                    / "s1045.ima.gz").read()
    out["mpl-s1045"] = np.frombuffer(raw, "<u2").reshape(256, 256)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def heldout_images(kind: str, channels: int, reference: float, seed: int = 7,
                   limit: int | None = None) -> dict:
    """Held-out images of ``kind`` ('anatomy', 'photos', 'phantoms') as (C, H, W) float32 in
    the prior's convention (complex MR images get a fixed smooth random phase); the first
    ``limit`` of them when given."""
    from diffrecon.datasets.phantoms import phantom

    if kind == "anatomy":
        raw = heldout_anatomy()
    elif kind == "photos":
        raw = {name: photos.test_photo(name) for name in photos.TEST_PHOTOS}
    elif kind == "phantoms":
        fam = "mri" if channels == 2 else "ellipses"
        raw = {f"{fam}-test-{i}": phantom(fam, 128, i, "test") for i in range(8)}
    else:
        raise ValueError(f"unknown held-out kind {kind!r}; valid: anatomy, photos, phantoms")
    out = {}
    for i, (name, img) in enumerate(list(raw.items())[:limit]):
        size = min(img.shape)
        img = img[:size - size % 4, :size - size % 4]
        if kind != "phantoms":
            img = img * (reference / data.reference_level(np.abs(img)))
        if channels == 2:
            if not np.iscomplexobj(img):
                rows = np.arange(img.shape[0], dtype=float)
                phase = synthetic.smooth_phase(np.random.default_rng([seed, i]))
                img = img * np.exp(1j * phase(rows, rows, img.shape[0]))
            out[name] = np.stack([img.real, img.imag]).astype(np.float32)
        else:
            out[name] = np.abs(img).astype(np.float32)[None]
    return out


def psnr(est: np.ndarray, ref: np.ndarray) -> float:
    """fastMRI PSNR of (C, H, W) images: peak = max |ref|, MSE of the per-pixel (complex)
    error, i.e. :func:`diffrecon.metrics.psnr` over all C H W entries (whose mean squared
    error is the per-pixel one over C) with data range max |ref| / sqrt(C)."""
    peak = np.sqrt((ref**2).sum(0)).max()
    return metrics.psnr(ref, est, maxval=peak / np.sqrt(ref.shape[0]))


def bm3d_denoise(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """BM3D (Dabov et al. 2007, package ``bm3d``, profile 'np') per channel: (C, H, W)."""
    import bm3d

    return np.stack([np.asarray(bm3d.bm3d(c.astype(np.float64), sigma_psd=sigma), np.float32)
                     for c in noisy])


def denoising_report(prior, kind: str, sigmas=SIGMAS, baseline: bool = True,
                     seed: int = 1234, limit: int | None = None) -> dict:
    """Mean PSNR (dB) of the prior, of BM3D and of the noisy input on the (first ``limit``)
    held-out images of ``kind``, per sigma (noise std per real channel, prior units, seeded
    by (seed, image, sigma index))."""
    reference = intensity_reference(prior)
    images = heldout_images(kind, prior.channels, reference, limit=limit)
    dev = next(prior.parameters()).device
    rows = {"sigmas": list(sigmas), "prior": [], "bm3d": [], "noisy": [],
            "kind": kind, "images": list(images)}
    for j, s in enumerate(sigmas):
        res = {"prior": [], "bm3d": [], "noisy": []}
        for i, clean in enumerate(images.values()):
            noise = np.random.default_rng([seed, i, j]).standard_normal(clean.shape)
            noisy = clean + s * noise.astype(np.float32)
            with torch.no_grad():
                den = prior.denoise(torch.from_numpy(noisy)[None].to(dev), float(s))[0]
            res["prior"].append(psnr(den.cpu().numpy(), clean))
            res["noisy"].append(psnr(noisy, clean))
            if baseline:
                res["bm3d"].append(psnr(bm3d_denoise(noisy, s), clean))
        for key, vals in res.items():
            if vals:
                rows[key].append(float(np.mean(vals)))
    return rows


def report_table(report: dict) -> str:
    """Markdown table of a :func:`denoising_report`."""
    lines = ["| sigma | noisy PSNR | prior PSNR | BM3D PSNR | prior - BM3D |",
             "|---:|---:|---:|---:|---:|"]
    for j, s in enumerate(report["sigmas"]):
        b = report["bm3d"][j] if report["bm3d"] else None
        p = report["prior"][j]
        bs, ds = (f"{b:.2f}", f"{p - b:+.2f}") if b is not None else ("-", "-")
        lines.append(f"| {s:g} | {report['noisy'][j]:.2f} | {p:.2f} | {bs} | {ds} |")
    return "\n".join(lines)


def write_model_card(path: str | os.PathLike, prior, reports: list[dict],
                     description: str = "") -> Path:
    """Write ``<name>.md``: data, recipe, steps, wall time, parameters, PSNR tables."""
    from diffrecon.priors.network import count_parameters

    extra = getattr(prior, "extra", {}) or {}
    recipe = extra.get("recipe", {})
    wall = extra.get("wall_time_s")
    lines = [f"# Prior `{prior.name}`", "", description or
             f"- Data: training family `{recipe.get('family', '?')}` "
             "(`diffrecon.training.data`).",
             f"- Network: U-Net, EDM preconditioning, {prior.channels} channel(s), "
             f"{count_parameters(prior)} parameters, config {prior.net.config}.",
             f"- Convention: data_range {[round(v, 4) for v in prior.data_range]}, "
             f"intensity_reference {prior.intensity_reference}, sigma in "
             f"[{prior.sigma_min:g}, {prior.sigma_max:g}], sigma_data {prior.sigma_data:.4f}, "
             f"data_mean {prior.data_mean:.4f}, size_multiple {prior.size_multiple}.",
             f"- Training: {extra.get('steps', '?')} steps"
             + (f", {wall / 3600:.2f} h on {extra.get('device', '?')}" if wall else "") + ".",
             f"- Final loss (EDM-weighted, last logs): {extra.get('final_loss')}",
             f"- Recipe: `{recipe}`",
             f"- Checksum (sha256): `{prior.checksum}`", ""]
    for rep in reports:
        lines += [f"## Denoising held-out {rep['kind']} ({len(rep['images'])} images: "
                  f"{', '.join(rep['images'])})", "",
                  "Gaussian noise of std sigma per real channel, prior units; fastMRI PSNR "
                  "(peak = max |reference|); BM3D per channel with the true sigma.", "",
                  report_table(rep), ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
