"""Fast CT normal operator: A^T A of ``operators.ct`` as one FFT convolution (Toeplitz
embedding on a 2N x 2N zero-padded grid), and the FFT convolution of the fan-beam FBP.

Kernel, derived from the projector itself (no fitting). One view of ``ct`` samples the image
bilinearly (hat w(x) w(y), w(t) = max(0, 1 - |t|)) at the lattice of points o + j a e +
k s d (detector spacing a, sample step s, ray direction d, detector axis e) and sums the
samples times s. Averaged over translations of that lattice relative to the pixel grid,
A_v^T A_v is the convolution with

    h_v(r) = (s / a) sum_{m in Z} B3(m s d_x - r_x) B3(m s d_y - r_y),

B3 = w * w the cubic B-spline: a line of B3 bumps through the origin along d. h = sum_v h_v
over the views is computed in closed form (16 B3 weights per point m s d; once per geometry,
cached) and is even, so its spectrum is real; the spectrum is clamped at 0 (it is
>= 0 up to rounding: each h_v is a positive-definite function), which makes the operator
symmetric positive semi-definite by construction: K x = crop(F^-1(H F(pad x))), H >= 0.

What is exact and what is not. Parallel beam: every ray lattice is a rotated copy of the same
lattice, so h is the phase-averaged A^T A exactly; the real operator departs from it by the
aliasing of the bilinear footprint (how a ray's samples fall on the pixel grid varies with
position, most for views near 0, pi / 4, pi / 2): relative error 0.6% on anatomy and
photographs, 4.7% on white noise (128 px, 180 views; 1.1% / 9% at 64 px, 64 views; 3% /
25% at 8 views). Fan beam (full 2 pi scans): the rays near the isocentre form the lattice
above with a = D du / Dsd (the detector spacing projected to the isocentre). The directions
of the lines through a point are the central rays' only at the isocentre; elsewhere they
are shifted by the fan angle under which the source sees the point, so h sums the lines of
``FAN_DIRECTIONS`` directions per view, spread evenly over one angular step (the average
over that shift, as the footprint is averaged over the lattice phase): white-noise error 20%
-> 14% (128 px, 180 views over 2 pi, clinical proportions D = 1.66 x field of view; 13% ->
11% at 64 px), and DDS 50 on four VALIDATION slices -0.07 to +0.44 dB from the exact
operator where the central directions alone lost 0.24-0.70 dB. The density of lines at
distance u from the isocentre grows as 1 / sqrt(1 - u^2 / D^2): image error 1.0%, and a
u^2 / (2 D^2) correction (three more convolutions) lowers it to 0.7% but did not change DDS
(64 and 128 px), so it is not used.

Not a drop-in A^T A: the error sits at high frequencies where K is small, so CG on K with
the exact A^T y amplifies it (100%+ image errors in 5 iterations); ``recon.common.
approximate_normal`` pairs K with the consistent right-hand side K x_d instead (DDS's
data term becomes ||x - x_d||_K^2; an exact last step changed nothing). ``ct(normal=
"auto")`` uses it on full scans (parallel pi, fan 2 pi) with >= N / 2 views per pi, where
x_d (iterated FBP) is close to a least-squares image.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from diffrecon.operators import _ct_kernels

_CACHE: dict[tuple, torch.Tensor] = {}  # spectra per geometry, dtype and device
FAN_DIRECTIONS = 4  # line directions per fan view (module docstring; 2: noise error 14.7%)
_CACHE_SIZE = 4


def line_kernel(n: int, angles: torch.Tensor, step: float, weight: float) -> torch.Tensor:
    """sum over views of weight * sum_m B3(m step d_x - r_x) B3(m step d_y - r_y), float64
    (2n, 2n), offset r = (r_x, r_y) stored at [r_y mod 2n, r_x mod 2n] for |r_x|, |r_y| <=
    n - 1 (the offsets between two pixels of an n x n image); d = (sin theta, cos theta).
    The sums run in ``operators._ct_kernels`` (numba; 16 B3 weights per point m step d)."""
    reach = int(math.ceil(math.sqrt(2) * n / step)) + 3
    m = torch.arange(-reach, reach + 1, dtype=torch.float64) * step
    h = _ct_kernels.line_kernel(n, angles, m) * weight
    return (h + torch.roll(h.flip(0, 1), (1, 1), (0, 1))) / 2  # even to the last bit


def _key(physics) -> tuple:
    geo = json.dumps(physics.geometry, sort_keys=True)
    angles = physics.angles.detach().cpu().to(torch.float64).numpy().tobytes()
    return physics.img_width, geo, physics.step, angles


def spectrum(physics, dtype: torch.dtype, device) -> torch.Tensor:
    """Real spectrum H >= 0 (2n, n + 1) of the Toeplitz kernel of a ``ct`` physics (module
    docstring), in ``dtype`` on ``device``; computed once per geometry (a module cache shared
    by the physics of one geometry) and kept on the physics (no host transfer per call)."""
    local = physics.__dict__.setdefault("_toeplitz_spectra", {})
    if (dtype, str(device)) not in local:
        local[dtype, str(device)] = _spectrum(physics, dtype, device)
    return local[dtype, str(device)]


def _spectrum(physics, dtype: torch.dtype, device) -> torch.Tensor:
    key = (_key(physics), dtype, str(device))
    if key not in _CACHE:
        n, geo = physics.img_width, physics.geometry
        angles, spread = physics.angles.detach().cpu().to(torch.float64), 1
        spacing = 1.0
        if geo["geometry"] == "fan":
            spacing = geo["dso_px"] * geo["du_px"] / geo["dsd_px"]
            spread = FAN_DIRECTIONS
            shifts = torch.arange(spread, dtype=torch.float64) * (physics.angle_step / spread)
            angles = (angles[:, None] + shifts).reshape(-1)
        h = line_kernel(n, angles, physics.step, physics.step / spacing / spread)
        spec = torch.fft.rfft2(h).real.clamp(min=0)
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = spec.to(device=device, dtype=dtype)
    return _CACHE[key]


def toeplitz_normal(physics, x: torch.Tensor) -> torch.Tensor:
    """K x ~ A^T A x for x (B, C, n, n): zero-pad to 2n x 2n, multiply the spectrum, crop.
    Two real FFTs of 2n x 2n per image (8.6 ms at n = 512 on one CPU core)."""
    n = x.shape[-1]
    h = spectrum(physics, x.dtype, x.device)
    out = torch.fft.irfft2(torch.fft.rfft2(x, s=(2 * n, 2 * n)) * h, s=(2 * n, 2 * n))
    return out[..., :n, :n]


def convolve(y: torch.Tensor, kernel: torch.Tensor, nd: int) -> torch.Tensor:
    """Linear convolution along the detector axis (-2) of y (B, C, nd, V) with ``kernel``
    (2 nd - 1,), centred (kernel index nd - 1 is lag 0); zero-padded FFT."""
    size = 1 << (3 * nd - 2).bit_length()
    kf = torch.fft.rfft(torch.roll(F.pad(kernel, (0, size - kernel.numel())), -(nd - 1)),
                        n=size)
    yf = torch.fft.rfft(y, n=size, dim=-2)
    return torch.fft.irfft(yf * kf[:, None], n=size, dim=-2)[..., :nd, :]
