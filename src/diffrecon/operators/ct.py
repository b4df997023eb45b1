"""2D CT: raw line integrals of the image, parallel beam (default) or fan beam, matrix-free
and chunked over views (bounded memory), with the EXACT adjoint and filtered
back-projection (FBP) as ``A_dagger``.

Units and layout. Images are square (B, 1, N, N); lengths are in pixels, so a sinogram
value is the line integral of the image in pixel lengths (a disc of value 1 and radius r px
projects to 2 r through its centre; an image of attenuation per mm times the pixel size in
mm gives dimensionless line integrals). Sinograms are (B, 1, n_detectors, views) (deepinv
layout). ``physics.angles`` holds the view angles in radians (float64).

Geometry. Pixel (row, col) sits at (col, row) in the plane (x along columns, y along
rows). The rotation centre (isocentre) is pixel (c, c) with c = (G - 1) / 2 - (G // 2 -
N // 2), G = ceil(sqrt(2) N) (deepinv's parallel-beam convention: c = N // 2 when G is odd,
e.g. N = 64, 256, 512, else (N - 1) / 2). At view angle theta the central ray runs along
d = (sin theta, cos theta) and the detector axis is e = (cos theta, -sin theta) (theta = 0:
rays down the columns, detector along the rows' direction).

- ``parallel``: detector j at offset (j - (n_detectors - 1) / 2) px along e, spacing 1 px;
  the ray through it is sampled at G points 1 px apart centred on the isocentre. Identical
  to deepinv ``Tomography(circle=False)`` (same sampling points).
- ``fan``: source at -D d (D = source-to-isocentre distance), detector at source-to-detector
  distance Dsd > D; ``detector="flat"``: element j at D_j = (Dsd - D) d + u_j e, u_j =
  (j - (n - 1) / 2) du (du the spacing on the detector); ``detector="curved"``
  (equiangular, arc of radius Dsd centred on the source, third-generation clinical
  scanners): fan angle gamma_j = (j - (n - 1) / 2) du / Dsd. Rays are sampled every
  ``step`` px from distance D - R to D + R from the source (R the half-diagonal plus 1 px),
  so the integral is in true arc length. Distances are given in mm with the pixel size in
  mm (converted to pixels internally).

Each ray sample is a bilinear interpolation of the image (zeros outside); ``A`` sums them
times the step and ``A_adjoint`` is the exact transpose of that sum. On the CPU (float32 /
float64) both run in ``operators._ct_kernels`` (numba ray marching over the samples inside the
image, 4-5x faster; memory: the rays' float64 coordinates and, for A^T, 8 float64 image
buffers). Elsewhere they run on ``grid_sample`` and its input gradient, chunk by chunk:
chunks hold about ``chunk_samples`` ray samples (times the batch size), so memory does not
grow with the number of views. The two agree to float rounding (tests/test_ct_kernels.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from deepinv.physics import LinearPhysics
from deepinv.physics.functional.radon import RampFilter

from diffrecon.operators import _ct_kernels, ct_normal
from diffrecon.operators._common import gaussian_noise, image_size, resolve_device

GEOMETRIES = ("parallel", "fan")
DETECTORS = ("flat", "curved")
ANGLE_SLACK = 0.1  # radians: a set of angles may span up to 2 pi + ANGLE_SLACK
CHUNK_SAMPLES = 2**20  # ray samples per chunk (float32: 12 MB of grid and samples)


def default_detectors(n: int) -> int:
    """deepinv's detector count for an n x n image: ceil(sqrt(2) n) in float32 arithmetic."""
    return int((torch.ones(1).mul(2).sqrt() * n).ceil())


