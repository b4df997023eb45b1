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


    def batches(self, indices: list[int], size: int) -> list[list[int]]:
        """``indices`` (positions in ``slices``, in order) cut into runs of at most ``size``
        consecutive positions whose operators :meth:`stack` can join (same operator class,
        buffer shapes and shared parts, all noiseless or all noisy: e.g. MRI slices whose
        coil compression kept the same number of virtual coils)."""
        out: list[list[int]] = []
        for j in indices:
            if out and len(out[-1]) < size and _stack_key(self, out[-1][0]) == _stack_key(
                    self, j):
                out[-1].append(j)
            else:
                out.append([j])
        return out

    def stack(self, indices: list[int]) -> tuple[torch.Tensor, Any]:
        """(measurements (N, ...), one physics for the N slices at positions ``indices``):
        the per-slice operators joined along the batch axis (per-slice buffers such as MRI
        coil maps concatenated, shared ones kept) with one noise level per row
        (``noise_model.sigma`` of shape (N,); solvers with ``Solver.row_noise``). Slice b's
        rows are what ``physics[indices[b]]`` gives it alone; ValueError when the operators
        cannot be joined (:meth:`batches` avoids that)."""
        if len(indices) == 1:
            j = indices[0]
            return self.measurements[j], self.physics[j]
        return (torch.cat([self.measurements[j] for j in indices]),
                stack_physics([self.physics[j] for j in indices]))


NOISE = "noise_model"


def _stack_key(problem: Problem, j: int) -> tuple:
    """What must agree for two slices' operators to be joined (no tensor data compared)."""
    from diffrecon.recon.common import noise_sigma

    p = problem.physics[j]
    return (type(p), tuple(problem.measurements[j].shape),
            tuple((k, None if b is None else tuple(b.shape)) for k, b in p._buffers.items()),
            tuple((k, id(m)) for k, m in p._modules.items() if k != NOISE),
            tuple((k, id(v)) for k, v in p._parameters.items()), noise_sigma(p) == 0)


def stack_physics(physics: list) -> Any:
    """One deepinv physics for a batch of per-measurement operators of the same class (see
    ``Problem.stack``): a shallow copy of the first whose buffers that differ between the
    operators are concatenated along their leading (batch) axis of size 1, submodules and
    parameters shared (the same objects), noise levels one per row."""
    import copy

    from diffrecon.operators._common import gaussian_noise
    from diffrecon.recon.common import noise_sigma

    first = physics[0]
    if any(type(p) is not type(first) for p in physics):
        raise ValueError("cannot stack operators of different classes")
    clone = copy.copy(first)
    for attr in ("_modules", "_buffers", "_parameters"):
        setattr(clone, attr, dict(getattr(first, attr)))
    for name, buf in first._buffers.items():
        bufs = [p._buffers.get(name) for p in physics]
        if all(b is buf for b in bufs):
            continue
        if buf is None or any(b is None or b.shape != buf.shape for b in bufs):
            raise ValueError(f"cannot stack operators: buffer {name!r} differs in shape")
        if all(torch.equal(b, buf) for b in bufs[1:]):
            continue  # the same values (e.g. one MRI mask built once per slice)
        if buf.ndim == 0 or buf.shape[0] != 1:
            raise ValueError(f"cannot stack operators: buffer {name!r} has no batch axis")
        clone._buffers[name] = torch.cat(bufs)
    for kind in ("_modules", "_parameters"):
        for name, value in getattr(first, kind).items():
            if name != NOISE and any(getattr(p, kind).get(name) is not value for p in physics):
                raise ValueError(f"cannot stack operators: {name!r} is not shared")
    clone.noise_model = gaussian_noise(0.0, "stack")
    clone.noise_model.update_parameters(sigma=torch.tensor([noise_sigma(p) for p in physics],
                                                           dtype=torch.float64))
    return clone


def format_slices(indices) -> str:
    """Slice indices in :func:`parse_slices`' syntax: [0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'
    ('none' when empty)."""
    idx = [int(i) for i in indices]
    parts, start = [], None
    for i, k in enumerate(idx):
        if start is None:
            start = k
        if i + 1 == len(idx) or idx[i + 1] != k + 1:
            parts.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ", ".join(parts) or "none"


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
