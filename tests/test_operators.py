"""Property tests shared by every operator (adjoint, linearity, closed-form normals, noise,
shapes), then operator-specific checks against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from deepinv.physics import LinearPhysics

from diffrecon.operators import (
    adjointness_error,
    birdcage_maps,
    blur,
    ct,
    estimate_coil_maps,
    fastmri_mask,
    inpaint,
    kspace_to_tensor,
    make_kernel,
    matrix,
    mri,
    rss,
    superres,
    tensor_to_kspace,
)

H, W = 12, 16  # MRI test size (non-square on purpose)
COL_MASK = np.zeros(W, dtype=bool)
COL_MASK[[0, 3, 6, 7, 8, 9, 12, 14]] = True
GRID_MASK = np.random.default_rng(1).random((H, W)) < 0.4
MAPS = birdcage_maps(3, (H, W))
MATRIX = torch.as_tensor(np.random.default_rng(2).standard_normal((6, 8)))


def _build(name: str, dtype: torch.dtype, noise_sigma: float = 0.0):
    """(physics, x shape, y shape, has a closed-form normal) for each case name."""
    kind, *rest = name.split("-")
    kw = {"noise_sigma": noise_sigma}
    if kind == "blur":
        kernel, boundary = rest
        width = {"gaussian": 1.2, "motion": 4.0, "uniform": 3}[kernel]
        p = blur(kernel, width=width, angle=30.0, boundary=boundary, dtype=dtype, **kw)
        k = p.filter.shape[-1]
        side = 16 - k + 1 if boundary == "valid" else 16
        return p, (2, 3, 16, 16), (2, 3, side, side), boundary == "circular"
    if kind == "superres":
        factor, sr_kind = int(rest[0][1:]), rest[1]
        boundary = rest[2] if len(rest) > 2 else "circular"
        p = superres(factor, img_size=(3, 16, 16), kind=sr_kind, boundary=boundary, dtype=dtype,
                     **kw)
        return p, (2, 3, 16, 16), (2, 3, 16 // factor, 16 // factor), False
    if kind == "inpaint":
        p = inpaint((3, 16, 16), kind=rest[0], fraction=0.3, box=(3, 4, 5, 6), dtype=dtype, **kw)
        return p, (2, 3, 16, 16), (2, 3, 16, 16), True
    if kind == "mri":
        coils, mask_kind = rest
        mask = COL_MASK if mask_kind == "1d" else GRID_MASK
        if coils == "single":
            return mri(mask, img_size=(H, W), **kw), (2, 2, H, W), (2, 2, H, W), True
        maps = MAPS if coils == "multi" else np.stack([MAPS, MAPS[::-1]])  # (B, C, H, W)
        return mri(mask, maps, **kw), (2, 2, H, W), (2, 2, 3, H, W), False
    if kind == "ct":
        n_det = int(rest[1]) if len(rest) > 1 else None
        if rest[0] == "sparse":
            p = ct(24, views=8, n_detectors=n_det, dtype=dtype, **kw)
        else:
            p = ct(24, views=12, angle_range=math.pi / 2, n_detectors=n_det, dtype=dtype, **kw)
        return p, (2, 1, 24, 24), (2, 1, n_det or 34, p.angles.numel()), False
    if kind == "ctfan":  # fan beam, flat or curved detector, 3 chunks of views
        p = ct(24, views=9, geometry="fan", detector=rest[0], source_to_isocentre_mm=40.0,
               source_to_detector_mm=70.0, detector_spacing_mm=1.5, n_detectors=40,
               chunk_samples=40 * 40 * 3 * 2, dtype=dtype, **kw)
        return p, (2, 1, 24, 24), (2, 1, 40, 9), False
    if kind == "matrix":
        return matrix(MATRIX, noise_sigma), (64, 8), (64, 6), True
    raise ValueError(name)


CASES = (
    [f"blur-{k}-{b}" for k in ("gaussian", "motion", "uniform")
     for b in ("circular", "reflect", "valid")]
    + [f"superres-x{f}-{k}" for f in (2, 4) for k in ("bicubic", "box")]
    + ["superres-x2-bicubic-reflect", "inpaint-random", "inpaint-box"]
    + [f"mri-{c}-{m}" for c in ("single", "multi") for m in ("1d", "2d")]
    + ["mri-batchmaps-1d", "ct-sparse", "ct-limited", "ct-sparse-40", "ct-limited-30", "matrix"]
    + ["ctfan-flat", "ctfan-curved"]
)
NORMAL_CASES = [c for c in CASES if _build(c, torch.float64)[3]]


@pytest.mark.parametrize("name", CASES)
def test_adjoint_exact_float64(name):
    p, x_shape, _, _ = _build(name, torch.float64)
    assert isinstance(p, LinearPhysics)
    assert adjointness_error(p, x_shape, torch.float64, seed=0) < 1e-12


@pytest.mark.parametrize("name", CASES)
def test_adjoint_default_dtype(name):
    p, x_shape, _, _ = _build(name, torch.float32)
    dtype = torch.float64 if name == "matrix" else torch.float32
    assert adjointness_error(p, x_shape, dtype, seed=1) < 1e-5


@pytest.mark.parametrize("name", CASES)
def test_linearity_and_shapes(name):
    p, x_shape, y_shape, _ = _build(name, torch.float64)
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(x_shape, generator=g, dtype=torch.float64)
    x2 = torch.randn(x_shape, generator=g, dtype=torch.float64)
    y = p.A(0.7 * x1 - 1.9 * x2)
    assert tuple(y.shape) == y_shape and y.dtype == torch.float64
    torch.testing.assert_close(y, 0.7 * p.A(x1) - 1.9 * p.A(x2), rtol=1e-10, atol=1e-10)
    assert tuple(p.A_adjoint(y).shape) == x_shape


@pytest.mark.parametrize("name", NORMAL_CASES)
def test_closed_form_normal(name):
    p, x_shape, _, _ = _build(name, torch.float64)
    assert type(p).A_adjoint_A is not LinearPhysics.A_adjoint_A  # really closed form
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(p.A_adjoint_A(x), p.A_adjoint(p.A(x)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_noise_level_carried(name):
    p, x_shape, _, _ = _build(name, torch.float64, noise_sigma=0.05)
    assert float(p.noise_model.sigma) == 0.05
    torch.manual_seed(5)
    x = torch.randn(x_shape, dtype=torch.float64)
    ax = p.A(x)
    r = torch.cat([(p(x) - ax).flatten() for _ in range(4)])
    r = r[r != 0]  # masked operators add noise at observed entries only
    assert r.numel() > 300
    assert abs(float(r.std()) / 0.05 - 1) < 0.15
    assert float(_build(name, torch.float64)[0].noise_model.sigma) == 0.0
    q, x_shape, _, _ = _build(name, torch.float32, noise_sigma=0.05)
    dtype = torch.float64 if name == "matrix" else torch.float32
    assert q(torch.zeros(x_shape, dtype=dtype)).dtype == dtype  # noise keeps the dtype


# ------------------------------------------------------------------------ blur
@pytest.mark.parametrize("boundary", ["circular", "reflect", "valid"])
def test_blur_impulse_response_is_the_kernel(boundary):
    p = blur("motion", width=4.0, angle=30.0, boundary=boundary, dtype=torch.float64)
    k = p.filter[0, 0]
    x = torch.zeros(1, 1, 15, 15, dtype=torch.float64)
    x[..., 7, 7] = 1.0
    y = p.A(x)
    kh = k.shape[0]
    assert kh % 2 == 1 and float(y.sum()) == pytest.approx(1.0)
    start = 8 - kh if boundary == "valid" else 7 - kh // 2  # valid output i sees i..i+kh-1
    torch.testing.assert_close(y[0, 0, start:start + kh, start:start + kh], k)


def test_blur_kernels():
    g = make_kernel("gaussian", width=2.0, dtype=torch.float64)
    assert g.shape == (13, 13) and abs(float(g.sum()) - 1) < 1e-12
    r = torch.arange(13, dtype=torch.float64) - 6
    std = float((g.sum(1) * r**2).sum()) ** 0.5
    assert abs(std / 2.0 - 1) < 0.02  # std = width (up to the 3-sigma truncation)
    m = make_kernel("motion", width=6.0, angle=0.0, dtype=torch.float64)
    rows = torch.nonzero(m.sum(1)).flatten()
    cols = torch.nonzero(m.sum(0)).flatten()
    assert rows.tolist() == [m.shape[0] // 2] and int(cols[-1] - cols[0]) == 6
    torch.testing.assert_close(make_kernel("uniform", width=3, dtype=torch.float64),
                               torch.full((3, 3), 1 / 9, dtype=torch.float64))
    custom = make_kernel(np.array([[1.0, 3.0]]), dtype=torch.float64)
    torch.testing.assert_close(custom, torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    with pytest.raises(ValueError):
        blur("gaussian", boundary="zeros")
    with pytest.raises(ValueError):
        make_kernel("uniform", width=2.5)


# ------------------------------------------------------------------ superres
@pytest.mark.parametrize("factor", [2, 4])
def test_superres_matches_torch_resize(factor):
    t = torch.linspace(0, 1, 48, dtype=torch.float64)
    x = (torch.sin(7 * t)[:, None] * torch.cos(5 * t)[None, :])[None, None].repeat(1, 2, 1, 1)
    bic = superres(factor, img_size=(2, 48, 48), kind="bicubic", dtype=torch.float64).A(x)
    ref = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True)
    b = 8 // factor + 1  # away from the (circular) border
    torch.testing.assert_close(bic[..., b:-b, b:-b], ref[..., b:-b, b:-b])
    box = superres(factor, img_size=(2, 48, 48), kind="box", dtype=torch.float64).A(x)
    torch.testing.assert_close(box, F.avg_pool2d(x, factor))
    with pytest.raises(ValueError):
        superres(3, img_size=(1, 48, 48))
    with pytest.raises(ValueError):
        superres(factor, img_size=(1, 51, 48))


def test_inpaint_masks():
    p = inpaint((1, 20, 20), fraction=0.3, seed=7)
    assert int(p.mask.sum()) == 120
    assert torch.equal(p.mask, inpaint((1, 20, 20), fraction=0.3, seed=7).mask)
    assert not torch.equal(p.mask, inpaint((1, 20, 20), fraction=0.3, seed=8).mask)
    q = inpaint((20, 20), kind="box", box=(2, 3, 4, 5))
    assert int(q.mask.sum()) == 400 - 20 and float(q.mask[0, 0, 2:6, 3:8].sum()) == 0
    with pytest.raises(ValueError):
        inpaint((20, 20), kind="box", box=(18, 0, 4, 4))


# ----------------------------------------------------------------------- MRI
def _centred_fft(a):
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(a, axes=(-2, -1)), norm="ortho"),
                           axes=(-2, -1))


@pytest.mark.parametrize("mask", [COL_MASK, GRID_MASK], ids=["1d", "2d"])
def test_mri_matches_numpy_reference(mask):
    rng = np.random.default_rng(6)
    img = rng.standard_normal((2, H, W)) + 1j * rng.standard_normal((2, H, W))
    x = kspace_to_tensor(img, dtype=torch.float64)
    single = tensor_to_kspace(mri(mask, img_size=(H, W)).A(x))
    np.testing.assert_allclose(single, _centred_fft(img) * mask, atol=1e-5)
    multi = tensor_to_kspace(mri(mask, MAPS).A(x))  # (B, C, H, W)
    np.testing.assert_allclose(multi, _centred_fft(img[:, None] * MAPS) * mask, atol=1e-5)


def test_mri_multicoil_isometry_and_layout():
    assert np.allclose(rss(MAPS), 1.0, atol=1e-6)
    p = mri(np.ones(W), torch.as_tensor(MAPS))
    x = torch.randn(3, 2, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    y = p.A(x)
    assert y.shape == (3, 2, 3, H, W)
    torch.testing.assert_close(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-6,
                               atol=0)
    torch.testing.assert_close(p.A_adjoint(y), x, rtol=1e-6, atol=1e-6)
    k = tensor_to_kspace(y)
    assert k.dtype == np.complex64 and k.shape == (3, 3, H, W)
    torch.testing.assert_close(kspace_to_tensor(k, dtype=torch.float64), y, rtol=0, atol=1e-6)


def test_mri_validation():
    with pytest.raises(ValueError):
        mri(COL_MASK)  # no H anywhere
    with pytest.raises(ValueError):
        mri(COL_MASK, img_size=(H, W + 2))
    with pytest.raises(ValueError):
        mri(GRID_MASK, MAPS.real)  # real maps
    with pytest.raises(ValueError):
        kspace_to_tensor(np.ones((2, 4, 4)))


def test_espirit_recovers_birdcage_maps():
    from diffrecon.datasets.phantoms import phantom

    img = phantom("mri", 32, 0)
    maps = birdcage_maps(4, 32)
    k = _centred_fft(img[None] * maps).astype(np.complex64)
    mask = fastmri_mask((32, 32), [0.4], [2], kind="equispaced", seed=0)
    est, params = estimate_coil_maps(k * mask, calib_width=24, kernel_width=5, mask=mask)
    assert est.shape == (4, 32, 32) and est.dtype == np.complex64
    assert params["calib_width"] == 13 and params["kernel_width"] == 5  # 13 centre lines
    support = np.abs(img) > 0.1
    e, s = est[:, support], maps[:, support]
    phase = np.sum(np.conj(e) * s, 0)
    phase /= np.abs(phase)  # ESPIRiT maps are defined up to a per-pixel phase
    assert np.linalg.norm(e * phase - s) / np.linalg.norm(s) < 0.05
    batched, _ = estimate_coil_maps(np.stack([k, k]), calib_width=12, kernel_width=5)
    assert batched.shape == (2, 4, 32, 32)
    with pytest.raises(ValueError):
        estimate_coil_maps(k * mask, kernel_width=5, mask=np.eye(1, 32, 16)[0])


# ------------------------------------------------------------------------ CT
def _disc(n: int, radius: float, oversample: int = 8) -> torch.Tensor:
    """Anti-aliased disc (pixel area fractions) centred at pixel n // 2."""
    t = (torch.arange(n * oversample) + 0.5) / oversample - 0.5 - n // 2
    inside = (t[:, None] ** 2 + t[None, :] ** 2 <= radius**2).float()
    return inside.reshape(n, oversample, n, oversample).mean((1, 3))[None, None]