def rotation_centre(n: int) -> float:
    """Pixel index (row = col) of the rotation centre of an n x n image (module docstring)."""
    g = default_detectors(n)
    return (g - 1) / 2 - (g // 2 - n // 2)


def check_angles(angles, name: str = "ct: angles") -> np.ndarray:
    """Validate view angles in radians and return them as float64 (n,).

    Errors (``ValueError``, one line starting with ``name``): not a non-empty 1D array,
    non-finite values, all equal (n > 1), a span max - min over 2 pi + ``ANGLE_SLACK`` or
    integer values only (n >= 3): both look like degrees."""
    try:
        a = np.asarray(angles, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a 1D array of radians, got "
                         f"{type(angles).__name__}.") from None
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1D array of radians, got shape "
                         f"{a.shape}.")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite values (NaN or inf), expected radians.")
    span = float(a.max() - a.min())
    if a.size > 1 and span == 0:
        raise ValueError(f"{name} are all equal ({a[0]!r}), expected distinct view angles "
                         f"in radians.")
    if span > 2 * math.pi + ANGLE_SLACK:
        raise ValueError(f"{name} span {span:.4g} > 2*pi: expected radians, these look like "
                         f"degrees (multiply by pi/180).")
    if a.size >= 3 and np.all(a == np.round(a)):
        raise ValueError(f"{name} are all integers ({a[0]:g}, {a[1]:g}, ...): expected "
                         f"radians, these look like degrees (multiply by pi/180).")
    return a


