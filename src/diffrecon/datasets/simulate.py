"""Simulated scans with ground truth, written in exactly the documented layouts.

Every simulator is deterministic in its arguments (no timestamps are written, so reruns give
byte-identical files) and returns the path. Slice ``s`` of a file simulated with ``seed`` is
phantom ``index = seed * 100_000 + s`` of ``split`` (so different seeds give different
anatomy and ``split="test"`` keeps benchmark scans disjoint from prior training data);
masks and noise draw from ``numpy.random.default_rng([seed, stream])``. Each file carries a
``simulation`` attribute (JSON of the simulator's arguments).

MRI scale: the complex phantom (magnitude max 1) is multiplied by ``MRI_SCALE = 1e-4``
before the centred orthonormal FFT, so image magnitudes are ~1e-4 and k-space magnitudes
~1e-7..1e-2 at 128 px, the range of fastMRI files; the pipeline normalises anyway.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import numpy as np

from diffrecon.datasets import phantoms
from diffrecon.datasets.ct import CTScan, tensor_to_sinogram, write_ct_scan
from diffrecon.datasets.fastmri import MRIScan, write_mri_scan
from diffrecon.datasets.images import ImageScan, write_image_scan
from diffrecon.datasets.ismrmrd import default_header
from diffrecon.errors import InputError, as_input_error
from diffrecon.operators.coils import rss
from diffrecon.operators.mri import fft2c, ifft2c

MRI_SCALE = 1e-4
MASK_TYPES = ("random", "equispaced", "equispaced_fraction", "poisson")
SLICE_STRIDE = 100_000
_STREAM_MASK, _STREAM_NOISE = 1, 2


def _check(name: str, value, ok: bool, want: str) -> None:
    if not ok:
        raise InputError(f"simulate: {name} is {value!r}, expected {want}")


def _edge(simulator):
    """A simulator is an edge: an operator factory's ``ValueError`` about the arguments given
    (an impossible kernel, angle range, ...) is bad input, ``InputError`` 'simulate: ...'."""
    @functools.wraps(simulator)
    def run(*args, **kwargs):
        try:
            return simulator(*args, **kwargs)
        except ValueError as exc:
            raise as_input_error(exc, "simulate") from exc
    return run


def _indices(seed: int, slices: int) -> list[int]:
    return [int(seed) * SLICE_STRIDE + s for s in range(slices)]


def _provenance(simulator: str, **kwargs) -> str:
    return json.dumps({"simulator": simulator, **kwargs}, sort_keys=True)


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def sampling_mask(size: int, *, acceleration: float, center_fraction: float, mask_type: str,
                  seed: int) -> np.ndarray:
    """The simulator's k-space mask: bool (ky,) from ``operators.masks.fastmri_mask`` for the
    1D fastMRI kinds (``acceleration`` rounded to an integer), bool (kx, ky) from
    ``poisson_mask`` for ``poisson`` (calibration square ``center_fraction * size`` wide).
    Seeded by ``seed`` only (not the file name)."""
    from diffrecon.operators import masks

    mask_seed = int(np.random.default_rng([int(seed), _STREAM_MASK]).integers(2**31))
    if mask_type == "poisson":
        calib = max(int(round(center_fraction * size)), 1)
        return np.asarray(masks.poisson_mask((size, size), float(acceleration),
                                             calib=(calib, calib), seed=mask_seed), dtype=bool)
    return np.asarray(masks.fastmri_mask((size, size), [center_fraction],
                                         [int(round(acceleration))], kind=mask_type,
                                         seed=mask_seed), dtype=bool)


@_edge
def simulate_mri(path: str | os.PathLike, *, size: int = 128, slices: int = 2, coils: int = 8,
                 acceleration: float = 4, center_fraction: float = 0.08,
                 mask_type: str = "random", noise: float = 0.0, seed: int = 0,
                 fully_sampled: bool = False, split: str = "test",
                 with_coil_maps: bool = False) -> Path:
    """Simulate a fastMRI-layout MRI volume.

    Each slice: complex MR phantom x (magnitude max 1) times ``MRI_SCALE``, birdcage coil maps
    S_c (``coils`` = 1: no coil maps, single-coil (slices, kx, ky) k-space), k = F(S_c x) +
    n with F the centred orthonormal FFT and n complex Gaussian whose real and imaginary
    parts each have std ``noise * MRI_SCALE`` (``noise`` is in units where the image
    magnitude max is 1; stored as attribute ``noise_sigma`` in file units).
    ``reconstruction_rss`` = RSS of the inverse FFT of the fully sampled noisy k-space
    (fastMRI definition; reconSpace = size x size), ``ground_truth_complex`` = the noise-free
    combined image x * MRI_SCALE. ``fully_sampled``: write full k-space and no mask
    (train-style; recon-time masks seed from the file name, ``mask_seed_from_filename``);
    else zero the unsampled lines and write ``mask`` (ky,) (or (kx, ky) for ``poisson``)
    plus attributes ``acceleration`` and ``num_low_frequency`` (test-style).
    ``with_coil_maps`` also stores the true maps as ``coil_maps``.
    """
    _check("size", size, isinstance(size, int) and size >= 8, "an integer >= 8")
    _check("slices", slices, isinstance(slices, int) and 1 <= slices < SLICE_STRIDE,
           f"an integer in [1, {SLICE_STRIDE})")
    _check("coils", coils, isinstance(coils, int) and coils >= 1, "an integer >= 1")
    _check("mask_type", mask_type, mask_type in MASK_TYPES, f"one of {', '.join(MASK_TYPES)}")
    _check("acceleration", acceleration, acceleration >= 1, "a number >= 1")
    _check("center_fraction", center_fraction, 0 < center_fraction <= 1, "in (0, 1]")
    _check("noise", noise, noise >= 0, "a number >= 0")
    _check("seed", seed, isinstance(seed, (int, np.integer)) and seed >= 0, "an integer >= 0")
    path = Path(path)

    images = np.stack([phantoms.phantom("mri", size, i, split)
                       for i in _indices(seed, slices)]).astype(np.complex128) * MRI_SCALE
    if coils > 1:
        from diffrecon.operators.coils import birdcage_maps

        maps = _to_numpy(birdcage_maps(coils, size)).astype(np.complex128)
        maps = maps.reshape(coils, size, size)
        coil_images = images[:, None] * maps[None]
    else:
        maps = None
        coil_images = images
    full = fft2c(coil_images)
    sigma = float(noise) * MRI_SCALE
    if sigma > 0:
        rng = np.random.default_rng([int(seed), _STREAM_NOISE])
        full = full + sigma * (rng.standard_normal(full.shape)
                               + 1j * rng.standard_normal(full.shape))
    full = full.astype(np.complex64)
    target = ifft2c(full.astype(np.complex128))
    target = rss(target, axis=1) if coils > 1 else np.abs(target)

    attrs = {"acquisition": "SIMULATED", "patient_id": f"sim-{split}-{seed:06d}",
             "noise_sigma": sigma, "scale": MRI_SCALE,
             "simulation": _provenance("mri", size=size, slices=slices, coils=coils,
                                       acceleration=acceleration,
                                       center_fraction=center_fraction, mask_type=mask_type,
                                       noise=noise, seed=seed, fully_sampled=fully_sampled,
                                       split=split)}
    mask = None
    kspace = full
    if not fully_sampled:
        mask = sampling_mask(size, acceleration=acceleration, center_fraction=center_fraction,
                             mask_type=mask_type, seed=seed)
        kspace = np.where(np.broadcast_to(mask, (size, size)), full, 0).astype(np.complex64)
        attrs["acceleration"] = float(acceleration)
        attrs["num_low_frequency"] = int(round(center_fraction * size))
    fov = (float(size), float(size), 1.0)  # 1 mm pixels
    scan = MRIScan(kspace=kspace, mask=mask, header=default_header((size, size), fov_mm=fov),
                   attrs=attrs, rss=target.astype(np.float32),
                   coil_maps=(np.broadcast_to(maps, kspace.shape).astype(np.complex64)
                              if with_coil_maps and maps is not None else None),
                   ground_truth=images.astype(np.complex64))
    return write_mri_scan(path, scan)


def fan_defaults(size: int, pixel_size_mm: float) -> dict[str, float]:
    """Clinical fan-beam proportions for an N x N image of ``pixel_size_mm`` pixels (field of
    view F = N * pixel): source-to-isocentre 1.66 F and source-to-detector 1.825 times that
    (Siemens SOMATOM Definition: 595 mm and 1085.6 mm for a 358 mm field of view), detector
    spacing = pixel size magnified to the detector (one detector per pixel at the
    isocentre)."""
    fov = float(size) * float(pixel_size_mm)
    dso = 1.66 * fov
    dsd = 1.825 * dso
    return {"source_to_isocentre_mm": dso, "source_to_detector_mm": dsd,
            "detector_spacing_mm": float(pixel_size_mm) * dsd / dso}


@_edge
def simulate_ct(path: str | os.PathLike, *, size: int = 128, slices: int = 2, views: int = 30,
                angle_range: float | None = None, n_detectors: int | None = None,
                noise: float = 0.0, seed: int = 0, split: str = "test",
                family: str = "ellipses", geometry: str = "parallel",
                pixel_size_mm: float = 1.0, source_to_isocentre_mm: float | None = None,
                source_to_detector_mm: float | None = None,
                detector_spacing_mm: float | None = None,
                detector_shape: str = "flat") -> Path:
    """Simulate a CT scan: ``views`` angles uniform on [0, ``angle_range``) radians (default
    pi for parallel beam, 2 pi for fan beam), sinogram = ``operators.ct`` applied to phantoms
    of ``family`` (values in [0, 1] per pixel, units "1/pixel"), plus Gaussian noise of std
    ``noise * max(clean sinogram)`` (max over the whole file; stored as ``noise_sigma`` in
    sinogram units).

    ``geometry="fan"``: fan beam with ``pixel_size_mm`` pixels, ``detector_shape`` "flat" or
    "curved", and the distances in mm (each None takes :func:`fan_defaults`); the default
    ``n_detectors`` covers the image. All geometry attributes of the CT layout are written.
    """
    from diffrecon.operators.ct import ct

    _check("size", size, isinstance(size, int) and size >= 8, "an integer >= 8")
    _check("slices", slices, isinstance(slices, int) and 1 <= slices < SLICE_STRIDE,
           f"an integer in [1, {SLICE_STRIDE})")
    _check("views", views, isinstance(views, int) and views >= 1, "an integer >= 1")
    _check("noise", noise, noise >= 0, "a number >= 0")
    _check("seed", seed, isinstance(seed, (int, np.integer)) and seed >= 0, "an integer >= 0")
    _check("family", family, family in ("ellipses", "shepp-logan", "mri"),
           "ellipses, shepp-logan or mri")
    _check("geometry", geometry, geometry in ("parallel", "fan"), "parallel or fan")
    _check("pixel_size_mm", pixel_size_mm, pixel_size_mm > 0, "a number > 0")
    fan = geometry == "fan"
    if angle_range is None:
        angle_range = 2 * math.pi if fan else math.pi
    path = Path(path)
    x = _images(family, size, seed, slices, split)
    kwargs = {} if n_detectors is None else {"n_detectors": int(n_detectors)}
    attrs = {"geometry": geometry, "image_size": size, "pixel_size": float(pixel_size_mm),
             "units": "1/pixel"}
    if fan:
        given = {"source_to_isocentre_mm": source_to_isocentre_mm,
                 "source_to_detector_mm": source_to_detector_mm,
                 "detector_spacing_mm": detector_spacing_mm}
        fan_geo = {k: (float(v) if v is not None else fan_defaults(size, pixel_size_mm)[k])
                   for k, v in given.items()}
        kwargs.update(geometry="fan", detector=detector_shape, pixel_size_mm=pixel_size_mm,
                      **fan_geo)
        attrs.update(fan_geo, detector_shape=detector_shape)
    import torch

    physics = ct(size, views=views, angle_range=angle_range, noise_sigma=0.0, **kwargs)
    with torch.no_grad():
        sino = tensor_to_sinogram(physics.A(torch.from_numpy(x)[:, None])).astype(np.float64)
    sigma = float(noise) * float(np.abs(sino).max())
    if sigma > 0:
        rng = np.random.default_rng([int(seed), _STREAM_NOISE])
        sino = sino + sigma * rng.standard_normal(sino.shape)
    attrs["noise_sigma"] = sigma
    fan_args = ({"geometry": geometry, "pixel_size_mm": pixel_size_mm,
                 "detector_shape": detector_shape, **fan_geo} if fan else {})
    attrs["simulation"] = _provenance(
        "ct", size=size, slices=slices, views=views, angle_range=angle_range,
        n_detectors=n_detectors, noise=noise, seed=seed, split=split, family=family,
        **fan_args)
    scan = CTScan(sinogram=sino.astype(np.float32), angles=_to_numpy(physics.angles),
                  attrs=attrs, ground_truth=x)
    return write_ct_scan(path, scan)


def _images(family: str, size: int, seed: int, slices: int, split: str) -> np.ndarray:
    imgs = [phantoms.phantom(family, size, i, split) for i in _indices(seed, slices)]
    return np.abs(np.stack(imgs)).astype(np.float32)


@_edge
def simulate_image(path: str | os.PathLike, *, operator: str = "blur", size: int = 128,
                   slices: int = 2, kernel: str = "gaussian", kernel_width: float = 2.0,
                   factor: int = 4, noise: float = 0.01, seed: int = 0, split: str = "test",
                   family: str = "ellipses", boundary: str = "circular",
                   kind: str = "bicubic", fraction: float = 0.5) -> Path:
    """Simulate a restoration scan of one-channel phantoms in [0, 1] with additive Gaussian
    noise of absolute std ``noise`` (image units).

    ``operator``: "blur" (``kernel`` gaussian | motion | uniform of ``kernel_width`` px,
    ``boundary`` circular | reflect | valid), "superres" (``factor`` 2 | 4, ``kind`` bicubic |
    box, ``boundary`` circular | reflect) or "inpaint" (random mask keeping ``fraction`` of
    the pixels, seeded by ``seed``). The operator parameters are stored so that
    ``read_image_scan(path).physics()`` rebuilds the same operator.
    """
    _check("operator", operator, operator in ("blur", "superres", "inpaint"),
           "blur, superres or inpaint")
    _check("size", size, isinstance(size, int) and size >= 8, "an integer >= 8")
    _check("slices", slices, isinstance(slices, int) and 1 <= slices < SLICE_STRIDE,
           f"an integer in [1, {SLICE_STRIDE})")
    _check("noise", noise, noise >= 0, "a number >= 0")
    _check("seed", seed, isinstance(seed, (int, np.integer)) and seed >= 0, "an integer >= 0")
    _check("family", family, family in ("ellipses", "shepp-logan", "mri"),
           "ellipses, shepp-logan or mri")
    path = Path(path)
    import torch

    x = _images(family, size, seed, slices, split)[:, None]
    mask = None
    if operator == "blur":
        from diffrecon.operators.blur import blur

        params = {"kernel_type": kernel, "kernel_width": float(kernel_width),
                  "kernel_angle": 0.0, "boundary": boundary, "noise_sigma": float(noise)}
        physics = blur(kernel, width=float(kernel_width), boundary=boundary)
    elif operator == "superres":
        from diffrecon.operators.superres import superres

        params = {"factor": int(factor), "kind": kind, "boundary": boundary,
                  "image_size": [size, size], "noise_sigma": float(noise)}
        physics = superres(int(factor), img_size=(1, size, size), kind=kind, boundary=boundary)
    else:
        from diffrecon.operators.inpaint import inpaint

        mask_seed = int(np.random.default_rng([int(seed), _STREAM_MASK]).integers(2**31))
        params = {"mask_kind": "random", "mask_fraction": float(fraction),
                  "mask_seed": mask_seed, "noise_sigma": float(noise)}
        physics = inpaint((1, size, size), kind="random", fraction=float(fraction),
                          seed=mask_seed)
        mask = _to_numpy(physics.mask).reshape(size, size) > 0
    with torch.no_grad():
        y = _to_numpy(physics.A(torch.from_numpy(x))).astype(np.float64)
    if noise > 0:
        rng = np.random.default_rng([int(seed), _STREAM_NOISE])
        y = y + float(noise) * rng.standard_normal(y.shape)
        if mask is not None:  # missing pixels stay exactly 0
            y = y * mask
    attrs = {"simulation": _provenance("image", operator=operator, size=size, slices=slices,
                                       kernel=kernel, kernel_width=kernel_width, factor=factor,
                                       noise=noise, seed=seed, split=split, family=family,
                                       boundary=boundary, kind=kind, fraction=fraction)}
    scan = ImageScan(measurement=y.astype(np.float32), operator=operator, params=params,
                     image=x, mask=mask, attrs=attrs)
    return write_image_scan(path, scan)
