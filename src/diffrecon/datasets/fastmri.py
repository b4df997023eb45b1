"""fastMRI-layout MRI scan files, read and written natively (h5py + xml.etree).

Layout (one file = one volume; slices along axis 0)::

    kspace                complex64 (slices, coils, kx, ky) multi-coil or (slices, kx, ky)
                          single-coil; kx = readout (frequency encoding, image rows),
                          ky = phase encoding (image columns, the undersampled axis);
                          centred k-space of the orthonormal centred 2D FFT of the coil images
    ismrmrd_header        bytes, ISMRMRD XML (namespace http://www.ismrm.org/ISMRMRD) with
                          encoding/encodedSpace/matrixSize {x=kx, y=ky, z=1},
                          encoding/reconSpace/matrixSize {x=H, y=W, z=1},
                          encoding/encodedSpace|reconSpace/fieldOfView_mm {x, y, z},
                          encoding/encodingLimits/kspace_encoding_step_1 {minimum, maximum,
                          center} (ky lines; fastMRI's SliceDataset parses exactly these)
    mask                  optional bool (ky,): sampled phase-encoding lines of an undersampled
                          (test-style) file; k-space is zero on unsampled lines. A 2D
                          (kx, ky) mask (e.g. Poisson-disc) is a diffrecon extension.
    reconstruction_rss    optional float32 (slices, H, W): RSS of the fully sampled coil images,
                          centre-cropped to reconSpace (ground truth; fastMRI definition).
                          Single-coil files may instead carry ``reconstruction_esc``.
    coil_maps             optional complex64, same shape as kspace (diffrecon extension)
    ground_truth_complex  optional complex64 (slices, H, W) (diffrecon extension, simulated)
    attrs                 acquisition (e.g. "CORPD_FBK"), max / norm (of reconstruction_rss),
                          patient_id; test-style files also acceleration, num_low_frequency

Missing ``ismrmrd_header`` is tolerated (encoded = recon size = k-space size). Fully sampled
(train-style) files get their mask at reconstruction time, seeded from the file name as
fastMRI does: :func:`mask_seed_from_filename`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffrecon.datasets.io import (
    atomic_h5,
    attrs_to_dict,
    check_shape,
    open_h5_checked,
    read_array,
    slice_selection,
    write_attrs,
)
from diffrecon.datasets.ismrmrd import (  # noqa: F401  (re-exported: old import path)
    _XML_DECL,
    ISMRMRD_NS,
    _query,
    default_header,
    header_to_xml,
    parse_header,
    read_header_xml,
)
from diffrecon.errors import InputError


@dataclass
class MRIScan:
    """An MRI scan in memory. ``header`` holds the parsed ISMRMRD fields ``encoding_size``,
    ``recon_size`` ((x, y, z) ints), ``encoding_fov_mm``, ``recon_fov_mm`` ((x, y, z)
    floats or None), ``kspace_encoding_step_1`` ({minimum, maximum, center}); None -> derived
    from the k-space shape. ``header_xml``, if set, is written verbatim (keeps all of a real
    file's header on rewrite)."""

    kspace: np.ndarray
    mask: np.ndarray | None = None
    header: dict[str, Any] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    rss: np.ndarray | None = None
    coil_maps: np.ndarray | None = None
    ground_truth: np.ndarray | None = None
    path: Path | None = None
    header_xml: str | None = None

    def __post_init__(self):
        if self.header is None:
            self.header = default_header(self.kspace.shape[-2:])

    @property
    def multicoil(self) -> bool:
        return self.kspace.ndim == 4

    @property
    def n_slices(self) -> int:
        return self.kspace.shape[0]

    @property
    def n_coils(self) -> int:
        return self.kspace.shape[1] if self.multicoil else 1

    @property
    def recon_size(self) -> tuple[int, int]:
        """(H, W) of the reference reconstruction (reconSpace matrix size x, y)."""
        x, y, _ = self.header["recon_size"]
        return int(x), int(y)

    @property
    def acceleration(self) -> float | None:
        """Sampled fraction^-1 (ky / sampled lines, or kx ky / sampled points for a 2D mask),
        None for a fully sampled (mask-less) file."""
        if self.mask is None:
            return None
        return self.mask.size / max(int(self.mask.sum()), 1)

    def mask_2d(self) -> np.ndarray | None:
        """The mask broadcast to (kx, ky) bool, or None."""
        if self.mask is None:
            return None
        return np.broadcast_to(self.mask, self.kspace.shape[-2:]).copy()

    def physics(self, slices=None, *, mask=None, coil_maps=None, noise_sigma=None,
                device=None):
        """``operators.mri`` for ``slices`` (None = all, else an index array / slice): mask =
        ``mask`` or the file's (a fully sampled file needs one, e.g. ``fastmri_mask(...,
        seed=mask_seed_from_filename(path))``), coil maps = ``coil_maps`` (slices, C, kx, ky)
        or the file's ``coil_maps`` (multi-coil only), noise_sigma = given or attribute
        ``noise_sigma`` or 0. Measurements: :meth:`measurement`."""
        from diffrecon.operators.mri import mri

        where = self.path if self.path is not None else "MRI scan"
        mask = self.mask if mask is None else np.asarray(mask)
        if mask is None:
            raise InputError(f"{where}: fully sampled file has no dataset 'mask', expected a "
                             f"mask to be given (e.g. seeded by mask_seed_from_filename)")
        sel = slice(None) if slices is None else slices
        maps = None
        if self.multicoil:
            maps = self.coil_maps if coil_maps is None else np.asarray(coil_maps)
            if maps is None:
                raise InputError(f"{where}: multi-coil file has no dataset 'coil_maps', "
                                 f"expected coil maps (estimate them with ESPIRiT first)")
            if coil_maps is None:
                maps = maps[sel]
        sigma = float(self.attrs.get("noise_sigma", 0.0)) if noise_sigma is None else noise_sigma
        return mri(mask, maps, img_size=self.kspace.shape[-2:], noise_sigma=float(sigma),
                   device=device)

    def measurement(self, slices=None, *, mask=None, device=None):
        """k-space of ``slices`` as the operator's real tensor ((S, 2, C, kx, ky) multi-coil,
        (S, 2, kx, ky) single-coil), multiplied by ``mask`` when one is given."""
        from diffrecon.operators.mri import kspace_to_tensor

        k = self.kspace[slice(None) if slices is None else slices]
        if mask is not None:
            k = k * np.broadcast_to(np.asarray(mask, dtype=bool), k.shape[-2:])
        return kspace_to_tensor(k, device=device)


def mask_seed_from_filename(name: str | os.PathLike) -> tuple[int, ...]:
    """fastMRI's per-file mask seed: ``tuple(map(ord, fname))`` of the base file name, used
    for the mask applied to fully sampled files at reconstruction time."""
    return tuple(map(ord, Path(name).name))


def center_crop(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre-crop the last two axes to ``size`` (clamped to the array's size), the fastMRI
    convention for cropping to reconSpace (and a reconstruction to its reference)."""
    h, w = min(size[0], x.shape[-2]), min(size[1], x.shape[-1])
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top:top + h, left:left + w]


# --------------------------------------------------------------------------- read / write

def read_mri_scan(path: str | os.PathLike, slices=None) -> MRIScan:
    """Read and validate a fastMRI-layout file (read-only). ``slices``: None (all), an int,
    a ``slice`` or a sequence of slice indices. Every problem raises one-line ``InputError``."""
    path = Path(path)
    with open_h5_checked(path) as f:
        index = slice_selection(f, "kspace", slices)
        ks = read_array(f, "kspace", kinds="c", ndim=(3, 4), index=index)
        n, (kx, ky) = ks.shape[0], ks.shape[-2:]
        header_xml = read_header_xml(f, path)
        header = default_header((kx, ky)) if header_xml is None else parse_header(
            header_xml, path)

        mask = read_array(f, "mask", kinds="biuf", ndim=(1, 2), required=False)
        if mask is not None:
            want = (ky,) if mask.ndim == 1 else (kx, ky)
            check_shape(path, "mask", mask.shape, want, "one entry per phase-encoding line ky "
                        "of 'kspace', or (kx, ky) for a 2D pattern")
            if not np.isin(mask, (0, 1)).all():
                raise InputError(f"{path}: dataset 'mask' has values other than 0 and 1, "
                                 f"expected a binary line mask")
            mask = mask.astype(bool)
            if not mask.any():
                raise InputError(f"{path}: dataset 'mask' samples no lines, expected at least "
                                 f"one sampled phase-encoding line")

        rss_key = "reconstruction_rss" if "reconstruction_rss" in f else "reconstruction_esc"
        rss = read_array(f, rss_key, kinds="f", ndim=3, required=False, index=index)
        if rss is not None:
            check_shape(path, rss_key, rss.shape[:1], (n,), "same number of slices as 'kspace'")
            rss = rss.astype(np.float32, copy=False)

        maps = read_array(f, "coil_maps", kinds="c", ndim=ks.ndim, required=False, index=index)
        if maps is not None:
            check_shape(path, "coil_maps", maps.shape, ks.shape, "same shape as 'kspace'")
            maps = maps.astype(np.complex64, copy=False)

        gt = read_array(f, "ground_truth_complex", kinds="c", ndim=3, required=False,
                        index=index)
        if gt is not None:
            check_shape(path, "ground_truth_complex", gt.shape[:1], (n,),
                        "same number of slices as 'kspace'")
            gt = gt.astype(np.complex64, copy=False)
        attrs = attrs_to_dict(f.attrs)
        numbers = np.arange(f["kspace"].shape[0])[index if index is not None else slice(None)]
    check_content(path, ks, maps, attrs, header, numbers)

    return MRIScan(kspace=ks.astype(np.complex64, copy=False), mask=mask, header=header,
                   attrs=attrs, rss=rss, coil_maps=maps, ground_truth=gt, path=path,
                   header_xml=header_xml)


# Coil sensitivities are relative: normalised maps (ESPIRiT, fastMRI's) have a
# root-sum-of-squares of at most about 1; far above that the SENSE normal operator overflows.
COIL_MAPS_RSS_MAX = 1e3


def check_content(path, kspace: np.ndarray, maps: np.ndarray | None, attrs: dict,
                  header: dict, numbers) -> None:
    """Degenerate but well-formed content is an ``InputError`` naming the dataset: a slice of
    all-zero ``kspace``, a slice of all-zero ``coil_maps`` or maps whose root-sum-of-squares
    exceeds ``COIL_MAPS_RSS_MAX``, an empty reconSpace / encodedSpace in the header, a
    ``noise_sigma`` attribute that is not a finite number >= 0. ``numbers``: the scan slice
    index of each row."""
    zero = [int(k) for k, s in zip(numbers, kspace, strict=True) if not np.any(s)]
    if zero:
        raise InputError(f"{path}: dataset 'kspace' is all zero in slice(s) "
                         f"{', '.join(map(str, zero[:10]))}, expected measured data")
    if maps is not None:
        check_coil_maps(path, maps, numbers)
    for key, what in (("recon_size", "reconSpace"), ("encoding_size", "encodedSpace")):
        size = header.get(key)
        if size is not None and not all(v >= 1 for v in size[:2]):
            raise InputError(f"{path}: dataset 'ismrmrd_header' {what} matrixSize is "
                             f"{size[0]} x {size[1]}, expected at least 1 x 1")
    if "noise_sigma" in attrs:
        v = attrs["noise_sigma"]
        if not (isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
                and v >= 0):
            raise InputError(f"{path}: attribute 'noise_sigma' is {v!r}, expected a finite "
                             f"number >= 0 (the k-space noise std)")


def check_coil_maps(path, maps: np.ndarray, numbers, name: str = "coil_maps") -> None:
    """``InputError`` naming dataset ``name`` for a slice of all-zero coil maps or maps whose
    root-sum-of-squares over coils exceeds ``COIL_MAPS_RSS_MAX`` (maps (slices, coils, kx,
    ky); single-coil maps (slices, kx, ky) are checked as one coil)."""
    for k, m in zip(numbers, maps, strict=True):
        mag = np.abs(m.astype(np.complex128))
        rss = np.sqrt((mag ** 2).sum(axis=0)) if m.ndim == 3 else mag
        peak = float(rss.max())
        if peak == 0:
            raise InputError(f"{path}: dataset '{name}' is all zero in slice {int(k)}, "
                             f"expected coil sensitivities")
        if not peak <= COIL_MAPS_RSS_MAX:
            raise InputError(f"{path}: dataset '{name}' reaches a root-sum-of-squares of "
                             f"{peak:.3g} in slice {int(k)}, expected normalised sensitivities "
                             f"(about 1, at most {COIL_MAPS_RSS_MAX:g})")


def write_mri_scan(path: str | os.PathLike, scan: MRIScan) -> Path:
    """Write ``scan`` atomically in the fastMRI layout; ``max`` / ``norm`` attributes are
    recomputed from ``scan.rss`` when it is present. Returns the path."""
    path = Path(path)
    ks = np.asarray(scan.kspace)
    if ks.ndim not in (3, 4) or ks.dtype.kind != "c" or ks.size == 0:
        raise InputError(f"kspace for {path} has shape {ks.shape} dtype {ks.dtype}, expected "
                         f"complex (slices, coils, kx, ky) or (slices, kx, ky)")
    n, ky = ks.shape[0], ks.shape[-1]
    attrs = dict(scan.attrs)
    xml = (scan.header_xml.encode("utf-8") if scan.header_xml is not None
           else header_to_xml(scan.header))
    with atomic_h5(path) as f:
        f.create_dataset("kspace", data=ks.astype(np.complex64, copy=False))
        f.create_dataset("ismrmrd_header", data=xml)
        if scan.mask is not None:
            mask = np.asarray(scan.mask).astype(bool)
            if mask.shape not in ((ky,), ks.shape[-2:]):
                raise InputError(f"mask for {path} has shape {mask.shape}, expected ({ky},) "
                                 f"(ky) or {ks.shape[-2:]} (kx, ky)")
            f.create_dataset("mask", data=mask)
        if scan.rss is not None:
            rss = np.asarray(scan.rss, dtype=np.float32)
            if rss.ndim != 3 or rss.shape[0] != n:
                raise InputError(f"reconstruction_rss for {path} has shape {rss.shape}, "
                                 f"expected ({n}, H, W)")
            f.create_dataset("reconstruction_rss", data=rss)
            attrs["max"] = float(rss.max())
            attrs["norm"] = float(np.linalg.norm(rss))
        if scan.coil_maps is not None:
            maps = np.asarray(scan.coil_maps, dtype=np.complex64)
            if maps.shape != ks.shape:
                raise InputError(f"coil_maps for {path} have shape {maps.shape}, expected "
                                 f"{ks.shape} (same as kspace)")
            f.create_dataset("coil_maps", data=maps)
        if scan.ground_truth is not None:
            gt = np.asarray(scan.ground_truth, dtype=np.complex64)
            if gt.ndim != 3 or gt.shape[0] != n:
                raise InputError(f"ground_truth_complex for {path} has shape {gt.shape}, "
                                 f"expected ({n}, H, W)")
            f.create_dataset("ground_truth_complex", data=gt)
        write_attrs(f, attrs)
    return path
