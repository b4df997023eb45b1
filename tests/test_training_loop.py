"""The training loop: loss decreases, resume is bit-exact, growth preserves the function;
user HDF5 images train and the model card reports the denoising PSNR."""

import numpy as np
import pytest
import torch

from diffrecon.priors.network import UNet, load_network_prior
from diffrecon.training import report
from diffrecon.training.loop import grow_unet, sample_sigmas, train_prior

SMALL = {"crop": 16, "batch_size": 8, "base": 8, "blocks": 1, "lr": 1e-2, "warmup": 3,
         "device": "cpu", "seed": 5, "log_every": 1, "workers": 0}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_loss_decreases_and_resume_is_bit_exact(tmp_path):
    logs = []
    full = train_prior(tmp_path / "full", family="mri-phantoms", steps=30,
                       checkpoint_every=100, callback=logs.append, **SMALL)
    losses = [d["loss"] for d in logs]
    assert [d["step"] for d in logs] == list(range(1, 31))
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
    # interrupted after 15 steps, then resumed to 30
    train_prior(tmp_path / "part", family="mri-phantoms", steps=30, stop_at=15,
                checkpoint_every=100, **SMALL)
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["step"] == 15
    resumed = train_prior(tmp_path / "part", family="mri-phantoms", steps=30,
                          checkpoint_every=100, **SMALL)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert a["history"] == b["history"]
    x = torch.randn(1, 2, 16, 16)
    assert torch.equal(full.denoise(x, 0.1), resumed.denoise(x, 0.1))
    assert full.channels == 2 and full.data_mean == 0.0
    exported = load_network_prior(tmp_path / "full" / "prior.pt")
    assert exported.extra["steps"] == 30 and exported.extra["recipe"]["crop"] == 16


def test_worker_process_gives_the_same_bits(tmp_path):
    kw = {**SMALL, "steps": 4, "checkpoint_every": 100}
    a = train_prior(tmp_path / "a", family="ellipses", **kw)
    b = train_prior(tmp_path / "b", family="ellipses", **{**kw, "workers": 1})
    x = torch.rand(1, 1, 16, 16)
    assert torch.equal(a.denoise(x, 0.2), b.denoise(x, 0.2))


@pytest.mark.parametrize("blocks", [1, 2])
def test_grown_network_computes_the_same_function(blocks):
    torch.manual_seed(0)
    small = UNet(2, base=8, mults=(1, 2), blocks=blocks)
    for p in small.parameters():   # a "trained" network: no zero-initialised layers
        p.data.normal_(0, 0.2)
    big = grow_unet(small, 4)
    assert big.config["mults"] == [1, 2, 4] and big.size_multiple == 4
    x, c = torch.randn(3, 2, 16, 16), torch.randn(3)
    assert torch.allclose(small(x, c), big(x, c), rtol=0, atol=1e-5)
    assert sum(p.numel() for p in big.parameters()) > sum(p.numel() for p in small.parameters())


def test_warm_start_grows_a_smaller_prior(tmp_path):
    small = train_prior(tmp_path / "small", family="ellipses", steps=3, mults=(1, 2),
                        checkpoint_every=100, **SMALL)
    big = train_prior(tmp_path / "big", family="ellipses", steps=0, mults=(1, 2, 4),
                      init_from=str(tmp_path / "small" / "prior.pt"), checkpoint_every=100,
                      **SMALL)
    x = torch.rand(2, 1, 16, 16)
    assert torch.allclose(small.denoise(x, 0.3), big.denoise(x, 0.3), atol=1e-5)
    with pytest.raises(ValueError, match="config"):
        train_prior(tmp_path / "bad", family="ellipses", steps=0, base=16,
                    init_from=str(tmp_path / "small" / "prior.pt"),
                    **{k: v for k, v in SMALL.items() if k != "base"})


def test_sigmas_cover_the_range():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(20000, g, sigma_min=0.002, sigma_max=80.0, sigma_data=0.25)
    assert s.min() >= 0.002 * (1 - 1e-6) and s.max() <= 80.0 * (1 + 1e-6)
    assert (s < 0.01).float().mean() > 0.02 and (s > 10).float().mean() > 0.02
    assert 0.08 < s.median().item() < 0.25   # log-normal part: median sd / 0.5 * exp(-1.2)


def test_h5_images_train_and_the_model_card_reports_them(tmp_path):
    import h5py

    with h5py.File(tmp_path / "imgs.h5", "w") as f:
        f["image"] = np.random.default_rng(0).random((3, 20, 20)).astype(np.float32)
    prior = train_prior(tmp_path / "h5", family=str(tmp_path / "imgs.h5"), steps=4,
                        checkpoint_every=100, **SMALL)
    assert prior.channels == 1 and 0 <= prior.data_range[0] < prior.data_range[1] <= 1
    rows = report.denoising_report(prior, "phantoms", sigmas=(0.05, 0.2), limit=1)
    assert rows["images"] == ["ellipses-test-0"] and len(rows["bm3d"]) == 2
    # noisy PSNR: peak max|x| over the noise std (16384 pixels: the MSE is within ~1%)
    clean = report.heldout_images("phantoms", 1, 0.9, limit=1)["ellipses-test-0"]
    assert rows["noisy"][0] == pytest.approx(20 * np.log10(clean.max() / 0.05), abs=0.1)
    # BM3D on a piecewise-constant phantom gains well over the noisy PSNR
    assert rows["bm3d"][1] > rows["noisy"][1] + 3
    card = report.write_model_card(tmp_path / "card.md", prior, [rows]).read_text()
    table = report.report_table(rows)
    assert table in card and "| 0.05 |" in table and "| 0.2 |" in table
    assert f"{prior.net.config}" in card and "4 steps" in card
