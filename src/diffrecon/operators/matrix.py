"""Dense linear operator y = A x on flat signals (B, d) -> (B, d_y): A(x) = x @ A^T,
A^T(y) = y @ A (the Gaussian-mixture test problems of the solver benchmarks)."""

from __future__ import annotations

import numpy as np
import torch
from deepinv.physics import LinearPhysics

from diffrecon.operators._common import gaussian_noise


class _Matrix(LinearPhysics):
    """LinearPhysics holding the dense matrix as buffer ``matrix`` (d_y, d)."""

    def __init__(self, matrix: torch.Tensor, noise_model):
        super().__init__(noise_model=noise_model, img_size=(matrix.shape[1],),
                         device=matrix.device)
        self.register_buffer("matrix", matrix)

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return x @ self.matrix.T

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return y @ self.matrix

    def A_adjoint_A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return (x @ self.matrix.T) @ self.matrix


def matrix(A, noise_sigma: float = 0.0) -> LinearPhysics:
    """LinearPhysics for the dense matrix ``A`` (d_y, d) (tensor or array; its dtype and
    device are kept) acting on signals (B, d)."""
    A = A if isinstance(A, torch.Tensor) else torch.as_tensor(np.asarray(A))
    if A.ndim != 2 or not A.is_floating_point():
        raise ValueError(f"matrix: A must be a real 2D (d_y, d) array, got {A.dtype} "
                         f"{tuple(A.shape)}.")
    return _Matrix(A, gaussian_noise(noise_sigma, "matrix"))
