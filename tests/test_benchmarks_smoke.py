"""Smoke tests of the benchmark scripts: each ``--quick`` main() runs in-process and prints
markdown tables with the expected columns and finite numbers (no timing assertions)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, gmm_table, run_all, speed, uncertainty  # noqa: E402


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


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


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


def test_run_all_writes_results(tmp_path, monkeypatch):
    calls = []

    def fake(name):
        def main(argv):
            calls.append((name, argv))
            return f"## {name}\n\n| a |\n|---|\n| 1 |"
        return main

    monkeypatch.setattr(run_all, "SCRIPTS", {n: fake(n) for n in run_all.SCRIPTS})
    out = tmp_path / "RESULTS.md"
    doc = run_all.main(["--quick", "--out", str(out)])
    assert out.read_text() == doc
    assert [c[0] for c in calls] == ["gmm_table", "speed", "uncertainty"]
    assert all("--quick" in c[1] for c in calls)
    assert "benchmarks/images.py" in doc and "git commit" in doc