def test_ct_fbp_units_and_angles():
    p = ct(64, views=180)
    assert p.angles.dtype == torch.float64
    torch.testing.assert_close(p.angles, torch.arange(180, dtype=torch.float64) * math.pi / 180)
    x = _disc(64, 20.0)
    y = p(x)
    assert y.shape == (1, 1, 91, 180)
    assert abs(float(y.amax()) / 40.0 - 1) < 0.02  # line integrals in pixel lengths
    rec = p.A_dagger(y)
    psnr = 10 * math.log10(1.0 / float(((rec - x) ** 2).mean()))
    assert psnr > 25
    limited = ct(64, views=90, angle_range=math.pi / 2)
    assert float(limited.angles.max()) < math.pi / 2
    explicit = ct(64, angles=limited.angles.numpy())
    torch.testing.assert_close(explicit.A_dagger(limited.A(x)), limited.A_dagger(limited.A(x)))


def test_ct_adjoint_without_grad_and_validation():
    p = ct(24, views=8, dtype=torch.float64)
    with torch.no_grad():
        assert adjointness_error(p, (3, 1, 24, 24), torch.float64, seed=2) < 1e-12
    with pytest.raises(ValueError):
        ct(24, views=8, n_detectors=35)  # odd difference from the default 34
    with pytest.raises(ValueError):
        ct((24, 20), views=8)
    with pytest.raises(ValueError):
        ct(24, views=8, angles=[0.0, 1.0])


def test_adjointness_error_detects_a_wrong_adjoint():
    a = MATRIX
    wrong = LinearPhysics(A=lambda x: x @ a.T, A_adjoint=lambda y: 1.01 * (y @ a))
    assert adjointness_error(wrong, (16, 8), torch.float64) > 1e-3
    with pytest.raises(ValueError):
        matrix(np.ones(3))
