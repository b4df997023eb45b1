"""``operators.mri.SenseMRI.A_adjoint_A``: the fused SENSE normal operator equals deepinv's
A_adjoint(A(x)) to float rounding (column masks: 1D transforms along W only; 2D masks: 2D
transforms; even and odd grids; one or per-slice coil maps; float32 and float64), follows
changed coil maps, and the solvers' data consistency uses it."""

from __future__ import annotations

import pytest
import torch

from diffrecon import operators
from diffrecon.operators.mri import SenseMRI
from diffrecon.recon.common import normal_operator, physics_in_dtype

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("hw, columns", [((16, 12), True), ((320, 320), True),
                                         ((15, 17), True), ((16, 12), False), ((15, 17), False)])
def test_fused_normal_operator_is_a_adjoint_a(hw, columns):
    g = torch.Generator().manual_seed(0)
    shape = hw[1:] if columns else hw
    mask = (torch.rand(*shape, generator=g) < 0.4).float()
    phys = [operators.mri(mask, torch.randn(3, *hw, dtype=torch.complex64, generator=g))
            for _ in range(2)]
    assert isinstance(phys[0], SenseMRI)
    x = torch.randn(2, 2, *hw, generator=g)
    per_slice = operators.mri(mask, torch.cat([p.coil_maps for p in phys]))  # (2, C, H, W)
    for p, u in ((phys[0], x), (per_slice, x),
                 (physics_in_dtype(phys[1], torch.float64), x.double())):
        fused = p.A_adjoint_A(u)
        assert fused.dtype == u.dtype and fused.shape == u.shape
        ref = p.A_adjoint(p.A(u))
        tol = 1e-6 if u.dtype == torch.float32 else 1e-14  # measured: 2e-7 / 4e-16
        assert (fused - ref).abs().max() <= tol * ref.abs().max()
        assert p._normal_parts()[3] == ((-1,) if columns else (-2, -1))
    assert normal_operator(phys[0]) == phys[0].A_adjoint_A  # what DDS's CG calls
    # not the identity or a stale map: a sabotaged mask changes it
    bad = operators.mri(torch.ones(hw[1]), phys[0].coil_maps[0])
    assert not torch.equal(bad.A_adjoint_A(x), phys[0].A_adjoint_A(x))
    # the shifted maps are cached: new maps (update) and in-place edits are followed
    p = phys[0]
    p.A_adjoint_A(x)
    p.update(coil_maps=phys[1].coil_maps.clone())
    assert torch.allclose(p.A_adjoint_A(x), phys[1].A_adjoint_A(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        p.coil_maps.mul_(2)
    assert torch.allclose(p.A_adjoint_A(x), 4 * phys[1].A_adjoint_A(x), rtol=0, atol=1e-5)
