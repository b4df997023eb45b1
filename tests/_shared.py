"""Plain helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from diffrecon.priors.base import Prior


class IsoGaussian(Prior):
    """Exact denoiser of x ~ N(0, s0^2 I): D(x, sigma) = x s0^2 / (s0^2 + sigma^2); no
    convolution, so its arithmetic does not depend on how rows are batched."""

    def __init__(self, s0=0.5, channels=2):
        super().__init__()
        self.name, self.channels, self.s0 = "iso-gaussian", channels, s0
        self.data_range, self.sigma_min, self.sigma_max = (-1.0, 1.0), 0.01, 5.0

    def _denoise(self, x, sigma):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return x * self.s0 ** 2 / (self.s0 ** 2 + s ** 2)


def _one_line_error(res, *needles: str) -> str:
    """The one stderr line of a CLI result that failed with exit 2, checked to start with
    ``diffrecon: error: `` and to hold each of ``needles``; returned."""
    err = res.stderr
    assert res.exit_code == 2, (res.exit_code, err, res.stdout)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("diffrecon: error: "), err
    assert "Traceback" not in err + res.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _file_sha(path) -> str:
    """sha256 (hex) of a file's bytes: inputs are never modified."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
