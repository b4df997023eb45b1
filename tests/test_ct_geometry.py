"""CT geometry (operators/ct.py), the CT layout's units / angles / fan-beam attributes
(datasets/ct.py) and the fan-beam simulator, against independent references: closed-form
chord lengths of a disc, deepinv's parallel-beam Tomography, the parallel limit of a far
source."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
from deepinv.physics import Tomography

from diffrecon.datasets.ct import CTScan, prior_scales, read_ct_scan, write_ct_scan
from diffrecon.datasets.simulate import fan_defaults, simulate_ct
from diffrecon.errors import InputError
from diffrecon.operators import _ct_kernels, adjointness_error, ct
from diffrecon.operators.ct import check_angles, default_detectors, rotation_centre

FAN = {"geometry": "fan", "source_to_isocentre_mm": 100.0, "source_to_detector_mm": 180.0,
       "detector_spacing_mm": 0.8, "pixel_size_mm": 0.5}


def _disc(n: int, cy: float, cx: float, r: float, oversample: int = 8) -> np.ndarray:
    """Anti-aliased disc of value 1 (pixel area fractions), centre (row cy, col cx) px."""
    t = (np.arange(n * oversample) + 0.5) / oversample - 0.5
    inside = (t[:, None] - cy) ** 2 + (t[None, :] - cx) ** 2 <= r * r
    return inside.reshape(n, oversample, n, oversample).mean((1, 3))


def _chords(p, cy: float, cx: float, r: float) -> np.ndarray:
    """Closed-form chord lengths (px) of a disc for every ray of fan operator ``p``,
    (detectors, views), from the geometry as documented (independent of the projector)."""
    c = rotation_centre(p.img_width)
    g = p.geometry
    dso, dsd, du = g["dso_px"], g["dsd_px"], g["du_px"]
    j = np.arange(p.n_detectors) - (p.n_detectors - 1) / 2
    out = np.zeros((p.n_detectors, p.angles.numel()))
    for v, b in enumerate(p.angles.numpy()):
        d, e = np.array([np.sin(b), np.cos(b)]), np.array([np.cos(b), -np.sin(b)])
        if g["detector"] == "flat":
            ray = dsd * d[None] + (j * du)[:, None] * e[None]
        else:
            gamma = j * du / dsd
            ray = np.cos(gamma)[:, None] * d[None] + np.sin(gamma)[:, None] * e[None]
        ray /= np.linalg.norm(ray, axis=1, keepdims=True)
        w = np.array([c, c]) - dso * d - np.array([cx, cy])  # source - disc centre (x, y)
        proj = ray @ w
        out[:, v] = 2 * np.sqrt(np.clip(proj**2 - (w @ w - r * r), 0, None))
    return out


@pytest.mark.parametrize("detector", ["flat", "curved"])
def test_fan_adjoint_exact_across_chunks(monkeypatch, detector):
    """The chunked ``grid_sample`` path (other devices than the CPU, where ``_ct_kernels``
    runs; forced here)."""
    monkeypatch.setattr(_ct_kernels, "supported", lambda t: False)
    p = ct(24, views=10, detector=detector, dtype=torch.float64, chunk_samples=3000, **FAN)
    assert len(p._chunks(2)) > 2  # several chunks of views
    assert adjointness_error(p, (2, 1, 24, 24), torch.float64) < 1e-12
    whole = ct(24, views=10, detector=detector, dtype=torch.float64, **FAN)
    x = torch.rand(2, 1, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = whole.A(x)
    torch.testing.assert_close(p.A(x), y, rtol=1e-13, atol=1e-13)  # chunking: same sums
    torch.testing.assert_close(p.A_adjoint(y), whole.A_adjoint(y), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert adjointness_error(p, (1, 1, 24, 24), torch.float32, seed=1) < 1e-5


@pytest.mark.parametrize("geometry", ["parallel", "fan"])
def test_autograd_gradient_of_A_is_the_adjoint(geometry):
    """DPS differentiates through A: the gradient is A^T (and that of A^T is A), chunked,
    without keeping a per-view graph."""
    kw = FAN if geometry == "fan" else {}
    p = ct(16, views=6, dtype=torch.float64, chunk_samples=2000, **kw)
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(p.A, (x,))
    y = p.A(x).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(p.A_adjoint, (y,))


@pytest.mark.parametrize("n_det", [None, 40, 30])
def test_parallel_equals_deepinv_tomography(n_det):
    p = ct(24, views=8, n_detectors=n_det, dtype=torch.float64)
    ref = Tomography(angles=p.angles * 180 / math.pi, img_width=24, circle=False,
                     normalize=False, dtype=torch.float64)
    x = torch.rand(2, 1, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = ref.A(x)
    pad = ((n_det or 34) - 34) // 2
    want = torch.nn.functional.pad(want, (0, 0, pad, pad))
    torch.testing.assert_close(p.A(x), want, rtol=0, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize("detector", ["flat", "curved"])
def test_fan_line_integrals_match_closed_form_chords(detector):
    """Off-centre disc (radius 30 px, value 1) in a 128 px image, 0.5 mm pixels: the
    sinogram is within 1.5% (relative L2) of the exact chord lengths (measured 0.9%; the
    rest is the pixelated disc edge), and the central chord is 2 r to 0.5%."""
    n = 128
    c = rotation_centre(n)
    cy, cx, r = c + 20.3, c - 15.7, 30.0
    p = ct(n, views=36, detector=detector, dtype=torch.float64, **FAN)
    y = p.A(torch.from_numpy(_disc(n, cy, cx, r))[None, None])[0, 0].numpy()
    ref = _chords(p, cy, cx, r)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.015
    assert abs(y.max() / (2 * r) - 1) < 0.005


def test_far_source_fan_is_parallel():
    """A source 10^5 px away with detectors 1 px apart at the isocentre gives the parallel
    sinogram (smooth image: < 0.2% relative difference)."""
    n = 48
    t = np.arange(n) - rotation_centre(n)
    img = np.exp(-((t[:, None] - 5) ** 2 + (t[None, :] + 3) ** 2) / (2 * 6.0**2))
    img[:, :10] += 0.5 * np.exp(-(t[:, None] ** 2) / 50)
    x = torch.from_numpy(img)[None, None]
    par = ct(n, views=24, dtype=torch.float64)
    for detector in ("flat", "curved"):
        fan = ct(n, views=24, angle_range=math.pi, geometry="fan", detector=detector,
                 source_to_isocentre_mm=1e5, source_to_detector_mm=2e5,
                 detector_spacing_mm=2.0, n_detectors=default_detectors(n),
                 dtype=torch.float64)
        a, b = fan.A(x), par.A(x)
        assert float((a - b).norm() / b.norm()) < 2e-3


@pytest.mark.parametrize("detector", ["flat", "curved"])
def test_fan_fbp_recovers_the_disc(detector):
    n = 96
    c = rotation_centre(n)
    disc = _disc(n, c + 10, c - 8, 25.0)
    p = ct(n, views=180, detector=detector, dtype=torch.float64, **FAN)
    rec = p.A_dagger(p.A(torch.from_numpy(disc)[None, None]))[0, 0].numpy()
    inner = _disc(n, c + 10, c - 8, 22.0) > 0.999
    assert abs(rec[inner].mean() - 1) < 0.01 and rec[inner].std() < 0.02
    psnr = 10 * math.log10(1 / np.mean((rec - disc) ** 2))
    assert psnr > 24


def test_angle_and_geometry_validation():
    for bad, word in [(np.arange(180.0), "degrees"), (np.arange(0.0, 6.0), "integers"),
                      (np.zeros(5), "all equal"), (np.array([0.0, np.nan]), "non-finite"),
                      (np.zeros((2, 2)), "1D"), (np.linspace(0, 7, 10), "span")]:
        with pytest.raises(ValueError, match="angles") as err:
            check_angles(bad)
        assert word in str(err.value) and "\n" not in str(err.value)
    good = np.linspace(0, 2 * np.pi, 721)  # 0..2 pi inclusive: allowed
    assert check_angles(good).dtype == np.float64
    with pytest.raises(ValueError, match="angles"):
        ct(32, angles=np.arange(0.0, 180.0, 2.0))
    with pytest.raises(ValueError, match="angle_range"):
        ct(32, views=10, angle_range=180.0)
    base = {**FAN, "views": 8}
    for key, value, word in [("source_to_detector_mm", 90.0, "more than"),
                             ("source_to_isocentre_mm", 20.0, "half-diagonal"),
                             ("detector_spacing_mm", 0.0, "detector_spacing_mm"),
                             ("pixel_size_mm", -1.0, "pixel_size_mm")]:
        with pytest.raises(ValueError, match=word):
            ct(64, **{**base, key: value})
    with pytest.raises(ValueError, match="detector"):
        ct(64, detector="round", **base)
    with pytest.raises(ValueError, match="geometry"):
        ct(64, views=8, geometry="cone")


# ------------------------------------------------------------------------ CT layout
def _fan_attrs(**kw):
    return {"geometry": "fan", "image_size": 32, "pixel_size": 0.5,
            "source_to_isocentre_mm": 100.0, "source_to_detector_mm": 180.0,
            "detector_spacing_mm": 0.8, "detector_shape": "curved", **kw}


def _write(path, attrs, angles=None, n_det=60):
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False) if angles is None else angles
    with h5py.File(path, "w") as f:
        f["sinogram"] = np.zeros((1, len(angles), n_det), np.float32)
        f["angles"] = angles
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


def test_fan_layout_round_trip_builds_the_operator(tmp_path):
    scan = read_ct_scan(_write(tmp_path / "fan.h5", _fan_attrs(units="1/mm")))
    p = scan.physics(dtype=torch.float64)
    assert p.geometry["detector"] == "curved" and p.n_detectors == 60
    assert p.geometry["dso_px"] == 200.0 and p.geometry["du_px"] == 1.6
    assert scan.scales == (1.0, 0.5)  # 1/mm: line integral = sum(mu * pixel_size)
    assert prior_scales({"units": "1/mm", "pixel_size": 0.7, "intensity_scale": 0.02}) == (
        0.02, pytest.approx(0.014))
    assert prior_scales({}) == (1.0, 1.0)


@pytest.mark.parametrize("edit, name, fragment", [
    ({"detector_shape": None}, "detector_shape", "missing"),
    ({"detector_shape": "round"}, "detector_shape", "'flat' or 'curved'"),
    ({"source_to_detector_mm": 90.0}, "source_to_detector_mm", "more than"),
    ({"source_to_isocentre_mm": 10.0}, "source_to_isocentre_mm", "half-diagonal"),
    ({"detector_spacing_mm": -1.0}, "detector_spacing_mm", "positive"),
    ({"pixel_size": None}, "pixel_size", "missing"),
    ({"image_size": None}, "image_size", "missing"),
    ({"units": "HU"}, "units", "1/mm"),
    ({"intensity_scale": 0.0}, "intensity_scale", "positive"),
    ({"n_detectors": 61}, "n_detectors", "match"),
    ({"geometry": "cone"}, "geometry", "'parallel' or 'fan'"),
])
def test_bad_fan_layout_is_one_line_naming_the_attribute(tmp_path, edit, name, fragment):
    attrs = {k: v for k, v in {**_fan_attrs(), **edit}.items() if v is not None}
    path = _write(tmp_path / "bad.h5", attrs)
    with pytest.raises(InputError) as err:
        read_ct_scan(path)
    msg = str(err.value)
    assert str(path) in msg and f"'{name}'" in msg and fragment in msg and "\n" not in msg


@pytest.mark.parametrize("angles, fragment", [
    (np.arange(0.0, 360.0, 30.0), "degrees"), (np.full(12, 0.3), "all equal"),
    (np.r_[np.linspace(0, 3, 11), np.nan], "finite")])
def test_bad_angles_in_a_file_name_the_dataset(tmp_path, angles, fragment):
    path = _write(tmp_path / "deg.h5", {"image_size": 32}, angles=angles, n_det=46)
    with pytest.raises(InputError) as err:
        read_ct_scan(path)
    assert f"{path}: dataset 'angles'" in str(err.value) and fragment in str(err.value)


def test_parallel_files_stay_valid(tmp_path):
    scan = CTScan(np.zeros((1, 6, 46), np.float32), np.linspace(0, np.pi, 6, endpoint=False),
                  attrs={"image_size": 32})
    got = read_ct_scan(write_ct_scan(tmp_path / "par.h5", scan))
    assert got.geometry == "parallel" and got.physics().geometry == {"geometry": "parallel"}
    assert got.scales == (1.0, 1.0)


# ------------------------------------------------------------------------ simulator
@pytest.mark.parametrize("detector", ["flat", "curved"])
def test_simulate_fan_beam(tmp_path, detector):
    path = simulate_ct(tmp_path / "fan.h5", size=48, slices=2, views=60, geometry="fan",
                       pixel_size_mm=0.7, detector_shape=detector, seed=3)
    scan = read_ct_scan(path)
    defaults = fan_defaults(48, 0.7)
    assert scan.attrs["geometry"] == "fan" and scan.attrs["detector_shape"] == detector
    for key, value in defaults.items():
        assert scan.attrs[key] == pytest.approx(value)
    np.testing.assert_allclose(scan.angles, np.arange(60) * 2 * np.pi / 60)
    p = scan.physics()
    with torch.no_grad():
        y = p.A(torch.from_numpy(scan.ground_truth)[:, None])
    np.testing.assert_allclose(scan.measurement().numpy(), y.numpy(), rtol=0,
                               atol=1e-6 * float(y.abs().max()))
    rec = p.A_dagger(scan.measurement())[:, 0].numpy()
    mse = np.mean((rec - scan.ground_truth) ** 2)
    assert 10 * math.log10(1 / mse) > 20  # FBP of 60 noiseless views, 48 px phantoms
    again = simulate_ct(tmp_path / "again.h5", size=48, slices=2, views=60, geometry="fan",
                        pixel_size_mm=0.7, detector_shape=detector, seed=3)
    assert again.read_bytes() == path.read_bytes()
