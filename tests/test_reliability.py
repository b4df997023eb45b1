"""Issue 18, reliability: careless batches and hostile options never lose data or write
garbage. Every refusal is exit 2 with one stderr line naming the culprit, before any work;
inputs are never modified.

Output naming: no result path may equal or replace an input of the same run (whatever
``--overwrite`` says); two inputs mapping to one result are refused naming both; result
files (recognised by their provenance, not their name) are never taken as inputs.

Signals and the rest: test_reliability_signals.py. The failure checks (``one_line_error``,
``file_sha``) are fixtures of conftest.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
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


def run_cli(*args: str):
    return runner.invoke(app, ["run", *map(str, args), "--solver", "zero-filled", "--quiet",
                               "--device", "cpu"])


# ------------------------------------------------------------------------ output naming

@pytest.mark.parametrize("overwrite", [False, True])
def test_result_path_that_is_an_input_is_refused(tmp_path, template, overwrite, one_line_error,
                                                 file_sha):
    """x.h5 and the SCAN x_recon.h5 in one directory, -o that directory: x.h5's result
    would replace the scan x_recon.h5; refused before anything is written."""
    d = tmp_path / "study"
    x = _copy(template, d / "x.h5")
    victim = _copy(template, d / "x_recon.h5", seed=7)
    before = {p.name: file_sha(p) for p in (x, victim)}
    res = run_cli(d, "-o", d, *(["--overwrite"] if overwrite else []))
    one_line_error(res, "x_recon.h5", "x.h5")
    assert {p.name: file_sha(p) for p in (x, victim)} == before
    assert sorted(p.name for p in d.iterdir()) == ["x.h5", "x_recon.h5"]


def test_single_input_output_is_the_input_or_a_link_to_it(tmp_path, template, one_line_error,
                                                          file_sha):
    x = _copy(template, tmp_path / "x.h5")
    link = tmp_path / "link.h5"
    link.symlink_to(x)
    before = file_sha(x)
    for out in (x, link):
        one_line_error(run_cli(x, "-o", out, "--overwrite"), "input")
    assert file_sha(x) == before


@pytest.mark.parametrize("names", [("a/scan.h5", "b/scan.h5"), ("a/x.h5", "a/x.hdf5")])
@pytest.mark.parametrize("overwrite", [False, True])
def test_two_inputs_one_result_refused_naming_both(tmp_path, template, names, overwrite,
                                                   one_line_error):
    first, second = (_copy(template, tmp_path / n, seed=i) for i, n in enumerate(names))
    out = tmp_path / "out"
    res = run_cli(first, second, "-o", out, *(["--overwrite"] if overwrite else []))
    line = one_line_error(res, str(first), str(second))
    assert "different settings" not in line
    assert not out.exists() or not any(out.iterdir())


def test_directory_with_two_stems_refused(tmp_path, template, one_line_error):
    d = tmp_path / "in"
    _copy(template, d / "x.h5")
    _copy(template, d / "x.hdf5", seed=3)
    one_line_error(run_cli(d, "-o", tmp_path / "out"), "x.h5", "x.hdf5")


def test_batch_into_its_own_directory_reruns(tmp_path, template, file_sha):
    """-o the input directory: the rerun skips the results (recognised by provenance)."""
    d = tmp_path / "in"
    a, b = _copy(template, d / "a.h5"), _copy(template, d / "b.h5", seed=2)
    res = run_cli(d, "-o", d)
    assert res.exit_code == 0, res.stderr
    results = {p: file_sha(p) for p in (d / "a_recon.h5", d / "b_recon.h5")}
    res = run_cli(d, "-o", d)
    assert res.exit_code == 0, res.stderr
    assert res.stdout.count("skipped") == 2, res.stdout
    assert {p: file_sha(p) for p in results} == results
    # a result renamed to look like a scan is still a result; a scan named like a result
    # is still a scan
    (d / "a_recon.h5").rename(d / "c.h5")
    _copy(template, d / "z_recon.h5", seed=5)
    res = run_cli(d, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.h5")) == [
        "a_recon.h5", "b_recon.h5", "z_recon_recon.h5"]
    assert file_sha(a) == file_sha(template)
    assert file_sha(b) != file_sha(a)


def test_directory_of_results_only_is_refused(tmp_path, template, one_line_error):
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


# ------------------------------------------------------------------------ options

ISSUE_OPTIONS = [  # (solver, option, value): refused at construction naming the option
    ("dds", "gamma", -1), ("dds", "gamma", 0), ("dds", "sigma_max", 0), ("dds", "batch_size", 0),
    ("dds", "cg_iters", -1), ("dds", "steps", "abc"), ("dds", "steps", True),
    ("dds", "steps", 2.5), ("dds", "eta", float("nan")), ("dds", "sigma_max", float("inf")),
    ("dds", "schedule", "foo"), ("dds", "noise_convention", 5),
    ("dps", "schedule", "foo"), ("dps", "steps", 0), ("dps", "zeta", -1), ("dps", "eta", 2),
    ("reddiff", "lr", -1), ("reddiff", "schedule", "bogus"), ("reddiff", "lam", -0.5),
    ("reddiff", "cg_iters", -2), ("smc", "krylov", 3), ("smc", "num_particles", 0),
    ("tv", "lam", -1), ("tv", "iters", -3), ("tv", "rho", 0), ("l1-wavelet", "iters", 0),
    ("cg-sense", "iters", 0), ("dds3d", "rho", -1), ("dds3d", "lam", float("inf")),
    ("zero-filled", "batch_size", [1]),
]


@pytest.mark.parametrize("solver, option, value", ISSUE_OPTIONS)
def test_bad_solver_option_refused_at_construction(solver, option, value):
    from diffrecon.errors import InputError
    from diffrecon.pipeline import RunOptions, make_solver
    from diffrecon.recon import solver_class

    with pytest.raises(ValueError, match=option):
        solver_class(solver)(**{option: value})
    with pytest.raises(InputError, match=f"--option: .*{option}"):
        make_solver(solver, RunOptions(solver=solver, solver_options={option: value}))


@pytest.mark.parametrize("options", [{"sigma_min": 5.0, "sigma_max": 1.0},
                                     {"sigma_min": 1.0, "sigma_max": 1.0},
                                     {"schedule": "vp", "sigma_max": 3.0}])
def test_sigma_bounds_checked_together(options):
    from diffrecon.recon import solver_class

    for name in ("dds", "dps", "reddiff", "smc"):
        with pytest.raises(ValueError, match="sigma_m"):
            solver_class(name)(**options)


def test_numbers_written_as_text_are_numbers():
    """YAML reads 1e-3 as text: make_solver takes it as the number it is."""
    from diffrecon.pipeline import RunOptions, make_solver

    s = make_solver("dds", RunOptions(solver_options={"sigma_min": "1e-3", "steps": "7"}))
    assert s.options.sigma_min == 1e-3 and s.options.steps == 7
    assert make_solver("tv", RunOptions(solver_options={"lam": "auto"})).options.lam == "auto"


@pytest.mark.parametrize("field, value, flag", [
    ("seed", -1, "--seed"), ("seed", 2 ** 64, "--seed"), ("seed", 1.5, "--seed"),
    ("seed", True, "--seed"), ("device", "mps", "--device"), ("device", "cuda:7", "--device"),
    ("device", "tpu", "--device"), ("center_fraction", 2.0, "--center-fraction"),
    ("center_fraction", 0.0, "--center-fraction"), ("acceleration", 0.5, "--acceleration"),
    ("acceleration", float("nan"), "--acceleration"), ("batch_size", 0, "--batch-size"),
    ("steps", "many", "--steps"), ("prior_label", -2, "--prior-label"),
    ("save_samples", "yes", "--save-samples"), ("samples", 0, "--samples"),
])
def test_bad_run_option_refused(field, value, flag):
    from diffrecon.errors import InputError
    from diffrecon.pipeline import RunOptions

    if field == "device" and value == "mps":
        import torch
        if torch.backends.mps.is_available():
            pytest.skip("this machine has MPS")
    with pytest.raises(InputError, match=flag):
        RunOptions(**{field: value})


@pytest.mark.parametrize("args, flag", [
    (["--seed", "-1"], "--seed"), (["--seed", str(2 ** 64)], "--seed"),
    (["--device", "mps"], "--device"), (["--center-fraction", "2"], "--center-fraction"),
    (["--solver", "dds", "--option", "gamma=-1"], "gamma"),
    (["--solver", "dps", "--option", "schedule=foo"], "schedule"),
    (["--solver", "reddiff", "--option", "steps=abc"], "steps"),
    (["--solver", "tv", "--option", "iters=-3"], "iters"),
])
def test_bad_options_refused_before_any_file_is_read(tmp_path, args, flag, one_line_error):
    """The input does not even exist: the option is named, not the file."""
    res = runner.invoke(app, ["run", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "o.h5"),
                              "--quiet", *args])
    line = one_line_error(res, flag)
    assert "missing.h5" not in line


def test_prior_that_is_no_checkpoint(tmp_path, template, one_line_error):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    x = _copy(template, tmp_path / "x.h5")
    res = runner.invoke(app, ["run", str(x), "-o", str(tmp_path / "o.h5"), "--quiet",
                              "--solver", "dds", "--prior", str(junk), "--device", "cpu"])
    one_line_error(res, "--prior", "junk.pt")
    assert not (tmp_path / "o.h5").exists()


# ------------------------------------------------------------------------ degenerate data

def _edit(path: Path, fn) -> Path:
    with h5py.File(path, "a") as f:
        fn(f)
    return path


def _put(f, name, data):
    if name in f:
        del f[name]
    f.create_dataset(name, data=data)


def _header_0x0(f):
    from diffrecon.datasets.fastmri import default_header, header_to_xml

    _put(f, "ismrmrd_header", header_to_xml(default_header(f["kspace"].shape[-2:],
                                                           recon_size=(0, 0))))


DEGENERATE_MRI = {  # name -> (edit, words the error line must hold)
    "kspace all zero": (lambda f: _put(f, "kspace", np.zeros_like(f["kspace"][()])),
                        ["'kspace'", "all zero"]),
    "one slice all zero": (lambda f: _put(f, "kspace", f["kspace"][()] * np.array(
        [1, 0, 1])[:, None, None, None]), ["'kspace'", "slice(s) 1"]),
    "coil maps all zero": (lambda f: _put(f, "coil_maps", np.zeros_like(f["coil_maps"][()])),
                           ["'coil_maps'", "all zero"]),
    "coil maps x 1e20": (lambda f: _put(f, "coil_maps", f["coil_maps"][()] * 1e20),
                         ["'coil_maps'", "root-sum-of-squares"]),
    "coil maps with inf": (lambda f: _put(f, "coil_maps", f["coil_maps"][()] * np.array(
        [np.inf, 1])[None, :, None, None]), ["'coil_maps'", "Inf"]),
    "reconSpace 0x0": (_header_0x0, ["reconSpace", "0 x 0"]),
    "noise_sigma text": (lambda f: f.attrs.__setitem__("noise_sigma", "abc"), ["'noise_sigma'"]),
    "noise_sigma negative": (lambda f: f.attrs.__setitem__("noise_sigma", -1.0),
                             ["'noise_sigma'"]),
    "noise_sigma array": (lambda f: f.attrs.__setitem__("noise_sigma", np.ones(3)),
                          ["'noise_sigma'"]),
    "noise_sigma nan": (lambda f: f.attrs.__setitem__("noise_sigma", np.nan),
                        ["'noise_sigma'"]),
}


@pytest.fixture(scope="module")
def mri_maps(tmp_path_factory) -> Path:
    return simulate_mri(tmp_path_factory.mktemp("maps") / "maps.h5", size=16, slices=3,
                        coils=2, center_fraction=0.3, with_coil_maps=True, noise=0.01)


@pytest.mark.parametrize("case", sorted(DEGENERATE_MRI))
def test_degenerate_mri_is_an_input_error(tmp_path, mri_maps, case, one_line_error, file_sha):
    edit, words = DEGENERATE_MRI[case]
    x = _edit(_copy(mri_maps, tmp_path / "deg.h5"), edit)
    before = file_sha(x)
    out = tmp_path / "o.h5"
    res = run_cli(x, "-o", out)
    one_line_error(res, "deg.h5", *words)
    assert not out.exists() and not list(tmp_path.glob("o.h5.tmp*"))
    assert file_sha(x) == before


def test_degenerate_side_file_maps(tmp_path, mri_maps, one_line_error):
    x = _copy(mri_maps, tmp_path / "x.h5")
    with h5py.File(x) as f:
        maps = f["coil_maps"][()]
    for name, bad in (("zero.h5", 0 * maps), ("huge.h5", 1e20 * maps)):
        with h5py.File(tmp_path / name, "w") as f:
            f.create_dataset("coil_maps", data=bad)
        res = run_cli(x, "-o", tmp_path / "o.h5", "--coil-maps", tmp_path / name)
        one_line_error(res, name, "'coil_maps'")


def test_ct_angles_all_equal(tmp_path, one_line_error):
    from diffrecon.datasets.simulate import simulate_ct

    x = simulate_ct(tmp_path / "ct.h5", size=16, slices=1, views=8)
    _edit(x, lambda f: _put(f, "angles", np.full(f["angles"].shape, 0.3)))
    res = runner.invoke(app, ["run", str(x), "-o", str(tmp_path / "o.h5"), "--solver", "fbp",
                              "--quiet", "--device", "cpu"])
    one_line_error(res, "ct.h5", "angles")


def test_non_finite_result_is_never_written(tmp_path, template):
    """The last guard: a solve that returns NaN fails with one line, nothing written."""
    import torch

    from diffrecon.errors import InputError
    from diffrecon.pipeline import reconstruct_file
    from diffrecon.priors.base import Prior

    class Broken(Prior):
        def __init__(self):
            super().__init__()
            self.name, self.channels = "broken", 2
            self.data_range, self.sigma_min, self.sigma_max = (-1.0, 1.0), 0.01, 5.0

        def _denoise(self, x, sigma):
            return torch.full_like(x, float("nan"))

    x = _copy(template, tmp_path / "x.h5")
    with pytest.raises(InputError, match=r"x\.h5: slice 0: .*NaN or Inf.*nothing written"):
        reconstruct_file(x, tmp_path / "o.h5", solver="dds", prior=Broken(), steps=2,
                         device="cpu")
    assert not (tmp_path / "o.h5").exists() and not list(tmp_path.glob("o.h5.tmp*"))


def test_library_warnings_dropped_on_failure_kept_on_success(recwarn):
    """A failure is reported by its one error line alone; a success keeps its warnings."""
    import warnings

    from diffrecon.pipeline.batch import warnings_unless_failed

    def fails():
        np.divide(np.zeros(2), np.zeros(2))  # numpy's RuntimeWarning: invalid value
        warnings.warn("sigpy says hello", RuntimeWarning, stacklevel=1)
        raise ValueError("bad scan")

    def works():
        warnings.warn("kept", UserWarning, stacklevel=1)
        return 3

    with pytest.raises(ValueError, match="bad scan"), warnings_unless_failed():
        fails()
    assert len(recwarn) == 0
    with warnings_unless_failed():
        assert works() == 3
    assert [str(w.message) for w in recwarn] == ["kept"]


def test_random_solver_options_are_accepted_or_refused_naming_the_option():
    """Property (hypothesis, derandomized): any solver with any option name (its own or not)
    and any value (numbers incl. nan / inf / huge, text, booleans, lists, null) is either a
    valid solver whose options hold the given value, or an ``InputError`` naming the option;
    never another exception."""
    import dataclasses

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from diffrecon.errors import InputError
    from diffrecon.pipeline import RunOptions, make_solver
    from diffrecon.recon import SOLVERS, solver_class

    names = sorted({f.name for s in SOLVERS for f in dataclasses.fields(solver_class(s).Options)}
                   | {"bogus"})
    values = st.one_of(st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                       st.text(max_size=8), st.booleans(), st.none(),
                       st.lists(st.integers(), max_size=2))

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(solver=st.sampled_from(sorted(SOLVERS)), option=st.sampled_from(names), value=values)
    def check(solver, option, value):
        try:
            built = make_solver(solver, RunOptions(solver=solver,
                                                   solver_options={option: value}))
        except InputError as exc:
            assert option in str(exc) or "--option" in str(exc), str(exc)
            return
        got = getattr(built.options, option)
        assert got == value or (isinstance(value, str) and str(got) == value.strip()) or \
            (isinstance(value, float) and got == value), (solver, option, value, got)

    check()
