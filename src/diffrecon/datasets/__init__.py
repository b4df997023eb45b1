"""Scan files (fastMRI MRI, CT, image restoration), result files, phantoms and simulation.

Layouts are documented in ``fastmri``, ``ct``, ``images`` and ``io`` (results). Readers
validate everything and raise one-line ``InputError``s; writers are atomic.
"""

import importlib

# Names -> submodule, imported on first use (PEP 562): reading a result file or a reference
# (evaluate, view, calibrate) must not pay for the CT operators' deepinv / torchvision import.
_LAZY = {
    **dict.fromkeys(("CTScan", "read_ct_scan", "write_ct_scan"), "ct"),
    **dict.fromkeys(("MRIScan", "center_crop", "mask_seed_from_filename", "read_mri_scan",
                     "write_mri_scan"), "fastmri"),
    **dict.fromkeys(("ImageScan", "read_image_scan", "write_image_scan"), "images"),
    **dict.fromkeys(("Result", "atomic_h5", "detect_modality", "open_h5_checked",
                     "read_result", "sha256_file", "write_result"), "io"),
    **dict.fromkeys(("simulate_ct", "simulate_image", "simulate_mri"), "simulate"),
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"diffrecon.datasets.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'diffrecon.datasets' has no attribute {name!r}")


def read_scan(path, slices=None):
    """Read any scan file: ``MRIScan``, ``CTScan`` or ``ImageScan`` by ``detect_modality``
    (a result file raises ``InputError``)."""
    from diffrecon.errors import InputError

    modality = __getattr__("detect_modality")(path)
    readers = {m: __getattr__(f"read_{m}_scan") for m in ("mri", "ct", "image")}
    if modality not in readers:
        raise InputError(f"{path}: is a reconstruction result file, expected a scan file "
                         f"(kspace, sinogram or measurement)")
    return readers[modality](path, slices=slices)


__all__ = [
    "CTScan", "ImageScan", "MRIScan", "Result", "atomic_h5", "center_crop", "detect_modality",
    "mask_seed_from_filename", "open_h5_checked", "read_ct_scan", "read_image_scan",
    "read_mri_scan", "read_result", "read_scan", "sha256_file", "simulate_ct", "simulate_image",
    "simulate_mri", "write_ct_scan", "write_image_scan", "write_mri_scan", "write_result",
]
