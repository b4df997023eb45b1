"""Inpainting y = m . x (deepinv ``Inpainting``, a DecomposablePhysics: closed-form normal
A^T A = diag(m), pseudo-inverse and prox). The mask is per pixel, shared by all channels;
y has the image's shape with zeros at missing pixels (noise is added to kept pixels only).
"""

from __future__ import annotations

import numpy as np
import torch
from deepinv.physics import Inpainting

from diffrecon.operators._common import gaussian_noise, image_size, resolve_device

KINDS = ("random", "box")


def inpaint_mask(shape: tuple[int, int], *, kind: str = "random", fraction: float = 0.5,
                 box=None, seed: int = 0) -> np.ndarray:
    """Boolean (H, W) mask, True = observed.

    ``random``: exactly round(fraction H W) pixels kept, chosen by
    ``np.random.default_rng(seed).permutation``; ``box``: everything kept except the hole
    ``box = (top, left, height, width)``.
    """
    h, w = shape
    if kind == "random":
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"inpaint: fraction must be in [0, 1], got {fraction!r}.")
        keep = np.random.default_rng(seed).permutation(h * w) < round(fraction * h * w)
        return keep.reshape(h, w)
    if kind == "box":
        if box is None or len(box) != 4:
            raise ValueError("inpaint: kind='box' needs box=(top, left, height, width).")
        top, left, bh, bw = (int(v) for v in box)
        if top < 0 or left < 0 or bh < 1 or bw < 1 or top + bh > h or left + bw > w:
            raise ValueError(f"inpaint: box {tuple(box)!r} must lie inside the {h}x{w} image.")
        mask = np.ones((h, w), dtype=bool)
        mask[top:top + bh, left:left + bw] = False
        return mask
    raise ValueError(f"inpaint: unknown kind {kind!r}; valid: {', '.join(KINDS)}.")


def inpaint(img_size, *, kind: str = "random", fraction: float = 0.5, box=None, seed: int = 0,
            noise_sigma: float = 0.0, device=None, dtype=torch.float32) -> Inpainting:
    """Inpainting operator on (B, C, H, W) signals; ``img_size`` (C, H, W) or (H, W).

    ``kind="random"`` keeps ``fraction`` of the pixels (seeded); ``kind="box"`` removes the
    rectangle ``box=(top, left, height, width)``. The mask is ``physics.mask`` (1, 1, H, W).
    """
    c, h, w = image_size(img_size, "inpaint")
    mask = inpaint_mask((h, w), kind=kind, fraction=fraction, box=box, seed=seed)
    device = resolve_device(device)
    return Inpainting(img_size=(c, h, w), mask=torch.as_tensor(mask, dtype=dtype)[None, None],
                      device=device, noise_model=gaussian_noise(noise_sigma, "inpaint"))
