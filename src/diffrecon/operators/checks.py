"""Property checks every linear operator must pass (the sigpy / deepinv operator tests)."""

from __future__ import annotations

import torch


def _device_of(physics) -> torch.device:
    for t in (*physics.buffers(), *physics.parameters()):
        return t.device
    return torch.device("cpu")


def adjointness_error(physics, x_shape, dtype=torch.float64, seed: int = 0) -> float:
    """Relative adjoint mismatch |<A x, y> - <x, A^T y>| / (||A x|| ||y||) for Gaussian x of
    shape ``x_shape`` (with batch) and Gaussian y, drawn from ``torch.Generator(seed)``.
    About 1e-16 for an exact adjoint in float64, 1e-7 in float32."""
    device = _device_of(physics)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tuple(x_shape), generator=g, dtype=dtype, device=device)
    ax = physics.A(x)
    y = torch.randn(ax.shape, generator=g, dtype=ax.dtype, device=device)
    lhs = (ax * y).sum()
    rhs = (x * physics.A_adjoint(y)).sum()
    return float((lhs - rhs).abs() / (ax.norm() * y.norm()))
