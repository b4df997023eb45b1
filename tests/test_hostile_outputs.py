"""Issue 18, hostile files (3/3): outputs that cannot be written (under a file, read-only,
FIFO / device / socket, full disk, file size limit) leave neither a partial result nor a
temporary file, and the rerun completes; side files and command-line links that are no
regular files are named.

The property test draws random corruptions of a small valid fastMRI file from every class
of hostile input and checks: exit 0 with a finite result of the right shape, or exit 2 with
one error line; never exit 1, never a traceback, the input's bytes unchanged."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from _hostile import (
    RUN,
    _header,
    _relink,
    arrays,
    copy,
    deadline,
    invoke,
    leftovers,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from diffrecon.datasets.simulate import simulate_mri

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------ 5. the output side

def test_output_under_a_file(tmp_path, mri, one_line_error):
    (tmp_path / "afile").write_text("x")
    res = invoke("run", mri, "-o", tmp_path / "afile" / "out.h5", *RUN["mri"])
    one_line_error(res, "afile", "not a directory")
    assert (tmp_path / "afile").read_text() == "x"


def test_read_only_output_directory(tmp_path, mri, monkeypatch, one_line_error):
    """As root a chmod does not stop writes: the check's question (os.access W_OK) is
    answered 'no' for that directory instead."""
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if (
                Path(p) == ro and mode & os.W_OK) else real(p, mode, *a, **k))
        one_line_error(invoke("run", mri, "-o", ro / "o.h5", *RUN["mri"]), "ro",
                       "not writable")
        assert not list(ro.iterdir())
    finally:
        os.chmod(ro, 0o700)


@pytest.mark.parametrize("kind", ["fifo", "device", "socket"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_that_is_a_fifo_device_or_socket(tmp_path, mri, kind, overwrite,
                                                one_line_error):
    """-o naming a FIFO (opening it would block), a device (renaming a result over a copy of
    /dev/null's node here; as root over /dev/null itself it would replace the machine's) or
    a socket: refused unopened and left in place, --overwrite or not; simulate and calib
    (atomic_h5 and check_output_path) too."""
    import stat as st_

    out = tmp_path / "special.h5"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("creating a device node needs root")
        os.mknod(out, st_.S_IFCHR | 0o666, os.makedev(1, 3))  # a node like /dev/null's
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(os.fspath(out))
    mode = os.stat(out).st_mode
    extra = ["--overwrite"] if overwrite else []
    with deadline(60):
        for args in (["run", mri, "-o", out, *RUN["mri"], *extra],
                     ["calib", mri, "-o", out, *extra],
                     ["simulate", "mri", "-o", out, "--size", "16", "--slices", "1"]):
            one_line_error(invoke(*args), "special.h5", "never opened or replaced")
    assert os.stat(out).st_mode == mode and not leftovers(tmp_path)


class _FullDisk:
    """``open`` for the writer of ``datasets.io``: writes half of what it is given, then
    fails with ENOSPC, as a disk that fills up mid-write."""

    def __init__(self):
        self.calls = 0

    def __call__(self, file, mode="r", *args, **kwargs):
        fh = open(file, mode, *args, **kwargs)  # noqa: SIM115 - wrapped below
        outer = self

        class Half:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                fh.close()

            def write(self, data):
                outer.calls += 1
                fh.write(bytes(data[: len(data) // 2]))
                fh.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name):
                return getattr(fh, name)

        return Half()


def test_full_disk_while_writing_the_result(tmp_path, mri, reference, monkeypatch,
                                            one_line_error, file_sha):
    import diffrecon.datasets.io as io

    scan = copy(mri, tmp_path / "in" / "scan.h5")
    before = file_sha(scan)
    out = tmp_path / "out"
    full = _FullDisk()
    monkeypatch.setattr(io, "open", full, raising=False)
    res = invoke("run", scan, "-o", f"{out}/", *RUN["mri"])
    line = one_line_error(res, "scan_recon.h5", "No space left on device")
    assert "nothing was written" in line and full.calls == 1
    assert sorted(os.listdir(out)) in ([], [".diffrecon-maps"]), os.listdir(out)
    assert not leftovers(out) and file_sha(scan) == before
    monkeypatch.undo()  # space freed: the rerun completes with the uninterrupted bits
    res = invoke("run", scan, "-o", f"{out}/", *RUN["mri"])
    assert res.exit_code == 0, res.stderr
    for k, v in reference.items():
        np.testing.assert_array_equal(arrays(out / "scan_recon.h5")[k], v)
    assert file_sha(scan) == before


def test_file_size_limit_through_the_real_stack(tmp_path, file_sha):
    """The kernel refuses the write (RLIMIT_FSIZE, SIGXFSZ ignored: EFBIG) in a real
    process: exit 2, one line naming the output, no temporary, no crash at exit (h5py
    writing to a failing file used to print destructor tracebacks and segfault)."""
    import resource

    scan = simulate_mri(tmp_path / "scan.h5", size=64, slices=2, coils=2,
                        center_fraction=0.3, with_coil_maps=True)
    before = file_sha(scan)
    limit = scan.stat().st_size // 4  # the ~140 KB result does not fit; nothing else grows

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "-m", "diffrecon.cli.main", "run", os.fspath(scan), "-o",
           os.fspath(tmp_path / "res.h5"), *RUN["mri"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                          preexec_fn=limited)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffrecon: error: "), proc.stderr
    assert "res.h5" in lines[0] and "File too large" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.h5"]
    assert file_sha(scan) == before
    res = invoke(*cmd[3:])  # the limit lifted: the rerun completes
    assert res.exit_code == 0, res.stderr
    assert np.isfinite(arrays(tmp_path / "res.h5")["reconstruction"]).all()


# ------------------------------------------------------------------------ 6. property test

DATASETS = ["kspace", "coil_maps", "mask", "reconstruction_rss", "ismrmrd_header",
            "ground_truth_complex"]
DTYPES = ["complex64", "complex128", "float16", "float32", "float64", "int8", "int32",
          "uint8", "bool", "S8"]
ODD_ATTR_VALUES = ["abc", "", -1.0, 0.0, 1e300, float("nan"), float("inf"), 3, True,
                   np.ones(3), b"\xff\xfe", np.array([b"a", b"b"])]


def _mutate(f: h5py.File, draw, other: Path) -> None:
    """One random corruption of an open (writable) fastMRI file, from every class of this
    module: dataset swaps, dtype / shape changes, values, attributes, links, header."""
    names = [n for n in DATASETS if isinstance(f.get(n, getlink=True), h5py.HardLink)
             and isinstance(f.get(n), h5py.Dataset)]  # an earlier mutation may have linked
    kind = draw(st.sampled_from(["swap", "dtype", "shape", "values", "attr", "link",
                                 "header"]))
    if len(names) < 2:
        return
    name = draw(st.sampled_from(names))
    numeric = np.asarray(f[name][()])
    if kind in ("dtype", "shape", "values") and (numeric.ndim == 0
                                                 or numeric.dtype.kind not in "biufc"):
        return  # e.g. the header swapped into 'kspace' by an earlier mutation
    if kind == "swap":
        b = draw(st.sampled_from([n for n in names if n != name]))
        f.move(name, "tmp_swap")
        f.move(b, name)
        f.move("tmp_swap", b)
    elif kind == "dtype" and name != "ismrmrd_header":
        data = f[name][()]
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        src = data.real if np.iscomplexobj(data) and dtype.kind != "c" else data
        with np.errstate(all="ignore"):
            new = np.asarray(src).astype(dtype) if dtype.kind != "S" else np.asarray(
                src).astype(str).astype("S8")
        del f[name]
        f[name] = new
    elif kind == "shape" and name != "ismrmrd_header":
        data = f[name][()]
        how = draw(st.sampled_from(["drop_axis", "add_axis", "transpose", "crop", "pad"]))
        if how == "drop_axis" and data.ndim > 1:
            data = data[0]
        elif how == "add_axis":
            data = data[None]
        elif how == "transpose":
            data = data.T
        elif how == "crop" and data.shape[-1] > 1:
            data = data[..., : draw(st.integers(1, data.shape[-1] - 1))]
        elif how == "pad":
            data = np.concatenate([data, data[..., :1]], axis=-1)
        del f[name]
        f[name] = data
    elif kind == "values" and name not in ("ismrmrd_header", "mask"):
        data = np.array(f[name][()])
        how = draw(st.sampled_from(["scale", "nan", "inf", "zero_entry", "negate"]))
        if data.dtype.kind not in "fc" and how in ("nan", "inf"):
            how = "zero_entry"
        with np.errstate(all="ignore"):
            if how == "scale":
                data = data * draw(st.sampled_from([0.0, 1e-30, 1e-6, 1e6, 1e30]))
            elif how in ("nan", "inf", "zero_entry"):
                flat = data.reshape(-1)
                flat[draw(st.integers(0, flat.size - 1))] = {"nan": np.nan, "inf": np.inf,
                                                             "zero_entry": 0}[how]
            else:
                data = -data
        del f[name]
        f[name] = data
    elif kind == "attr":
        key = draw(st.sampled_from(["noise_sigma", "acceleration", "max", "norm",
                                    "acquisition", "odd\nname", "num_low_frequency"]))
        f.attrs[key] = draw(st.sampled_from(ODD_ATTR_VALUES))
    elif kind == "link":
        how = draw(st.sampled_from(["dangling", "loop", "self", "ext_missing",
                                    "ext_existing", "hard_other", "soft_other"]))
        if how in ("hard_other", "soft_other"):
            target = draw(st.sampled_from(names))
            if target != name:
                f.move(name, f"old_{name}")
                f[name] = f[target] if how == "hard_other" else h5py.SoftLink(f"/{target}")
        else:
            _relink(name, how, other)(f)
    elif kind == "header" and "ismrmrd_header" in names:
        xml = f["ismrmrd_header"][()]
        xml = xml.encode() if isinstance(xml, str) else bytes(xml)
        how = draw(st.sampled_from(["number", "delete", "cut", "latin1", "group", "numeric",
                                    "empty"]))
        if how == "number":
            tags = [b"<x>16</x>", b"<y>16</y>", b"<z>1</z>"]
            tag = draw(st.sampled_from(tags))
            value = draw(st.sampled_from([b"0", b"-1", b"8", b"15", b"17", b"32", b"1.5",
                                          b"x", b"99999999999999999999", b""]))
            xml = xml.replace(tag, tag[:3] + value + tag[-4:], 1)
        elif how == "delete":
            tag = draw(st.sampled_from([b"reconSpace", b"encodedSpace", b"matrixSize",
                                        b"encodingLimits", b"kspace_encoding_step_1"]))
            xml = xml.replace(tag, b"gone", 2)
        elif how == "cut":
            xml = xml[: draw(st.integers(0, len(xml) - 1))]
        elif how == "latin1":
            xml = xml.replace(b"cartesian", b"cart\xe9sian")
        _header({"group": "group", "numeric": np.arange(3), "empty": b""}.get(how, xml))(f)


# Shrinking re-runs the CLI hundreds of times (minutes); a failure is reported with its
# draws (file name, mutation kinds and targets), which reproduce it.
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]


def _kspace_slices(path: Path) -> int | None:
    try:
        with h5py.File(path, "r") as f:
            k = f.get("kspace")
            return int(k.shape[0]) if isinstance(k, h5py.Dataset) and k.ndim else None
    except (OSError, KeyError, RuntimeError, ValueError):
        return None


@settings(max_examples=40, deadline=None, derandomize=True, phases=NO_SHRINK,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_hostile_files_exit_0_or_2(tmp_path_factory, mri, data, file_sha):
    draw = data.draw
    d = tmp_path_factory.mktemp("prop")
    other = copy(mri, d / "other" / "target.h5")
    name = draw(st.sampled_from([b"scan.h5", b"scan\xff.h5", b"new\nline.h5", b"-x.h5",
                                 b"a b.h5"]))
    path = Path(os.fsdecode(os.fsencode(d) + b"/" + name))
    copy(mri, path)
    special = draw(st.sampled_from([None] * 6 + ["fifo", "truncate", "zero", "text"]))
    if special == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif special == "truncate":
        path.write_bytes(mri.read_bytes()[: draw(st.integers(1, mri.stat().st_size - 1))])
    elif special in ("zero", "text"):
        path.write_bytes(b"" if special == "zero" else b"kspace = 1\n")
    else:
        for _ in range(draw(st.integers(1, 2))):
            with h5py.File(path, "a") as f:
                _mutate(f, draw, other)
    regular = path.is_file()
    before = file_sha(path) if regular else None
    out = d / "out.h5"
    with deadline(120):
        res = invoke("run", "-o", out, *RUN["mri"], "--", path)
        info = invoke("info", path)
    for r in (res, info):
        assert r.exit_code in (0, 2), (r.exit_code, r.stderr)
        assert "Traceback" not in r.stderr + r.stdout
        if r.exit_code == 2:
            lines = r.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("diffrecon: error: "), r.stderr
    if res.exit_code == 0:
        got = arrays(out)
        rec = got["reconstruction"]
        assert rec.ndim == 3 and rec.shape[0] == _kspace_slices(path) and rec.size > 0
        assert rec.shape == got["std"].shape
        assert np.isfinite(rec).all() and np.isfinite(got["std"]).all()
    else:
        assert not out.exists()
    assert not leftovers(d)
    if regular:
        assert file_sha(path) == before


@pytest.mark.parametrize("flag", ["--prior", "--coil-maps", "--calibration", "--config"])
@pytest.mark.parametrize("device", ["fifo", "/dev/zero"])
def test_side_files_that_are_no_regular_files(tmp_path, mri, flag, device, one_line_error):
    """The other files run reads (prior checkpoint, coil maps, calibration) are refused the
    same way, unopened; so is a prior path given to info."""
    path = Path(device)
    if device == "fifo":
        path = tmp_path / "side.h5"
        os.mkfifo(path)
    extra = ["--solver", "dds"] if flag == "--prior" else []
    args = ["run", mri, "-o", tmp_path / "o.h5", *RUN["mri"], *extra, flag, path]
    with deadline(60):
        line = one_line_error(invoke(*args), os.fspath(path))
        assert "not opened" in line
        if flag in ("--coil-maps", "--config"):  # checked before any file is read
            assert line.startswith(f"diffrecon: error: {flag} "), line
        if device == "/dev/zero":
            one_line_error(invoke("info", path), "/dev/zero", "character device")
    assert not (tmp_path / "o.h5").exists()


@pytest.mark.parametrize("flag", [None, "--coil-maps", "--config"])
@pytest.mark.parametrize("kind", ["dangling", "looping"])
def test_symbolic_links_given_on_the_command_line_are_named(tmp_path, mri, flag, kind,
                                                            one_line_error):
    """A dangling or looping link given as INPUT, --coil-maps or --config: one line saying
    which (not 'no such file'), before any file is read."""
    link = tmp_path / "link.h5"
    if kind == "dangling":
        link.symlink_to(tmp_path / "nowhere.h5")
    else:
        (tmp_path / "other.h5").symlink_to(link)
        link.symlink_to(tmp_path / "other.h5")
    scan = link if flag is None else mri
    extra = [] if flag is None else [flag, link]
    res = invoke("run", scan, "-o", tmp_path / "o.h5", *RUN["mri"], *extra)
    needle = "does not exist" if kind == "dangling" else "symbolic link loop"
    line = one_line_error(res, os.fspath(link), needle)
    assert flag is None or line.startswith(f"diffrecon: error: {flag} "), line
    assert not (tmp_path / "o.h5").exists()
