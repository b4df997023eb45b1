"""Shared test fixtures: one torch thread on the shared CPU, a small exact image prior, and
the published-checkpoint fixture files (``files``).

A module opts in to the thread fixture with ``pytestmark = pytest.mark.usefixtures(
"one_thread")``."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import pytest
import torch

from diffrecon.priors.analytic import GaussianMixture
from diffrecon.priors.base import Prior


@pytest.fixture
def one_thread():
    """One torch intra-op thread during the test, restored after: tiny convolutions and
    small matrices are faster (and not oversubscribed) on the shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FlatGMM(Prior):
    """A GaussianMixture over flattened images (B, C, H, W): test stand-in image prior."""

    def __init__(self, images, variance):
        super().__init__()
        self.shape = tuple(images.shape[1:])
        self.gmm = GaussianMixture(images.flatten(1), torch.ones(images.shape[0]),
                                   variance=variance)
        self.data_range = (0.0, 1.0)

    def _denoise(self, x, sigma):
        return self.gmm.denoise(x.flatten(1), sigma).view_as(x)


@pytest.fixture(scope="module")
def ellipse_gmm():
    """(images, prior): ellipse phantoms 0-3 of the default split, (4, 1, 32, 32) float64, and
    the equal-weight Gaussian mixture on them with per-pixel variance 1e-3 (exact denoiser)."""
    from diffrecon.datasets.phantoms import phantom_batch

    imgs = torch.from_numpy(phantom_batch("ellipses", 32, range(4))).to(torch.float64)[:, None]
    return imgs, FlatGMM(imgs, variance=1e-3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``files(name)``: path of the decompressed ``tests/fixtures/checkpoints/<name>.xz``,
    decompressed once per module (its sha256 is what the official code wrote)."""
    fixtures = Path(__file__).parent / "fixtures" / "checkpoints"
    root = tmp_path_factory.mktemp("released")

    def get(name: str) -> Path:
        dst = root / name
        if not dst.exists():
            with lzma.open(fixtures / f"{name}.xz") as f, open(dst, "wb") as g:
                shutil.copyfileobj(f, g)
        return dst

    return get
