"""Plain helpers shared by the hostile-file tests (``test_hostile_*.py``): the CLI runner,
the cheap solver per modality, result arrays, file edits (links, header), temporary
leftovers, a FIFO deadline and the verbs that read a scan. Their fixtures are in
conftest.py."""

from __future__ import annotations

import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
from typer.testing import CliRunner

from diffrecon.cli.main import app

runner = CliRunner()
SOLVER = {"mri": "zero-filled", "ct": "fbp"}


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


def _header(value):
    def fn(f):
        del f["ismrmrd_header"]
        if isinstance(value, str) and value == "group":
            f.create_group("ismrmrd_header")
        else:
            f["ismrmrd_header"] = value
    return fn
