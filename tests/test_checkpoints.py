"""Published checkpoints against the ORIGINAL repositories' code.

tests/fixtures/checkpoints/ holds tiny random networks that each official repository's own
code built (configs shrunk), saved in that repository's own format (xz-compressed here; the
sha256 of the decompressed file is checked), with inputs and the D(x, sigma) that the family's
own parameterisation computed from them; released_shapes.json.xz holds the key -> shape maps
of the released full-size architectures, built with the official code from the released
configs (which it also records). NOTES.md names the repositories, commits and configs.
"""

import hashlib
import json
import lzma
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from diffrecon import priors
from diffrecon.errors import InputError
from diffrecon.priors.checkpoints import adm, convert, describe, edm, score_sde
from diffrecon.priors.checkpoints.io import Checkpoint

FIX = Path(__file__).parent / "fixtures" / "checkpoints"
RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions


def _expected(name):
    return torch.load(FIX / f"{name.split('.')[0]}.expected.pt", weights_only=True)


def _check(prior, exp, D):
    for k, sigma in enumerate(exp["sigma"].tolist()):
        z = exp["x0"] + exp["sigma"][k] * exp["n"]
        with torch.no_grad():
            got = prior.denoise(z, sigma)
        assert got.dtype == torch.float64
        rel = float((got - D[k]).norm() / D[k].norm())
        assert rel <= RTOL, f"sigma {sigma}: relative error {rel:.2e}"


CASES = [  # file, config (relative to the fixtures), options, reference label
    ("adm_dps_ffhq_tiny.pt", "adm_dps_ffhq_tiny.yaml", {}, None),
    ("adm_reddiff_imagenet_cond_tiny.pt", "adm_reddiff_imagenet_cond_tiny.yaml", {"label": 7},
     None),
    ("adm_dds_knee_tiny.pt", None, {}, None),
    ("adm_dds_knee_tiny.pt", "adm_dds_knee_tiny.yml", {}, None),
    ("adm_openai_variant_tiny.pt", None,
     {"num_heads": 2, "num_head_channels": -1, "use_new_attention_order": True}, None),
    ("scoremri_knee_tiny.pth", None, {}, None),
    ("scoremri_knee_tiny.pth", "score_mri/configs/ve/scoremri_knee_tiny.py", {}, None),
    ("scoresde_celebahq_tiny.pth", None, {}, None),
    ("scoresde_celebahq_tiny.pth", "score_sde/configs/ve/scoresde_celebahq_tiny.py", {}, None),
    ("edm_adm_cond_tiny.pkl", None, {"trust_pickle": True, "label": 3}, "3"),
    ("edm_adm_cond_tiny.pkl", None, {"trust_pickle": True}, "none"),
    ("edm_ncsnpp_uncond_tiny.pkl", None, {"trust_pickle": True}, "none"),
]


@pytest.mark.parametrize("name, config, options, ref", CASES,
                         ids=[f"{c[0].split('.')[0]}-{'config' if c[1] else 'file'}-{c[3]}"
                              for c in CASES])
def test_matches_original_code(files, name, config, options, ref):
    path = files(name)
    exp = _expected(name)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == exp["sha256"]
    prior = priors.load(path, config=None if config is None else FIX / config, **options)
    _check(prior, exp, exp["D"] if ref is None else exp["D"][ref])


def test_declared_ranges(files):
    """Each family declares its data range and noise range (score-MRI: data in [0, 1], sigma
    0.01 - 378 read off the file's sigmas buffer)."""
    dps = priors.load(files("adm_dps_ffhq_tiny.pt"), config=FIX / "adm_dps_ffhq_tiny.yaml")
    mri = priors.load(files("scoremri_knee_tiny.pth"))
    pkl = priors.load(files("edm_ncsnpp_uncond_tiny.pkl"), trust_pickle=True)
    assert dps.data_range == (-1.0, 1.0) and dps.channels == 3
    assert dps.sigma_min == pytest.approx(0.0100005, rel=1e-5)
    assert dps.sigma_max == pytest.approx(157.4073, rel=1e-5)
    assert mri.data_range == (0.0, 1.0) and mri.channels == 1
    assert (mri.sigma_min, mri.sigma_max) == pytest.approx((0.01, 378.0), rel=1e-6)
    assert pkl.data_range == (-1.0, 1.0) and (pkl.sigma_min, pkl.sigma_max) == (0.002, 80.0)
    info = describe(mri)
    assert info["kind"] == "score_sde" and info["config"]["songunet"]["encoder_type"] == "residual"
    assert "model.ch_mult" in info["inferred_from_file"]


