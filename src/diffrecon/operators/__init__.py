"""Forward models y = A(x) + n as deepinv physics, built by factory functions, plus the
masks and coil calibration deepinv lacks. Every operator carries a deepinv
``GaussianNoise`` (``float(physics.noise_model.sigma) == noise_sigma``, default 0).
Bad arguments raise ``ValueError`` (``TypeError`` for a wrong kind of object) naming the
function and parameter; the file readers, ``problems`` and the CLI turn them into one-line
``InputError`` with the file's name."""

from diffrecon.operators.blur import blur, make_kernel
from diffrecon.operators.checks import adjointness_error
from diffrecon.operators.coils import birdcage_maps, estimate_coil_maps, rss
from diffrecon.operators.ct import ct
from diffrecon.operators.inpaint import inpaint, inpaint_mask
from diffrecon.operators.masks import acceleration_of, fastmri_mask, poisson_mask
from diffrecon.operators.matrix import matrix
from diffrecon.operators.mri import kspace_to_tensor, mri, tensor_to_kspace
from diffrecon.operators.superres import superres

__all__ = [
    "acceleration_of", "adjointness_error", "birdcage_maps", "blur", "ct", "estimate_coil_maps",
    "fastmri_mask", "inpaint", "inpaint_mask", "kspace_to_tensor", "make_kernel", "matrix",
    "mri", "poisson_mask", "rss", "superres", "tensor_to_kspace",
]
