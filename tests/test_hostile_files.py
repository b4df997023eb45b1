"""Issue 18, hostile files: scans whose links, header, name or file type are hostile, and
outputs that cannot be written. Each is refused with exit 2 and ONE stderr line
``diffrecon: error: ...`` naming the file and the dataset / key, before any work, by every
verb that reads scans (run, info, calib, evaluate, view); or, where the file is valid
(a hard link, an odd but legal name), it reconstructs. Inputs are never modified; a failed
write leaves neither a partial result nor a temporary file, and the rerun completes.

The property test at the end draws random corruptions of a small valid fastMRI file from
every class above and checks: exit 0 with a finite result of the right shape, or exit 2 with
one error line; never exit 1, never a traceback, the input's bytes unchanged."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from diffrecon.cli.main import app
from diffrecon.datasets.simulate import simulate_ct, simulate_mri

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
SOLVER = {"mri": "zero-filled", "ct": "fbp"}


@pytest.fixture(scope="module")
def mri(tmp_path_factory) -> Path:
    """Two-slice, two-coil 16 px scan with coil maps, mask, header and ground truth."""
    return simulate_mri(tmp_path_factory.mktemp("mri") / "mri.h5", size=16, slices=2,
                        coils=2, center_fraction=0.3, with_coil_maps=True, noise=0.01)


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    return simulate_ct(tmp_path_factory.mktemp("ct") / "ct.h5", size=16, slices=1, views=8)


@pytest.fixture(scope="module")
def mri_result(mri, tmp_path_factory) -> Path:
    """The template's zero-filled result file."""
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    assert invoke("run", mri, "-o", out, *RUN["mri"]).exit_code == 0
    return out


@pytest.fixture(scope="module")
def reference(mri_result) -> dict[str, np.ndarray]:
    """The template's zero-filled result arrays."""
    return arrays(mri_result)


RUN = {m: ["--solver", s, "--quiet", "--device", "cpu"] for m, s in SOLVER.items()}


def invoke(*args):
    return runner.invoke(app, [a if isinstance(a, str) else os.fspath(a) for a in args])


def arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("reconstruction", "std")}


