"""Hostile-file guards for every reader: a path must name a readable regular file (a FIFO
or device is refused from ``stat`` alone, never opened), must be HDF5, and every name at its
root must lead to data stored in the file itself (no external link, virtual dataset or
external raw storage is followed; soft links are resolved hop by hop). Re-exported by
:mod:`diffrecon.datasets.io`."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import h5py

from diffrecon.errors import InputError


def check_readable_file(path: str | os.PathLike, what: str = "an HDF5 file") -> Path:
    """``path`` as a Path when it names a readable regular file (symbolic links followed);
    else ``InputError`` saying what it is: missing, a dangling or looping symbolic link, a
    directory, a FIFO, device or socket (refused from ``stat`` alone, never opened, so a
    FIFO cannot block the run), or not readable by this user. ``what`` is what was
    expected, for the message ('an HDF5 file', 'a checkpoint file', ...)."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{p}: symbolic link loop, expected {what}") from None
        if os.path.islink(p):
            raise InputError(f"{p}: symbolic link to {os.readlink(p)}, which does not exist"
                             ) from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise InputError(f"{p}: no such file") from None
        raise InputError(f"{p}: cannot be read ({exc.strerror}), expected {what}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{p}: is a directory, expected {what}")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{p}: is a {_file_kind(st.st_mode)}, expected {what} (a "
                         f"regular file; not opened)")
    if not os.access(p, os.R_OK):
        raise InputError(f"{p}: permission denied, expected {what} readable by this user")
    return p


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def open_h5_checked(path: str | os.PathLike) -> h5py.File:
    """Open ``path`` read-only after :func:`check_readable_file`; a non-HDF5 or corrupt file,
    or one whose links or storage reach outside it (:func:`check_links`), raises
    ``InputError``."""
    p = check_readable_file(path)
    try:
        is_hdf5 = h5py.is_hdf5(p)
    except OSError as exc:
        raise InputError(f"{p}: cannot read file ({exc})") from exc
    if not is_hdf5:
        raise InputError(f"{p}: not an HDF5 file")
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise InputError(f"{p}: truncated or corrupt HDF5 file") from exc
    try:
        check_links(f, p)
    except BaseException:
        f.close()
        raise
    return f


MAIN_DATASETS = ("reconstruction", "kspace", "sinogram", "measurement")
MAX_SOFT_LINKS = 16  # HDF5's own default limit on soft-link hops (H5L_NUM_LINKS)


def check_links(f: h5py.File, path) -> None:
    """Every name at the root of ``f`` must lead to an object stored in ``f`` itself:

    - a soft link is followed (hop by hop, at most ``MAX_SOFT_LINKS``) and must end at an
      object of this file: a dangling or looping one is an ``InputError`` naming the key;
    - an external link is REFUSED, not followed, whether its target exists or not: the
      result's provenance (``input_sha256``) and the resume fingerprint cover this file's
      bytes only, so data read from another file could change without a rerun noticing;
      and a scan must not make diffrecon open other paths of the machine (a FIFO, a device,
      a private file) on its behalf. The same holds for datasets whose data live in other
      files (virtual datasets, external raw storage);
    - hard links need no check (two names of one dataset are fine).

    Scan and result layouts keep their datasets at the root, so the root is what is read.
    The layouts' main datasets are checked first, then names no other link points to, so
    that the error names the dataset the layout reads ('kspace', not the 'a' it links to)."""
    try:
        links = {name: f.get(name, getlink=True) for name in f}
    except (KeyError, OSError, RuntimeError, ValueError) as exc:
        raise InputError(f"{path}: truncated or corrupt HDF5 file (its root group cannot be "
                         f"listed: {' '.join(str(exc).split())})") from exc
    pointed = {link.path.strip("/").split("/")[0] for link in links.values()
               if isinstance(link, h5py.SoftLink)}
    for name in sorted(links, key=lambda n: (n not in MAIN_DATASETS, n in pointed)):
        where = f"{path}: '{name}'"
        try:
            target = _resolve(f, "/" + name, [0], where)
            obj = f[target]
            if isinstance(obj, h5py.Dataset):
                plist = obj.id.get_create_plist()
                if obj.is_virtual or plist.get_external_count() > 0:
                    kind = "a virtual dataset" if obj.is_virtual else "external raw storage"
                    raise InputError(f"{where} keeps its data in other files ({kind}), "
                                     f"which are not followed; expected the data in this file "
                                     f"(copy it in, e.g. with h5copy)")
        except InputError:
            raise
        except (KeyError, OSError, RuntimeError, ValueError) as exc:
            raise InputError(f"{where} cannot be opened (truncated or corrupt file: "
                             f"{' '.join(str(exc).split())})") from exc


def _resolve(f: h5py.File, target: str, hops: list[int], where: str) -> str:
    """The hard-link path that ``target`` (absolute) leads to, walking it component by
    component so that no soft or external link is ever traversed by HDF5 itself; ``hops``
    counts the soft links followed for the whole walk."""
    current = ""
    for part in (q for q in target.split("/") if q and q != "."):
        here = f"{current}/{part}"
        link = f.get(here, getlink=True)
        if link is None:
            raise InputError(f"{where} is a soft link to '{target}', which does not exist in "
                             f"the file; expected a dataset")
        if isinstance(link, h5py.ExternalLink):
            how = "leads through" if hops[0] else "is"
            raise InputError(f"{where} {how} an external link to '{link.path}' in file "
                             f"{link.filename!r}; external links are not followed (the data "
                             f"must be in this file, which the result's input checksum "
                             f"covers)")
        if isinstance(link, h5py.SoftLink):
            hops[0] += 1
            if hops[0] > MAX_SOFT_LINKS:
                raise InputError(f"{where} is a soft link that loops (more than "
                                 f"{MAX_SOFT_LINKS} hops); expected a dataset")
            dest = link.path if link.path.startswith("/") else f"{current}/{link.path}"
            here = _resolve(f, dest, hops, where)
        current = here
    return current or "/"
