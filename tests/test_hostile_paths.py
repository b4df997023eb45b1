"""Issue 18, hostile files (2/3): odd file names and inputs that are no regular HDF5 file
(FIFO, device, socket, truncated, directory, unreadable). Refused with exit 2 and ONE
escaped stderr line naming the file, or, where the name is odd but legal, reconstructed.
Inputs are never modified. Shared helpers in _hostile.py, fixtures in conftest.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from _hostile import (
    RUN,
    arrays,
    copy,
    deadline,
    invoke,
    runner,
    verbs,
)

from diffrecon.cli.main import app

pytestmark = pytest.mark.usefixtures("one_thread")


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