class _CT(LinearPhysics):
    """Chunked ray-driven CT projector (see the module docstring); build with :func:`ct`."""

    def __init__(self, n: int, angles: torch.Tensor, n_detectors: int, angle_step: float,
                 geometry: dict, dtype, device, noise_model, chunk_samples: int, normal: str,
                 full_scan: bool):
        super().__init__(noise_model=noise_model, device=device)
        self.img_width, self.normal = n, normal
        self.full_scan = full_scan  # full angular range, >= N / 2 views per pi: FBP is close
        self.register_buffer("angles", angles.to(device), persistent=False)
        self.n_detectors = n_detectors
        self.angle_step = angle_step
        self.geometry = geometry  # JSON-ready: kind and (fan) distances in pixels and mm
        self.dtype = dtype
        self.chunk_samples = int(chunk_samples)
        self.centre = rotation_centre(n)
        fan = geometry["geometry"] == "fan"
        g = default_detectors(n)
        if fan:
            radius = math.sqrt(2) * n / 2 + 1
            self.step = float(geometry["step"])
            self.n_samples = int(math.ceil(2 * radius / self.step)) + 1
            self.t0 = geometry["dso_px"] - radius
        else:
            self.step, self.n_samples, self.t0 = 1.0, g, -(g - 1) / 2
        self._ramp = RampFilter(dtype=dtype)

    # -- rays -------------------------------------------------------------------------
    def _rays(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(origin, direction) of every ray of views ``theta`` (V,), each (V * D, 2) in pixel
        coordinates (col, row), float64; sample k sits at origin + (t0 + k step) direction."""
        d = torch.stack([theta.sin(), theta.cos()], -1)[:, None]  # (V, 1, 2)
        e = torch.stack([theta.cos(), -theta.sin()], -1)[:, None]
        j = torch.arange(self.n_detectors, dtype=theta.dtype, device=theta.device)
        j = (j - (self.n_detectors - 1) / 2)[None, :, None]  # (1, D, 1)
        centre = torch.full((2,), self.centre, dtype=theta.dtype, device=theta.device)
        geo = self.geometry
        if geo["geometry"] == "parallel":
            origin, direction = centre + j * e, d.expand(-1, self.n_detectors, -1)
        else:
            source = centre - geo["dso_px"] * d
            if geo["detector"] == "flat":
                r = geo["dsd_px"] * d + (j * geo["du_px"]) * e
                r = r / r.norm(dim=-1, keepdim=True)
            else:
                gamma = j * (geo["du_px"] / geo["dsd_px"])
                r = gamma.cos() * d + gamma.sin() * e
            origin, direction = source.expand_as(r), r
        return origin.reshape(-1, 2), direction.reshape(-1, 2)

    def _grid(self, theta: torch.Tensor, dtype, out: torch.Tensor) -> torch.Tensor:
        """``grid_sample`` grid (1, n_samples, V * D, 2) of the rays of views ``theta``,
        written into the flat buffer ``out`` (reused across chunks: no page faults)."""
        origin, direction = self._rays(theta)
        scale = 2.0 / (self.img_width - 1)
        o = ((origin + self.t0 * direction) * scale - 1.0).to(dtype)
        dirs = (direction * (self.step * scale)).to(dtype)
        k = torch.arange(self.n_samples, device=theta.device, dtype=dtype)[:, None, None]
        grid = out[: self.n_samples * o.numel()].view(self.n_samples, -1, 2)
        return torch.addcmul(o[None], k, dirs[None], out=grid)[None]

    def _chunks(self, batch: int) -> list[slice]:
        per_view = self.n_samples * self.n_detectors * max(batch, 1)
        size = max(1, self.chunk_samples // per_view)
        n = self.angles.numel()
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    def _scratch(self, chunks: list[slice], batch: int, like: torch.Tensor):
        rays = max(sl.stop - sl.start for sl in chunks) * self.n_detectors
        return (like.new_empty(self.n_samples * rays * 2),
                like.new_empty(batch * self.n_samples * rays))

    # -- operator ---------------------------------------------------------------------
    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Line integrals (B, C, n_detectors, views); differentiable, its gradient is
        ``A_adjoint`` (chunked too: no per-view graph is kept)."""
        return _Linear.apply(x, self._project, self._backproject)

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Exact adjoint (B, C, N, N); differentiable, its gradient is ``A``."""
        return _Linear.apply(y, self._backproject, self._project)

    def _cpu_rays(self) -> tuple[np.ndarray, ...]:
        """(ox, oy, dx, dy) float64 (V * D,): sample k of each ray at o + k d (``_ct_kernels``)."""
        origin, direction = self._rays(self.angles.detach().cpu().to(torch.float64))
        o, d = origin + self.t0 * direction, direction * self.step
        return tuple(np.ascontiguousarray(a.numpy()) for a in (o[:, 0], o[:, 1], d[:, 0], d[:, 1]))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        if _ct_kernels.supported(x):
            n, views = self.img_width, self.angles.numel()
            s = _ct_kernels.project(x.reshape(b * c, n, n), self._cpu_rays(), self.n_samples)
            return s.view(b, c, views, self.n_detectors).transpose(-1, -2).contiguous() \
                * self.step
        chunks = self._chunks(b * c)
        grid_buf, sample_buf = self._scratch(chunks, b * c, x)
        out = []
        for sl in chunks:
            grid = self._grid(self.angles[sl], x.dtype, grid_buf).expand(b, -1, -1, -1)
            s = sample_buf[: b * c * grid[0].numel() // 2].view(b, c, *grid.shape[1:3])
            torch.ops.aten.grid_sampler_2d.out(x, grid, 0, 0, True, out=s)  # bilinear, zeros
            out.append(s.sum(2).unflatten(-1, (-1, self.n_detectors)).transpose(-1, -2))
        return torch.cat(out, -1) * self.step

    def _backproject(self, y: torch.Tensor) -> torch.Tensor:
        b, c = y.shape[:2]
        n = self.img_width
        if _ct_kernels.supported(y):
            values = (y * self.step).transpose(-1, -2).reshape(b * c, -1)
            x = _ct_kernels.backproject(values, self._cpu_rays(), self.n_samples, n)
            return x.view(b, c, n, n)
        chunks = self._chunks(b * c)
        grid_buf, _ = self._scratch(chunks, 0, y)
        x = y.new_zeros(b, c, n, n)
        for sl in chunks:
            grid = self._grid(self.angles[sl], y.dtype, grid_buf).expand(b, -1, -1, -1)
            g = (y[..., sl] * self.step).transpose(-1, -2).flatten(-2)[:, :, None]
            x.add_(torch.ops.aten.grid_sampler_2d_backward(
                g.expand(-1, -1, self.n_samples, -1), x, grid, 0, 0, True, [True, False])[0])
        return x

    def A_adjoint_A_approx(self, x: torch.Tensor) -> torch.Tensor:  # FFT A^T A: ct_normal
        return ct_normal.toeplitz_normal(self, x)

    # -- filtered back-projection ----------------------------------------------------
    def fbp(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Filtered back-projection. Parallel: A^T(ramp * y) * dtheta / 2 (Ram-Lak filter,
        zero-padded). Fan (full 2 pi scan; shorter scans need Parker weights, not applied):
        the weighted FBP of Kak & Slaney (1988, sec. 3.4) for flat or equiangular detectors,
        pixel-driven back-projection with linear interpolation."""
        if self.geometry["geometry"] == "parallel":
            return self.A_adjoint(self._ramp(y)) * (self.angle_step / 2)
        return self._fan_fbp(y)

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fbp(y)

    def _fan_fbp(self, y: torch.Tensor) -> torch.Tensor:
        geo = self.geometry
        dso, dsd, du = geo["dso_px"], geo["dsd_px"], geo["du_px"]
        nd = self.n_detectors
        j = torch.arange(-(nd - 1), nd, dtype=torch.float64, device=y.device)
        u = torch.arange(nd, dtype=torch.float64, device=y.device) - (nd - 1) / 2
        odd = (j.abs() % 2) == 1
        if geo["detector"] == "flat":  # virtual detector through the isocentre
            tau = du * dso / dsd
            s = u * tau
            pre = dso / torch.sqrt(dso**2 + s**2)
            kernel = torch.where(odd, -1 / (math.pi * j * tau) ** 2, torch.zeros_like(j))
            kernel = torch.where(j == 0, torch.full_like(j, 1 / (4 * tau**2)), kernel) / 2
            spacing = tau
        else:
            alpha = du / dsd
            gamma = u * alpha
            pre = dso * gamma.cos()
            kernel = torch.where(odd, -1 / (2 * math.pi**2 * torch.sin(j * alpha) ** 2),
                                 torch.zeros_like(j))
            kernel = torch.where(j == 0, torch.full_like(j, 1 / (8 * alpha**2)), kernel)
            spacing = alpha
        q = ct_normal.convolve(y.to(torch.float64) * pre[:, None], kernel, nd) * spacing
        return self._fan_backproject(q).to(y.dtype) * self.angle_step

    def _fan_backproject(self, q: torch.Tensor) -> torch.Tensor:
        """sum over views of q(detector position of each pixel) / distance weight."""
        geo = self.geometry
        b, c, nd, _ = q.shape
        n = self.img_width
        if _ct_kernels.supported(q):
            flat = geo["detector"] == "flat"
            scale = geo["dsd_px"] / (geo["du_px"] * (geo["dso_px"] if flat else 1.0))
            out = _ct_kernels.fan_backproject(q.reshape(b * c, nd, -1), self.angles,
                                              self.centre, geo["dso_px"], scale, flat, n)
            return out.to(q.dtype).view(b, c, n, n)
        pos = torch.arange(n, dtype=q.dtype, device=q.device) - self.centre
        yy, xx = torch.meshgrid(pos, pos, indexing="ij")
        out = q.new_zeros(b * c, n * n)
        size = max(1, self.chunk_samples // (n * n * max(b * c, 1)))
        for i in range(0, self.angles.numel(), size):
            th = self.angles[i:i + size].to(q.dtype)[:, None]
            a = xx.reshape(1, -1) * th.cos() - yy.reshape(1, -1) * th.sin()  # along e
            dist = geo["dso_px"] + xx.reshape(1, -1) * th.sin() + yy.reshape(1, -1) * th.cos()
            if geo["detector"] == "flat":
                tau = geo["du_px"] * geo["dso_px"] / geo["dsd_px"]
                idx = geo["dso_px"] * a / dist / tau
                w = (geo["dso_px"] / dist) ** 2
            else:
                idx = torch.atan2(a, dist) / (geo["du_px"] / geo["dsd_px"])
                w = 1 / (a**2 + dist**2)
            gx = (idx / ((nd - 1) / 2)) if nd > 1 else idx  # normalised detector coordinate
            grid = torch.stack([gx, torch.zeros_like(gx)], -1)[:, :, None]  # (V, N*N, 1, 2)
            qv = q[..., i:i + size].reshape(b * c, nd, -1).permute(2, 0, 1)[:, :, None]
            s = F.grid_sample(qv, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=True)[..., 0]  # (V, B*C, N*N)
            out = out + (s * w[:, None]).sum(0)
        return out.reshape(b, c, n, n)


class _Linear(torch.autograd.Function):
    """``apply(x, f, f_adjoint)`` = f(x) for a linear ``f``; its gradient is ``f_adjoint``
    (the projector and back-projector are each other's, chunked: no per-view graph)."""

    @staticmethod
    def forward(ctx, x, f, f_adjoint):
        ctx.f_adjoint = f_adjoint
        return f(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.f_adjoint(grad), None, None


def ct(img_size, *, views: int | None = None, angles=None, angle_range: float | None = None,
       n_detectors: int | None = None, noise_sigma: float = 0.0, device=None,
       dtype=torch.float32, geometry: str = "parallel",
       source_to_isocentre_mm: float | None = None, source_to_detector_mm: float | None = None,
       detector_spacing_mm: float | None = None, pixel_size_mm: float = 1.0,
       detector: str = "flat", step: float = 1.0,
       chunk_samples: int = CHUNK_SAMPLES, normal: str = "auto") -> LinearPhysics:
    """CT operator on (B, 1, N, N) images (a deepinv ``LinearPhysics``; module docstring).

    ``img_size``: N, (N, N) or (1, N, N). Angles: ``views`` equally spaced in
    [0, ``angle_range``) radians (default pi for parallel, 2 pi for fan; sparse view:
    views=30; limited angle: angle_range=pi/2), or explicit ``angles`` in radians
    (:func:`check_angles`); default 180 views (parallel) / 360 (fan). ``A_dagger`` is FBP
    with dtheta = angle_range / views, or (max - min) / (n - 1) for n explicit angles.

    Parallel: ``n_detectors`` (default ceil(sqrt(2) N)) must differ from the default by an
    even number (detectors 1 px apart, centred). Fan: ``source_to_isocentre_mm``,
    ``source_to_detector_mm`` (> source-to-isocentre), ``detector_spacing_mm`` (at the
    detector; arc length for ``detector="curved"``) and ``pixel_size_mm`` are required to
    be positive; the source must lie outside the image's circumscribed circle;
    ``n_detectors`` defaults to the count whose fan just covers that circle; ``step`` is the
    ray sampling step in pixels. ``chunk_samples`` bounds the ray samples held at once
    (``grid_sample`` path).
    ``normal``: DDS's A^T A in its loop: "toeplitz" (``operators.ct_normal``; full scans with >=
    N / 2 views per pi), "exact" or "auto" (toeplitz where it is allowed).
    """
    if isinstance(img_size, (int, np.integer)):
        img_size = (int(img_size), int(img_size))
    _, h, w = image_size(img_size, "ct", channels=1)
    if h != w or h < 2:
        raise ValueError(f"ct: images must be square and at least 2 x 2, got img_size "
                         f"{img_size!r}.")
    if geometry not in GEOMETRIES:
        raise ValueError(f"ct: geometry must be one of {', '.join(GEOMETRIES)}, got "
                         f"{geometry!r}.")
    fan = geometry == "fan"
    if views is not None and angles is not None:
        raise ValueError("ct: give either views or angles, not both.")
    if angles is not None:
        a = check_angles(angles)
        angles = torch.as_tensor(a)
        n = angles.numel()
        step_angle = math.pi if n == 1 else float(a.max() - a.min()) / (n - 1)
    else:
        views = (360 if fan else 180) if views is None else int(views)
        angle_range = (2 * math.pi if fan else math.pi) if angle_range is None else angle_range
        if views < 1 or not 0 < angle_range <= 2 * math.pi + ANGLE_SLACK:
            raise ValueError(f"ct: need views >= 1 and 0 < angle_range <= 2*pi (radians), "
                             f"got {views}, {angle_range}.")
        angles = torch.arange(views, dtype=torch.float64) * (angle_range / views)
        step_angle = angle_range / views
    geo = {"geometry": geometry}
    if fan:
        geo = _fan_geometry(h, source_to_isocentre_mm, source_to_detector_mm,
                            detector_spacing_mm, pixel_size_mm, detector, step)
        n_det = _fan_detectors(h, geo) if n_detectors is None else int(n_detectors)
        if n_det < 1:
            raise ValueError(f"ct: n_detectors must be positive, got {n_detectors}.")
    else:
        n_det = default_detectors(h) if n_detectors is None else int(n_detectors)
        if n_det < 1 or (n_det - default_detectors(h)) % 2:
            raise ValueError(f"ct: n_detectors must be positive and differ from "
                             f"{default_detectors(h)} by an even number, got {n_detectors}.")
    full = step_angle * angles.numel() >= (1 + fan) * math.pi * (1 - 1e-6)  # pi / 2 pi
    fit = full and step_angle <= 2 * math.pi / h  # >= N/2 views per pi (sparser diverged)
    if normal not in ("auto", "toeplitz", "exact") or (normal == "toeplitz" and not fit):
        raise ValueError(f"ct: normal must be auto, toeplitz or exact ('toeplitz' needs a full "
                         f"scan with >= N/2 views per pi), got {normal!r}.")
    normal = ("toeplitz" if fit else "exact") if normal == "auto" else normal
    if not chunk_samples >= 1:
        raise ValueError(f"ct: chunk_samples must be >= 1, got {chunk_samples!r}.")
    return _CT(h, angles, n_det, step_angle, geo, dtype, resolve_device(device),
               gaussian_noise(noise_sigma, "ct"), chunk_samples, normal, fit)


def _fan_geometry(n, dso, dsd, du, pixel, detector, step) -> dict:
    values = {"source_to_isocentre_mm": dso, "source_to_detector_mm": dsd,
              "detector_spacing_mm": du, "pixel_size_mm": pixel, "step": step}
    for name, v in values.items():
        ok = isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
        if not (ok and math.isfinite(v) and v > 0):
            raise ValueError(f"ct: fan beam needs {name} > 0 (finite), got {v!r}.")
    if detector not in DETECTORS:
        raise ValueError(f"ct: detector must be one of {', '.join(DETECTORS)}, got "
                         f"{detector!r}.")
    check_fan_distances(n, dso, dsd, pixel, "ct:")
    return {"geometry": "fan", "detector": detector,
            "source_to_isocentre_mm": float(dso), "source_to_detector_mm": float(dsd),
            "detector_spacing_mm": float(du), "pixel_size_mm": float(pixel),
            "dso_px": float(dso) / pixel, "dsd_px": float(dsd) / pixel,
            "du_px": float(du) / pixel, "step": float(step)}


def check_fan_distances(n: int, dso: float, dsd: float, pixel: float, where: str) -> None:
    """The fan-beam distances of an N x N image with ``pixel`` mm pixels: source-to-detector
    more than source-to-isocentre, and the source outside the image's circumscribed circle
    (source-to-isocentre more than the half-diagonal sqrt(2) N pixel / 2). Raises
    ``ValueError`` naming the distance, its message prefixed with ``where`` ("ct:", or a
    scan file's "PATH: attribute")."""
    if not dsd > dso:
        raise ValueError(f"{where} 'source_to_detector_mm' is {dsd!r}, expected more than "
                         f"'source_to_isocentre_mm' ({dso!r})")
    radius = math.sqrt(2) * n / 2 * pixel
    if not dso > radius:
        raise ValueError(f"{where} 'source_to_isocentre_mm' is {dso!r}, expected more than "
                         f"the image half-diagonal {radius:.4g} mm (source outside the field "
                         f"of view)")


def _fan_detectors(n: int, geo: dict) -> int:
    """Detector count whose fan just covers the image's circumscribed circle (+2)."""
    half_fan = math.asin(min(1.0, (math.sqrt(2) * n / 2 + 1) / geo["dso_px"]))
    if geo["detector"] == "flat":
        half = geo["dsd_px"] * math.tan(half_fan) / geo["du_px"]
    else:
        half = geo["dsd_px"] * half_fan / geo["du_px"]
    return 2 * int(math.ceil(half)) + 2
