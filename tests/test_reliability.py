"""Issue 18, reliability: careless batches and hostile options never lose data or write
garbage. Every refusal is exit 2 with one stderr line naming the culprit, before any work;
inputs are never modified.

Output naming: no result path may equal or replace an input of the same run (whatever
``--overwrite`` says); two inputs mapping to one result are refused naming both; result
files (recognised by their provenance, not their name) are never taken as inputs."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import h5py
import pytest
from typer.testing import CliRunner

from diffrecon.cli.main import app
from diffrecon.datasets.simulate import simulate_mri

runner = CliRunner()


def _scan(path: Path, seed: int = 0) -> Path:
    return simulate_mri(path, size=16, slices=1, coils=2, center_fraction=0.3, seed=seed)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return _scan(tmp_path_factory.mktemp("tpl") / "scan.h5")


def _copy(template: Path, dest: Path, seed: int | None = None) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if seed is None:
        shutil.copyfile(template, dest)
        return dest
    return _scan(dest, seed)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_cli(*args: str):
    return runner.invoke(app, ["run", *map(str, args), "--solver", "zero-filled", "--quiet",
                               "--device", "cpu"])


def one_line_error(res, *needles: str) -> str:
    err = res.stderr
    assert res.exit_code == 2, (res.exit_code, err, res.stdout)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("diffrecon: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------------ output naming

@pytest.mark.parametrize("overwrite", [False, True])
def test_result_path_that_is_an_input_is_refused(tmp_path, template, overwrite):
    """x.h5 and the SCAN x_recon.h5 in one directory, -o that directory: x.h5's result
    would replace the scan x_recon.h5; refused before anything is written."""
    d = tmp_path / "study"
    x = _copy(template, d / "x.h5")
    victim = _copy(template, d / "x_recon.h5", seed=7)
    before = {p.name: _sha(p) for p in (x, victim)}
    res = run_cli(d, "-o", d, *(["--overwrite"] if overwrite else []))
    one_line_error(res, "x_recon.h5", "x.h5")
    assert {p.name: _sha(p) for p in (x, victim)} == before
    assert sorted(p.name for p in d.iterdir()) == ["x.h5", "x_recon.h5"]


def test_single_input_output_is_the_input_or_a_link_to_it(tmp_path, template):
    x = _copy(template, tmp_path / "x.h5")
    link = tmp_path / "link.h5"
    link.symlink_to(x)
    before = _sha(x)
    for out in (x, link):
        one_line_error(run_cli(x, "-o", out, "--overwrite"), "input")
    assert _sha(x) == before


@pytest.mark.parametrize("names", [("a/scan.h5", "b/scan.h5"), ("a/x.h5", "a/x.hdf5")])
@pytest.mark.parametrize("overwrite", [False, True])
def test_two_inputs_one_result_refused_naming_both(tmp_path, template, names, overwrite):
    first, second = (_copy(template, tmp_path / n, seed=i) for i, n in enumerate(names))
    out = tmp_path / "out"
    res = run_cli(first, second, "-o", out, *(["--overwrite"] if overwrite else []))
    line = one_line_error(res, str(first), str(second))
    assert "different settings" not in line
    assert not out.exists() or not any(out.iterdir())


def test_directory_with_two_stems_refused(tmp_path, template):
    d = tmp_path / "in"
    _copy(template, d / "x.h5")
    _copy(template, d / "x.hdf5", seed=3)
    one_line_error(run_cli(d, "-o", tmp_path / "out"), "x.h5", "x.hdf5")


def test_batch_into_its_own_directory_reruns(tmp_path, template):
    """-o the input directory: the rerun skips the results (recognised by provenance)."""
    d = tmp_path / "in"
    a, b = _copy(template, d / "a.h5"), _copy(template, d / "b.h5", seed=2)
    res = run_cli(d, "-o", d)
    assert res.exit_code == 0, res.stderr
    results = {p: _sha(p) for p in (d / "a_recon.h5", d / "b_recon.h5")}
    res = run_cli(d, "-o", d)
    assert res.exit_code == 0, res.stderr
    assert res.stdout.count("skipped") == 2, res.stdout
    assert {p: _sha(p) for p in results} == results
    # a result renamed to look like a scan is still a result; a scan named like a result
    # is still a scan
    (d / "a_recon.h5").rename(d / "c.h5")
    _copy(template, d / "z_recon.h5", seed=5)
    res = run_cli(d, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a_recon.h5", "b_recon.h5", "z_recon_recon.h5"]
    assert _sha(a) == _sha(template)
    assert _sha(b) != _sha(a)


def test_directory_of_results_only_is_refused(tmp_path, template):
    d = tmp_path / "in"
    _copy(template, d / "a.h5")
    assert run_cli(d, "-o", tmp_path / "res").exit_code == 0
    one_line_error(run_cli(tmp_path / "res", "-o", tmp_path / "again"), "result")


def test_result_recognised_by_provenance_not_name(tmp_path, template):
    from diffrecon.pipeline.batch import is_result_file

    x = _copy(template, tmp_path / "x_recon.h5")
    assert not is_result_file(x)
    assert run_cli(x, "-o", tmp_path / "r.h5").exit_code == 0
    assert is_result_file(tmp_path / "r.h5")
    with h5py.File(tmp_path / "r.h5", "a") as f:  # no provenance: not a result
        del f.attrs["settings_sha256"]
    assert not is_result_file(tmp_path / "r.h5")
