"""ISMRMRD XML headers of fastMRI files (dataset ``ismrmrd_header``): the header dict
(encoded / recon matrix sizes and fields of view, ky encoding limits), written and parsed
with the standard library's ``xml.etree``, and the checked read of the dataset's text.
Re-exported by :mod:`diffrecon.datasets.fastmri`."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from diffrecon.errors import InputError

ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"
_XML_DECL = re.compile(rb"^\s*<\?xml[^>]*\?>")


def default_header(kspace_shape: Sequence[int], recon_size: Sequence[int] | None = None,
                   fov_mm: Sequence[float] | None = None) -> dict[str, Any]:
    """Header dict for k-space (kx, ky): encoded = (kx, ky, 1), recon = ``recon_size`` or
    (kx, ky), step-1 limits 0..ky-1 centred at ky // 2."""
    kx, ky = int(kspace_shape[-2]), int(kspace_shape[-1])
    rx, ry = (kx, ky) if recon_size is None else (int(recon_size[0]), int(recon_size[1]))
    fov = None if fov_mm is None else tuple(float(v) for v in fov_mm)
    return {
        "encoding_size": (kx, ky, 1),
        "recon_size": (rx, ry, 1),
        "encoding_fov_mm": fov,
        "recon_fov_mm": fov,
        "kspace_encoding_step_1": {"minimum": 0, "maximum": ky - 1, "center": ky // 2},
    }


def header_to_xml(header: Mapping[str, Any]) -> bytes:
    """Header dict -> ISMRMRD XML bytes (default namespace ``ISMRMRD_NS``)."""
    def sub(parent, tag, text=None):
        el = ET.SubElement(parent, f"{{{ISMRMRD_NS}}}{tag}")
        if text is not None:
            el.text = str(text)
        return el

    def xyz(parent, tag, values):
        el = sub(parent, tag)
        for axis, v in zip("xyz", values, strict=True):
            sub(el, axis, v)

    ET.register_namespace("", ISMRMRD_NS)
    root = ET.Element(f"{{{ISMRMRD_NS}}}ismrmrdHeader")
    enc = sub(root, "encoding")
    for space, size_key, fov_key in (("encodedSpace", "encoding_size", "encoding_fov_mm"),
                                     ("reconSpace", "recon_size", "recon_fov_mm")):
        el = sub(enc, space)
        xyz(el, "matrixSize", header[size_key])
        fov = header.get(fov_key)
        if fov is not None:
            xyz(el, "fieldOfView_mm", [f"{float(v):g}" for v in fov])
    sub(enc, "trajectory", "cartesian")
    lim = sub(sub(enc, "encodingLimits"), "kspace_encoding_step_1")
    for k in ("minimum", "maximum", "center"):
        sub(lim, k, int(header["kspace_encoding_step_1"][k]))
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _query(root, qlist: Sequence[str]):
    """fastMRI ``et_query``: nested ``.//ns:tag`` search in the ISMRMRD namespace."""
    s = "." + "".join(f"//ismrmrd_namespace:{el}" for el in qlist)
    return root.find(s, {"ismrmrd_namespace": ISMRMRD_NS})


def read_header_xml(f, path) -> str | None:
    """The text of dataset ``ismrmrd_header`` (None when absent): one string, stored as
    bytes (fixed-length or variable-length string, or opaque), strictly UTF-8 (ISMRMRD
    writes UTF-8; a latin-1 header would be re-written as mojibake) and not empty. A group,
    a numeric dataset, several strings or undecodable bytes raise ``InputError``."""
    if "ismrmrd_header" not in f:
        return None
    where = f"{path}: dataset 'ismrmrd_header'"
    ds = f["ismrmrd_header"]
    if not isinstance(ds, h5py.Dataset):
        raise InputError(f"{where} is a group, expected a string dataset of ISMRMRD XML")
    if ds.dtype.kind not in "SOV" or (ds.dtype.kind == "O" and h5py.check_string_dtype(
            ds.dtype) is None):
        raise InputError(f"{where} has dtype {ds.dtype}, expected a string of ISMRMRD XML")
    if ds.size != 1:
        raise InputError(f"{where} has shape {ds.shape}, expected one string of ISMRMRD XML")
    try:
        raw = ds[()]
    except (OSError, ValueError) as exc:
        raise InputError(f"{where} cannot be read (truncated or corrupt file)") from exc
    raw = np.asarray(raw).reshape(-1)[0] if isinstance(raw, np.ndarray) else raw
    raw = raw.tobytes() if isinstance(raw, np.void) else raw
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{where} is not UTF-8 text (byte {raw[exc.start]:#04x} at "
                             f"position {exc.start}), expected ISMRMRD XML in UTF-8") from None
    if not str(raw).strip():
        raise InputError(f"{where} is empty, expected an ISMRMRD XML header")
    return str(raw)


def parse_header(xml: bytes | str, path="<header>") -> dict[str, Any]:
    """ISMRMRD XML -> header dict; a missing or non-numeric required element raises
    ``InputError`` naming it. Entity expansion is bounded and external entities are never
    fetched (the standard library's expat; tests: billion laughs, XXE)."""
    if isinstance(xml, str):  # a declaration other than UTF-8 must not re-decode it
        xml = xml.encode("utf-8")
        xml = _XML_DECL.sub(b"", xml, count=1)
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InputError(f"{path}: dataset 'ismrmrd_header' is not valid XML ({exc}), "
                         f"expected an ISMRMRD header") from exc

    def get(qlist, cast, required=True):
        el = _query(root, qlist)
        if el is None or el.text is None:
            if not required:
                return None
            raise InputError(f"{path}: dataset 'ismrmrd_header' lacks element "
                             f"{'/'.join(qlist)} (namespace {ISMRMRD_NS}), expected it")
        try:
            return cast(el.text.strip())
        except ValueError as exc:
            want = "an integer" if cast is int else "a number"
            raise InputError(f"{path}: dataset 'ismrmrd_header' element {'/'.join(qlist)} is "
                             f"{el.text!r}, expected {want}") from exc

    def xyz(prefix, cast, required=True):
        vals = tuple(get([*prefix, a], cast, required) for a in "xyz")
        return None if any(v is None for v in vals) else vals

    lims = ["encoding", "encodingLimits", "kspace_encoding_step_1"]
    return {
        "encoding_size": xyz(["encoding", "encodedSpace", "matrixSize"], int),
        "recon_size": xyz(["encoding", "reconSpace", "matrixSize"], int),
        "encoding_fov_mm": xyz(["encoding", "encodedSpace", "fieldOfView_mm"], float, False),
        "recon_fov_mm": xyz(["encoding", "reconSpace", "fieldOfView_mm"], float, False),
        "kspace_encoding_step_1": {k: get([*lims, k], int, k != "minimum")
                                   for k in ("minimum", "maximum", "center")},
    }
