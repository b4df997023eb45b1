"""Smoke tests of the benchmark scripts: each ``--quick`` main() runs in-process and prints
markdown tables with the expected columns and finite numbers (no timing assertions); the
runner (``python -m benchmarks``, ``diffrecon bench``) collects reports where it is told."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import __main__ as runner
from benchmarks import (
    common,
    denoise_prior,
    gmm_dds,
    gmm_dps_reddiff,
    gmm_smc,
    gmm_table,
    smc_images,
    smc_mode_weights,
    speed,
    uncertainty,
)


def table_after(text: str, heading: str) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows (dicts) of the first markdown table after the line ``heading``."""
    rest = text[text.index(heading) + len(heading):]
    cols, rows = common.parse_table(rest)
    assert cols, f"no table after {heading!r}"
    return cols, [dict(zip(cols, r, strict=True)) for r in rows]


def value(cell: str) -> float:
    """First number of a cell ('0.12 ± 0.03' -> 0.12); '—' -> nan."""
    head = cell.split("±")[0].strip()
    return math.nan if head == "—" else float(head)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_common_helpers():
    assert common.fmt(0.0812) == "0.0812" and common.fmt(float("nan")) == "—"
    m, s = common.mean_spread([1.0, 2.0, 3.0])
    assert m == 2.0 and s == 1.0
    assert common.fmt_ms([1.0, 3.0]) == "2 ± 1.41"
    cols, rows = common.parse_table(common.markdown_table([{"a": 1, "b": 0.5}]))
    assert cols == ["a", "b"] and rows == [["1", "0.5"]]
    assert "torch" in common.header() and "git commit" in common.header()


def test_gmm_metrics_floor_and_exact_samples():
    from diffrecon.priors.analytic import mcgdiff_problem

    prior, physics, y, _ = mcgdiff_problem(8, 2, 1000)
    post = prior.posterior(physics, y)
    exact = post.sample(2000, torch.Generator().manual_seed(1234))
    m = common.gmm_metrics(exact, post, 1002)
    # exact samples sit at the noise floor; a shifted set is far off it
    assert m["sw"] < 3 * m["floor"] + 0.05 and m["tv"] < 0.05 and m["mean_err"] < 0.5
    bad = common.gmm_metrics(exact + 3.0, post, 1002)
    assert bad["sw"] > 2.0 and bad["mean_err"] > 8.0


def test_gmm_table_quick(capsys):
    text = gmm_table.main(["--quick"])
    assert text in capsys.readouterr().out
    cols, rows = table_after(text, "## GMM exactness table")
    assert cols == gmm_table.COLUMNS
    labels = [r["solver"] for r in rows]
    for name in [*gmm_table.SOLVERS, "deepinv DPS", "deepinv DDRM", "deepinv DIFFPIR"]:
        assert name in labels
    for r in rows:
        assert not r["SW"].startswith("failed"), r
        for c in ("SW", "floor", "weight TV", "mean err", "time (s)"):
            assert math.isfinite(value(r[c])), (r["solver"], c, r[c])
        assert 0 <= value(r["weight TV"]) <= 1
        if r["solver"].startswith("smc"):
            assert 0 < value(r["ESS/N"]) <= 1 + 1e-9
    # the reference-figures table is printed next to it
    _, ref = table_after(text, "### Reference figures")
    assert len(ref) == len(gmm_table.REFERENCE)


def test_speed_quick():
    text = speed.main(["--quick"])
    cols, rows = table_after(text, "### Solvers vs the bare denoiser")
    assert cols[:4] == ["solver", "steps", "rows", "NFE"] and "overhead" in cols
    assert [r["solver"] for r in rows] == list(speed.SOLVER_ROWS)
    for r in rows:
        assert value(r["NFE"]) >= 1
        assert all(value(r[c]) > 0 for c in ("time (s)", "ms / NFE", "overhead"))
    _, cg = table_after(text, "### DDS: conjugate-gradient share")
    assert math.isfinite(value(cg[0]["CG share"]))
    _, dps = table_after(text, "### deepinv DPS vs diffrecon DPS")
    assert {r["dtype"] for r in dps} == {"float32", "float64"}
    for dtype in ("float32", "float64"):  # equal NFE is the point of the comparison
        nfe = {r["implementation"]: r["NFE"] for r in dps if r["dtype"] == dtype}
        assert nfe["deepinv DPS"] == nfe["diffrecon DPS"] == "3"


def test_uncertainty_quick():
    text = uncertainty.main(["--quick"])
    cols, rows = table_after(text, "## Uncertainty")
    assert cols == uncertainty.COLUMNS
    assert len(rows) == 2 * (len(uncertainty.SOLVERS) + 1)
    for r in rows:
        assert 0 <= value(r["coverage"]) <= 1
        assert math.isfinite(value(r["width ratio"]))
        if r["solver"] == "exact posterior":
            assert value(r["width ratio"]) == 1


def test_smc_images_quick(tmp_path):
    """48 px MRI 4x TEST slice, 5 steps: DDS rows and SMC dds rows with N = 4, 8."""
    text = smc_images.main(["--quick", "--out", str(tmp_path)])
    cols, rows = table_after(text, "## SMC dds proposal vs DDS")
    assert cols == smc_images.COLUMNS
    assert [r["method"] for r in rows] == ["dds, 1 draw", "dds, mean of 2 draws", "smc dds",
                                           "smc dds"]
    for r in rows:
        assert 10 < value(r["PSNR"]) < 60 and 0 < value(r["SSIM"]) <= 1, r
        if r["method"] == "smc dds":
            n = int(r["N / draws"])
            assert 1 <= value(r["lineages (min)"]) <= n and 0 < value(r["min ESS"]) <= n


@pytest.mark.parametrize("module, needle", [
    (gmm_dds, "| 8 | 2 |"), (gmm_dps_reddiff, "| 8 | 2 |"), (gmm_smc, "| 8 | 2 | 100 | twisted"),
    (smc_mode_weights, "steps 10 run 0:"), (denoise_prior, "| 0.1 |")])
def test_quick_mode_of_the_small_scripts(module, needle, capsys):
    text = module.main(["--quick"])  # denoise_prior: no arguments needed, nothing written
    assert needle in text and text in capsys.readouterr().out
    assert "nan" not in text.lower(), text


def test_runner_writes_reports_where_told(tmp_path, capsys):
    names = runner.scripts()
    assert {"gmm_dds", "images", "speed"} <= set(names)
    assert "common" not in names and not any(n.startswith("_") for n in names)
    out = tmp_path / "bench"
    assert runner.main(["smc_mode_weights", "--quick", "--out", str(out)]) == 0
    report = (out / "smc_mode_weights.md").read_text()
    assert "exact weights:" in report and "steps 10 run 0:" in report
    doc = (out / "RESULTS.md").read_text()
    assert report.strip() in doc and "git commit" in doc and "--quick" in doc
    assert sorted(p.name for p in out.iterdir()) == ["RESULTS.md", "smc_mode_weights.md"]
    assert runner.main(["no-such-benchmark", "--out", str(out)]) == 2
    assert "unknown benchmark 'no-such-benchmark'" in capsys.readouterr().err


@pytest.mark.parametrize("name", runner.scripts())
def test_every_script_takes_the_runners_flags(name, capsys):
    """`diffrecon bench --quick` runs each script with --quick --out DIR: all must accept
    them (baselines_auto once refused --out)."""
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    usage = capsys.readouterr().out
    assert exc.value.code == 0 and "--quick" in usage and "--out" in usage, usage
