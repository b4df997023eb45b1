"""HDF5 plumbing shared by the scan layouts: checked opening (:mod:`.safe_open`), validated reads,
atomic writes, modality detection, checksums, and the result-file layout.

Result files (written by the pipeline, readable with plain h5py)::

    reconstruction          float32 (slices, H, W) or (slices, C, H, W)  posterior mean
    std                     float32, same shape      pointwise posterior standard deviation
    samples                 float32 (slices, n_samples, ...)   optional posterior draws
    reconstruction_complex  complex64 (slices, H, W)  optional complex mean (MRI)
    lower_<level>, upper_<level>  float32, shape of reconstruction: optional calibrated
                            interval at nominal coverage <level> (e.g. lower_0.9), written
                            by ``run --calibration`` (``diffrecon.calibration``)
    attrs                   provenance: str / int / float / bool / numeric arrays; nested
                            dicts, None and mixed lists are stored as JSON strings

Every writer goes through :func:`atomic_h5`: the file is built in memory, written to
``<path>.tmp-<pid>`` in the same directory, fsynced, then renamed over ``path`` with
``os.replace``; on an exception (a full disk included) the temporary file is deleted, so a
reader never sees a partial file. Every reader opens through :func:`open_h5_checked`: a
regular, readable HDF5 file whose datasets are all stored in it (no FIFO or device is ever
opened, no external link followed). No
timestamps are stored (h5py ``track_times`` is off), so identical content gives
byte-identical files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from diffrecon.datasets.safe_open import (  # noqa: F401  (re-exported: old import path)
    MAIN_DATASETS,
    MAX_SOFT_LINKS,
    _file_kind,
    check_links,
    check_readable_file,
    open_h5_checked,
)
from diffrecon.errors import InputError

_KIND_NAMES = {"c": "complex", "f": "real floating-point", "b": "boolean", "i": "integer",
               "u": "integer"}


# --------------------------------------------------------------------------- writing

@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Context manager yielding a writable ``h5py.File`` that appears at ``path`` only on
    success.

    The file is built in memory (HDF5 ``core`` driver, no backing store) and its image is
    then written with one plain write to ``<path>.tmp-<pid>`` in the same directory,
    fsynced and renamed over ``path`` (``os.replace``). So HDF5 never meets a failing
    write: on a full disk, a quota or a file-size limit, h5py otherwise leaves the library
    with unflushable dirty metadata (tracebacks from its destructors, a crash at exit). A
    write that fails (ENOSPC, EDQUOT, EFBIG, EROFS, EACCES, a vanished directory) deletes
    the temporary and raises ``InputError`` naming ``path``: exit 2, like an unwritable
    -o directory caught before the work, because the user must act on the output location
    (free space, choose another -o) and the rerun then completes; it is no diffrecon bug
    (exit 1). Cost: the file's image is held in memory (twice, briefly, while written)."""
    p = Path(path)
    if p.parent and not p.parent.exists():
        raise InputError(f"{p}: output directory {p.parent} does not exist")
    check_not_special(p)
    tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}")
    f = h5py.File(tmp, "w", driver="core", backing_store=False, track_order=False)
    try:
        yield f
        f.flush()
        image = f.id.get_file_image()
        f.close()
        try:
            with open(tmp, "wb") as fh:
                fh.write(image)
                fh.flush()
                os.fsync(fh.fileno())
            del image
            os.replace(tmp, p)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise InputError(f"{p}: cannot write the file ({reason}); nothing was written "
                             f"(no partial or temporary file left), free space or choose "
                             f"another output and rerun") from exc
    except BaseException:
        with contextlib.suppress(Exception):
            f.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
        dfd = os.open(p.parent if str(p.parent) else ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def check_not_special(output: Path) -> None:
    """``InputError`` when ``output`` exists as a FIFO, device or socket: it is never opened
    (a FIFO would block) nor replaced (as root, renaming a result over /dev/null would
    replace the device for the whole machine), whatever ``--overwrite`` says."""
    try:
        mode = os.stat(output).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InputError(f"-o/--output {output} is a {_file_kind(mode)}, expected a result "
                         f"file name (it is never opened or replaced)")


def check_output_path(output: Path, input_path: Path | None = None) -> None:
    """InputError unless ``output`` can be written as a new file: not the input itself, not a
    directory, FIFO, device or socket, in an existing writable directory (checked before
    any expensive work)."""
    check_not_special(output)
    if (input_path is not None and output.exists() and input_path.exists()
            and output.resolve() == input_path.resolve()):
        raise InputError(f"-o/--output {output} is the input file; inputs are never modified")
    if output.is_dir():
        raise InputError(f"-o/--output {output} is a directory, expected a result file name")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise InputError(f"-o/--output {output}: directory {parent} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"-o/--output {output}: directory {parent} is not writable")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def detect_modality(path: str | os.PathLike) -> str:
    """'mri' (has ``kspace``), 'ct' (``sinogram``), 'image' (``measurement``) or 'result'
    (``reconstruction``); anything else raises ``InputError``."""
    with open_h5_checked(path) as f:
        keys = set(f.keys())
    for key, modality in zip(MAIN_DATASETS, ("result", "mri", "ct", "image"), strict=True):
        if key in keys:
            return modality
    found = ", ".join(sorted(keys)) or "none"
    raise InputError(f"{path}: no dataset 'kspace', 'sinogram', 'measurement' or "
                     f"'reconstruction' (found: {found}); expected a diffrecon scan or result file")


# --------------------------------------------------------------------------- validated reads

def read_array(f: h5py.File, name: str, *, kinds: str, ndim: tuple[int, ...] | int,
               required: bool = True, finite: bool = True, index=None) -> np.ndarray | None:
    """Read dataset ``name`` and validate it: present, numpy kind in ``kinds`` (e.g. 'c',
    'fiub'), rank in ``ndim``, non-empty, all finite. ``index`` selects along axis 0 (slices).
    Each failure raises ``InputError`` naming the file and dataset."""
    path = f.filename
    if name not in f:
        if not required:
            return None
        raise InputError(f"{path}: missing dataset '{name}'")
    ds = f[name]
    if not isinstance(ds, h5py.Dataset):
        raise InputError(f"{path}: '{name}' is a group, expected a dataset")
    ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    want_rank = " or ".join(str(n) for n in ndims)
    if ds.ndim not in ndims:
        raise InputError(f"{path}: dataset '{name}' has rank {ds.ndim} (shape {ds.shape}), "
                         f"expected rank {want_rank}")
    if ds.dtype.kind not in kinds:
        want = " or ".join(dict.fromkeys(_KIND_NAMES[k] for k in kinds))
        raise InputError(f"{path}: dataset '{name}' has dtype {ds.dtype}, expected {want}")
    if ds.size == 0:
        raise InputError(f"{path}: dataset '{name}' is empty (shape {ds.shape}), "
                         f"expected a non-empty array")
    try:
        arr = np.asarray(ds[()] if index is None else ds[index])
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: dataset '{name}' cannot be read (truncated or corrupt file: "
                         f"{exc})") from exc
    if finite and arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        n_bad = int(arr.size - np.isfinite(arr).sum())
        raise InputError(f"{path}: dataset '{name}' contains {n_bad} NaN or Inf values, "
                         f"expected finite values")
    return arr


def check_shape(path, name: str, shape: tuple[int, ...], expected: tuple[int, ...],
                what: str) -> None:
    """Raise ``InputError`` unless ``shape == expected`` (``what`` explains the expectation)."""
    if tuple(shape) != tuple(expected):
        raise InputError(f"{path}: dataset '{name}' has shape {tuple(shape)}, expected "
                         f"{tuple(expected)} ({what})")


def slice_index(slices, n: int, path) -> Any:
    """Normalise a slice selection (None, int, slice, sequence of ints) for axis 0 of
    length ``n``; sequences are returned sorted and unique (h5py fancy-index rule)."""
    if slices is None:
        return None
    if isinstance(slices, slice):
        return slices
    idx = np.atleast_1d(np.asarray(slices))
    if idx.dtype.kind not in "iu" or idx.ndim != 1:
        raise InputError(f"{path}: slice selection {slices!r} must be integers")
    idx = np.where(idx < 0, idx + n, idx)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
        raise InputError(f"{path}: slice selection {slices!r} out of range for {n} slices")
    return sorted(set(int(i) for i in idx))


def slice_selection(f: h5py.File, name: str, slices) -> Any:
    """:func:`slice_index` of ``slices`` along axis 0 of dataset ``name`` (the scan's main
    dataset); None when it is missing or not an array (``read_array`` then says so)."""
    ds = f.get(name)
    if not isinstance(ds, h5py.Dataset) or ds.ndim == 0:
        return None
    return slice_index(slices, ds.shape[0], f.filename)


def attrs_to_dict(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """HDF5 attributes -> plain Python (bytes -> str, numpy scalars -> int/float/bool)."""
    out = {}
    for k, v in attrs.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        elif isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray) and v.dtype.kind in "OSU":
            v = [x.decode() if isinstance(x, bytes) else str(x) for x in v.ravel()]
        out[k] = v
    return out


def storable_text(text: str) -> str:
    """``text`` as valid UTF-8 for an HDF5 string. A file name that is not UTF-8 reaches
    Python with its odd bytes as lone surrogates (b'scan\\xff.h5' -> 'scan\\udcff.h5');
    those bytes are stored as backslash escapes ('scan\\\\xff.h5')."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape" if all(
            not 0xD800 <= ord(c) < 0xDC80 for c in text) else "backslashreplace")
        return raw.decode("utf-8", "backslashreplace")


def attr_value(value: Any) -> Any:
    """A Python value -> something HDF5 stores natively (JSON string for dicts, None,
    mixed or nested lists; numeric arrays stay arrays; paths become strings; text that is
    not UTF-8 through :func:`storable_text`)."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, (bool, int, float, np.generic)):
        return value
    if isinstance(value, os.PathLike):
        return storable_text(os.fspath(value))
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        return np.asarray(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(x, str) for x in value):
        return [storable_text(str(x)) for x in value]
    return json.dumps(_jsonable(value), sort_keys=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def write_attrs(obj: h5py.File | h5py.Dataset, attrs: Mapping[str, Any]) -> None:
    """Write ``attrs`` in sorted key order (deterministic files) via :func:`attr_value`."""
    for k in sorted(attrs):
        obj.attrs[str(k)] = attr_value(attrs[k])


# --------------------------------------------------------------------------- result files

@dataclass
class Result:
    """Contents of a result file (see module docstring). ``attrs`` strings holding JSON
    objects / arrays are decoded back to dicts / lists."""

    reconstruction: np.ndarray
    std: np.ndarray
    samples: np.ndarray | None = None
    complex: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    intervals: dict[float, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def interval_names(level: float) -> tuple[str, str]:
    """Dataset names of the interval at nominal coverage ``level``: ('lower_0.9',
    'upper_0.9')."""
    return f"lower_{float(level)!r}", f"upper_{float(level)!r}"


def write_result(path: str | os.PathLike, reconstruction, std, samples=None, complex=None,
                 attrs: Mapping[str, Any] | None = None,
                 intervals: Mapping[float, tuple[Any, Any]] | None = None) -> Path:
    """Write a result file atomically. Shapes: ``reconstruction``/``std`` (slices, H, W) or
    (slices, C, H, W); ``samples`` (slices, n_samples, ...); ``complex`` (slices, H, W);
    ``intervals`` {level: (lower, upper)} each of the reconstruction's shape."""
    rec = np.asarray(reconstruction, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    if rec.ndim not in (3, 4):
        raise InputError(f"reconstruction for {path} has shape {rec.shape}, expected "
                         f"(slices, H, W) or (slices, C, H, W)")
    if std.shape != rec.shape:
        raise InputError(f"std for {path} has shape {std.shape}, expected {rec.shape}")
    with atomic_h5(path) as f:
        f.create_dataset("reconstruction", data=rec)
        f.create_dataset("std", data=std)
        if samples is not None:
            s = np.asarray(samples, dtype=np.float32)
            if s.ndim != rec.ndim + 1 or s.shape[0] != rec.shape[0] or s.shape[2:] != rec.shape[1:]:
                raise InputError(f"samples for {path} have shape {s.shape}, expected "
                                 f"(slices, n_samples, {', '.join(map(str, rec.shape[1:]))})")
            f.create_dataset("samples", data=s)
        if complex is not None:
            c = np.asarray(complex, dtype=np.complex64)
            if c.shape[0] != rec.shape[0]:
                raise InputError(f"reconstruction_complex for {path} has {c.shape[0]} slices, "
                                 f"expected {rec.shape[0]}")
            f.create_dataset("reconstruction_complex", data=c)
        for level, bounds in sorted((intervals or {}).items()):
            for name, b in zip(interval_names(level), bounds, strict=True):
                b = np.asarray(b, dtype=np.float32)
                if b.shape != rec.shape:
                    raise InputError(f"{name} for {path} has shape {b.shape}, expected "
                                     f"{rec.shape}")
                f.create_dataset(name, data=b)
        write_attrs(f, dict(attrs or {}))
    return Path(path)


def read_result(path: str | os.PathLike, index=None, samples: bool = True) -> Result:
    """Read and validate a result file written by :func:`write_result`; ``index`` (positions
    along the result's slice axis, sorted; None: all) reads only those slices, ``samples``
    False skips the draws."""
    with open_h5_checked(path) as f:
        idx = slice_selection(f, "reconstruction", index)
        rec = read_array(f, "reconstruction", kinds="f", ndim=(3, 4), finite=False, index=idx)
        std = read_array(f, "std", kinds="f", ndim=(3, 4), finite=False, index=idx)
        check_shape(path, "std", std.shape, rec.shape, "same as 'reconstruction'")
        draws = read_array(f, "samples", kinds="f", ndim=rec.ndim + 1, required=False,
                           finite=False, index=idx) if samples else None
        cplx = read_array(f, "reconstruction_complex", kinds="c", ndim=3, required=False,
                          finite=False, index=idx)
        intervals = {}
        for name in sorted(f.keys()):
            if not name.startswith("lower_"):
                continue
            try:
                level = float(name[len("lower_"):])
            except ValueError:
                continue
            lo_name, hi_name = interval_names(level)
            pair = [read_array(f, n, kinds="f", ndim=rec.ndim, finite=False, index=idx)
                    for n in (lo_name, hi_name)]
            for n, b in zip((lo_name, hi_name), pair, strict=True):
                check_shape(path, n, b.shape, rec.shape, "same as 'reconstruction'")
            intervals[level] = (pair[0], pair[1])
        attrs = attrs_to_dict(f.attrs)
    for k, v in attrs.items():
        if isinstance(v, str) and v[:1] in "{[":
            with contextlib.suppress(ValueError):
                attrs[k] = json.loads(v)
    return Result(rec, std, draws, cplx, attrs, Path(path), intervals)
