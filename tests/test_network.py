import math

import pytest
import torch

from diffrecon.errors import InputError
from diffrecon.priors.network import (
    NetworkPrior,
    UNet,
    count_parameters,
    edm_scalings,
    load_network_prior,
    save_network_prior,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_prior(channels=1, seed=0, **kw):
    torch.manual_seed(seed)
    net = UNet(channels, base=8, blocks=1, emb_dim=16)
    with torch.no_grad():  # make the network output non-negligible so tests see F
        net.conv_out.weight.mul_(10)
    kw = {"sigma_data": 0.3, "data_mean": 0.2, **kw}
    return NetworkPrior(net, name="test", **kw).eval()


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (1, 1, 20, 12), (3, 1, 17, 23), (1, 1, 5, 6)])
def test_output_shape_any_size(shape):
    prior = make_prior()
    x = torch.rand(shape)
    out = prior.denoise(x, 0.1)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_two_channels_and_default_size():
    torch.manual_seed(0)
    net = UNet(2)
    assert 1_000_000 <= count_parameters(net) <= 2_500_000
    prior = NetworkPrior(net, data_range=(-1, 1))
    assert prior.channels == 2 and prior.size_multiple == 4
    assert prior.denoise(torch.randn(1, 2, 12, 8), 0.5).shape == (1, 2, 12, 8)


def test_edm_scalings_formulas():
    sigma, sd = torch.tensor([0.01, 0.5, 3.0], dtype=torch.float64), 0.5
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sd)
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-12)
        assert c_out[i].item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-12)
    # EDM identity: the training target (x - c_skip (x + s n)) / c_out has unit variance
    assert torch.allclose(c_out**2, sd**2 * (1 - c_skip), rtol=1e-12)


def test_small_sigma_returns_input_large_sigma_not():
    prior = make_prior()
    x = torch.rand(2, 1, 16, 16)
    assert (prior.denoise(x, 1e-6) - x).abs().max() < 1e-4
    # at large sigma the skip vanishes and the output is data_mean + sd * F (not x)
    assert (prior.denoise(x, 50.0) - x).abs().max() > 1e-2


def test_sigma_float_and_batch_equivalent():
    prior = make_prior()
    x = torch.rand(3, 1, 16, 16)
    a = prior.denoise(x, 0.2)
    b = prior.denoise(x, torch.full((3,), 0.2))
    assert torch.equal(a, b)
    sig = torch.tensor([0.05, 0.2, 1.0])
    c = prior.denoise(x, sig)
    for i in range(3):
        torch.testing.assert_close(c[i:i + 1], prior.denoise(x[i:i + 1], sig[i].item()))
    assert not torch.allclose(c[0], prior.denoise(x[:1], 1.0)[0])


def test_float64_in_float64_out():
    prior = make_prior()
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    out = prior.denoise(x, torch.tensor([0.1], dtype=torch.float64))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, prior.denoise(x.float(), 0.1).double())


def test_save_load_round_trip(tmp_path):
    prior = make_prior(channels=2, data_range=(-1, 1), sigma_min=0.01, sigma_max=40.0,
                       data_mean=0.0)
    path = save_network_prior(prior, tmp_path / "p.pt", {"steps": 7, "recipe": {"lr": 1e-3}})
    blob = torch.load(path, weights_only=True)
    assert blob["extra"]["steps"] == 7
    loaded = load_network_prior(path)
    assert loaded.checksum == prior.checksum
    assert (loaded.channels, loaded.data_range, loaded.sigma_max, loaded.sigma_data) == (
        2, (-1.0, 1.0), 40.0, 0.3)
    x = torch.randn(2, 2, 12, 16)
    assert torch.equal(loaded.denoise(x, 0.3), prior.denoise(x, 0.3))
    # checksum is stable across save/load cycles and changes with the weights
    save_network_prior(loaded, tmp_path / "q.pt")
    assert load_network_prior(tmp_path / "q.pt").checksum == prior.checksum
    assert make_prior(channels=2, seed=1).checksum != prior.checksum


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_network_prior(tmp_path / "missing.pt")
    torch.save({"a": 1}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="not a diffrecon network prior"):
        load_network_prior(tmp_path / "bad.pt")
