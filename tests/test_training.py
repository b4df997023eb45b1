import numpy as np
import pytest
import torch

from diffrecon.errors import InputError
from diffrecon.priors.network import load_network_prior
from diffrecon.priors.training import (
    ImageSource,
    denoising_report,
    make_batch,
    report_table,
    sample_sigmas,
    train_prior,
    write_model_card,
)

SMALL = {"crop": 16, "batch_size": 8, "base": 8, "blocks": 1, "phantom_size": 32, "lr": 1e-2,
         "warmup": 3, "device": "cpu", "seed": 5, "log_every": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_loss_decreases_and_resume_is_bit_exact(tmp_path):
    logs = []
    full = train_prior(tmp_path / "full", family="mri", channels=2, steps=30,
                       checkpoint_every=100, callback=logs.append, **SMALL)
    losses = [d["loss"] for d in logs]
    assert [d["step"] for d in logs] == list(range(1, 31))
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
    # interrupted after 15 steps, then resumed to 30
    train_prior(tmp_path / "part", family="mri", channels=2, steps=30, stop_at=15,
                checkpoint_every=100, **SMALL)
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["step"] == 15
    resumed = train_prior(tmp_path / "part", family="mri", channels=2, steps=30,
                          checkpoint_every=100, **SMALL)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert a["history"] == b["history"]
    x = torch.randn(1, 2, 16, 16)
    assert torch.equal(full.denoise(x, 0.1), resumed.denoise(x, 0.1))
    assert full.channels == 2 and full.data_range == (-1.0, 1.0) and full.data_mean == 0.0
    exported = load_network_prior(tmp_path / "full" / "prior.pt")
    assert exported.extra["steps"] == 30 and exported.extra["recipe"]["crop"] == 16


def test_batches_deterministic_and_sigmas_cover_range():
    src = ImageSource("ellipses", 1, size=32)
    a, b = make_batch(src, 7, 4, 16, 0), make_batch(src, 7, 4, 16, 0)
    assert a.shape == (4, 1, 16, 16) and np.array_equal(a, b)
    assert not np.array_equal(a, make_batch(src, 8, 4, 16, 0))
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(20000, g, sigma_min=0.002, sigma_max=80.0, sigma_data=0.25)
    assert s.min() >= 0.002 * (1 - 1e-6) and s.max() <= 80.0 * (1 + 1e-6)
    assert (s < 0.01).float().mean() > 0.02 and (s > 10).float().mean() > 0.02
    # log-normal part has median sd / 0.5 * exp(-1.2)
    assert 0.08 < s.median().item() < 0.25


def test_input_errors(tmp_path):
    with pytest.raises(InputError, match="channels"):
        ImageSource("ellipses", 2)
    with pytest.raises(InputError, match="does not exist"):
        ImageSource(str(tmp_path / "nope.h5"), 1)


def test_h5_source_and_model_card(tmp_path):
    import h5py

    with h5py.File(tmp_path / "imgs.h5", "w") as f:
        f["image"] = np.random.default_rng(0).random((3, 20, 20)).astype(np.float32)
    prior = train_prior(tmp_path / "h5", family=str(tmp_path / "imgs.h5"), channels=1,
                        steps=4, checkpoint_every=100, **SMALL)
    assert prior.data_range[0] >= 0 and prior.data_range[1] <= 1
    report = denoising_report(prior, "ellipses", sigmas=(0.05, 0.2), n=1, size=32)
    assert len(report["prior"]) == len(report["bm3d"]) == 2
    # BM3D on piecewise-constant phantoms gains well over the noisy PSNR
    assert report["bm3d"][1] > report["noisy"][1] + 3
    assert report["noisy"][0] == pytest.approx(-20 * np.log10(0.05), abs=1.0)  # 1024 pixels
    card = write_model_card(tmp_path / "card.md", prior, report).read_text()
    table = report_table(report)
    assert table in card and "| 0.05 |" in table and "| 0.2 |" in table
    assert "parameters" in card and "4 steps" in card
