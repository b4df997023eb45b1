"""Super-resolution forward model y = S (h * x): anti-aliasing filter then decimation by
``factor`` (deepinv ``Downsampling``).

``kind="bicubic"``: Keys bicubic kernel (a = -0.5) stretched by ``factor`` (antialiased,
4 factor taps; equals ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``
away from the border), ``boundary`` padding (circular by default).
``kind="box"``: average pooling over factor x factor blocks (no padding needed).
Low-res pixel j is centred at high-res coordinate factor * j + (factor - 1) / 2 in both
kinds. Signals (B, C, H, W) -> (B, C, H / factor, W / factor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepinv.physics import Downsampling
from deepinv.physics.functional import bicubic_filter

from diffrecon.operators._common import gaussian_noise, image_size, resolve_device

KINDS = ("bicubic", "box")


def superres(factor: int, *, img_size, kind: str = "bicubic", boundary: str = "circular",
             noise_sigma: float = 0.0, device=None, dtype=torch.float32) -> Downsampling:
    """Downsampling operator, a deepinv ``Downsampling`` (LinearPhysics).

    ``factor`` 2 or 4; ``img_size`` (C, H, W) (or (H, W), one channel) with H and W multiples
    of ``factor``; ``kind`` bicubic | box; ``boundary`` circular | reflect (bicubic only).
    """
    if factor not in (2, 4):
        raise ValueError(f"superres: factor must be 2 or 4, got {factor!r}.")
    c, h, w = image_size(img_size, "superres")
    if h % factor or w % factor:
        raise ValueError(f"superres: img_size {img_size!r} must be divisible by factor {factor}.")
    device = resolve_device(device)
    if kind == "bicubic":
        if boundary not in ("circular", "reflect"):
            raise ValueError(f"superres: boundary must be circular or reflect, got {boundary!r}.")
        # deepinv centres an even 4f-tap filter half a pixel after a low-res sample; appending
        # f - 2 zero taps moves the centre to f j + (f - 1) / 2, so A equals torch's antialiased
        # bicubic ``interpolate`` away from the border (tested).
        pad = factor - 2
        filt = F.pad(bicubic_filter(factor).reshape(1, 1, 4 * factor, 4 * factor), (0, pad, 0, pad))
        padding = boundary
    elif kind == "box":
        filt = torch.full((1, 1, factor, factor), 1.0 / factor**2)
        padding = "valid"  # valid correlation at stride factor == average pooling
    else:
        raise ValueError(f"superres: unknown kind {kind!r}; valid: {', '.join(KINDS)}.")
    filt = filt.to(device=device, dtype=dtype)
    return Downsampling(img_size=(c, h, w), filter=filt / filt.sum(), factor=factor,
                        padding=padding, device=device,
                        noise_model=gaussian_noise(noise_sigma, "superres"))
