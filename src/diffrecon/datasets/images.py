"""Image scan files for deblurring, super-resolution and inpainting.

Layout::

    measurement   float32 (slices, C, h, w): degraded images y = A(x) + n
    image         optional float32 (slices, C, H, W): ground truth x (simulated scans)
    kernel        float (kh, kw), only for blur with kernel_type = "custom"
    mask          bool (H, W), only for inpaint (True = observed pixel; y is 0 elsewhere)
    attrs         operator = "blur" | "superres" | "inpaint", noise_sigma (std of the additive
                  Gaussian noise, image units), and per operator:
                    blur:     kernel_type (gaussian | motion | uniform | custom), kernel_width
                              (gaussian std / motion length / box side, px), kernel_size
                              (optional, odd px), kernel_angle (degrees, motion), boundary
                              (circular | reflect | valid)
                    superres: factor (2 | 4), kind (bicubic | box), boundary (circular |
                              reflect), image_size (H, W) of the high-resolution image
                    inpaint:  optional mask_kind (random | box), mask_fraction, mask_seed,
                              mask_box (top, left, height, width): how ``mask`` was made

The operator parameters round-trip to the factory call: ``scan.physics()`` is
``operators.blur(kernel_type or kernel, width=kernel_width, size=kernel_size,
angle=kernel_angle, boundary=boundary, noise_sigma=noise_sigma)``,
``operators.superres(factor, img_size=(C, *image_size), kind=kind, boundary=boundary,
noise_sigma=noise_sigma)`` or ``operators.inpaint((C, H, W), kind=mask_kind,
fraction=mask_fraction, box=mask_box, seed=mask_seed, noise_sigma=noise_sigma)`` (a file
with only a ``mask`` dataset gets deepinv ``Inpainting`` on that mask), so it reproduces the
operator that made a simulated measurement.
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
from diffrecon.errors import InputError, as_input_error

OPERATORS = ("blur", "superres", "inpaint")
KERNEL_TYPES = ("gaussian", "motion", "uniform", "custom")
BLUR_DEFAULTS = {"kernel_type": "gaussian", "kernel_width": 2.0, "kernel_angle": 0.0,
                 "boundary": "circular", "noise_sigma": 0.0}
SUPERRES_DEFAULTS = {"factor": 4, "kind": "bicubic", "boundary": "circular", "noise_sigma": 0.0}


@dataclass
class ImageScan:
    """An image-restoration scan in memory (see module docstring)."""

    measurement: np.ndarray
    operator: str
    params: dict[str, Any] = field(default_factory=dict)
    image: np.ndarray | None = None
    kernel: np.ndarray | None = None
    mask: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_slices(self) -> int:
        return self.measurement.shape[0]

    @property
    def channels(self) -> int:
        return self.measurement.shape[1]

    @property
    def noise_sigma(self) -> float:
        return float(self.params.get("noise_sigma", 0.0))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the signal to reconstruct."""
        c, h, w = self.measurement.shape[1:]
        if self.operator == "superres":
            if "image_size" in self.params:
                h, w = (int(v) for v in self.params["image_size"])
            else:
                f = int(self.params.get("factor", SUPERRES_DEFAULTS["factor"]))
                h, w = h * f, w * f
        elif self.operator == "blur" and self.params.get("boundary") == "valid":
            kh, kw = self._kernel_shape()
            h, w = h + kh - 1, w + kw - 1
        return c, h, w

    def _kernel_shape(self) -> tuple[int, int]:
        from diffrecon.operators.blur import make_kernel

        return tuple(make_kernel(**self._kernel_kwargs()).shape)

    def _kernel_kwargs(self) -> dict[str, Any]:
        p = {**BLUR_DEFAULTS, **self.params}
        kernel = self.kernel if p["kernel_type"] == "custom" else p["kernel_type"]
        size = p.get("kernel_size")
        return {"kernel": kernel, "width": float(p["kernel_width"]),
                "size": None if size is None else int(size), "angle": float(p["kernel_angle"])}

    def physics(self, device=None, noise_sigma: float | None = None):
        """The forward operator that produced ``measurement`` (see module docstring);
        ``noise_sigma`` overrides the file's value."""
        sigma = self.noise_sigma if noise_sigma is None else float(noise_sigma)
        if self.operator == "blur":
            from diffrecon.operators.blur import blur

            p = {**BLUR_DEFAULTS, **self.params}
            return blur(**self._kernel_kwargs(), boundary=p["boundary"], noise_sigma=sigma,
                        device=device)
        if self.operator == "superres":
            from diffrecon.operators.superres import superres

            p = {**SUPERRES_DEFAULTS, **self.params}
            return superres(int(p["factor"]), img_size=self.image_shape, kind=p["kind"],
                            boundary=p["boundary"], noise_sigma=sigma, device=device)
        return _inpaint_physics(self, sigma, device)