def copy(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def edit(path: Path, fn) -> Path:
    with h5py.File(path, "a") as f:
        fn(f)
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).glob("*.tmp-*"))


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def boom(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def verbs(path: Path, tmp: Path, modality: str = "mri") -> dict[str, list]:
    """Every verb that reads ``path`` as a scan (calib only for MRI)."""
    out = {"run": ["run", path, "-o", tmp / "out.h5", *RUN[modality]], "info": ["info", path]}
    if modality == "mri":
        out["calib"] = ["calib", path, "-o", tmp / "maps.h5"]
    return out


@pytest.fixture(scope="session")
def refused(one_line_error, file_sha):
    """``refused(path, tmp, *needles, modality='mri', skip=())``: every verb of
    :func:`verbs` but ``skip`` exits 2 with one line holding ``needles``; nothing is written
    and the input's bytes are unchanged."""
    def check(path: Path, tmp: Path, *needles: str, modality: str = "mri",
              skip: tuple[str, ...] = ()) -> None:
        before = file_sha(path) if path.is_file() else None
        for verb, args in verbs(path, tmp, modality).items():
            if verb in skip:
                continue
            with deadline(60):
                res = invoke(*args)
            one_line_error(res, *needles)
            assert not (tmp / "out.h5").exists() and not (tmp / "maps.h5").exists(), verb
            assert not leftovers(tmp)
        if before is not None:
            assert file_sha(path) == before

    return check


# ------------------------------------------------------------------------ 1. links in the file

def _relink(key: str, kind: str, other: Path):
    """Edit: dataset ``key`` becomes a link of ``kind``; its data stay reachable as
    /data/<key> (so that a working soft link has a target)."""
    def fn(f):
        keep = f.require_group("data")
        n = len(keep)  # unique names: the property test may relink twice
        f.move(key, f"data/{key}_{n}")
        if kind == "dangling":
            f[key] = h5py.SoftLink("/nowhere")
        elif kind == "loop":
            f[f"loop_a{n}"] = h5py.SoftLink(f"/loop_b{n}")
            f[f"loop_b{n}"] = h5py.SoftLink(f"/loop_a{n}")
            f[key] = h5py.SoftLink(f"/loop_a{n}")
        elif kind == "self":
            f[key] = h5py.SoftLink(f"/{key}")
        elif kind == "ext_missing":
            f[key] = h5py.ExternalLink("no_such_file.h5", f"/{key}")
        elif kind == "ext_existing":
            f[key] = h5py.ExternalLink(os.fspath(other), f"/{key}")
        elif kind == "soft_through_ext":  # a soft link whose path crosses an external link
            f[f"elsewhere{n}"] = h5py.ExternalLink(os.fspath(other), "/")
            f[key] = h5py.SoftLink(f"/elsewhere{n}/{key}")
        else:  # pragma: no cover
            raise AssertionError(kind)
    return fn


BAD_LINKS = ["dangling", "loop", "self", "ext_missing", "ext_existing", "soft_through_ext"]
SOME_LINKS = ["dangling", "ext_existing"]
WORDS = {"dangling": "does not exist", "loop": "loops", "self": "loops",
         "ext_missing": "external link", "ext_existing": "external link",
         "soft_through_ext": "external link"}
LINK_CASES = ([("mri", "kspace", k) for k in BAD_LINKS] + [("ct", "sinogram", k) for k in BAD_LINKS]
              + [(m, key, k) for m, key in (("mri", "coil_maps"), ("mri", "reconstruction_rss"),
                                          ("mri", "ismrmrd_header"), ("ct", "angles"))
                 for k in SOME_LINKS])


@pytest.mark.parametrize("modality, key, kind", LINK_CASES)
def test_bad_link_refused_naming_file_and_key(tmp_path, mri, ct, modality, key, kind, refused,
                                              file_sha):
    template = {"mri": mri, "ct": ct}[modality]
    other = copy(template, tmp_path / "other" / "target.h5")  # an external link's target
    other_sha = file_sha(other)
    path = edit(copy(template, tmp_path / "linked.h5"), _relink(key, kind, other))
    refused(path, tmp_path, "linked.h5", f"'{key}'", WORDS[kind], modality=modality)
    assert file_sha(other) == other_sha


@pytest.mark.parametrize("storage", ["virtual", "external_raw"])
def test_dataset_stored_in_other_files_refused(tmp_path, mri, storage, refused):
    """Virtual datasets and external raw storage read other files (here a device) like an
    external link: refused, never read."""
    path = copy(mri, tmp_path / "vds.h5")
    with h5py.File(path, "a") as f:
        k = f["kspace"]
        shape, dtype = k.shape, k.dtype
        del f["kspace"]
        if storage == "virtual":
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            layout[...] = h5py.VirtualSource(os.fspath(tmp_path / "elsewhere.h5"), "kspace",
                                             shape=shape)
            f.create_virtual_dataset("kspace", layout)
        else:
            f.create_dataset("kspace", shape=shape, dtype=dtype,
                             external=[("/dev/zero", 0, h5py.h5f.UNLIMITED)])
    refused(path, tmp_path, "vds.h5", "'kspace'", "other files")


def test_hard_link_and_working_soft_link_reconstruct(tmp_path, mri, reference, file_sha):
    """Two names of one dataset (hard link) and a soft link to a dataset of the file are
    valid: the result is the template's, bit for bit."""
    hard = edit(copy(mri, tmp_path / "hard.h5"), lambda f: f.__setitem__("kspace_again",
                                                                          f["kspace"]))

    def soft(f):
        f.require_group("data")
        f.move("kspace", "data/kspace")
        f["kspace"] = h5py.SoftLink("data/kspace")  # relative, resolved from the root
        f.move("coil_maps", "data/maps")
        f["coil_maps"] = h5py.SoftLink("/data/maps")

    softp = edit(copy(mri, tmp_path / "soft.h5"), soft)
    for path in (hard, softp):
        before = file_sha(path)
        out = tmp_path / f"{path.stem}_out.h5"
        res = invoke("run", path, "-o", out, *RUN["mri"])
        assert res.exit_code == 0, res.stderr
        got = arrays(out)
        for k, v in reference.items():
            np.testing.assert_array_equal(got[k], v)
        assert invoke("info", path).exit_code == 0
        assert file_sha(path) == before


def test_evaluate_and_view_refuse_bad_links(tmp_path, mri, one_line_error):
    """evaluate / view read the reference scan and the result through the same checks."""
    out = tmp_path / "r.h5"
    assert invoke("run", mri, "-o", out, *RUN["mri"]).exit_code == 0
    ref = edit(copy(mri, tmp_path / "ref.h5"), _relink("reconstruction_rss", "dangling", mri))
    res_link = edit(copy(out, tmp_path / "res.h5"), _relink("reconstruction", "ext_existing",
                                                            out))
    for args, needles in (
            (["evaluate", out, "--reference", ref], ["ref.h5", "'reconstruction_rss'"]),
            (["view", out, "-o", tmp_path / "v.png", "--reference", ref],
             ["ref.h5", "'reconstruction_rss'"]),
            (["evaluate", res_link, "--reference", mri], ["res.h5", "'reconstruction'"]),
            (["view", res_link, "-o", tmp_path / "v.png"], ["res.h5", "'reconstruction'"]),
            (["info", res_link], ["res.h5", "'reconstruction'"])):
        one_line_error(invoke(*args), *needles)
    assert not (tmp_path / "v.png").exists()


# ------------------------------------------------------------------------ 2. the ISMRMRD header

def _xml(mri: Path) -> bytes:
    with h5py.File(mri, "r") as f:
        return f["ismrmrd_header"][()]


def _header(value):
    def fn(f):
        del f["ismrmrd_header"]
        if isinstance(value, str) and value == "group":
            f.create_group("ismrmrd_header")
        else:
            f["ismrmrd_header"] = value
    return fn


BILLION_LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1
                                                            else b"&lol;") * 10)
                             for i in range(1, 10))
                  + b']><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">&lol9;'
                  b"</ismrmrdHeader>")