def test_labels(files):
    """Class-conditional ADM needs a label; EDM's label changes D; a label on an
    unconditional network is refused."""
    path = files("adm_reddiff_imagenet_cond_tiny.pt")
    cfg = FIX / "adm_reddiff_imagenet_cond_tiny.yaml"
    with pytest.raises(InputError, match=r"class-conditional \(1000 classes\): give label="):
        priors.load(path, config=cfg)
    with pytest.raises(InputError, match="outside 0..999"):
        priors.load(path, config=cfg, label=1000)
    with pytest.raises(InputError, match="unconditional"):
        priors.load(files("adm_dds_knee_tiny.pt"), label=1)
    exp = _expected("edm_adm_cond_tiny")
    assert float((exp["D"]["3"] - exp["D"]["none"]).norm() / exp["D"]["none"].norm()) > 1e-4


def test_pickles_need_consent_and_run_nothing(files, tmp_path):
    path = files("edm_adm_cond_tiny.pkl")
    with pytest.raises(InputError, match=r"trust_pickle=True \(--trust-pickle\).*"
                                         r"diffrecon convert-prior"):
        priors.load(path)

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'ran')!r}, 'w').close()",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ema": Evil()}))
    with pytest.raises(InputError, match="holds no EDM network"):
        priors.load(evil, trust_pickle=True)
    assert not (tmp_path / "ran").exists()        # the restricted unpickler imports nothing


@pytest.mark.parametrize("name, options", [
    ("adm_reddiff_imagenet_cond_tiny.pt",
     {"config": FIX / "adm_reddiff_imagenet_cond_tiny.yaml", "label": 7}),
    ("scoremri_knee_tiny.pth", {}),
    ("scoresde_celebahq_tiny.pth", {}),
    ("edm_adm_cond_tiny.pkl", {"trust_pickle": True, "label": 3}),
    ("edm_ncsnpp_uncond_tiny.pkl", {"trust_pickle": True}),
])
def test_convert_round_trip(files, tmp_path, name, options):
    """convert-prior writes a weights_only .pt + json card that loads with no options and
    gives bit-identical D."""
    src = files(name)
    dst = convert(src, tmp_path / "out.pt", **options)
    card = json.loads(dst.with_suffix(".json").read_text())
    assert card["source_sha256"] == _expected(name)["sha256"]
    blob = torch.load(dst, weights_only=True)
    assert blob["kind"] == card["kind"]
    a, b = priors.load(src, **options), priors.load(dst)
    exp = _expected(name)
    z = exp["x0"] + 0.7 * exp["n"]
    with torch.no_grad():
        assert torch.equal(a.denoise(z, 0.7), b.denoise(z, 0.7))
    assert (b.data_range, b.sigma_min, b.sigma_max) == (a.data_range, a.sigma_min, a.sigma_max)


def test_diffusers_folder(tmp_path):
    pytest.importorskip("diffusers")
    import tarfile

    with tarfile.open(FIX / "diffusers_vpred_tiny.tar.xz") as tar:
        tar.extractall(tmp_path, filter="data")
    prior = priors.load(tmp_path / "diffusers_vpred_tiny")
    exp = _expected("diffusers_vpred_tiny")
    _check(prior, exp, exp["D"])


# --------------------------------------------------------------------- released architectures
@pytest.fixture(scope="module")
def released():
    with lzma.open(FIX / "released_shapes.json.xz", "rt") as f:
        return json.load(f)


def _meta(shapes: dict) -> dict:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


ADM_RELEASED = ["dps_ffhq_256", "dps_imagenet_256", "reddiff_imagenet_256_cond",
                "reddiff_imagenet_256_uncond", "reddiff_imagenet_512_cond", "dds_knee_320",
                "dds_aapm_256"]


@pytest.mark.parametrize("name", ADM_RELEASED)
def test_released_adm_architectures(released, name, tmp_path):
    """Full-size released ADMs: the file alone gives the architecture (no hand-given options),
    and the released config file, as released, is accepted and agrees."""
    entry = released[name]
    sd = _meta(entry["state_dict"])
    arch = adm.infer(sd)
    cfg = tmp_path / Path(entry["config_file"]).name
    cfg.write_text(yaml.safe_dump(entry["config"]))
    label = 0 if arch["num_classes"] else None
    for config in ({}, priors.checkpoints.read_config(cfg)):
        with torch.device("meta"):
            net, kw, card = adm.build(sd, config, {}, name, label)
        assert {k: list(v.shape) for k, v in net.state_dict().items()} == entry["state_dict"]
    model = entry["config"].get("model", entry["config"])
    assert arch["num_res_blocks"] == model["num_res_blocks"]
    assert (arch["num_classes"] is not None) == bool(model["class_cond"])
    assert kw["channels"] == model.get("in_channels", 3)
    if name == "dds_knee_320":      # "16" at 320 px names no level: attention only mid-block
        assert arch["channel_mult"] == (1, 1, 2, 2, 4, 4) and arch["attention_resolutions"] == ()
    if name == "reddiff_imagenet_512_cond":
        assert arch["channel_mult"] == (0.5, 1, 1, 2, 2, 4, 4)


