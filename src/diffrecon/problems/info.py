"""``diffrecon info``: what a scan or result file holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from diffrecon.errors import as_input_error

from .mri import kspace_noise_sigma
from .mri_coils import acs_width


def describe_file(path) -> dict[str, Any]:
    """What a scan or result file holds: modality, datasets (shape, dtype), and per
    modality coils / mask and acceleration / noise estimate / views / operator, or a
    result's provenance. Invalid scans raise ``InputError`` (validated like ``run``)."""
    from diffrecon.datasets.io import detect_modality, open_h5_checked

    path = Path(path)
    modality = detect_modality(path)
    with open_h5_checked(path) as f:
        datasets = {}

        def visit(name, obj):
            if hasattr(obj, "shape"):
                datasets[name] = {"shape": list(obj.shape), "dtype": str(obj.dtype)}

        f.visititems(visit)
    out: dict[str, Any] = {"file": str(path), "modality": modality, "datasets": datasets,
                           "size_bytes": path.stat().st_size}
    if modality == "mri":
        from diffrecon.datasets.fastmri import read_mri_scan

        scan = read_mri_scan(path)
        sigma = scan.attrs.get("noise_sigma")
        out.update({
            "slices": scan.n_slices, "coils": scan.n_coils, "multicoil": scan.multicoil,
            "kspace_shape": list(scan.kspace.shape), "recon_size": list(scan.recon_size),
            "fully_sampled": scan.mask is None,
            "acceleration": None if scan.mask is None else round(scan.acceleration, 4),
            "sampled_lines": None if scan.mask is None else int(scan.mask.sum()),
            "acs_lines": None if scan.mask is None else acs_width(scan.mask),
            "coil_maps": scan.coil_maps is not None,
            "noise_sigma": float(sigma) if isinstance(sigma, int | float) else None,
            "noise_sigma_estimate": kspace_noise_sigma(scan.kspace, scan.mask),
            "ground_truth": [k for k in ("reconstruction_rss", "reconstruction_esc",
                                         "ground_truth_complex") if k in datasets],
            "attrs": {k: v for k, v in scan.attrs.items() if k != "simulation"},
        })
    elif modality == "ct":
        from diffrecon.datasets.ct import read_ct_scan

        scan = read_ct_scan(path)
        out.update({"slices": scan.n_slices, "views": int(scan.angles.size),
                    "detectors": int(scan.sinogram.shape[-1]), "image_size": scan.image_size,
                    "angle_range_deg": float(np.degrees(np.ptp(scan.angles))),
                    "noise_sigma": scan.noise_sigma,
                    "ground_truth": scan.ground_truth is not None})
    elif modality == "image":
        from diffrecon.datasets.images import read_image_scan

        scan = read_image_scan(path)
        try:
            shape = list(scan.image_shape)
        except ValueError as exc:  # a blur kernel the operator refuses
            raise as_input_error(exc, str(path)) from exc
        out.update({"slices": scan.n_slices, "operator": scan.operator,
                    "parameters": scan.params, "image_shape": shape,
                    "noise_sigma": scan.noise_sigma, "ground_truth": scan.image is not None})
    else:
        from diffrecon.datasets.io import read_result

        res = read_result(path)
        keep = ("input", "input_sha256", "modality", "solver", "solver_options", "prior",
                "prior_sha256", "seed", "num_samples", "device", "nfe", "wall_time_s",
                "diffrecon_version", "torch_version", "acceleration", "mask_source",
                "coil_maps_source", "slices", "data_residual_per_slice",
                "smc_lineages_per_slice", "noise_chi_per_slice", "scale_per_slice",
                "normalisation")
        out.update({"slices": int(res.reconstruction.shape[0]),
                    "reconstruction_shape": list(res.reconstruction.shape),
                    "samples": None if res.samples is None else int(res.samples.shape[1]),
                    "provenance": {k: res.attrs[k] for k in keep if k in res.attrs}})
    return json.loads(json.dumps(out, sort_keys=True, default=str))