def _xxe(secret: Path) -> bytes:
    return (b'<?xml version="1.0"?><!DOCTYPE h [<!ENTITY xxe SYSTEM "file://%s">]>'
            b'<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding><encodedSpace>'
            b"<matrixSize><x>&xxe;</x><y>16</y><z>1</z></matrixSize></encodedSpace>"
            b"</encoding></ismrmrdHeader>" % os.fsencode(secret))


def _bad_headers(xml: bytes, secret: Path) -> dict[str, tuple[object, str]]:
    """name -> (stored value, words of the error)."""
    first_x = b"<x>16</x>"
    return {
        "group": ("group", "is a group"),
        "numeric array": (np.arange(5), "dtype int64"),
        "numeric scalar": (3.5, "dtype float64"),
        "two strings": (np.array([xml, xml]), "shape (2,)"),
        "latin-1 bytes": (xml.replace(b"cartesian", b"cart\xe9sian"), "not UTF-8"),
        "latin-1 declared": (xml.replace(b"utf-8", b"ISO-8859-1").replace(
            b"cartesian", b"cart\xe9sian"), "not UTF-8"),
        "latin-1 opaque": (np.void(xml.replace(b"cartesian", b"cart\xe9sian")), "not UTF-8"),
        "empty": (b"", "is empty"),
        "blank": (b"  \n ", "is empty"),
        "no reconSpace": (xml.replace(b"reconSpace", b"reconSpaceX"), "reconSpace"),
        "no encodedSpace": (xml.replace(b"encodedSpace", b"otherSpace"), "encodedSpace"),
        "size 16.5": (xml.replace(first_x, b"<x>16.5</x>", 1), "expected an integer"),
        "size abc": (xml.replace(first_x, b"<x>abc</x>", 1), "expected an integer"),
        "size 1e3": (xml.replace(first_x, b"<x>1e3</x>", 1), "expected an integer"),
        "size empty": (xml.replace(first_x, b"<x></x>", 1), "lacks element"),
        "recon size 0": (xml.replace(b"<reconSpace><matrixSize><x>16</x>",
                                     b"<reconSpace><matrixSize><x>0</x>"), "reconSpace"),
        "recon size -4": (xml.replace(b"<reconSpace><matrixSize><x>16</x>",
                                      b"<reconSpace><matrixSize><x>-4</x>"), "reconSpace"),
        "not xml": (b"hello", "not valid XML"),
        "truncated xml": (xml[: len(xml) // 2], "not valid XML"),
        "billion laughs": (BILLION_LAUGHS, "not valid XML"),
        "xxe": (_xxe(secret), "not valid XML"),
    }


HEADER_CASES = sorted(_bad_headers(b"<x>16</x>", Path("/x")))


@pytest.mark.parametrize("case", HEADER_CASES)
def test_bad_header_refused(tmp_path, mri, case, refused):
    secret = tmp_path / "secret.txt"
    secret.write_text("16")  # an XXE that worked would read a valid size from here
    value, words = _bad_headers(_xml(mri), secret)[case]
    path = edit(copy(mri, tmp_path / "hdr.h5"), _header(value))
    refused(path, tmp_path, "hdr.h5", "'ismrmrd_header'", words)


@pytest.mark.parametrize("store", ["vlen str", "fixed bytes", "opaque", "one-element array",
                                   "ascii declared latin-1"])
def test_header_stored_in_other_valid_ways(tmp_path, mri, reference, store):
    xml = _xml(mri)
    value = {"vlen str": xml.decode(), "fixed bytes": np.bytes_(xml), "opaque": np.void(xml),
             "one-element array": np.array([xml]),
             "ascii declared latin-1": xml.replace(b"utf-8", b"ISO-8859-1")}[store]
    path = edit(copy(mri, tmp_path / "hdr.h5"), _header(value))
    res = invoke("run", path, "-o", tmp_path / "o.h5", *RUN["mri"])
    assert res.exit_code == 0, res.stderr
    for k, v in reference.items():
        np.testing.assert_array_equal(arrays(tmp_path / "o.h5")[k], v)


# ------------------------------------------------------------------------ 3. file names

ODD_NAMES = {"not utf-8": b"scan\xff\xfe.h5", "newline": b"new\nline.h5",
             "leading dash": b"-scan.h5", "spaces": b"my scan  1.h5",
             "terminal escape": b"esc\x1b[31mred.h5", "right-to-left": "rtl\u202egpj.h5".encode()}


@pytest.mark.parametrize("case", sorted(ODD_NAMES))
def test_odd_file_name_reconstructs_and_names_its_result(tmp_path, mri, reference, case, file_sha):
    """A valid scan with an odd (even non-UTF-8) name reconstructs; its result in a
    directory is the name's own bytes + '_recon.h5'; the provenance stores the name as
    UTF-8 text (odd bytes escaped)."""
    from diffrecon.datasets.io import storable_text

    raw = ODD_NAMES[case]
    d = tmp_path / "in"
    d.mkdir()
    path = Path(os.fsdecode(os.fsencode(d) + b"/" + raw))
    copy(mri, path)
    before = file_sha(path)
    out = tmp_path / "out"
    res = invoke("run", "-o", f"{out}/", *RUN["mri"], "--", path)  # '--': names like -scan
    assert res.exit_code == 0, res.stderr
    stem = raw[: -len(b".h5")]
    assert os.listdir(os.fsencode(out)) == [stem + b"_recon.h5"]
    result = Path(os.fsdecode(os.fsencode(out) + b"/" + stem + b"_recon.h5"))
    for k, v in reference.items():
        np.testing.assert_array_equal(arrays(result)[k], v)
    with h5py.File(result, "r") as f:
        assert f.attrs["input"] == storable_text(path.name)
    assert len(res.stdout.strip().splitlines()) == 1  # the summary line, name escaped
    info = invoke("info", path)
    assert info.exit_code == 0 and "\x1b" not in info.stdout and "\u202e" not in info.stdout
    assert file_sha(path) == before


@pytest.mark.parametrize("case", sorted(ODD_NAMES))
def test_odd_file_name_in_an_error_is_one_escaped_line(tmp_path, case, one_line_error):
    from diffrecon.errors import printable

    raw = ODD_NAMES[case]
    path = Path(os.fsdecode(os.fsencode(tmp_path) + b"/" + raw))
    path.write_bytes(b"")  # a zero-byte file: not HDF5
    for args in (["run", "-o", tmp_path / "o.h5", *RUN["mri"], "--", path], ["info", path]):
        line = one_line_error(invoke(*args), printable(path.name), "not an HDF5 file")
        assert line.isprintable()


def test_leading_dash_without_separator_is_a_usage_error(tmp_path, mri, one_line_error):
    copy(mri, tmp_path / "-scan.h5")
    res = runner.invoke(app, ["run", "-scan.h5", "-o", "o.h5", "--solver", "zero-filled"])
    one_line_error(res, "-s")


def test_non_utf8_name_through_the_real_console(tmp_path, mri):
    """The console script (strict UTF-8 stdout, not the test runner's): exit 0, one stdout
    line with the odd byte escaped; the error of a broken one is one escaped stderr line."""
    good = os.fsencode(tmp_path) + b"/scan\xff.h5"
    shutil.copyfile(mri, good)
    bad = os.fsencode(tmp_path) + b"/bad\xff\n.h5"
    open(bad, "wb").close()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8:strict"}
    cmd = [sys.executable, "-m", "diffrecon.cli.main", "run", "-o",
           os.fsencode(tmp_path) + b"/out/", "--solver", "zero-filled", "--quiet",
           "--device", "cpu", good, bad]
    proc = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count(b"\n") == 1 and b"Traceback" not in proc.stderr
    assert proc.stderr.startswith(b"diffrecon: error: ")
    assert b"bad\\xff\\n.h5: not an HDF5 file" in proc.stderr, proc.stderr
    assert os.listdir(os.fsencode(tmp_path) + b"/out") == [b"scan\xff_recon.h5"]
    assert b"scan\\xff.h5 -> " not in proc.stdout or proc.stdout.count(b"\n") <= 1


# ------------------------------------------------------------------------ 4. not regular files

@pytest.fixture
def special(tmp_path, mri):
    """name -> path of an input that is no regular readable HDF5 file, and the words of its
    error."""
    made = {}
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)
    made["fifo"] = (fifo, "FIFO")
    made["dev zero"] = (Path("/dev/zero"), "character device")
    made["dev null"] = (Path("/dev/null"), "character device")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.fspath(tmp_path / "sock.h5"))
    made["socket"] = (tmp_path / "sock.h5", "socket")
    (tmp_path / "trunc.h5").write_bytes(mri.read_bytes()[:1024])
    made["truncated 1 KB"] = (tmp_path / "trunc.h5", "truncated or corrupt")
    (tmp_path / "empty.h5").write_bytes(b"")
    made["zero bytes"] = (tmp_path / "empty.h5", "not an HDF5 file")
    (tmp_path / "text.h5").write_text("this is not HDF5\n")
    made["text"] = (tmp_path / "text.h5", "not an HDF5 file")
    (tmp_path / "dangling.h5").symlink_to(tmp_path / "gone.h5")
    made["dangling symlink"] = (tmp_path / "dangling.h5", "does not exist")
    (tmp_path / "la.h5").symlink_to(tmp_path / "lb.h5")
    (tmp_path / "lb.h5").symlink_to(tmp_path / "la.h5")
    made["looping symlink"] = (tmp_path / "la.h5", "loop")
    yield made
    sock.close()


