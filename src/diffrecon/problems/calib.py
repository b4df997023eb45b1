"""``diffrecon calib``: ESPIRiT coil maps for a multi-coil MRI scan, stored in the scan or a
side file (both written through ``datasets.io.atomic_h5``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from diffrecon.errors import InputError, as_input_error

from .mri_coils import estimate_maps


def calibrate_file(scan_path, output=None, *, overwrite: bool = False,
                   slices=None) -> dict[str, Any]:
    """ESPIRiT coil maps for every slice (or the ``slices``: list, int or '0,2,5-7') of a
    multi-coil MRI scan, on the coarse calibration grid (``problems.mri_coils.estimate_maps``).

    ``output`` None: the maps are added to the scan itself as ``coil_maps`` (the file is
    rewritten atomically: its datasets and attributes copied into a temporary file, the maps
    added, then renamed over it; nothing else in the file changes). Otherwise they go to the
    side file ``output`` (dataset ``coil_maps`` plus the calibration parameters), usable with
    ``diffrecon run --coil-maps``. With ``slices`` the side file is partial: it also holds
    dataset ``slices`` (the scan slice of each map) and serves runs on those slices; the
    scan itself can only take maps of every slice. Returns a summary.
    """
    from diffrecon.datasets.fastmri import read_mri_scan
    from diffrecon.datasets.io import (
        atomic_h5,
        check_output_path,
        detect_modality,
        open_h5_checked,
        sha256_file,
        write_attrs,
    )

    from .problem import parse_slices

    scan_path = Path(scan_path)
    selected = parse_slices(slices)
    if selected is not None and output is None:
        raise InputError("--slices needs -o/--output: the maps of some slices go to a side "
                         "file (the scan's own 'coil_maps' must cover every slice)")
    if detect_modality(scan_path) != "mri":
        raise InputError(f"{scan_path}: not an MRI scan (no 'kspace'); calib needs multi-coil "
                         f"k-space")
    scan = read_mri_scan(scan_path, slices=selected)
    if not scan.multicoil:
        raise InputError(f"{scan_path}: single-coil k-space (slices, kx, ky) needs no coil maps")
    if output is None and scan.coil_maps is not None and not overwrite:
        raise InputError(f"{scan_path}: already holds 'coil_maps'; pass --overwrite to replace "
                         f"them")
    if output is not None:
        check_output_path(Path(output), scan_path)
        if Path(output).exists() and not overwrite:
            raise InputError(f"-o/--output {output} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    try:
        maps, params = estimate_maps(scan.kspace, scan.mask, scan_path)
    except ValueError as exc:  # the ESPIRiT parameters refusing this scan's k-space
        raise as_input_error(exc, str(scan_path)) from exc
    attrs = {"coil_maps_method": "espirit", "coil_maps_params": params,
             "coil_maps_input_sha256": sha256_file(scan_path)}
    target = scan_path if output is None else Path(output)
    with atomic_h5(target) as f:
        if output is None:  # the scan itself: everything it holds, then the maps
            with open_h5_checked(scan_path) as src:
                for name in src:
                    if name != "coil_maps":
                        src.copy(src[name], f, name=name)
                for key in src.attrs:
                    f.attrs.create(key, src.attrs[key], dtype=src.attrs.get_id(key).dtype)
        f.create_dataset("coil_maps", data=maps)
        if selected is not None:
            f.create_dataset("slices", data=np.asarray(selected, dtype=np.int64))
        write_attrs(f, attrs)
    return {"scan": str(scan_path), "coil_maps": str(target), "shape": list(maps.shape),
            "slices": selected, "params": params,
            "wall_time_s": round(time.perf_counter() - t0, 3)}
