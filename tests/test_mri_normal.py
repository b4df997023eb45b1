"""``operators.mri.SenseMRI.A_adjoint_A``: the fused SENSE normal operator equals deepinv's
A_adjoint(A(x)) bit for bit on even grids (every fastMRI grid; one or per-slice coil maps,
float32 and float64) and to float rounding on odd ones (the FFTs round differently), and
the solvers' data consistency uses it."""

from __future__ import annotations

import pytest
import torch

from diffrecon import operators
from diffrecon.operators.mri import SenseMRI
from diffrecon.recon.common import normal_operator, physics_in_dtype

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("hw", [(16, 12), (320, 320), (15, 17)])
def test_fused_normal_operator_is_a_adjoint_a_bit_for_bit(hw):
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(hw[1], generator=g) < 0.4).float()
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
        if hw[0] % 2 == 0 and hw[1] % 2 == 0:
            assert torch.equal(fused, ref)
        else:
            assert (fused - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert normal_operator(phys[0]) == phys[0].A_adjoint_A  # what DDS's CG calls
    # not the identity or a stale map: a sabotaged mask changes it
    bad = operators.mri(torch.ones(hw[1]), phys[0].coil_maps[0])
    assert not torch.equal(bad.A_adjoint_A(x), phys[0].A_adjoint_A(x))
