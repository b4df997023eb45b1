"""Scan-file layouts: round trips, fastMRI compatibility, validation errors, atomic writes."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest

from diffrecon.datasets import (
    CTScan,
    ImageScan,
    MRIScan,
    atomic_h5,
    detect_modality,
    read_ct_scan,
    read_image_scan,
    read_mri_scan,
    read_result,
    read_scan,
    sha256_file,
    write_ct_scan,
    write_image_scan,
    write_mri_scan,
    write_result,
)
from diffrecon.datasets.fastmri import ISMRMRD_NS, default_header, header_to_xml, parse_header
from diffrecon.errors import InputError


def _complex(rng, shape):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def _mri_scan(rng, coils=3, kx=12, ky=10, slices=2, mask=True):
    shape = (slices, coils, kx, ky) if coils else (slices, kx, ky)
    m = np.zeros(ky, bool)
    m[::2] = True
    return MRIScan(kspace=_complex(rng, shape), mask=m if mask else None,
                   header=default_header((kx, ky), recon_size=(8, 8), fov_mm=(120, 100, 3)),
                   attrs={"acquisition": "CORPD_FBK", "patient_id": "p1"},
                   rss=rng.random((slices, 8, 8)).astype(np.float32),
                   coil_maps=_complex(rng, shape) if coils else None,
                   ground_truth=_complex(rng, (slices, 8, 8)))


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("coils", [3, 0])
def test_mri_round_trip(tmp_path, coils):
    rng = np.random.default_rng(0)
    scan = _mri_scan(rng, coils=coils)
    path = write_mri_scan(tmp_path / "a.h5", scan)
    got = read_mri_scan(path)
    assert got.kspace.dtype == np.complex64 and got.kspace.shape == scan.kspace.shape
    np.testing.assert_array_equal(got.kspace, scan.kspace)
    np.testing.assert_array_equal(got.mask, scan.mask)
    np.testing.assert_array_equal(got.rss, scan.rss)
    np.testing.assert_array_equal(got.ground_truth, scan.ground_truth)
    if coils:
        np.testing.assert_array_equal(got.coil_maps, scan.coil_maps)
        assert got.multicoil and got.n_coils == 3
    else:
        assert got.coil_maps is None and not got.multicoil and got.n_coils == 1
    assert got.header == scan.header
    assert got.recon_size == (8, 8) and got.acceleration == 2.0
    assert got.attrs["acquisition"] == "CORPD_FBK" and got.attrs["patient_id"] == "p1"
    assert got.attrs["max"] == pytest.approx(float(scan.rss.max()))
    assert got.attrs["norm"] == pytest.approx(float(np.linalg.norm(scan.rss)), rel=1e-6)
    # rewriting keeps the original XML verbatim
    write_mri_scan(tmp_path / "b.h5", got)
    with h5py.File(tmp_path / "a.h5") as fa, h5py.File(tmp_path / "b.h5") as fb:
        assert fa["ismrmrd_header"][()] == fb["ismrmrd_header"][()]


def test_mri_slice_selection_and_no_header(tmp_path):
    rng = np.random.default_rng(1)
    ks = _complex(rng, (4, 2, 6, 6))
    with h5py.File(tmp_path / "raw.h5", "w") as f:  # a user's minimal file: kspace only
        f["kspace"] = ks
    scan = read_mri_scan(tmp_path / "raw.h5", slices=[3, 1])
    np.testing.assert_array_equal(scan.kspace, ks[[1, 3]])
    assert scan.mask is None and scan.recon_size == (6, 6)
    with pytest.raises(InputError, match="out of range"):
        read_mri_scan(tmp_path / "raw.h5", slices=[4])


def test_header_xml_uses_ismrmrd_namespace_and_parses_back():
    hdr = default_header((640, 368), recon_size=(320, 320), fov_mm=(280, 140, 4.5))
    xml = header_to_xml(hdr)
    assert xml.startswith(b"<?xml") and ISMRMRD_NS.encode() in xml
    back = parse_header(xml)
    assert back["encoding_size"] == (640, 368, 1) and back["recon_size"] == (320, 320, 1)
    assert back["kspace_encoding_step_1"] == {"minimum": 0, "maximum": 367, "center": 184}
    assert back["encoding_fov_mm"] == (280.0, 140.0, 4.5)


def test_fastmri_slicedataset_reads_our_files(tmp_path):
    fastmri_data = pytest.importorskip("fastmri.data")
    rng = np.random.default_rng(2)
    root = tmp_path / "multicoil_val"
    root.mkdir()
    scan = _mri_scan(rng, coils=3, kx=16, ky=12, slices=3)
    write_mri_scan(root / "file1000001.h5", scan)
    ds = fastmri_data.SliceDataset(root, challenge="multicoil",
                                   dataset_cache_file=tmp_path / "cache.pkl")
    assert len(ds) == 3
    kspace, mask, target, attrs, fname, dataslice = ds[1]
    np.testing.assert_array_equal(kspace, scan.kspace[1])
    np.testing.assert_array_equal(mask, scan.mask)
    np.testing.assert_array_equal(target, scan.rss[1])
    assert fname == "file1000001.h5" and dataslice == 1
    assert attrs["encoding_size"] == (16, 12, 1) and attrs["recon_size"] == (8, 8, 1)
    assert attrs["padding_left"] == 0 and attrs["padding_right"] == 12
    assert attrs["max"] == pytest.approx(float(scan.rss.max()))


def test_ct_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    scan = CTScan(sinogram=rng.standard_normal((2, 7, 11)).astype(np.float32),
                  angles=np.linspace(0, np.pi, 7, endpoint=False),
                  attrs={"image_size": 8, "pixel_size": 0.5, "noise_sigma": 0.1},
                  ground_truth=rng.random((2, 8, 8)).astype(np.float32))
    got = read_ct_scan(write_ct_scan(tmp_path / "ct.h5", scan))
    np.testing.assert_array_equal(got.sinogram, scan.sinogram)
    np.testing.assert_array_equal(got.angles, scan.angles)
    np.testing.assert_array_equal(got.ground_truth, scan.ground_truth)
    assert got.angles.dtype == np.float64
    assert got.attrs == {"geometry": "parallel", "n_detectors": 11, "image_size": 8,
                         "pixel_size": 0.5, "noise_sigma": 0.1}
    assert got.image_size == 8 and got.noise_sigma == 0.1


def test_image_round_trips(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.random((2, 1, 16, 16)).astype(np.float32)
    blur = ImageScan(measurement=x + 0.1, operator="blur", image=x,
                     params={"kernel_type": "custom", "kernel_width": 1.0, "boundary": "reflect",
                             "noise_sigma": 0.02}, kernel=np.ones((3, 3)) / 9)
    got = read_image_scan(write_image_scan(tmp_path / "b.h5", blur))
    np.testing.assert_array_equal(got.measurement, blur.measurement)
    np.testing.assert_array_equal(got.image, x)
    np.testing.assert_allclose(got.kernel, np.ones((3, 3)) / 9, rtol=1e-6)
    assert got.operator == "blur" and got.params == blur.params and got.noise_sigma == 0.02

    sr = ImageScan(measurement=x[:, :, ::4, ::4], operator="superres", image=x,
                   params={"factor": 4, "kind": "box", "boundary": "circular",
                           "image_size": (16, 16), "noise_sigma": 0.0})
    got = read_image_scan(write_image_scan(tmp_path / "s.h5", sr))
    assert got.params == sr.params and got.image_shape == (1, 16, 16)

    mask = rng.random((16, 16)) > 0.5
    inp = ImageScan(measurement=x * mask, operator="inpaint", image=x, mask=mask,
                    params={"noise_sigma": 0.0})
    got = read_image_scan(write_image_scan(tmp_path / "i.h5", inp))
    np.testing.assert_array_equal(got.mask, mask)


def test_image_scan_physics_round_trips_to_factory(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = rng.random((1, 1, 16, 16)).astype(np.float32)
    scan = ImageScan(measurement=x, operator="blur", image=x,
                     params={"kernel_type": "gaussian", "kernel_width": 1.5,
                             "boundary": "circular", "noise_sigma": 0.05})
    phys = read_image_scan(write_image_scan(tmp_path / "b.h5", scan)).physics()
    from diffrecon.operators.blur import blur

    ref = blur("gaussian", width=1.5, boundary="circular")
    xt = torch.from_numpy(x)
    torch.testing.assert_close(phys.A(xt), ref.A(xt), rtol=0, atol=0)
    assert float(phys.noise_model.sigma) == 0.05


def test_result_round_trip_plain_h5py(tmp_path):
    rng = np.random.default_rng(6)
    rec = rng.random((2, 8, 8)).astype(np.float32)
    std = rng.random((2, 8, 8)).astype(np.float32)
    samples = rng.random((2, 3, 8, 8)).astype(np.float32)
    cplx = _complex(rng, (2, 8, 8))
    prov = {"solver": "dps", "options": {"steps": 50, "zeta": 0.5}, "seed": 3, "nfe": 50,
            "prior_sha256": "ab" * 32, "sigmas": [1.0, 0.5], "note": None}
    path = write_result(tmp_path / "r.h5", rec, std, samples=samples, complex=cplx, attrs=prov)
    with h5py.File(path, "r") as f:  # plain h5py, no diffrecon
        np.testing.assert_array_equal(f["reconstruction"][()], rec)
        assert json.loads(f.attrs["options"]) == {"steps": 50, "zeta": 0.5}
        assert f.attrs["solver"] == "dps" and f.attrs["nfe"] == 50
    got = read_result(path)
    np.testing.assert_array_equal(got.std, std)
    np.testing.assert_array_equal(got.samples, samples)
    np.testing.assert_array_equal(got.complex, cplx)
    assert got.attrs["options"] == {"steps": 50, "zeta": 0.5}
    np.testing.assert_array_equal(got.attrs["sigmas"], [1.0, 0.5])
    assert detect_modality(path) == "result"
    with pytest.raises(InputError, match="samples"):
        write_result(tmp_path / "bad.h5", rec, std, samples=samples[:, :, :4])
    assert not (tmp_path / "bad.h5").exists()


def test_detect_modality_and_read_scan(tmp_path):
    rng = np.random.default_rng(7)
    p_mri = write_mri_scan(tmp_path / "m.h5", _mri_scan(rng))
    p_ct = write_ct_scan(tmp_path / "c.h5", CTScan(np.zeros((1, 3, 4), np.float32),
                                                    np.arange(3.0) * np.pi / 3))
    p_img = write_image_scan(tmp_path / "i.h5", ImageScan(np.zeros((1, 1, 4, 4)), "blur"))
    assert [detect_modality(p) for p in (p_mri, p_ct, p_img)] == ["mri", "ct", "image"]
    assert isinstance(read_scan(p_ct), CTScan) and isinstance(read_scan(p_img), ImageScan)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["foo"] = np.zeros(3)
    with pytest.raises(InputError, match="other.h5.*foo"):
        detect_modality(tmp_path / "other.h5")


# --------------------------------------------------------------------------- validation

def _h5(path, datasets, attrs=None):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    return path


def _good_mri(rng):
    return {"kspace": _complex(rng, (2, 3, 8, 6)),
            "ismrmrd_header": header_to_xml(default_header((8, 6)))}


_MRI_BAD = {
    "missing kspace": (lambda d: d.pop("kspace"), "kspace", "missing"),
    "real kspace": (lambda d: d.update(kspace=d["kspace"].real.copy()), "kspace", "complex"),
    "rank-2 kspace": (lambda d: d.update(kspace=d["kspace"][0, 0]), "kspace", "rank"),
    "empty kspace": (lambda d: d.update(kspace=d["kspace"][:0]), "kspace", "empty"),
    "nan kspace": (lambda d: d["kspace"].__setitem__((0, 1, 2, 3), np.nan), "kspace", "NaN"),
    "inf kspace": (lambda d: d["kspace"].__setitem__((1, 0, 0, 0), np.inf), "kspace", "Inf"),
    "mask length": (lambda d: d.update(mask=np.ones(5, bool)), "mask", "ky"),
    "mask values": (lambda d: d.update(mask=np.arange(6.0)), "mask", "0 and 1"),
    "coil maps shape": (lambda d: d.update(coil_maps=d["kspace"][:, :2]), "coil_maps",
                        "same shape"),
    "coil maps dtype": (lambda d: d.update(coil_maps=np.abs(d["kspace"])), "coil_maps",
                        "complex"),
    "rss slices": (lambda d: d.update(reconstruction_rss=np.ones((3, 8, 6), np.float32)),
                   "reconstruction_rss", "slices"),
    "header xml": (lambda d: d.update(ismrmrd_header=b"<not xml"), "ismrmrd_header", "XML"),
    "header element": (lambda d: d.update(ismrmrd_header=d["ismrmrd_header"].replace(
        b"reconSpace", b"otherSpace")), "ismrmrd_header", "reconSpace/matrixSize"),
}


@pytest.mark.parametrize("case", list(_MRI_BAD))
def test_malformed_mri_raises_one_line_input_error(tmp_path, case):
    rng = np.random.default_rng(8)
    data = _good_mri(rng)
    edit, dataset, fragment = _MRI_BAD[case]
    edit(data)
    path = _h5(tmp_path / "bad.h5", data)
    before = sha256_file(path)
    with pytest.raises(InputError) as err:
        read_mri_scan(path)
    msg = str(err.value)
    assert str(path) in msg and f"'{dataset}'" in msg and fragment in msg
    assert "\n" not in msg
    assert sha256_file(path) == before  # input untouched


_CT_BAD = {
    "complex sinogram": (lambda d, a: d.update(sinogram=d["sinogram"] * 1j), "sinogram",
                         "real"),
    "rank-2 sinogram": (lambda d, a: d.update(sinogram=d["sinogram"][0]), "sinogram", "rank"),
    "inf sinogram": (lambda d, a: d["sinogram"].__setitem__((0, 0, 0), np.inf), "sinogram",
                     "Inf"),
    "angles length": (lambda d, a: d.update(angles=d["angles"][:-1]), "angles", "one angle"),
    "missing angles": (lambda d, a: d.pop("angles"), "angles", "missing"),
    "detector attr": (lambda d, a: a.update(n_detectors=5), "n_detectors", "match"),
    "geometry": (lambda d, a: a.update(geometry="cone"), "geometry", "parallel"),
    "ground truth size": (lambda d, a: d.update(ground_truth=np.zeros((2, 5, 5), np.float32)),
                          "ground_truth", "image_size"),
}


@pytest.mark.parametrize("case", list(_CT_BAD))
def test_malformed_ct_raises(tmp_path, case):
    data = {"sinogram": np.ones((2, 5, 9), np.float32), "angles": np.linspace(0, 3, 5)}
    attrs = {"geometry": "parallel", "n_detectors": 9, "image_size": 8}
    edit, name, fragment = _CT_BAD[case]
    edit(data, attrs)
    path = _h5(tmp_path / "bad.h5", data, attrs)
    with pytest.raises(InputError) as err:
        read_ct_scan(path)
    msg = str(err.value)
    assert str(path) in msg and f"'{name}'" in msg and fragment in msg and "\n" not in msg


_IMG_BAD = {
    "missing operator": ({}, {}, "operator", "missing"),
    "bad operator": ({}, {"operator": "warp"}, "operator", "blur"),
    "integer measurement": ({"measurement": np.ones((1, 1, 8, 8), np.int32)},
                            {"operator": "blur"}, "measurement", "floating"),
    "custom kernel missing": ({}, {"operator": "blur", "kernel_type": "custom"}, "kernel",
                              "missing"),
    "inpaint mask shape": ({"mask": np.ones((4, 4))}, {"operator": "inpaint"}, "mask",
                           "(H, W)"),
    "superres factor": ({}, {"operator": "superres", "factor": 3}, "factor", "2 or 4"),
    "image shape": ({"image": np.ones((1, 1, 16, 16), np.float32)}, {"operator": "blur"},
                    "image", "(slices, C, H, W)"),
}


@pytest.mark.parametrize("case", list(_IMG_BAD))
def test_malformed_image_scan_raises(tmp_path, case):
    extra, attrs, name, fragment = _IMG_BAD[case]
    data = {"measurement": np.ones((1, 1, 8, 8), np.float32), **extra}
    path = _h5(tmp_path / "bad.h5", data, attrs)
    with pytest.raises(InputError) as err:
        read_image_scan(path)
    msg = str(err.value)
    assert str(path) in msg and f"'{name}'" in msg and fragment in msg and "\n" not in msg


def test_not_hdf5_truncated_and_missing_files(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("kspace = 1\n")
    with pytest.raises(InputError, match=r"notes\.h5: not an HDF5 file"):
        read_mri_scan(text)
    full = write_mri_scan(tmp_path / "full.h5", _mri_scan(np.random.default_rng(9)))
    blob = full.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match=r"cut\.h5: truncated or corrupt HDF5 file"):
        read_mri_scan(cut)
    with pytest.raises(InputError, match=r"nope\.h5: no such file"):
        read_ct_scan(tmp_path / "nope.h5")
    for reader in (detect_modality, read_image_scan, read_result):
        with pytest.raises(InputError, match="not an HDF5 file"):
            reader(text)


# --------------------------------------------------------------------------- atomic writes

def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.h5"
    with pytest.raises(RuntimeError, match="boom"), atomic_h5(target) as f:
        f["a"] = np.zeros(1000)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    write_result(target, np.ones((1, 4, 4)), np.zeros((1, 4, 4)), attrs={"v": 1})
    before = sha256_file(target)
    with pytest.raises(RuntimeError), atomic_h5(target) as f:
        f["reconstruction"] = np.zeros((1, 2, 2))
        raise RuntimeError("midway")
    assert sha256_file(target) == before  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]

    with atomic_h5(target) as f:
        f["x"] = np.arange(3)
        assert not target.exists() or sha256_file(target) == before
        # built in memory: nothing but the old file on disk until it is complete
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]
    with h5py.File(target) as f:
        assert list(f) == ["x"]


def test_sha256_file(tmp_path):
    p = tmp_path / "b.bin"
    p.write_bytes(b"diffrecon" * 1000)
    assert sha256_file(p, chunk=7) == hashlib.sha256(b"diffrecon" * 1000).hexdigest()
