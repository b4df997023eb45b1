"""Malformed scan files never produce a traceback: `run` and `info` print one line on stderr
naming the problem, exit with code 2, write no output and leave the input unchanged.

A hypothesis property test mutates small valid MRI / CT / image scans with one corruption
that is invalid by construction (missing required dataset, wrong dtype or rank, empty
array, NaN/Inf, wrong mask length, non-binary mask, coil maps of the wrong shape, bad
attributes, truncated bytes, random bytes)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from _shared import _file_sha, _one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from diffrecon.cli.main import app
from diffrecon.datasets.simulate import simulate_ct, simulate_image, simulate_mri

runner = CliRunner()


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    d = tmp_path_factory.mktemp("templates")
    return {
        "mri": simulate_mri(d / "mri.h5", size=16, slices=1, coils=2, center_fraction=0.3),
        "mri1": simulate_mri(d / "mri1.h5", size=16, slices=1, coils=1, center_fraction=0.3),
        "ct": simulate_ct(d / "ct.h5", size=16, slices=1, views=8),
        "image": simulate_image(d / "img.h5", size=16, slices=1, operator="blur"),
    }


REQUIRED = {"mri": ["kspace"], "mri1": ["kspace"], "ct": ["sinogram", "angles"],
            "image": ["measurement"]}
MAIN = {"mri": "kspace", "mri1": "kspace", "ct": "sinogram", "image": "measurement"}


def _replace(f, name, data):
    del f[name]
    f.create_dataset(name, data=data)


def mutate(path: Path, kind: str, mutation: str, draw_int, draw_bytes) -> None:
    """Apply one invalidating corruption to ``path`` in place."""
    if mutation == "random_bytes":
        path.write_bytes(draw_bytes)
        return
    if mutation == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[:draw_int(0, int(len(data) * 0.9))])
        return
    with h5py.File(path, "a") as f:
        main = MAIN[kind]
        arr = f[main][()]
        if mutation == "missing":
            names = REQUIRED[kind]
            del f[names[draw_int(0, len(names) - 1)]]
        elif mutation == "dtype":
            bad = {"c": arr.real.astype(np.float32), "f": arr.astype(np.complex64)}
            _replace(f, main, bad[arr.dtype.kind] if draw_int(0, 1) else arr.astype("S8"))
        elif mutation == "rank":
            _replace(f, main, arr[0] if draw_int(0, 1) else arr[None, None])
        elif mutation == "empty":
            _replace(f, main, np.zeros((0, *arr.shape[1:]), arr.dtype))
        elif mutation in ("nan", "inf"):
            flat = arr.reshape(-1).copy()
            flat[draw_int(0, flat.size - 1)] = np.nan if mutation == "nan" else np.inf
            _replace(f, main, flat.reshape(arr.shape))
        elif mutation == "mask_length":
            ky = f["kspace"].shape[-1]
            n = draw_int(1, 3 * ky)
            n = n + 1 if n == ky else n
            _replace(f, "mask", np.ones(n, bool))
        elif mutation == "mask_values":
            m = f["mask"][()].astype(np.float32)
            m[draw_int(0, m.size - 1)] = 0.5
            _replace(f, "mask", m)
        elif mutation == "coil_maps":
            shape = list(f["kspace"].shape)
            shape[draw_int(1, len(shape) - 1)] += 1
            f.create_dataset("coil_maps", data=np.ones(shape, np.complex64))
        elif mutation == "ct_attrs":
            key = ("geometry", "image_size", "n_detectors")[draw_int(0, 2)]
            f.attrs[key] = {"geometry": "fan", "image_size": -3, "n_detectors": 7}[key]
        elif mutation == "angles":
            _replace(f, "angles", np.zeros(f["angles"].shape[0] + draw_int(1, 5)))
        elif mutation == "image_attrs":
            f.attrs["operator"] = ("warp", "")[draw_int(0, 1)]
        else:  # pragma: no cover
            raise AssertionError(mutation)


COMMON = ["missing", "dtype", "rank", "empty", "nan", "inf", "truncate", "random_bytes"]
MUTATIONS = {"mri": COMMON + ["mask_length", "mask_values", "coil_maps"],
             "mri1": COMMON + ["mask_length", "mask_values"],
             "ct": COMMON + ["ct_attrs", "angles"],
             "image": COMMON + ["image_attrs"]}
CASES = [(k, m) for k, ms in MUTATIONS.items() for m in ms]


def check_one_line_error(result, outputs=()):
    _one_line_error(result)
    for out in outputs:
        assert not Path(out).exists()
        assert not list(Path(out).parent.glob(Path(out).name + ".tmp*"))


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), data=st.data())
def test_malformed_files_exit_2_one_line(tmp_path_factory, templates, case, data):
    kind, mutation = case
    d = tmp_path_factory.mktemp("bad")
    path = d / "scan.h5"
    path.write_bytes(Path(templates[kind]).read_bytes())
    mutate(path, kind, mutation,
           lambda lo, hi: data.draw(st.integers(lo, hi)),
           data.draw(st.binary(min_size=0, max_size=2048)))
    before = _file_sha(path)
    out = d / "out.h5"
    solver = {"mri": "zero-filled", "mri1": "zero-filled", "ct": "fbp", "image": "tv"}[kind]
    res = runner.invoke(app, ["run", str(path), "-o", str(out), "--solver", solver, "--quiet",
                              "--device", "cpu"])
    check_one_line_error(res, [out])
    if mutation in ("coil_maps", "mask_values", "mask_length") or kind == "ct":
        assert path.name in res.stderr  # names the file
    res = runner.invoke(app, ["info", str(path)])
    check_one_line_error(res)
    assert _file_sha(path) == before


def test_messages_name_the_problem(tmp_path, templates):
    path = tmp_path / "scan.h5"
    path.write_bytes(Path(templates["mri"]).read_bytes())
    with h5py.File(path, "a") as f:
        _replace(f, "mask", np.ones(5, bool))
    res = runner.invoke(app, ["run", str(path), "-o", str(tmp_path / "o.h5"), "--solver",
                              "zero-filled"])
    check_one_line_error(res, [tmp_path / "o.h5"])
    assert "'mask'" in res.stderr and "scan.h5" in res.stderr


@pytest.mark.parametrize("args, flag", [
    (["--solver", "nope"], "--solver"),
    (["--solver", "dds", "--prior", "no-such-prior"], "--prior"),
    (["--slices", "7"], "slice"),
    (["--slices", "a-b"], "--slices"),
    (["--samples", "0"], "--samples"),
    (["--device", "tpu"], "--device"),
    (["--acceleration", "4"], "--acceleration"),
    (["--option", "nonsense=1", "--solver", "zero-filled"], "nonsense"),
    (["--config", "missing.yaml"], "--config"),
])
def test_bad_flags_exit_2(tmp_path, templates, args, flag):
    out = tmp_path / "o.h5"
    res = runner.invoke(app, ["run", str(templates["mri"]), "-o", str(out), *args])
    check_one_line_error(res, [out])
    assert flag in res.stderr


def test_unwritable_output(tmp_path, templates):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        res = runner.invoke(app, ["run", str(templates["ct"]), "-o", str(ro / "o.h5"),
                                  "--solver", "fbp"])
        check_one_line_error(res, [ro / "o.h5"])
        assert "not writable" in res.stderr
    finally:
        os.chmod(ro, 0o700)
    res = runner.invoke(app, ["run", str(templates["ct"]), "-o", str(tmp_path / "no/dir/o.h5"),
                              "--solver", "fbp"])
    check_one_line_error(res)
    assert "does not exist" in res.stderr


def test_usage_errors_one_line(tmp_path):
    for args in (["run"], ["run", "x.h5"], ["frobnicate"], ["simulate", "mri", "-o", "x.h5",
                                                           "--size", "abc"]):
        res = runner.invoke(app, args)
        check_one_line_error(res)


def test_library_errors_are_plain_and_the_edges_name_the_file(tmp_path):
    """Operators and prior adapters raise ValueError / TypeError naming the parameter, not
    the CLI's InputError; the edges (scan readers, load_problem, the simulators) turn what a
    file or a flag makes them refuse into one line naming the file, exit 2."""
    import torch

    from diffrecon.operators import blur, ct, mri, superres
    from diffrecon.priors.adapters import VEScorePrior, VPEpsPrior

    for call, name in [(lambda: blur("gaussian", boundary="zeros"), "boundary"),
                       (lambda: ct(24, views=8, n_detectors=35), "n_detectors"),
                       (lambda: superres(3, img_size=(1, 48, 48)), "factor"),
                       (lambda: VPEpsPrior(torch.nn.Identity(), timestep="round"), "timestep"),
                       (lambda: VEScorePrior(torch.nn.Identity(), output="eps"), "output")]:
        with pytest.raises(ValueError, match=name) as err:
            call()
        assert type(err.value) is ValueError
    with pytest.raises(TypeError, match="mask"):
        mri(object())
    # a superres scan whose image size the factor does not divide: the operator refuses it
    path = tmp_path / "sr.h5"
    with h5py.File(path, "w") as f:
        f["measurement"] = np.zeros((1, 1, 12, 12), np.float32)
        f.attrs.update({"operator": "superres", "factor": 4, "image_size": [50, 50]})
    out = tmp_path / "o.h5"
    res = runner.invoke(app, ["run", str(path), "-o", str(out), "--solver", "tv"])
    check_one_line_error(res, [out])
    assert "sr.h5: superres: img_size" in res.stderr and "divisible by factor 4" in res.stderr
    # a fan-beam source inside the 16 x 16 mm image's circumscribed circle
    out = tmp_path / "ct.h5"
    res = runner.invoke(app, ["simulate", "ct", "-o", str(out), "--size", "16", "--slices",
                              "1", "--geometry", "fan", "--source-to-isocentre", "10",
                              "--source-to-detector", "20"])
    check_one_line_error(res, [out])
    assert "simulate: ct: 'source_to_isocentre_mm' is 10.0" in res.stderr
