"""Published checkpoints from the command line: ``diffrecon info PRIOR``, ``convert-prior``,
``run --prior FILE`` with ``--prior-config`` / ``--prior-label`` / ``--trust-pickle`` (and the
same keys in a ``--config`` YAML), and the run pipeline's prior loading checked against the
ORIGINAL code's D(x, sigma) (fixtures: tests/fixtures/checkpoints/NOTES.md)."""

import json
import lzma
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from diffrecon import priors
from diffrecon.cli.main import app
from diffrecon.datasets.io import read_result
from diffrecon.pipeline.options import RunOptions, load_prior

FIX = Path(__file__).parent / "fixtures" / "checkpoints"
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions


def cli(args, code=0):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (args, res.stdout, res.stderr)
    return res


@pytest.mark.parametrize("name, config, label, trust, ref", [
    ("adm_dps_ffhq_tiny.pt", "adm_dps_ffhq_tiny.yaml", None, False, None),
    ("adm_dds_knee_tiny.pt", "adm_dds_knee_tiny.yml", None, False, None),
    ("adm_reddiff_imagenet_cond_tiny.pt", "adm_reddiff_imagenet_cond_tiny.yaml", 7, False, None),
    ("scoremri_knee_tiny.pth", "score_mri/configs/ve/scoremri_knee_tiny.py", None, False, None),
    ("edm_adm_cond_tiny.pkl", None, 3, True, "3"),
    ("edm_adm_cond_tiny.pkl", None, None, True, "none"),
    ("scoresde_celebahq_tiny.pth", None, None, False, None),
])
def test_run_options_prior_matches_original_code(files, name, config, label, trust, ref):
    """The prior ``diffrecon run`` builds from its options is the original's D."""
    opts = RunOptions(prior=str(files(name)), prior_label=label, trust_pickle=trust,
                      prior_config=None if config is None else [str(FIX / config)])
    prior = load_prior(opts.prior, torch.device("cpu"), **opts.prior_load())
    exp = torch.load(FIX / f"{name.split('.')[0]}.expected.pt", weights_only=True)
    ref_d = exp["D"] if ref is None else exp["D"][ref]
    for k, sigma in enumerate(exp["sigma"].tolist()):
        with torch.no_grad():
            got = prior.denoise(exp["x0"] + exp["sigma"][k] * exp["n"], sigma)
        assert float((got - ref_d[k]).norm() / ref_d[k].norm()) <= 1e-5


def test_info_and_convert_prior(files, tmp_path):
    d = json.loads(cli(["info", files("adm_dds_knee_tiny.pt"), "--json"]).stdout)
    assert (d["kind"], d["channels"], d["data_range"]) == ("adm", 2, [-1.0, 1.0])
    assert d["config"]["unet"]["channel_mult"] == [1, 2] and "num_res_blocks" in \
        d["inferred_from_file"]
    pkl = files("edm_adm_cond_tiny.pkl")
    res = cli(["info", pkl], code=2)
    assert len(res.stderr.strip().splitlines()) == 1 and "--trust-pickle" in res.stderr \
        and "convert-prior" in res.stderr
    out = tmp_path / "edm.pt"
    cli(["convert-prior", pkl, out, "--trust-pickle", "--prior-label", 3])
    d = json.loads(cli(["info", out, "--json"]).stdout)     # no pickle, no options now
    assert d["kind"] == "edm" and d["config"]["label"] == 3 and d["sigma_max"] == 80.0
    cli(["convert-prior", pkl, out, "--trust-pickle"], code=2)   # exists: --overwrite
    d = json.loads(cli(["info", "phantom-mri", "--json"]).stdout)
    assert d["kind"] == "diffrecon" and d["channels"] == 2


def test_run_with_published_checkpoints(files, tmp_path):
    """``diffrecon run --prior FILE`` on a multi-coil scan: a DDS-format ADM (2 channels) and
    the real-valued score-MRI NCSN++ on real and imaginary parts (per_channel: 2); the
    --config YAML keys give the same result as the flags."""
    scan = tmp_path / "knee.h5"
    cli(["simulate", "mri", "-o", scan, "--size", 48, "--slices", 1, "--coils", 4,
         "--center-fraction", 0.16, "--seed", 1])
    dds = files("adm_dds_knee_tiny.pt")
    common = ["--steps", 2, "--quiet", "--device", "cpu"]
    cli(["run", scan, "-o", tmp_path / "a.h5", "--prior", dds, "--prior-config",
         FIX / "adm_dds_knee_tiny.yml", *common])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"prior": str(dds),
                                      "prior_config": [str(FIX / "adm_dds_knee_tiny.yml")]}))
    cli(["run", scan, "-o", tmp_path / "b.h5", "--config", config, *common])
    a, b = read_result(tmp_path / "a.h5"), read_result(tmp_path / "b.h5")
    assert (a.reconstruction == b.reconstruction).all()
    assert a.attrs["prior_sha256"] == priors.load(dds).checksum
    per = tmp_path / "per_channel.yaml"
    per.write_text("per_channel: 2\n")
    cli(["run", scan, "-o", tmp_path / "c.h5", "--prior", files("scoremri_knee_tiny.pth"),
         "--prior-config", FIX / "score_mri/configs/ve/scoremri_knee_tiny.py",
         "--prior-config", per, *common])
    res = cli(["run", scan, "-o", tmp_path / "d.h5", "--prior", files("scoremri_knee_tiny.pth"),
               *common], code=2)        # one channel for a two-channel scan: one-line error
    assert "channel" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_dds_knee_320_full_size(tmp_path):
    """The DDS fastMRI-knee-320 ADM at full size (361 M random weights, saved as DDS loads
    them: torch.load of a state dict), with its released config: D on a 320 x 320 two-channel
    input, then ``diffrecon run --prior FILE`` on a 320 x 320 multi-coil scan."""
    with lzma.open(FIX / "released_shapes.json.xz", "rt") as f:
        entry = json.load(f)["dds_knee_320"]
    g = torch.Generator().manual_seed(0)
    sd = {k: 0.02 * torch.randn(v, generator=g) for k, v in entry["state_dict"].items()}
    path = tmp_path / "fastmri_knee_320_complex_1m.pt"
    torch.save(sd, path)
    del sd
    cfg = tmp_path / "fastmri_knee_320_complex.yml"
    cfg.write_text(yaml.safe_dump(entry["config"]))
    prior = priors.load(path, config=cfg)
    assert prior.channels == 2 and 320 % prior.size_multiple == 0
    x = torch.randn(1, 2, 320, 320, generator=g, dtype=torch.float64)
    with torch.no_grad():
        d = prior.denoise(x, 0.5)
    assert d.shape == x.shape and torch.isfinite(d).all()
    del prior
    scan = tmp_path / "knee320.h5"
    cli(["simulate", "mri", "-o", scan, "--size", 320, "--slices", 1, "--coils", 4,
         "--seed", 3])
    cli(["run", scan, "-o", tmp_path / "out.h5", "--prior", path, "--prior-config", cfg,
         "--steps", 1, "--quiet", "--device", "cpu"])
    assert read_result(tmp_path / "out.h5").reconstruction.shape == (1, 320, 320)
