"""The MRI coil policy of ``diffrecon run``: the k-space readout cropped to reconSpace, SVD
coil compression (``--coil-compression``), and the coil maps: a side file (``--coil-maps``,
``diffrecon calib``), else the scan's ``coil_maps``, else ESPIRiT on the compressed coils at
calibration resolution, cached per slice next to the results."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffrecon.errors import InputError

from .problem import format_slices

COMPRESS_ABOVE = 8  # 'auto' coil compression only for scans with more physical coils
MIN_VIRTUAL_COILS = 8  # 'auto' keeps at least this many (well above the acceleration)
COMPRESSION_ENERGY = 0.999  # 'auto' keeps at least this fraction of the k-space energy
OFF = ("off", "none", "0")


def compression_spec(spec, n_coils: int | None = None) -> int | str | None:
    """``--coil-compression`` as ``compress_coils`` takes it: None (no compression: 'off',
    'none', 0, or 'auto' with at most ``COMPRESS_ABOVE`` coils, or K equal to the coil
    count), 'auto' or an int K in [1, coils]. ``n_coils`` None checks the spelling only."""
    text = str(spec).strip().lower() if spec is not None else "off"
    if text in OFF or spec is False:
        return None
    if text == "auto":
        return "auto" if n_coils is None or n_coils > COMPRESS_ABOVE else None
    try:
        k = int(text)
    except ValueError:
        k = -1
    if isinstance(spec, bool) or k < 1 or (isinstance(spec, float) and not spec.is_integer()):
        raise InputError(f"--coil-compression {spec!r} is not valid; expected auto, off or a "
                         f"number of virtual coils >= 1")
    if n_coils is not None and k > n_coils:
        raise InputError(f"--coil-compression {spec!r}: the scan has only {n_coils} coils")
    return None if k == n_coils else k


def readout_width(recon_x: int, kx: int, mask: np.ndarray) -> int:
    """Readout samples kept by the reconSpace crop (``operators.readout``): the reconSpace x
    size when it is smaller than the k-space readout kx and the mask is a column (ky) mask
    (a 2D mask undersamples the readout too: no crop), else kx."""
    return int(recon_x) if 1 <= recon_x < kx and np.asarray(mask).ndim == 1 else int(kx)


def sense_setup(scan, kspace, mask, sel, path, coil_maps, compression, cache, progress):
    """(k-space, coil maps or None, provenance) of the selected slices on the reconstruction
    grid (arrays (slices, coils, H, W), or lists of (coils, H, W) per slice after coil
    compression, which may keep different coil counts per slice): readout cropped to
    reconSpace (:func:`readout_width`), coils SVD-compressed (:func:`compression_spec`),
    maps from the side file / the scan (cropped and compressed like the k-space: virtual
    maps = matrix @ maps) or ESPIRiT on the compressed coils (:func:`cached_maps`)."""
    from diffrecon.operators.coils import apply_coil_matrix, compress_coils
    from diffrecon.operators.readout import crop_readout

    kx = kspace.shape[-2]
    width = readout_width(scan.recon_size[0], kx, mask)
    info: dict = {"readout": f"cropped {kx} -> {width} (reconSpace)" if width < kx
                  else f"{kx} (no crop)"}
    if width < kx:
        kspace = crop_readout(kspace, width)
    if not scan.multicoil:
        return kspace, None, {**info, "coil_maps_source": "none (single coil)"}
    top = (kx - width) // 2
    maps, source = None, None
    if coil_maps is not None:
        maps, source = read_coil_maps(coil_maps, scan.kspace.shape[1:], sel), \
            f"side file {Path(coil_maps).name}"
    elif scan.coil_maps is not None:
        maps, source = scan.coil_maps, "file"
    if maps is not None:
        maps = maps[..., top:top + width, :]
    n = scan.n_coils
    spec = compression_spec(compression, n)
    if spec is None:
        info["coil_compression"] = {"method": "none", "coils": n}
    else:
        # slice by slice: a slice's operator does not depend on which others are selected
        ccs = [compress_coils(k, spec, energy=COMPRESSION_ENERGY,
                              min_coils=min(MIN_VIRTUAL_COILS, n)) for k in kspace]
        kspace = [cc.kspace for cc in ccs]
        counts = sorted({k.shape[0] for k in kspace})
        info["coil_compression"] = {
            "method": "svd (per slice, all sampled k-space)", "physical_coils": n,
            "virtual_coils": counts[0] if len(counts) == 1 else counts,
            "rule": (f"auto: >= {COMPRESSION_ENERGY} of the energy, >= {MIN_VIRTUAL_COILS} "
                     f"coils" if spec == "auto" else "fixed"),
            "energy_kept_min": float(min(cc.energy for cc in ccs))}
        if maps is not None:
            maps = [np.ascontiguousarray(apply_coil_matrix(m, cc.matrix), dtype=np.complex64)
                    for m, cc in zip(maps, ccs, strict=True)]
    if maps is not None:
        return kspace, maps, {**info, "coil_maps_source": source}
    maps, params, reused = cached_maps(kspace, mask, sel, path, {**info, "spec": spec},
                                       cache, progress)
    info.update(coil_maps_source="espirit", espirit=params, espirit_cache=(
        "off" if cache is None else f"{reused} of {len(sel)} slices reused"))
    return kspace, maps, info


def cached_maps(kspace, mask, sel, path, setup: dict, cache, progress):
    """ESPIRiT maps (coils, H, W) of each slice of ``kspace`` (the reconstruction grid's, after
    coil compression) on the coarse calibration grid (``estimate_coil_maps(grid='auto')``),
    one slice at a time; with a ``cache`` directory each slice's maps live in
    ``cache/espirit-<key digest>.h5`` keyed by the input's SHA-256, the slice, the mask, the
    readout crop, the compression and the calibration parameters (stored in the file and
    compared on reuse; an unreadable or mismatched file is recomputed). Returns (maps per
    slice, parameters, number of slices reused)."""
    import hashlib
    import json

    from diffrecon.datasets.io import sha256_file
    from diffrecon.operators.coils import espirit_params

    shape = tuple(kspace[0].shape[-2:])
    cal = calibration_params(shape, mask, path)
    params = espirit_params(shape, mask=mask, grid="auto", **cal)
    base = None
    if cache is not None:
        base = {"format": 1, "input_sha256": sha256_file(path),
                "mask_sha256": hashlib.sha256(np.asarray(mask, bool).tobytes()).hexdigest(),
                "shape": list(shape), "setup": setup, "espirit": params}
    out, reused, told = [], 0, False
    for j, k in enumerate(sel):
        file = key = None
        if base is not None:
            key = json.dumps({**base, "slice": int(k)}, sort_keys=True, default=str)
            file = Path(cache) / f"espirit-{hashlib.sha256(key.encode()).hexdigest()[:24]}.h5"
            m = _read_cached(file, key, kspace[j].shape)
            if m is not None:
                out.append(m)
                reused += 1
                continue
        if progress is not None and not told:
            told = True
            progress({"event": "message",
                      "text": f"{Path(path).name}: estimating coil maps (ESPIRiT)"})
        out.append(espirit_slice(kspace[j], mask, path, cal))
        if file is not None:
            _write_cached(file, key, out[-1])
    return out, params, reused


def _read_cached(file: Path, key: str, shape) -> np.ndarray | None:
    import h5py

    try:
        with h5py.File(file, "r") as f:
            if f.attrs.get("key") != key or f["coil_maps"].shape != tuple(shape):
                return None
            return f["coil_maps"][()].astype(np.complex64)
    except (OSError, KeyError):
        return None


def _write_cached(file: Path, key: str, maps: np.ndarray) -> None:
    """Best effort: a cache that cannot be written only costs the next run the ESPIRiT."""
    from diffrecon.datasets.io import atomic_h5

    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_h5(file) as f:
            f.create_dataset("coil_maps", data=maps)
            f.attrs["key"] = key
    except (OSError, InputError):
        pass


def espirit_slice(k: np.ndarray, mask, path, cal: dict) -> np.ndarray:
    """ESPIRiT maps (coils, H, W) of one slice's k-space on the coarse calibration grid;
    failures and all-zero maps are ``InputError`` naming the file."""
    from diffrecon.operators.coils import estimate_coil_maps

    try:
        m, _ = estimate_coil_maps(k, mask=mask, grid="auto", **cal)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - sigpy failures on odd data are input problems
        raise InputError(f"{path}: ESPIRiT coil-map estimation failed ({exc}); store "
                         f"'coil_maps' in the file (diffrecon calib) or pass --coil-maps"
                         ) from exc
    if not (np.sum(np.abs(m) ** 2, 0) > 0.5).any():
        raise InputError(f"{path}: ESPIRiT found no coil sensitivity (all-zero maps) with "
                         f"{cal}; store 'coil_maps' in the file or pass --coil-maps")
    return np.ascontiguousarray(m, dtype=np.complex64)  # strides set the rounding of A


def acs_width(mask: np.ndarray) -> int:
    """Width of the fully sampled calibration region around the k-space centre: the band of
    phase-encoding lines around ky // 2 for 1D (or column-wise) masks, the largest centred
    fully sampled square for 2D (Poisson-disc) masks."""
    m = np.asarray(mask, bool)
    if m.ndim == 2 and not (m.all(0) | ~m.any(0)).all():  # truly 2D pattern
        cy, cx = m.shape[0] // 2, m.shape[1] // 2
        width = 0
        while width < min(m.shape):
            w = width + 1
            lo_y, lo_x = cy - w // 2, cx - w // 2
            if lo_y < 0 or lo_x < 0 or not m[lo_y:lo_y + w, lo_x:lo_x + w].all():
                break
            width = w
        return width
    cols = m if m.ndim == 1 else m.all(0)
    c = cols.size // 2
    if not cols[c]:
        return 0
    lo, hi = c, c
    while lo > 0 and cols[lo - 1]:
        lo -= 1
    while hi < cols.size - 1 and cols[hi + 1]:
        hi += 1
    return hi - lo + 1


def calibration_params(kspace_shape, mask: np.ndarray | None, path) -> dict[str, int]:
    """ESPIRiT calibration region and kernel for a scan: calib_width = the side of the
    centred square sigpy will actually calibrate on (min(24, ACS lines), shrunk to the fully
    sampled square: 6 ACS lines may give a 5-wide square); kernel_width 2 for <= 6, 3 up
    to 12, then min(6, calib // 3 + 1) (24 -> 6, the paper's setting). A kernel close to the
    calibration width leaves too few calibration rows: with a 3-wide kernel on a 5 or 6-wide
    square the maps lose up to 70% of the object to the eigenvalue crop (validation split,
    MNI / dipy aniso_vox / piesno slices at 128 px, 8x with 4% centre); a 2-wide kernel with
    a larger region gives visibly worse maps. Fewer than 4 calibration lines raise
    ``InputError``."""
    from diffrecon.operators.coils import calibration_width

    shape = tuple(int(n) for n in kspace_shape[-2:])
    acs = min(shape) if mask is None else acs_width(mask)
    calib = int(min(24, acs, *shape))
    if mask is not None:
        calib = calibration_width(mask, shape, calib)
    if calib < 4:
        raise InputError(f"{path}: only {calib} fully sampled central k-space lines, expected "
                         f"at least 4 to estimate coil maps (ESPIRiT); store 'coil_maps' in "
                         f"the file or pass --coil-maps")
    kernel = 2 if calib <= 6 else 3 if calib <= 12 else min(6, calib // 3 + 1)
    return {"calib_width": calib, "kernel_width": int(kernel)}


def estimate_maps(kspace: np.ndarray, mask: np.ndarray | None, path) -> tuple[np.ndarray, dict]:
    """ESPIRiT maps for every slice of multi-coil k-space (slices, coils, kx, ky), on the
    coarse calibration grid (:func:`espirit_slice`); with the resolved parameters."""
    from diffrecon.operators.coils import espirit_params

    cal = calibration_params(kspace.shape, mask, path)
    params = espirit_params(kspace.shape, mask=mask, grid="auto", **cal)
    return np.stack([espirit_slice(k, mask, path, cal) for k in kspace]), params


def read_coil_maps(path, slice_shape, sel) -> np.ndarray:
    """Coil maps (len(sel), coils, kx, ky) of scan slices ``sel`` from a side file (dataset
    ``coil_maps``, checked against the scan's per-slice k-space shape (coils, kx, ky)). A
    partial side file (``diffrecon calib --slices``) also holds ``slices``, the scan slice
    of each map; without it map i is scan slice i."""
    from diffrecon.datasets.io import check_shape, open_h5_checked, read_array

    with open_h5_checked(path) as f:
        held = read_array(f, "slices", kinds="iu", ndim=1, required=False)
        if "coil_maps" not in f:
            read_array(f, "coil_maps", kinds="c", ndim=4)  # the missing-dataset error
        n = f["coil_maps"].shape[0]
        held = list(range(n)) if held is None else [int(i) for i in held]
        if len(held) != n:
            raise InputError(f"{path}: dataset 'slices' has {len(held)} entries but "
                             f"'coil_maps' {n} slices, expected one scan slice index per map")
        missing = sorted(set(sel) - set(held))
        if missing:
            raise InputError(f"{path}: dataset 'coil_maps' lacks scan slice(s) "
                             f"{', '.join(map(str, missing))} (it holds slices "
                             f"{format_slices(held)}); run diffrecon calib --slices for them")
        where = {k: i for i, k in enumerate(held)}
        rows = sorted({where[k] for k in sel})  # h5py reads increasing indices
        maps = read_array(f, "coil_maps", kinds="c", ndim=4, index=rows)
        maps = maps[[rows.index(where[k]) for k in sel]]
    check_shape(path, "coil_maps", maps.shape[1:], tuple(slice_shape),
                "(coils, kx, ky) of the scan's 'kspace'")
    from diffrecon.datasets.fastmri import check_coil_maps

    check_coil_maps(path, maps, sel)  # all-zero or absurdly scaled maps (issue 18)
    return maps.astype(np.complex64)
