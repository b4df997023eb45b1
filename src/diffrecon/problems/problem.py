"""The ``Problem`` a scan file becomes, and the slice-selection parser."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffrecon.errors import InputError

from .normalise import Normaliser


@dataclass
class Problem:
    """One scan ready to solve, in the prior's units.

    Per selected slice k = ``slices[j]``: ``measurements[j]`` (1, ...) and ``physics[j]`` (a
    deepinv physics whose noise level is in prior units) and ``normalisers[j]`` (prior units
    <-> scan units). ``channels`` of the signal (2: real/imag for MRI), ``crop`` the MRI
    reconSpace (H, W) the written image is cropped to (None: no crop), ``normalisation`` the
    scale rule (provenance), ``meta`` the acquisition facts a result records (mask, coil
    maps source, noise level, operator parameters).
    """

    path: Path
    modality: str                             # "mri" | "ct" | "image"
    slices: list[int]
    measurements: list[torch.Tensor]
    physics: list[Any]
    normalisers: list[Normaliser]
    channels: int
    normalisation: str
    crop: tuple[int, int] | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    # per slice, (H, W) bool or None: where the image is observed (MRI: where the coil maps
    # are nonzero). Outside, nothing but the prior speaks (ESPIRiT maps vanish where there is
    # no signal), so written images are zero there, as in SENSE practice.
    supports: list[Any] | None = None

    def scan_image(self, x: np.ndarray, std: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """A slice in prior layout (C, H, W), data units -> (the image a result file stores,
        the complex image or None). MRI: magnitude of the complex image (for ``std``:
        sqrt(sd_re^2 + sd_im^2)) and the complex image, both cropped to reconSpace; CT: (H, W);
        images: (C, H, W)."""
        if self.modality == "mri":
            c = x[0] + 1j * x[1]
            mag = np.sqrt(x[0] ** 2 + x[1] ** 2)
            if self.crop is not None:
                from diffrecon.datasets.fastmri import center_crop

                mag, c = center_crop(mag, self.crop), center_crop(c, self.crop)
            return mag, (None if std else c)
        if self.modality == "ct":
            return x[0], None
        return x, None


def parse_slices(spec) -> list[int] | None:
    """'0,2,5-7' / [0, 2] / 3 / None -> sorted unique slice indices (None = all)."""
    if spec is None or spec == "" or spec == "all":
        return None
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, str):
        out = []
        try:
            for part in spec.split(","):
                part = part.strip()
                if "-" in part[1:]:
                    a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                    out.extend(range(int(a), int(b) + 1))
                else:
                    out.append(int(part))
        except ValueError:
            raise InputError(f"--slices {spec!r} is not valid; expected indices like "
                             f"'0,2,5-7'") from None
        spec = out
    idx = sorted({int(i) for i in spec})
    if not idx or min(idx) < 0:
        raise InputError(f"--slices {spec!r} is not valid; expected non-negative indices")
    return idx