def test_released_diffusion_configs(released):
    """DPS's diffusion_config.yaml and RED-diff's linear1000.yaml give the ADM schedule."""
    for name in ("dps_diffusion_config", "reddiff_diffusion_linear1000"):
        gd, diff, prior_kw, _ = adm.split_config(released[name]["config"], name)
        kw = adm._prior_options(diff, prior_kw, {"in_channels": 3}, name)
        assert kw["num_train_steps"] == 1000 and kw["schedule"] == "linear"
    with pytest.raises(InputError, match=r"unknown option\(s\) \['not_a_key'\]"):
        adm.split_config({"not_a_key": 1, "use_fp16": True}, "cfg")


@pytest.mark.parametrize("name, config", [
    ("scoremri_knee_320", "score_mri/configs/ve/fastmri_knee_320_ncsnpp_continuous.py"),
    ("scoresde_celebahq_256", "score_sde/configs/ve/celebahq_256_ncsnpp_continuous.py"),
])
def test_released_score_sde_architectures(released, name, config):
    """Full-size released NCSN++ files (DataParallel keys, EMA shadow list) map onto the
    SongUNet layout; with the released .py config (read, not executed) they agree."""
    entry = released[name]
    model = _meta(entry["state_dict"])
    obj = {"model": model, "ema": {"shadow_params": [torch.empty(s, device="meta")
                                                     for s in entry["ema_shadow"]]}, "step": 0}
    cfg = priors.checkpoints.read_config(FIX / config)
    with torch.device("meta"):
        prior, card, _ = score_sde.load(Checkpoint(Path(name), obj, "torch"), None, cfg, {},
                                        None)
    arch = card["songunet"]
    assert arch["model_channels"] == cfg["model"]["nf"] == 128
    assert arch["channel_mult"] == list(cfg["model"]["ch_mult"])
    assert arch["num_blocks"] == cfg["model"]["num_res_blocks"]
    assert (prior.sigma_min, prior.sigma_max) == (0.01, cfg["model"]["sigma_max"])
    assert prior.data_range == (0.0, 1.0) and prior.channels == cfg["data"]["num_channels"]
    if name == "scoremri_knee_320":
        assert arch["attn_resolutions"] == [] and arch["decoder_type"] == "standard"
    else:
        assert arch["encoder_type"] == arch["decoder_type"] == "skip"


@pytest.mark.parametrize("name", ["edm_imagenet_64_cond_adm", "edm_ffhq_64_uncond_ncsnpp"])
def test_released_edm_architectures(released, name):
    entry = released[name]
    kw = dict(entry["init_kwargs"])
    arch = kw.pop("model_type")
    kw["in_channels"] = kw["out_channels"] = kw.pop("img_channels")
    kw.setdefault("augment_dim", 0)
    with torch.device("meta"):
        net = edm.build_net(arch, kw, name)
    want = {k[len("model."):]: v for k, v in entry["state_dict"].items()}
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == want



def test_per_channel_score_mri(files, tmp_path):
    """channels=2: the real-valued score-MRI prior denoises real and imaginary parts apart,
    as it denoises each alone (float32 network: batch layout changes the last bits only);
    the converted file keeps that."""
    path = files("scoremri_knee_tiny.pth")
    one = priors.load(path)
    two = priors.load(path, channels=2)
    assert two.channels == 2 and two.data_range == (0.0, 1.0)
    exp = _expected("scoremri_knee_tiny")
    x = torch.cat([exp["x0"], exp["n"]], dim=1)               # (2, 2, 40, 40)
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    with torch.no_grad():
        both = two.denoise(x, sigma)
        for c in range(2):
            torch.testing.assert_close(both[:, c:c + 1], one.denoise(x[:, c:c + 1], sigma),
                                       rtol=1e-5, atol=1e-5)
    back = priors.load(convert(path, tmp_path / "mri2.pt", channels=2))
    assert back.channels == 2
    with pytest.raises(InputError, match="has 2 channels, not channels=3"):
        priors.load(files("adm_dds_knee_tiny.pt"), channels=3)
