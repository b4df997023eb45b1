"""The CPU ray kernels of ``operators.ct`` (``operators._ct_kernels``, numba) against the
``grid_sample`` path they replace on CPU: same line integrals and back-projections to float
rounding, exact transposes, the same bits on any thread count, and safe in forked children
and concurrent threads (numba's OpenMP layer aborts a forked child: not used)."""

from __future__ import annotations

import math
import multiprocessing
import threading

import pytest
import torch

from diffrecon.operators import _ct_kernels, adjointness_error, ct, ct_normal

FAN = {"geometry": "fan", "source_to_isocentre_mm": 40.0, "source_to_detector_mm": 70.0,
       "detector_spacing_mm": 1.5, "pixel_size_mm": 1.0}
GEOMETRIES = {"parallel": {}, "parallel-limited": {"angle_range": 1.2, "n_detectors": 40},
              "fan-flat": {**FAN, "detector": "flat"},
              "fan-curved": {**FAN, "detector": "curved", "step": 0.7}}


def _grid_sample_path(monkeypatch, fn, *args):
    with monkeypatch.context() as m:
        m.setattr(_ct_kernels, "supported", lambda t: False)
        return fn(*args)


@pytest.mark.parametrize("name", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernels_equal_the_grid_sample_path(monkeypatch, name, dtype):
    """Odd size (25 px, rotation centre between pixels), a batch with 2 channels, rays that
    graze the image border: projections and back-projections agree to float rounding."""
    p = ct(25, views=11, dtype=dtype, **GEOMETRIES[name])
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 2, 25, 25, dtype=torch.float64, generator=gen).to(dtype)
    y = torch.randn(2, 2, p.n_detectors, 11, dtype=torch.float64, generator=gen).to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for fn, arg in ((p._project, x), (p._backproject, y)):
        got, want = fn(arg), _grid_sample_path(monkeypatch, fn, arg)
        assert got.dtype == dtype and got.shape == want.shape
        assert float((got - want).norm() / want.norm()) < tol
        # one image at a time (the kernel's single-image path) gives the same rows
        torch.testing.assert_close(fn(arg[1:2, :1]), got[1:2, :1], rtol=0, atol=0)


@pytest.mark.parametrize("name", GEOMETRIES)
def test_kernels_are_exact_transposes(name):
    p = ct(25, views=11, dtype=torch.float64, **GEOMETRIES[name])
    assert _ct_kernels.supported(torch.zeros(1, dtype=torch.float64))
    assert adjointness_error(p, (2, 1, 25, 25), torch.float64) < 1e-13


def test_same_bits_on_any_thread_count():
    p = ct(64, views=90, geometry="fan", source_to_isocentre_mm=120.0,
           source_to_detector_mm=200.0, detector_spacing_mm=1.0)
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            y = p.A(x)
            outs.append((y, p.A_adjoint(y)))
    finally:
        torch.set_num_threads(threads)
    for y, z in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(z, outs[0][1])


def _child(queue, p, x):
    queue.put(p.A_adjoint(p.A(x)).numpy())  # numpy: pickled, not shared by file descriptor


def test_forked_children_and_threads_run_the_kernels():
    """After the parent ran the kernels, a forked child and concurrent threads get the same
    bits (GNU OpenMP, numba's default threading layer here, would abort the child)."""
    p = ct(32, views=40)
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    want = p.A_adjoint(p.A(x))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue, p, x))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0 and torch.equal(torch.from_numpy(got), want)
    results = [None] * 4

    def work(i):
        results[i] = p.A_adjoint(p.A(x))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(torch.equal(r, want) for r in results)


def _line_kernel_reference(n, angles, step, weight):
    """ct_normal.line_kernel as first written (torch, vectorised per view, index_add_)."""
    def b3(t):
        a = t.abs()
        return torch.where(a < 1, 2 / 3 - a ** 2 + a ** 3 / 2, (2 - a).clamp(min=0) ** 3 / 6)

    size = 2 * n
    h = torch.zeros(size * size, dtype=torch.float64)
    reach = int(math.ceil(math.sqrt(2) * n / step)) + 3
    m = torch.arange(-reach, reach + 1, dtype=torch.float64) * step
    nb = torch.arange(-1, 3, dtype=torch.float64)
    for theta in angles.to(torch.float64):
        px, py = m * theta.sin(), m * theta.cos()
        ix, iy = px.floor()[:, None] + nb, py.floor()[:, None] + nb
        w = b3(iy - py[:, None])[:, :, None] * b3(ix - px[:, None])[:, None, :]
        ix, iy = ix[:, None, :].expand_as(w), iy[:, :, None].expand_as(w)
        keep = (ix.abs() <= n - 1) & (iy.abs() <= n - 1) & (w > 0)
        h.index_add_(0, (iy[keep].long() % size) * size + ix[keep].long() % size, w[keep])
    h = h.view(size, size) * weight
    return (h + torch.roll(h.flip(0, 1), (1, 1), (0, 1))) / 2


@pytest.mark.parametrize("n, step", [(13, 1.0), (20, 0.7)])
def test_toeplitz_line_kernel_equals_the_reference(n, step):
    angles = torch.linspace(0, 2 * math.pi, 17, dtype=torch.float64)[:-1] + 0.1
    got = ct_normal.line_kernel(n, angles, step, 0.3)
    want = _line_kernel_reference(n, angles, step, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13 * float(want.abs().max()))
    assert torch.equal(got, torch.roll(got.flip(0, 1), (1, 1), (0, 1)))  # even


@pytest.mark.parametrize("detector", ["flat", "curved"])
def test_fan_fbp_kernel_equals_the_grid_sample_path(monkeypatch, detector):
    p = ct(25, views=40, dtype=torch.float32, detector=detector, **FAN)
    y = p.A(torch.rand(2, 1, 25, 25, generator=torch.Generator().manual_seed(4)))
    got = p.fbp(y)
    want = _grid_sample_path(monkeypatch, p.fbp, y)
    assert got.dtype == torch.float32
    assert float((got - want).norm() / want.norm()) < 1e-6
