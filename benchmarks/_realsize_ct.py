"""benchmarks/realsize.py, CT part: the analytic ellipse phantom (image, closed-form
sinogram), the operators of a parallel or curved-fan CT scan, the timing subprocess
(``ct_child``), its table rows and the CT scan file of the whole runs. Split from
realsize.py (issue 14: files <= 400 lines); not a benchmark script of its own."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from benchmarks.common import REPO, SEED0, fmt, setup

# ------------------------------------------------------------------------------ CT
ELLIPSES = [  # (value, centre x, centre y, semi-axis a, semi-axis b, angle rad): fractions
    (1.00, 0.00, 0.00, 0.85, 0.65, 0.00),    # of the half-width; a body-like section
    (-0.40, 0.00, 0.00, 0.78, 0.58, 0.00),
    (0.50, -0.35, 0.10, 0.18, 0.25, 0.30),
    (0.60, 0.30, 0.05, 0.20, 0.15, -0.50),
    (0.80, 0.05, -0.35, 0.10, 0.10, 0.00),
    (-0.30, 0.10, 0.30, 0.12, 0.06, 1.10),
    (0.90, -0.05, 0.45, 0.04, 0.04, 0.00),
]


def ellipse_image(n: int, oversample: int = 4) -> np.ndarray:
    """The phantom rasterised on n x n pixels (pixel-area averages over oversample^2 points),
    centred on the rotation centre c; unit = fraction of (n / 2) px."""
    from diffrecon.operators.ct import rotation_centre

    c = rotation_centre(n)
    t = ((np.arange(n * oversample) + 0.5) / oversample - 0.5 - c) / (n / 2)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    img = np.zeros_like(xx)
    for v, x0, y0, a, b, th in ELLIPSES:
        u = (xx - x0) * np.cos(th) + (yy - y0) * np.sin(th)
        w = -(xx - x0) * np.sin(th) + (yy - y0) * np.cos(th)
        img += v * ((u / a) ** 2 + (w / b) ** 2 <= 1)
    return img.reshape(n, oversample, n, oversample).mean((1, 3))


def ellipse_sinogram(n: int, angles: np.ndarray, n_det: int, geometry: dict) -> np.ndarray:
    """Closed-form line integrals (px) of the phantom, (n_det, views): rays built from the
    geometry as documented in operators/ct.py, chords by solving |p + t r|_ellipse = 1."""
    j = np.arange(n_det) - (n_det - 1) / 2
    half = n / 2
    out = np.zeros((n_det, len(angles)))
    for v, b in enumerate(angles):
        d, e = np.array([np.sin(b), np.cos(b)]), np.array([np.cos(b), -np.sin(b)])
        if geometry["geometry"] == "parallel":
            origin, ray = j[:, None] * e[None], np.broadcast_to(d, (n_det, 2))
        else:
            origin = np.broadcast_to(-geometry["dso_px"] * d, (n_det, 2))
            gamma = j * geometry["du_px"] / geometry["dsd_px"]
            ray = np.cos(gamma)[:, None] * d[None] + np.sin(gamma)[:, None] * e[None]
        for val, x0, y0, a, bb, th in ELLIPSES:
            rot = np.array([[np.cos(th), np.sin(th)], [-np.sin(th), np.cos(th)]])
            p = (origin - half * np.array([x0, y0])) @ rot.T / (half * np.array([a, bb]))
            q = ray @ rot.T / (half * np.array([a, bb]))
            qa, qb, qc = (q * q).sum(1), (p * q).sum(1), (p * p).sum(1) - 1
            disc = qb * qb - qa * qc
            out[:, v] += val * 2 * np.sqrt(np.clip(disc, 0, None)) / qa
    return out


def _ct_physics(geometry: str, n: int, views: int, normal: str = "auto"):
    from diffrecon.datasets.simulate import fan_defaults
    from diffrecon.operators import ct

    if geometry == "parallel":
        return ct(n, views=views, normal=normal)
    return ct(n, views=views, geometry="fan", detector="curved", pixel_size_mm=0.7,
              normal=normal, **fan_defaults(n, 0.7))


def ct_child(geometry: str, n: int, views: int, repeats: int, threads: int) -> None:
    """Subprocess body: prints one JSON line of timings, peak RSS and the analytic check."""
    setup(threads)
    import diffrecon.datasets.simulate  # noqa: F401  (imports outside the timings)
    from diffrecon.operators.ct import rotation_centre

    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # noqa: E731
    rss_imports = peak()
    t0 = time.process_time()
    p = _ct_physics(geometry, n, views)
    build = time.process_time() - t0
    img = ellipse_image(n)
    x = torch.from_numpy(img).float()[None, None]
    out = {"build": build}

    def timed(fn, arg):
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            r = fn(arg)
            times.append(time.process_time() - t0)
        return r, statistics.median(times)

    with torch.no_grad():
        y, out["A"] = timed(p.A, x)
        _, out["A^T"] = timed(p.A_adjoint, y)
        _, out["FBP"] = timed(p.fbp, y)
        out["rss_operators_gb"], out["rss_imports_gb"] = peak(), rss_imports
        ref = ellipse_sinogram(n, p.angles.numpy(), p.n_detectors, p.geometry)
        out["rel_err"] = float(np.linalg.norm(y[0, 0].double().numpy() - ref)
                               / np.linalg.norm(ref))
        rec = p.fbp(torch.from_numpy(ref).float()[None, None])[0, 0].double().numpy()
    t = np.arange(n) - rotation_centre(n)
    inside = t[:, None] ** 2 + t[None, :] ** 2 <= (n / 2 - 1) ** 2
    out["fbp_psnr"] = float(10 * np.log10(1 / np.mean((rec - img)[inside] ** 2)))
    out["views"], out["detectors"], out["samples"] = views, p.n_detectors, p.n_samples
    out["peak_rss_gb"] = peak()
    print(json.dumps(out))


def ct_rows(n: int, views: int, repeats: int, threads: int) -> list[dict]:
    rows = []
    for geometry in ("parallel", "fan"):
        args = ["--_ct", geometry, str(n), str(views), str(repeats), "--threads", str(threads)]
        res = subprocess.run(  # main() directly: the child keeps this process's niceness
            [sys.executable, "-c", f"from benchmarks.realsize import main; main({args!r})"],
            cwd=REPO, capture_output=True, text=True, check=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append({"geometry": geometry if geometry == "parallel" else "fan (curved)",
                     "image": f"{n} x {n}", "views": r["views"], "detectors": r["detectors"],
                     "samples / ray": r["samples"], "build CPU s": r["build"],
                     "A CPU s": r["A"], "A^T CPU s": r["A^T"], "FBP CPU s": r["FBP"],
                     "RSS imports GB": r["rss_imports_gb"],
                     "peak RSS operators GB": r["rss_operators_gb"],
                     "peak RSS GB": r["peak_rss_gb"],
                     "A vs analytic (rel L2)": r["rel_err"],
                     "FBP(analytic) PSNR dB": r["fbp_psnr"]})
    return rows


def write_ct_file(path: Path, geometry: str, n: int, views: int) -> None:
    """A CT scan file (``datasets.ct`` layout) of the analytic ellipse phantom: closed-form
    sinogram plus Gaussian noise (0.5% of its peak, declared), ground truth rasterised."""
    from diffrecon.datasets.simulate import fan_defaults

    p = _ct_physics(geometry, n, views)
    sino = ellipse_sinogram(n, p.angles.numpy(), p.n_detectors, p.geometry)
    sigma = 0.005 * float(np.abs(sino).max())
    sino = sino + sigma * np.random.default_rng(SEED0).standard_normal(sino.shape)
    attrs = {"geometry": geometry, "n_detectors": int(p.n_detectors), "image_size": n,
             "noise_sigma": sigma}
    if geometry == "fan":
        attrs.update(pixel_size=0.7, detector_shape="curved", **fan_defaults(n, 0.7))
    with h5py.File(path, "w") as f:
        f["sinogram"] = sino.T[None].astype(np.float32)
        f["angles"] = p.angles.numpy().astype(np.float64)
        f["ground_truth"] = ellipse_image(n)[None].astype(np.float32)
        f.attrs.update(attrs)


# ------------------------------------------------------------------------------ fast normal
def ct_fast_step_rows(p, x: torch.Tensor, net: float, exact_step: float, steps: int,
                      label: str, cpu) -> list[dict]:
    """Rows of the per-step split with ``ct(normal="toeplitz")`` (``operators.ct_normal``):
    the fast data-consistency step (5 CG iterations of I + gamma K and the initial residual,
    6 FFT normal products, plus 1 / ``RESIDUAL_EVERY`` exact A for the residual diagnostic),
    and the same with the per-solve extras spread over ``steps`` DDS steps: the kernel
    spectrum (once per geometry), x_d (``DATA_REFINEMENTS`` + 1 FBP and as many A) and K x_d,
    and ``dds.EXACT_LAST`` exact steps (``exact_step`` each; none since session 10).
    ``cpu(fn, n)`` times a call in process CPU seconds."""
    from diffrecon.operators import ct_normal
    from diffrecon.recon.common import approximate_normal, cg
    from diffrecon.recon.dds import EXACT_LAST, RESIDUAL_EVERY

    y = p.A(x)
    gamma = 0.3 ** 2 / 0.01 ** 2

    def build():
        ct_normal._CACHE.clear()
        p.__dict__.pop("_toeplitz_spectra", None)
        ct_normal.spectrum(p, x.dtype, x.device)

    kernel = cpu(build, 1)
    normal, b = approximate_normal(p, y)
    extras = cpu(lambda: approximate_normal(p, y), 1)  # x_d and K x_d (spectrum cached)
    fft = cpu(lambda: normal(x), 3)
    dc = cpu(lambda: cg(lambda v: v + gamma * normal(v), x + gamma * b, x, 5), 3)
    a = cpu(lambda: p.A(x), 1)
    step = dc + a / RESIDUAL_EVERY
    whole = step + (kernel + extras + EXACT_LAST * exact_step) / steps
    return [{"problem": f"{label}, toeplitz normal (K {fmt(fft)}; kernel {fmt(kernel)}, "
                        f"x_d {fmt(extras)} once)",
             "network CPU s / call": net, "data consistency CPU s / step": step,
             "step / network": (net + step) / net},
            {"problem": f"{label}, toeplitz, with {EXACT_LAST} exact last steps and set-up "
                        f"over {steps} steps",
             "network CPU s / call": net, "data consistency CPU s / step": whole,
             "step / network": (net + whole) / net}]


def ct_normal_quality_rows(n: int, scans: list[tuple[str, int]], steps: int) -> list[dict]:
    """PSNR (dB, peak 1) of DDS ``steps`` with the exact and the toeplitz normal operator on
    a VALIDATION image (nilearn MNI axial slice 80, ``benchmarks._baselines_scans``) of n x n,
    per (geometry, views) scan: sinogram by ``operators.ct`` plus Gaussian noise of 0.5% of
    its peak, one draw, seed 0; 'auto' is what ``ct(normal="auto")`` picks (toeplitz is
    forced where ``ct`` refuses it)."""
    from benchmarks._baselines_scans import anatomy_images
    from diffrecon import operators, priors
    from diffrecon.datasets.simulate import fan_defaults
    from diffrecon.metrics import psnr
    from diffrecon.recon.dds import DDSSolver

    prior = priors.load("ct").eval()
    x = torch.from_numpy(dict(anatomy_images("val", n))["mni-ax80"]).float()[None, None]
    ref = x[0, 0].double().numpy()
    rows = []
    for geometry, views in scans:
        kw = {"views": views}
        if geometry == "fan":
            kw.update(geometry="fan", detector="curved", pixel_size_mm=0.7,
                      **fan_defaults(n, 0.7))
        clean = operators.ct(n, **kw).A(x)
        sigma = 0.005 * float(clean.abs().max())
        g = torch.Generator().manual_seed(SEED0)
        y = clean + sigma * torch.randn(clean.shape, generator=g)
        out, cpu_s = {}, {}
        for normal in ("exact", "toeplitz"):
            t0 = time.process_time()
            p = operators.ct(n, noise_sigma=sigma, normal="exact", **kw)
            p.normal = normal  # forced past ct's refusal on sparse scans, to measure it
            rec = DDSSolver(steps=steps).solve(y, p, prior, seed=0)
            cpu_s[normal] = time.process_time() - t0
            out[normal] = (rec.mean[0, 0].double().numpy(), rec.info["data_residual"][-1])
        rows.append({"scan": f"{geometry} {n} x {n}, {views} views",
                     "auto": operators.ct(n, **kw).normal,
                     "PSNR exact": psnr(ref, out["exact"][0]),
                     "PSNR toeplitz": psnr(ref, out["toeplitz"][0]),
                     "difference dB": psnr(ref, out["toeplitz"][0]) - psnr(ref, out["exact"][0]),
                     "PSNR toeplitz vs exact": psnr(out["exact"][0], out["toeplitz"][0]),
                     "residual exact": out["exact"][1], "residual toeplitz": out["toeplitz"][1],
                     "CPU s exact": cpu_s["exact"], "CPU s toeplitz": cpu_s["toeplitz"]})
    return rows


def ct_normal_section(quick: bool) -> list[str]:
    """Report lines of ``ct_normal_quality_rows``: DDS 50 on 256 x 256, parallel 8, 30 and
    180 views, fan 256 and 360 views over 2 pi (--quick: 64 x 64, parallel 8 and 64 views, 3
    steps)."""
    from benchmarks.common import markdown_table

    n, scans, steps = ((64, [("parallel", 8), ("parallel", 64)], 3) if quick else
                       (256, [("parallel", 8), ("parallel", 30), ("parallel", 180),
                              ("fan", 256), ("fan", 360)], 50))
    return [f"## CT: DDS {steps} with the exact vs the toeplitz normal operator", "",
            markdown_table(ct_normal_quality_rows(n, scans, steps)), ""]
