"""Scan files (fastMRI MRI, CT, image restoration), result files, phantoms and simulation.

Layouts are documented in ``fastmri``, ``ct``, ``images`` and ``io`` (results). Readers
validate everything and raise one-line ``InputError``s; writers are atomic.
"""

from diffrecon.datasets.ct import CTScan, read_ct_scan, write_ct_scan
from diffrecon.datasets.fastmri import (
    MRIScan,
    center_crop,
    mask_seed_from_filename,
    read_mri_scan,
    write_mri_scan,
)
from diffrecon.datasets.images import ImageScan, read_image_scan, write_image_scan
from diffrecon.datasets.io import (
    Result,
    atomic_h5,
    detect_modality,
    open_h5_checked,
    read_result,
    sha256_file,
    write_result,
)
from diffrecon.datasets.simulate import simulate_ct, simulate_image, simulate_mri


def read_scan(path, slices=None):
    """Read any scan file: ``MRIScan``, ``CTScan`` or ``ImageScan`` by ``detect_modality``
    (a result file raises ``InputError``)."""
    from diffrecon.errors import InputError

    modality = detect_modality(path)
    readers = {"mri": read_mri_scan, "ct": read_ct_scan, "image": read_image_scan}
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
