"""Issue 18, hostile files (1/3): links inside the file (dangling, looping, external,
virtual) and hostile ISMRMRD headers. Each is refused with exit 2 and ONE stderr line
``diffrecon: error: ...`` naming the file and the dataset / key, before any work, by every
verb that reads scans; a hard link or a working soft link reconstructs. Shared helpers in
_hostile.py, fixtures in conftest.py."""

from __future__ import annotations

import os
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
    edit,
    invoke,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------ 1. links in the file

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


