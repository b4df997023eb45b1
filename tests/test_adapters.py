"""Adapters (parameterisations) and the loader registry on tiny random networks saved to
tmp_path (no downloads). Equality with the ORIGINAL repositories' code is test_checkpoints.py."""

import math

import pytest
import torch
from deepinv.models import ADMUNet, DRUNet, NCSNpp

from diffrecon.errors import InputError
from diffrecon.priors.adapters import VEScorePrior, vp_betas
from diffrecon.priors.checkpoints.adm import GuidedDiffusionUNet
from diffrecon.priors.registry import KINDS, available, load

ADM_CFG = dict(image_size=16, in_channels=1, num_channels=32, num_res_blocks=1,
               channel_mult=(1, 2), attention_resolutions="8", num_heads=1,
               num_head_channels=-1)
ADM_NET = dict(in_channels=1, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
               attention_resolutions=(2,), num_heads=1, num_head_channels=-1,
               use_scale_shift_norm=True, resblock_updown=True)
# >= 128 channels: deepinv's blocks (32 groups) and EDM's (min(32, C / 4)) then agree
EDM_ARCH = dict(img_resolution=16, in_channels=1, out_channels=1, model_channels=128,
                channel_mult=(1,), num_blocks=1, attn_resolutions=(16,), dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions


def _randomise(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


def _x(dtype=torch.float64, b=2, seed=1):
    return torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _save(tmp_path, net, config=None, name="model.pt"):
    path = tmp_path / name
    sd = net.state_dict()
    torch.save(sd if config is None else {"state_dict": sd, "config": config}, path)
    return path


@pytest.fixture(scope="module")
def adm_net():
    return _randomise(GuidedDiffusionUNet(out_channels=2, **ADM_NET))


def _train_sigma(t, betas=None):
    betas = vp_betas() if betas is None else betas
    abar = torch.cumprod(1 - betas, 0)[t]
    return float(((1 - abar) / abar).sqrt()), float(abar.sqrt())


def test_vp_eps_identity_at_training_timesteps(tmp_path, adm_net):
    prior = load(_save(tmp_path, adm_net, ADM_CFG), kind="adm")
    assert prior.channels == 1 and prior.data_range == (-1.0, 1.0)
    x = _x()
    for t in (0, 37, 500, 999):
        sigma, a_t = _train_sigma(t)
        with torch.no_grad():
            out = adm_net((a_t * x).float(), torch.full((2,), float(t)))
            expected = x - sigma * out[:, :1].double()
            got = prior.denoise(x, sigma)
        assert out.shape[1] == 2 and got.dtype == torch.float64
        assert float(prior.sigma_to_t(torch.tensor([sigma], dtype=torch.float64))[0]) == t
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * max(1.0, sigma))


def test_vp_fractional_and_nearest_timesteps(tmp_path, adm_net):
    path = _save(tmp_path, adm_net)       # raw guided-diffusion style state dict
    cfg = {k: v for k, v in ADM_CFG.items() if k not in ("in_channels", "num_channels")}
    interp = load(path, kind="adm", **cfg)
    nearest = load(path, kind="adm", timestep="nearest", **cfg)
    s0, _ = _train_sigma(200)
    s1, _ = _train_sigma(201)
    sigma = math.exp(0.25 * math.log(s0) + 0.75 * math.log(s1))
    t = interp.sigma_to_t(torch.tensor([sigma], dtype=torch.float64))
    assert float(t[0]) == pytest.approx(200.75, abs=1e-9)
    assert float(nearest.sigma_to_t(torch.tensor([sigma], dtype=torch.float64))[0]) == 201
    x = _x()
    a = 1 / math.sqrt(1 + sigma ** 2)
    with torch.no_grad():
        eps = adm_net((a * x).float(), torch.full((2,), 200.75))[:, :1].double()
        torch.testing.assert_close(interp.denoise(x, sigma), x - sigma * eps)
        d0 = interp.denoise(x, s0)
        assert not torch.allclose(d0, interp.denoise(x, sigma))


def test_sigma_forms_and_dtypes(tmp_path, adm_net):
    prior = load(_save(tmp_path, adm_net, ADM_CFG), kind="adm")
    x = _x()
    with torch.no_grad():
        d_float = prior.denoise(x, 0.5)
        d_tensor = prior.denoise(x, torch.tensor([0.5, 0.5], dtype=torch.float64))
        d_rows = prior.denoise(x, torch.tensor([0.5, 2.0], dtype=torch.float64))
        d32 = prior.denoise(x.float(), 0.5)
    assert torch.equal(d_float, d_tensor)
    assert torch.equal(d_rows[:1], d_float[:1]) and not torch.allclose(d_rows[1:], d_float[1:])
    assert d32.dtype == torch.float32
    torch.testing.assert_close(d32.double(), d_float, rtol=1e-4, atol=1e-4)


def test_vpred_identity(tmp_path):
    net = _randomise(GuidedDiffusionUNet(out_channels=1, **ADM_NET), seed=2)
    betas = vp_betas(100, schedule="cosine")
    prior = load(_save(tmp_path, net, {**ADM_CFG, "learn_sigma": False}), kind="vpred",
                 num_train_steps=100, schedule="cosine")
    x = _x()
    sigma, a_t = _train_sigma(60, betas)
    with torch.no_grad():
        v = net((a_t * x).float(), torch.full((2,), 60.0)).double()
        got = prior.denoise(x, sigma)
    s_t = math.sqrt(1 - a_t ** 2)
    torch.testing.assert_close(got, a_t * (a_t * x) - s_t * v, rtol=1e-5, atol=1e-5)


def test_ncsnpp_ve_matches_deepinv_preconditioning(tmp_path):
    net = _randomise(NCSNpp(pretrained=None, augment_dim=0, precondition_type="ve-baseline",
                            **EDM_ARCH), seed=3)
    prior = load(_save(tmp_path, net, EDM_ARCH), kind="ncsnpp")
    assert isinstance(prior, VEScorePrior)
    x = _x()
    sigma = torch.tensor([0.3, 7.0], dtype=torch.float64)
    with torch.no_grad():
        reference = net(x.float(), sigma.float()).double()   # deepinv's own D(x, sigma)
        got = prior.denoise(x, sigma)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-4)