def _inpaint_physics(scan: ImageScan, sigma: float, device):
    """``operators.inpaint`` from the mask parameters when the file has them (simulated
    scans), else deepinv ``Inpainting`` on the stored ``mask``."""
    import torch
    from deepinv.physics import GaussianNoise, Inpainting

    from diffrecon.operators.inpaint import inpaint

    p = scan.params
    if "mask_kind" in p:
        box = p.get("mask_box")
        phys = inpaint(scan.image_shape, kind=p["mask_kind"],
                       fraction=float(p.get("mask_fraction", 0.5)),
                       box=None if box is None else [int(b) for b in box],
                       seed=int(p.get("mask_seed", 0)), noise_sigma=sigma, device=device)
        made = phys.mask.reshape(scan.mask.shape).bool().cpu().numpy()
        if not np.array_equal(made, scan.mask):
            raise InputError(f"{scan.path}: dataset 'mask' differs from the mask of attributes "
                             f"'mask_kind', 'mask_fraction', 'mask_seed', expected them to agree")
        return phys
    mask = torch.as_tensor(np.asarray(scan.mask, dtype=np.float32))[None, None]
    dev = torch.device("cpu") if device is None else torch.device(device)
    return Inpainting(img_size=scan.image_shape, mask=mask.to(dev), device=dev,
                      noise_model=GaussianNoise(sigma=torch.tensor(sigma, dtype=torch.float64)))


_PARAM_KEYS = {"blur": ("kernel_type", "kernel_width", "kernel_size", "kernel_angle",
                        "boundary", "noise_sigma"),
               "superres": ("factor", "kind", "boundary", "image_size", "noise_sigma"),
               "inpaint": ("mask_kind", "mask_fraction", "mask_seed", "mask_box",
                           "noise_sigma")}


def read_image_scan(path: str | os.PathLike, slices=None) -> ImageScan:
    """Read and validate an image scan file (read-only); ``slices`` as in ``read_mri_scan``."""
    path = Path(path)
    with open_h5_checked(path) as f:
        index = slice_selection(f, "measurement", slices)
        y = read_array(f, "measurement", kinds="f", ndim=4, index=index)
        x = read_array(f, "image", kinds="f", ndim=4, required=False, index=index)
        attrs = attrs_to_dict(f.attrs)
        op = attrs.get("operator")
        if op is None:
            raise InputError(f"{path}: missing attribute 'operator', expected one of "
                             f"{', '.join(OPERATORS)}")
        if op not in OPERATORS:
            raise InputError(f"{path}: attribute 'operator' is {op!r}, expected one of "
                             f"{', '.join(OPERATORS)}")
        params = {k: attrs.pop(k) for k in _PARAM_KEYS[op] if k in attrs}
        attrs.pop("operator")
        kernel = mask = None
        if op == "blur" and params.get("kernel_type", "gaussian") == "custom":
            kernel = read_array(f, "kernel", kinds="fiu", ndim=2)
            if not kernel.sum() != 0:
                raise InputError(f"{path}: dataset 'kernel' sums to 0, expected a kernel with "
                                 f"non-zero sum")
        if op == "inpaint":
            mask = read_array(f, "mask", kinds="biuf", ndim=2)
            check_shape(path, "mask", mask.shape, y.shape[2:], "the measurement's (H, W)")
            if not np.isin(mask, (0, 1)).all():
                raise InputError(f"{path}: dataset 'mask' has values other than 0 and 1, "
                                 f"expected a binary pixel mask")
            mask = mask.astype(bool)
    _check_params(path, op, params)
    scan = ImageScan(measurement=y.astype(np.float32, copy=False), operator=op, params=params,
                     image=None if x is None else x.astype(np.float32, copy=False),
                     kernel=kernel, mask=mask, attrs=attrs, path=path)
    if x is not None:
        try:
            shape = scan.image_shape  # a blur kernel the operator refuses: bad input
        except ValueError as exc:
            raise as_input_error(exc, str(path)) from exc
        check_shape(path, "image", x.shape, (y.shape[0], *shape),
                    f"(slices, C, H, W) of the {op} operator's input")
    return scan