SPECIAL = ["fifo", "dev zero", "dev null", "socket", "truncated 1 KB", "zero bytes", "text",
           "dangling symlink", "looping symlink"]


@pytest.mark.parametrize("case", SPECIAL)
def test_input_that_is_no_regular_hdf5_file(tmp_path, special, mri, mri_result, case, refused,
                                            one_line_error):
    """Refused by every verb from its type alone (a FIFO is never opened: the test would
    block); evaluate / view refuse it as reference and as result too."""
    path, words = special[case]
    out = tmp_path / "o"
    out.mkdir()
    skip = ("run",) if case.endswith("symlink") else ()  # run: 'no such file' (batch)
    refused(path, out, os.fspath(path), modality="mri", skip=skip)
    for verb in ("info", "calib"):
        with deadline(60):
            one_line_error(invoke(*verbs(path, out)[verb]), words)
    result = mri_result
    for args in (["evaluate", result, "--reference", path], ["evaluate", path, "--reference",
                                                             mri],
                 ["view", result, "-o", out / "v.png", "--reference", path],
                 ["view", path, "-o", out / "v.png"]):
        with deadline(60):
            one_line_error(invoke(*args), os.fspath(path))


def test_directory_named_like_a_scan(tmp_path, one_line_error):
    d = tmp_path / "x.h5"
    d.mkdir()
    one_line_error(invoke("info", d), "x.h5", "is a directory")
    one_line_error(invoke("run", d, "-o", tmp_path / "o", *RUN["mri"]), "x.h5",
                   "no .h5/.hdf5 scan files")
    one_line_error(invoke("calib", d), "x.h5", "is a directory")


def test_unreadable_file(tmp_path, mri, monkeypatch, refused, one_line_error):
    """A file this user may not read: refused naming it. Root reads anything, so there the
    permission answer is emulated (os.access says no), which is what the reader asks."""
    path = copy(mri, tmp_path / "secret.h5")
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):  # root
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if (
                Path(p) == path and mode & os.R_OK) else real(p, mode, *a, **k))
        refused(path, tmp_path, "secret.h5")
        line = one_line_error(invoke("info", path), "secret.h5")
        assert "permission denied" in line or "not readable" in line, line
    finally:
        os.chmod(path, 0o600)


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
