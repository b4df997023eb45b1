"""``--precision bf16``: the network prior under bf16 autocast (issue 16, speed on CPUs with
native bf16 and on CUDA); refused for priors without a network, recorded in the result."""

from __future__ import annotations

import pytest
import torch
from _shared import _one_line_error
from typer.testing import CliRunner

from diffrecon.cli.main import app
from diffrecon.datasets.io import read_result
from diffrecon.errors import InputError
from diffrecon.pipeline.options import RunOptions, native_bf16, set_precision
from diffrecon.priors import load
from diffrecon.priors.analytic import GaussianMixture

runner = CliRunner()
CPU = torch.device("cpu")


def test_bf16_network_is_close_to_fp32_and_fp32_is_restored():
    prior = load("mri").eval()
    gen = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.01, 0.05, 1.0, 10.0])
    x = torch.randn(4, 2, 32, 32, generator=gen) * sigma[:, None, None, None]
    with torch.no_grad():
        exact = prior.denoise(x, sigma)
        set_precision(prior, "bf16", "mri", CPU)
        fast = prior.denoise(x, sigma)
        set_precision(prior, "fp32", "mri", CPU)
        again = prior.denoise(x, sigma)
    assert fast.dtype == torch.float32
    assert torch.equal(again, exact)
    assert not torch.equal(fast, exact)           # it did run in bf16
    rms = (fast - exact).flatten(1).pow(2).mean(1).sqrt() / sigma
    assert float(rms.max()) < 0.03, rms           # measured: 1.4% of sigma at 0.01, 0.007%
    assert float(rms.min()) > 0                   # at 10: far below the denoiser's own error


def test_bf16_is_refused_for_a_prior_without_a_network():
    gmm = GaussianMixture(torch.zeros(1, 4), torch.ones(1))
    with pytest.raises(InputError, match=r"^--precision bf16: prior 'gmm' has no network"):
        set_precision(gmm, "bf16", "gmm", CPU)
    assert set_precision(gmm, "fp32", "gmm", CPU) == "fp32"  # nothing to do, no error
    assert set_precision(gmm, "auto", "gmm", CPU) == "fp32"  # no network: fp32


def test_precision_flag_is_validated_and_recorded(tmp_path):
    with pytest.raises(InputError, match=r"^--precision 'fp16' is not valid; expected auto, fp32, "
                                         r"bf16$"):
        RunOptions(precision="fp16")
    scan = tmp_path / "mri.h5"
    assert runner.invoke(app, ["simulate", "mri", "-o", str(scan), "--size", 32, "--slices",
                               1, "--seed", 1, "--coil-maps"]).exit_code == 0
    _one_line_error(runner.invoke(app, ["run", str(scan), "-o", str(tmp_path / "x.h5"),
                                        "--precision", "half"]), "--precision 'half'")
    out = tmp_path / "bf16.h5"
    res = runner.invoke(app, ["run", str(scan), "-o", str(out), "--precision", "bf16",
                              "--steps", 3, "-q"])
    assert res.exit_code == 0, res.stderr
    attrs = read_result(out).attrs
    assert attrs["settings"]["precision"] == "bf16" and attrs["precision"] == "bf16"


def test_auto_precision_follows_the_device():
    prior = load("mri")
    used = set_precision(prior, "auto", "mri", CPU)
    assert used == ("bf16" if native_bf16(CPU) else "fp32")
    assert prior.autocast == (used == "bf16")
    assert not native_bf16(torch.device("meta"))
