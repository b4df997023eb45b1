"""Shared test fixtures: one torch thread on the shared CPU, a small exact image prior, the
published-checkpoint fixture files (``files``), the CLI failure checks
(``one_line_error``, ``file_sha``), and the hostile-file tests' scans and checks (``mri``,
``ct``, ``mri_result``, ``reference``, ``refused``; helpers in _hostile.py).

A module opts in to the thread fixture with ``pytestmark = pytest.mark.usefixtures(
"one_thread")``."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _hostile import RUN, arrays, deadline, invoke, leftovers, verbs
from _shared import _file_sha, _one_line_error

from diffrecon.datasets.simulate import simulate_ct, simulate_mri
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


@pytest.fixture(scope="session")
def one_line_error():
    """``one_line_error(cli_result, *needles) -> line``: exit 2, one stderr line
    ``diffrecon: error: ...`` holding every needle, no traceback."""
    return _one_line_error


@pytest.fixture(scope="session")
def file_sha():
    """``file_sha(path) -> hex``: sha256 of the file's bytes."""
    return _file_sha


# ------------------------------------------------ hostile-file tests (test_hostile_*.py)

@pytest.fixture(scope="module")
def mri(tmp_path_factory) -> Path:
    """Two-slice, two-coil 16 px scan with coil maps, mask, header and ground truth."""
    return simulate_mri(tmp_path_factory.mktemp("mri") / "mri.h5", size=16, slices=2,
                        coils=2, center_fraction=0.3, with_coil_maps=True, noise=0.01)


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    return simulate_ct(tmp_path_factory.mktemp("ct") / "ct.h5", size=16, slices=1, views=8)


@pytest.fixture(scope="module")
def mri_result(mri, tmp_path_factory) -> Path:
    """The template's zero-filled result file."""
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    assert invoke("run", mri, "-o", out, *RUN["mri"]).exit_code == 0
    return out


@pytest.fixture(scope="module")
def reference(mri_result) -> dict[str, np.ndarray]:
    """The template's zero-filled result arrays."""
    return arrays(mri_result)

@pytest.fixture(scope="session")
def refused(one_line_error, file_sha):
    """``refused(path, tmp, *needles, modality='mri', skip=())``: every verb of
    :func:`verbs` but ``skip`` exits 2 with one line holding ``needles``; nothing is written
    and the input's bytes are unchanged."""
    def check(path: Path, tmp: Path, *needles: str, modality: str = "mri",
              skip: tuple[str, ...] = ()) -> None:
        before = file_sha(path) if path.is_file() else None
        for verb, args in verbs(path, tmp, modality).items():
            if verb in skip:
                continue
            with deadline(60):
                res = invoke(*args)
            one_line_error(res, *needles)
            assert not (tmp / "out.h5").exists() and not (tmp / "maps.h5").exists(), verb
            assert not leftovers(tmp)
        if before is not None:
            assert file_sha(path) == before

    return check
