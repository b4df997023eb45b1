"""CLI round trips: simulate -> run (each baseline) -> evaluate --json -> view, config files,
resumable batches (also when killed), the console script, and torchrun with 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from diffrecon.cli.main import app
from diffrecon.datasets.io import read_result

runner = CliRunner()


def ok(args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, (args, res.stdout, res.stderr)
    return res


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    # 10 ACS lines (64 px x 0.16): enough for ESPIRiT maps; 8x uses the stored true maps
    ok(["simulate", "mri", "-o", d / "mri4.h5", "--size", 64, "--slices", 1, "--noise", 0.002,
        "--center-fraction", 0.16, "--seed", 1])
    ok(["simulate", "mri", "-o", d / "mri8.h5", "--size", 64, "--slices", 1, "--noise", 0.002,
        "--acceleration", 8, "--coil-maps", "--seed", 2])
    ok(["simulate", "ct", "-o", d / "ct30.h5", "--size", 48, "--slices", 1, "--views", 30,
        "--seed", 3])
    ok(["simulate", "ct", "-o", d / "ct8.h5", "--size", 48, "--slices", 1, "--views", 8,
        "--seed", 3])
    return d


# PSNR floors (dB) on these fixed seeds; measured values are 3-8 dB above them
FLOORS = [("mri4", "zero-filled", 16), ("mri4", "cg-sense", 20), ("mri4", "l1-wavelet", 22),
          ("mri4", "tv", 25), ("mri8", "cg-sense", 16), ("mri8", "tv", 18),
          ("ct30", "fbp", 24), ("ct30", "tv", 25), ("ct8", "fbp", 15), ("ct8", "tv", 19)]


@pytest.mark.parametrize("scan, solver, floor", FLOORS)
def test_baseline_round_trip(scans, tmp_path, scan, solver, floor):
    out = tmp_path / f"{scan}_{solver}.h5"
    ok(["run", scans / f"{scan}.h5", "-o", out, "--solver", solver, "--quiet"])
    res = runner.invoke(app, ["evaluate", str(out), "--reference", str(scans / f"{scan}.h5"),
                              "--json"])
    assert res.exit_code == 0, res.stderr
    m = json.loads(res.stdout)
    assert {"psnr", "ssim", "nmse", "per_slice"} <= set(m)
    assert len(m["per_slice"]) == 1 and m["psnr"] > floor, (scan, solver, m["psnr"])
    assert 0 < m["ssim"] <= 1 and 0 <= m["nmse"] < 1


def test_smc_degenerate_cloud_warns_on_stderr(scans, tmp_path):
    out = tmp_path / "smc.h5"
    res = ok(["run", scans / "mri4.h5", "-o", out, "--solver", "smc", "--steps", 4,
              "--option", "num_particles=4", "--quiet"])
    assert "-> " in res.stdout and "warning" not in res.stdout
    assert "diffrecon: warning: mri4.h5: SMC slices 0: the 4 particles descend from 1 " \
        "initial particle(s)" in res.stderr, res.stderr
    assert list(read_result(out).attrs["smc_lineages_per_slice"]) == [1]


def test_view_info_and_json_summary(scans, tmp_path):
    out = tmp_path / "r.h5"
    res = ok(["run", scans / "ct30.h5", "-o", out, "--solver", "fbp", "--quiet", "--json"])
    summary = json.loads(res.stdout)
    assert summary[0]["status"] == "done" and summary[0]["solver"] == "fbp"
    png = tmp_path / "fig.png"
    ok(["view", out, "-o", png, "--reference", scans / "ct30.h5"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    info = json.loads(ok(["info", out, "--json"]).stdout)
    assert info["modality"] == "result" and info["provenance"]["solver"] == "fbp"
    info = json.loads(ok(["info", scans / "mri4.h5", "--json"]).stdout)
    assert info["coils"] == 8 and info["acs_lines"] == 10 and not info["fully_sampled"]
    text = ok(["info", scans / "ct8.h5"]).stdout
    assert "views: 8" in text


def test_config_file_cli_wins_and_skip(scans, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("solver: cg-sense\nseed: 4\nsolver_options:\n  iters: 3\n")
    out = tmp_path / "r.h5"
    ok(["run", scans / "ct30.h5", "-o", out, "--config", cfg, "--seed", 7, "--quiet"])
    a = read_result(out).attrs
    assert a["solver"] == "cg-sense" and a["seed"] == 7 and a["solver_options"]["iters"] == 3
    res = ok(["run", scans / "ct30.h5", "-o", out, "--config", cfg, "--seed", 7])
    assert "skipped" in res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("solverr: tv\n")
    res = runner.invoke(app, ["run", str(scans / "ct30.h5"), "-o", str(tmp_path / "x.h5"),
                              "--config", str(bad)])
    assert res.exit_code == 2 and "unknown key 'solverr'" in res.stderr


def test_fully_sampled_needs_acceleration(tmp_path):
    scan = tmp_path / "full.h5"
    ok(["simulate", "mri", "-o", scan, "--size", 32, "--slices", 1, "--fully-sampled",
        "--coils", 1])
    res = runner.invoke(app, ["run", str(scan), "-o", str(tmp_path / "o.h5"), "--solver",
                              "zero-filled"])
    assert res.exit_code == 2 and "--acceleration" in res.stderr
    ok(["run", scan, "-o", tmp_path / "o.h5", "--solver", "zero-filled", "--acceleration", 4,
        "--mask-type", "equispaced", "--quiet"])
    assert read_result(tmp_path / "o.h5").attrs["acceleration"] == 4.0


# ----------------------------------------------------------------------------- subprocesses

def _cli(*args, **kw):
    exe = shutil.which("diffrecon")
    cmd = [exe] if exe else [sys.executable, "-m", "diffrecon.cli.main"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, **kw)


def _ct_study(folder: Path, n: int, size: int = 32):
    from diffrecon.datasets.simulate import simulate_ct

    folder.mkdir()
    for i in range(n):
        simulate_ct(folder / f"s{i}.h5", size=size, slices=2, views=20, seed=i)


def test_console_script_errors_and_kill_resume(tmp_path):
    res = _cli("run", tmp_path / "missing.h5", "-o", tmp_path / "o.h5")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"diffrecon: error: {tmp_path / 'missing.h5'}: no such file or directory"]
    study = tmp_path / "study"
    _ct_study(study, 3)
    out = tmp_path / "out"
    # kill the batch as soon as its first result appears, then resume
    proc = subprocess.Popen([sys.executable, "-m", "diffrecon.cli.main", "run", str(study),
                             "-o", str(out), "--solver", "tv", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir() and any(p.suffix == ".h5" for p in out.iterdir()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in out.glob("*_recon.h5"))
    for p in out.glob("*_recon.h5"):
        assert read_result(p).reconstruction.shape == (2, 32, 32)  # complete, never partial
    res = _cli("run", study, "-o", out, "--solver", "tv", "--quiet", "--json", timeout=600)
    assert res.returncode == 0, res.stderr
    status = {Path(s["input"]).name: s["status"] for s in json.loads(res.stdout)}
    assert len(status) == 3
    for name in done_before:
        assert status[name.replace("_recon", "")] == "skipped"
    assert sorted(p.name for p in out.iterdir()) == [f"s{i}_recon.h5" for i in range(3)]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_two_processes_match_single(tmp_path):
    study = tmp_path / "study"
    _ct_study(study, 3, size=24)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    res = _cli("run", study, "-o", single, "--solver", "tv", "--quiet", env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    multi = tmp_path / "multi"
    one = tmp_path / "one_file.h5"
    for target, inputs in ((multi, [study]), (one, [study / "s0.h5"])):
        res = subprocess.run(
            ["torchrun", "--standalone", "--nproc-per-node=2", "-m", "diffrecon.cli.main",
             "run", *map(str, inputs), "-o", str(target), "--solver", "tv", "--quiet", "--json",
             "--device", "cpu"],
            capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads(res.stdout)  # rank 0 only prints
        assert len(summary) == (3 if target == multi else 1)
    for i in range(3):
        a, b = read_result(single / f"s{i}_recon.h5"), read_result(multi / f"s{i}_recon.h5")
        np.testing.assert_array_equal(a.reconstruction, b.reconstruction)
    # one file: its two slices were split over the ranks, rank 0 wrote the merged result
    a, b = read_result(single / "s0_recon.h5"), read_result(one)
    np.testing.assert_array_equal(a.reconstruction, b.reconstruction)
    with h5py.File(one) as f:
        assert list(f.attrs["slices"]) == [0, 1]


def test_demo_quick_and_progress(tmp_path):
    res = ok(["demo", "--quick", "--output-dir", tmp_path / "demo", "--solver", "tv"])
    for key in ("scan:", "reconstruction:", "metrics:", "figure:"):
        assert key in res.stdout
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert m["psnr"] > 22, m["psnr"]  # 27.5 dB measured
    assert any(p.suffix == ".png" for p in (tmp_path / "demo").iterdir())


def test_internal_errors_exit_1_traceback_only_with_debug(monkeypatch, tmp_path):
    from diffrecon.problems import info

    def boom(path):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(info, "describe_file", boom)
    monkeypatch.delenv("DIFFRECON_DEBUG", raising=False)
    res = runner.invoke(app, ["info", "x.h5"])
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "diffrecon: error: internal error: RuntimeError: kaboom (rerun with --debug for the "
        "traceback)"]
    res = runner.invoke(app, ["--debug", "info", "x.h5"])
    assert res.exit_code == 1 and "Traceback" in res.stderr and "kaboom" in res.stderr
    monkeypatch.delenv("DIFFRECON_DEBUG", raising=False)


def test_help_explains_units_and_defaults():
    text = ok(["run", "--help"]).stdout
    for needle in ("--batch-size", "--config", "--acceleration", "default", "--slices"):
        assert needle in text
    assert "DEGREES" in ok(["simulate", "ct", "--help"]).stdout
    assert "--list" in ok(["bench", "--help"]).stdout


def test_bench_lists_and_refuses_unknown_names(capfd):
    """`diffrecon bench` runs `python -m benchmarks` in the source checkout (subprocess)."""
    assert runner.invoke(app, ["bench", "--list"]).exit_code == 0
    listed = capfd.readouterr().out.split()
    assert {"gmm_dds", "images", "denoise_prior"} <= set(listed) and "common" not in listed
    res = runner.invoke(app, ["bench", "no-such-benchmark", "--quick"])
    assert res.exit_code == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["diffrecon bench: error: unknown benchmark 'no-such-benchmark'; available: "
                   + ", ".join(listed)]


def test_train_prior_cli_resumes_and_reports(tmp_path):
    out = tmp_path / "prior"
    args = ["train-prior", "-o", out, "--steps", "3", "--batch-size", "2", "--crop", "16",
            "--base", "8", "--mults", "1,2", "--workers", "0", "--checkpoint-every", "1", "-q"]
    res = ok(args)
    assert (out / "prior.pt").exists() and (out / "checkpoint.pt").exists()
    # the default report of the ellipse family: the 8 held-out test phantoms
    assert "on 8 held-out phantoms images" in res.stdout and "| 0.1 |" in res.stdout
    from diffrecon.priors import load_network_prior

    first = load_network_prior(out / "prior.pt").checksum
    ok(args)  # already at 3 steps: resumes and changes nothing
    assert load_network_prior(out / "prior.pt").checksum == first


@pytest.mark.parametrize(("flags", "message"), [
    (["--crop", "18"], "train-prior: crop must be a multiple of 4, got 18"),
    (["--lr-schedule", "linear"], "lr_schedule must be 'cosine' or 'constant'"),
    (["--family", "no-such.h5"], "--family 'no-such.h5' is neither one of"),
    (["--report", "faces"], "'--report': must be one of anatomy, photos, phantoms, none"),
    (["--mults", "1,x"], "'--mults': must be comma-separated integers"),
])
def test_train_prior_bad_input_is_one_line(tmp_path, flags, message):
    res = runner.invoke(app, ["train-prior", "-o", str(tmp_path / "p"), "--steps", "1",
                              "--workers", "0", "-q", *flags])
    err = (res.stderr or "").strip().splitlines()
    assert res.exit_code == 2 and len(err) == 1 and message in err[0], (res.stderr, err)
    assert not (tmp_path / "p" / "prior.pt").exists()


def test_call_depth_from_the_run_verb_to_the_prior(scans, tmp_path, monkeypatch):
    """`diffrecon run` reaches the prior's D(x, sigma) through at most 8 diffrecon frames
    (the verb, the batch, the file, Solver.solve, the algorithm, the Tweedie step or cloud
    evaluation, the NFE counter, Prior.denoise), for each diffusion solver."""
    import inspect

    import diffrecon
    from diffrecon import priors
    from diffrecon.priors.base import Prior

    package = str(Path(diffrecon.__file__).parent)
    seen = {}

    class Probe(Prior):
        name, channels, data_range, sigma_min, sigma_max = "probe", 1, (0.0, 1.0), 0.01, 5.0

        def _denoise(self, x, sigma):
            stack = [(f.filename, f.function) for f in inspect.stack()[::-1]]
            verb = max(i for i, (file, fn) in enumerate(stack)
                       if fn == "run" and file.endswith("cli/run.py"))
            seen.setdefault("frames", [f"{file[len(package) + 1:]}:{fn}" for file, fn
                                       in stack[verb:] if file.startswith(package)])
            return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)

    monkeypatch.setattr(priors, "load", lambda *args, **kw: Probe())
    for solver in ("dds", "dps", "reddiff", "smc"):
        seen.clear()
        ok(["run", scans / "ct30.h5", "-o", tmp_path / f"{solver}.h5", "--solver", solver,
            "--prior", "probe", "--steps", 2, "--option", "num_particles=2" if solver == "smc"
            else "batch_size=1", "--quiet"])
        frames = seen["frames"]
        assert frames[0] == "cli/run.py:run" and frames[-1] == "priors/base.py:denoise"
        assert len(frames) <= 8, (solver, frames)