def _check_params(path, op: str, p: dict[str, Any]) -> None:
    def bad(key, want):
        raise InputError(f"{path}: attribute '{key}' is {p[key]!r}, expected {want}")

    def number(key, low=0.0, strict=False):
        v = p.get(key)
        if v is None:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or (
                v <= low if strict else v < low):
            bad(key, f"a number {'>' if strict else '>='} {low:g}")

    number("noise_sigma")
    if op == "blur":
        if p.get("kernel_type", "gaussian") not in KERNEL_TYPES:
            bad("kernel_type", f"one of {', '.join(KERNEL_TYPES)}")
        number("kernel_width", strict=True)
        number("kernel_size", strict=True)
        if p.get("boundary", "circular") not in ("circular", "reflect", "valid"):
            bad("boundary", "circular, reflect or valid")
    elif op == "superres":
        if p.get("factor", 4) not in (2, 4):
            bad("factor", "2 or 4")
        if p.get("kind", "bicubic") not in ("bicubic", "box"):
            bad("kind", "bicubic or box")
        if p.get("boundary", "circular") not in ("circular", "reflect"):
            bad("boundary", "circular or reflect")
        if "image_size" in p:
            size = np.asarray(p["image_size"])
            if size.shape != (2,) or size.dtype.kind not in "iu" or (size < 1).any():
                bad("image_size", "two positive integers (H, W)")
            p["image_size"] = tuple(int(s) for s in size)
    elif op == "inpaint":
        if p.get("mask_kind", "random") not in ("random", "box"):
            bad("mask_kind", "random or box")
        number("mask_fraction")


def write_image_scan(path: str | os.PathLike, scan: ImageScan) -> Path:
    """Write ``scan`` atomically in the image layout. Returns the path."""
    path = Path(path)
    y = np.asarray(scan.measurement, dtype=np.float32)
    if y.ndim != 4:
        raise InputError(f"measurement for {path} has shape {y.shape}, expected "
                         f"(slices, C, h, w)")
    if scan.operator not in OPERATORS:
        raise InputError(f"operator for {path} is {scan.operator!r}, expected one of "
                         f"{', '.join(OPERATORS)}")
    params = {k: v for k, v in scan.params.items() if v is not None}
    if scan.operator == "blur" and params.get("kernel_type") == "custom" and scan.kernel is None:
        raise InputError(f"kernel for {path} is missing, expected a 2D array for "
                         f"kernel_type 'custom'")
    if scan.operator == "inpaint" and scan.mask is None:
        raise InputError(f"mask for {path} is missing, expected an (H, W) mask for inpaint")
    with atomic_h5(path) as f:
        f.create_dataset("measurement", data=y)
        if scan.image is not None:
            f.create_dataset("image", data=np.asarray(scan.image, dtype=np.float32))
        if scan.kernel is not None:
            f.create_dataset("kernel", data=np.asarray(scan.kernel, dtype=np.float32))
        if scan.mask is not None:
            f.create_dataset("mask", data=np.asarray(scan.mask).astype(bool))
        write_attrs(f, {**scan.attrs, **params, "operator": scan.operator})
    return path