def test_ve_score_output_conventions():
    score_net = lambda x, s: -x / (1 + s.reshape(-1, 1, 1, 1) ** 2)   # N(0, I) data
    net = torch.nn.Module()
    net.forward = score_net
    x = _x()
    sig = torch.tensor([0.5, 3.0], dtype=torch.float64)
    exact = x / (1 + sig.reshape(-1, 1, 1, 1) ** 2)
    torch.testing.assert_close(VEScorePrior(net).denoise(x, sig), exact)
    scaled = torch.nn.Module()
    scaled.forward = lambda x, c: score_net(x, 2 * c.exp()) * 2 * c.exp().reshape(-1, 1, 1, 1)
    prior = VEScorePrior(scaled, output="scaled_score", noise_input="log_half_sigma")
    torch.testing.assert_close(prior.denoise(x, sig), exact)


def test_edm_matches_deepinv_admunet(tmp_path):
    net = _randomise(ADMUNet(pretrained=None, pixel_std=0.5, augment_dim=0,
                             **{**EDM_ARCH, "attn_resolutions": ()}), seed=4)
    prior = load(_save(tmp_path, net, {**EDM_ARCH, "attn_resolutions": ()}), kind="edm",
                 arch="ADMUNet")
    x = _x()
    sigma = torch.tensor([0.05, 20.0], dtype=torch.float64)
    with torch.no_grad():
        reference = net(x.float(), sigma.float()).double()
        got = prior.denoise(x, sigma)
    assert prior.data_range == (-1.0, 1.0) and prior.sigma_max == 80.0
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-4)


def test_deepinv_denoiser(tmp_path):
    net = _randomise(DRUNet(1, 1, nc=(8, 8, 8, 8), nb=1, pretrained=None), seed=5)
    path = _save(tmp_path, net)
    prior = load(path, kind="deepinv", model="DRUNet", in_channels=1, out_channels=1,
                 nc=(8, 8, 8, 8), nb=1)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(prior.denoise(x, 0.1), net(x.float(), 0.1).double())


def test_diffusers_local_directory(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1,
                                 block_out_channels=(32, 32), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    _randomise(unet, seed=6)
    sched = diffusers.DDPMScheduler(num_train_timesteps=50, prediction_type="v_prediction")
    unet.save_pretrained(tmp_path / "m" / "unet")
    sched.save_pretrained(tmp_path / "m" / "scheduler")
    prior = load(tmp_path / "m", kind="diffusers")
    x = _x()
    sigma, a_t = _train_sigma(30, sched.betas.double())
    with torch.no_grad():
        v = unet((a_t * x).float(), torch.full((2,), 30.0)).sample.double()
        got = prior.denoise(x, sigma)
    s_t = math.sqrt(1 - a_t ** 2)
    torch.testing.assert_close(got, a_t * a_t * x - s_t * v, rtol=1e-5, atol=1e-5)


def test_registry_errors(tmp_path, adm_net):
    assert isinstance(available(), list)
    assert set(KINDS) == {"adm", "vpred", "score_sde", "ncsnpp", "edm", "diffusers", "deepinv",
                          "diffrecon"}
    path = _save(tmp_path, adm_net, ADM_CFG)
    with pytest.raises(InputError, match="adm.*ncsnpp"):
        load(path, kind="bogus")
    with pytest.raises(InputError, match="missing.pt"):
        load(tmp_path / "missing.pt", kind="adm")
    with pytest.raises(InputError, match="not-a-prior"):
        load("not-a-prior")
    # an option contradicting the file names both values and the way out
    with pytest.raises(InputError, match=r"channel_mult=\(1, 2, 2\) but the file has "
                                         r"channel_mult=\(1, 2\); drop the option"):
        load(path, kind="adm", channel_mult=(1, 2, 2))
    with pytest.raises(InputError, match="unknown option.*not_an_option"):
        load(path, kind="adm", not_an_option=3)
    drunet = tmp_path / "drunet.pt"
    torch.save(DRUNet(1, 1, nc=(8, 8, 8, 8), nb=1, pretrained=None).state_dict(), drunet)
    with pytest.raises(InputError, match="cannot tell the kind.*give kind="):
        load(drunet)
    # wrong architecture options: the first differing key and shapes, and what to give
    with pytest.raises(InputError, match=r"does not match the architecture \(shape m_head\."
                                         r"weight \(8, 2, 3, 3\) in the file vs \(16, 2, 3, 3\)"
                                         r".*give the DRUNet constructor arguments"):
        load(drunet, kind="deepinv", in_channels=1, out_channels=1, nc=(16, 16, 16, 16), nb=1)
