"""Real-size scans: the set-up pieces of a fastMRI 640 x 320 16-coil slice and a 512 x 512 CT
slice with 720 views, timed and checked, and whole default runs on them.

    python -m benchmarks.realsize [--quick] [--out DIR] [--threads 1] [--repeats 3]
        [--parts setup mri-run ct-run step-split] [--ct-steps S]
        [--ct-geometries parallel fan]

MRI file, written here with h5py + numpy + sigpy only (no diffrecon simulator): an axial
slice (z = 90) of nilearn's MNI152 2009 T1 template (validation split; 1 mm, zero-padded to
320 x 320) with a smooth phase, placed in a 640 x 320 field of view (readout oversampled
2x, as fastMRI brain files); 16 sigpy birdcage coils on that field of view; k-space =
sigpy's centred orthonormal FFT plus complex Gaussian noise (std 2e-4 x the k-space peak
per part); fastMRI's own ``EquispacedMaskFractionFunc`` (4x, centre 8%, seed 1000);
ISMRMRD header with encodedSpace 640 x 320, reconSpace 320 x 320;
``reconstruction_rss`` = RSS of the centre-cropped fully sampled coil images. The file is
read back by fastMRI's ``SliceDataset`` and by ``diffrecon.datasets.read_mri_scan``.

Rows (MRI): ESPIRiT at full resolution (sigpy ``EspiritCalib``, 16 coils) on the
oversampled 640 x 320 grid (what ``diffrecon calib`` did) and on the readout-cropped
320 x 320 grid; readout crop (``operators.readout.crop_readout``; its error against
fastMRI's ifft2c / complex_center_crop / fft2c); SVD coil compression
(``operators.coils.compress_coils``, automatic at 99% and 99.9% energy, and 8 coils);
ESPIRiT on the compressed coils at calibration resolution (``grid``). Agreement: CG-SENSE
(30 iterations, ``operators.mri`` + ``recon.common.cg``) with each set of maps; magnitude
NRMSE on the head
(reconstruction_rss > 5% of its max) against SENSE with all coils and full-resolution maps
("full res") and against reconstruction_rss. Times are process CPU seconds
(``time.process_time``), medians of ``--repeats`` runs (ESPIRiT at full resolution: once).

CT: parallel beam (720 views over pi) and fan beam (720 views over 2 pi, curved detector,
``datasets.simulate.fan_defaults`` for 0.7 mm pixels: 595 / 1086 mm) on 512 x 512. Each
geometry runs in a fresh subprocess that reports the build, A, A^T and FBP process CPU
times (medians of ``--repeats``; batch of one slice, float32) and its peak resident set
(``ru_maxrss``, the whole process, Python, torch and data included) after the imports,
after the operator timings and at the end (after the analytic check). Independent
check: the sinogram of an analytic ellipse phantom (closed-form chord lengths, numpy, from
the geometry as documented) against A of the same phantom rasterised with 4 x 4
supersampling (relative L2 error), and the PSNR of FBP of the analytic sinogram against the
rasterised phantom (peak 1) inside the inscribed circle.

Whole default runs (``--parts mri-run ct-run``): ``pipeline.reconstruct_file`` with the
options of a plain ``diffrecon run FILE -o OUT`` (DDS with the default steps and draws,
``pipeline.options.DEFAULT_STEPS`` / ``DEFAULT_SAMPLES``, and the shipped ``mri`` / ``ct``
prior, coil compression auto, ESPIRiT on its first run: a fresh output folder, so no cached
maps), one slice, in a fresh subprocess (its ``ru_maxrss`` is the run's peak RSS). MRI: the
file above (640 x 320, 16 coils, 4x). CT: a 512 x 512 file per geometry written here with
h5py from the analytic ellipse sinogram (720 views, plus Gaussian noise of 0.5% of its
peak, ``noise_sigma`` declared; fan: 0.7 mm pixels, ``fan_defaults``). Split of the wall
time: set-up = ``load_problem`` (read, readout crop, coil compression, ESPIRiT, the
normaliser's least-squares level, the noise floor); network = time inside the prior's
``denoise`` (a wrapper on the loaded prior accumulates it: no timer inside the step loop);
operator = time inside the scan operators' A / A^T (wrappers likewise; outermost call
only); data consistency = solve - network (CG with its operator calls, renoising, the
residual diagnostic); other = whole - set-up - solve (prior load, plan, input checksum,
result writing). The bare network is then timed in the same process on a tensor of the
same shape for the same number of calls at the run's own noise levels, with the run's
allocator settings (``pipeline.concurrency.kept_memory``: after the run glibc returns freed
memory to the kernel again, and a bare loop would then fault its activations in on every
call, flattering the ratio; the table gives the minor page faults per network call in the
run and bare); ratio = whole run / bare network (the issue's whole-run / network-bound).
``--ct-steps S`` runs the CT rows with S DDS steps instead of the default run's
(``pipeline.options.DEFAULT_STEPS``; at 720 views a DDS step on the exact operator costs 13
applications of the CT projector per draw, one on the FFT normal operator none): the table
then also gives the figures of the default's T steps extrapolated as whole + (T - S) x step,
step = (solve - the solve's 3 operator calls outside the step loop) / S, against T / S times
the bare network. Times are wall seconds (``time.perf_counter``) with the process CPU
seconds alongside: on a shared machine the wall time includes waiting for a core.

Per-step split (``--parts step-split``): process CPU seconds, in one process, of one
network call and one DDS data-consistency step on the real-size shapes (MRI 320 x 320 with
8 coils and a 4x column mask, both normal operators; CT 512 x 512 with 720 views, 7 A + 6
A^T per step, and with ``ct(normal="toeplitz")``: 6 FFT normal products, the residual every
``dds.RESIDUAL_EVERY`` steps, ``dds.EXACT_LAST`` exact steps and the set-up spread over the default
run's steps, ``_realsize_ct.ct_fast_step_rows``), so the per-step ratio does not depend on
the machine's load. Then DDS 50 with the exact vs the toeplitz normal on a 256 x 256
VALIDATION image, 8 to 360 views (``_realsize_ct.ct_normal_section``).

Every run uses ``--threads`` torch threads (default 1) and one OpenMP thread; run it with
``OMP_NUM_THREADS=1 nice``. ``--quick``: MRI 128 x 64 (8 coils, 20% centre), CT 64 x 64
with 90 views (whole runs with 3 DDS steps).
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from benchmarks import _realsize_ct as rct
from benchmarks._realsize_ct import _ct_physics, ct_child, ct_rows, write_ct_file
from benchmarks._realsize_runs import run_child, whole_rows
from benchmarks.common import SEED0, arguments, fmt, header, markdown_table, nice, setup


# ------------------------------------------------------------------------------ MRI file
def mni_slice(size: int) -> np.ndarray:
    """Axial slice z = 90 of the MNI152 2009 T1 template (nilearn's packaged copy, read with
    nibabel), max 1, zero-padded / cropped to size x size (1 mm pixels at size 320)."""
    import importlib.util

    import nibabel

    root = Path(importlib.util.find_spec("nilearn").submodule_search_locations[0])
    vol = nibabel.load(root / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    sl = np.rot90(np.asarray(vol.dataobj[:, :, 90], dtype=np.float64))
    if size < 320:  # quick mode: block-average to keep the whole head
        f = int(math.ceil(max(sl.shape) / size))
        h, w = (s // f * f for s in sl.shape)
        sl = sl[:h, :w].reshape(h // f, f, w // f, f).mean((1, 3))
    out = np.zeros((size, size))
    h, w = min(size, sl.shape[0]), min(size, sl.shape[1])
    r0, c0 = (size - h) // 2, (size - w) // 2
    s0, s1 = (sl.shape[0] - h) // 2, (sl.shape[1] - w) // 2
    out[r0:r0 + h, c0:c0 + w] = sl[s0:s0 + h, s1:s1 + w]
    return out / out.max()


def header_xml(enc: tuple[int, int], rec: tuple[int, int], fov_mm: tuple[float, float]) -> str:
    ns = "http://www.ismrm.org/ISMRMRD"
    m = lambda tag, x, y, z: f"<{tag}><x>{x}</x><y>{y}</y><z>{z}</z></{tag}>"  # noqa: E731
    return (f'<?xml version="1.0" encoding="utf-8"?><ismrmrdHeader xmlns="{ns}"><encoding>'
            f"<encodedSpace>{m('matrixSize', *enc, 1)}"
            f"{m('fieldOfView_mm', 2 * fov_mm[0], fov_mm[1], 5.0)}</encodedSpace>"
            f"<reconSpace>{m('matrixSize', *rec, 1)}"
            f"{m('fieldOfView_mm', *fov_mm, 5.0)}</reconSpace>"
            "<encodingLimits><kspace_encoding_step_1><minimum>0</minimum>"
            f"<maximum>{enc[1] - 1}</maximum><center>{enc[1] // 2}</center>"
            "</kspace_encoding_step_1></encodingLimits></encoding></ismrmrdHeader>")


def write_fastmri_file(path: Path, size: int, coils: int, centre: float = 0.08) -> None:
    """The fastMRI-layout file of the module docstring (one slice; ``centre``: fraction of
    fully sampled centre lines)."""
    import sigpy as sp
    import sigpy.mri
    from fastmri.data.subsample import EquispacedMaskFractionFunc

    img = mni_slice(size)
    t = (np.arange(size) - size / 2) / size
    phase = 1.2 * t[:, None] - 0.8 * t[None, :] + 2.0 * (t[:, None] ** 2 + t[None, :] ** 2)
    full_fov = np.zeros((2 * size, size), np.complex128)
    full_fov[size // 2:size // 2 + size] = img * np.exp(1j * phase)
    maps = sigpy.mri.birdcage_maps((coils, 2 * size, size), dtype=np.complex128)
    maps /= np.sqrt(np.sum(np.abs(maps) ** 2, 0))
    k = sp.fft(maps * full_fov, axes=(-2, -1))
    rng = np.random.default_rng(SEED0)
    sigma = 2e-4 * np.abs(k).max()
    k = k + sigma * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
    coil_img = sp.ifft(k, axes=(-2, -1))[:, size // 2:size // 2 + size]
    target = np.sqrt(np.sum(np.abs(coil_img) ** 2, 0)).astype(np.float32)
    mask_func = EquispacedMaskFractionFunc(center_fractions=[centre], accelerations=[4],
                                           seed=SEED0)
    mask, n_low = mask_func((1, 2 * size, size, 2), seed=SEED0)
    mask = mask.numpy().reshape(-1).astype(bool)
    with h5py.File(path, "w") as f:
        f["kspace"] = (k * mask)[None].astype(np.complex64)
        f["mask"] = mask
        f["reconstruction_rss"] = target[None]
        f["ismrmrd_header"] = header_xml((2 * size, size), (size, size),
                                         (float(size), float(size)))
        f.attrs.update({"acquisition": "AXT1", "max": float(target.max()),
                        "norm": float(np.linalg.norm(target)), "patient_id": "mni152",
                        "acceleration": 4, "num_low_frequency": int(n_low)})


def fastmri_check(path: Path) -> tuple[tuple, float]:
    """(kspace shape, |target - SliceDataset target|max) read by fastMRI's SliceDataset."""
    from fastmri.data import SliceDataset

    with tempfile.TemporaryDirectory() as d:
        link = Path(d) / path.name
        link.symlink_to(path)
        ds = SliceDataset(d, challenge="multicoil", use_dataset_cache=False)
        kspace, mask, target, attrs, fname, slice_num = ds[0]
    with h5py.File(path, "r") as f:
        return kspace.shape, float(np.abs(target - f["reconstruction_rss"][0]).max())


# ------------------------------------------------------------------------------ MRI rows
def _cpu(fn, repeats: int = 1):
    """(result of the last call, median process CPU seconds over ``repeats`` calls)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return out, statistics.median(times)


def sense(k: np.ndarray, maps: np.ndarray, mask: np.ndarray, iters: int = 30) -> np.ndarray:
    from diffrecon.operators import kspace_to_tensor, mri
    from diffrecon.recon.common import cg

    p = mri(mask, maps)
    x = cg(lambda v: p.A_adjoint(p.A(v)), p.A_adjoint(kspace_to_tensor(k[None])), iters=iters)
    return torch.view_as_complex(x[0].movedim(0, -1).contiguous()).numpy()


def nrmse(a: np.ndarray, b: np.ndarray, support: np.ndarray) -> float:
    a, b = np.abs(a)[support], np.abs(b)[support]
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def mri_rows(path: Path, repeats: int, quick: bool) -> tuple[list[dict], list[dict], dict]:
    import fastmri
    from fastmri.data import transforms as T

    from diffrecon.datasets import read_mri_scan
    from diffrecon.operators.coils import compress_coils, estimate_coil_maps
    from diffrecon.operators.readout import crop_readout

    scan = read_mri_scan(path)
    k, mask = scan.kspace[0], scan.mask
    width = scan.recon_size[0]
    target = scan.rss[0]
    support = target > 0.05 * target.max()
    rows, quality = [], []

    _, t = _cpu(lambda: estimate_coil_maps(k, mask=mask))
    rows.append({"step": f"ESPIRiT full res, {k.shape[0]} coils, {k.shape[1]} x {k.shape[2]}",
                 "CPU s": t})
    kc, t = _cpu(lambda: crop_readout(k, width), repeats)
    ref = fastmri.fft2c(T.complex_center_crop(fastmri.ifft2c(T.to_tensor(k)),
                                              (width, k.shape[-1])))
    err = float((T.to_tensor(kc) - ref).abs().max() / ref.abs().max())
    rows.append({"step": f"readout crop {k.shape[1]} -> {width}", "CPU s": t,
                 "note": f"max abs diff / max vs fastMRI transforms {err:.1e}"})
    (maps16, _), t = _cpu(lambda: estimate_coil_maps(kc, mask=mask))
    rows.append({"step": f"ESPIRiT full res, {kc.shape[0]} coils, {width} x {kc.shape[2]}",
                 "CPU s": t})
    x16 = sense(kc, maps16, mask)
    quality.append({"maps": f"full res, {kc.shape[0]} coils", "NRMSE vs full res": 0.0,
                    "NRMSE vs reconstruction_rss": nrmse(x16, target, support)})
    grids = (32, 48) if quick else (32, 48, 64)
    for label, n_coils in (("auto 99%", "auto"), ("auto 99.9%", "auto"), ("8", 8)):
        energy = 0.99 if label == "auto 99%" else 0.999
        comp, t = _cpu(lambda n=n_coils, e=energy: compress_coils(kc, n, energy=e), repeats)
        n = comp.kspace.shape[0]
        rows.append({"step": f"coil compression {kc.shape[0]} -> {n} ({label})", "CPU s": t,
                     "note": f"energy kept {float(comp.energy):.5f}"})
        for g in grids:
            (maps, params), t = _cpu(
                lambda c=comp, g=g: estimate_coil_maps(c.kspace, mask=mask, grid=g), repeats)
            rows.append({"step": f"ESPIRiT grid {g}, {n} coils", "CPU s": t,
                         "note": f"calib {params['calib_width']}"})
            x = sense(comp.kspace, maps, mask)
            quality.append({"maps": f"grid {g}, {n} coils ({label})",
                            "NRMSE vs full res": nrmse(x, x16, support),
                            "NRMSE vs reconstruction_rss": nrmse(x, target, support)})
    info = {"kspace": tuple(scan.kspace.shape), "mask lines": int(mask.sum()),
            "centre lines": int(scan.attrs["num_low_frequency"])}
    return rows, quality, info


# ------------------------------------------------------------------------------ step split
def step_rows(size: int, coils: int, ct_n: int, ct_views: int, repeats: int) -> list[dict]:
    """Process CPU seconds of one network call and one DDS data-consistency step (5 CG
    iterations of (I + gamma A^T A) and the step's residual; CT: 7 A + 6 A^T, from one A and
    one A^T) in this process: the per-step ratio (network + data consistency) / network,
    independent of the machine's load."""
    from diffrecon import operators, priors
    from diffrecon.pipeline.options import DEFAULT_STEPS
    from diffrecon.recon.common import cg, relative_residual

    def cpu(fn, n=repeats):
        fn()
        t0 = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - t0) / n

    g = torch.Generator().manual_seed(SEED0)
    maps = torch.randn(coils, size, size, dtype=torch.complex64, generator=g)
    maps /= maps.abs().pow(2).sum(0).sqrt()
    mask = torch.zeros(size)
    mask[::4] = 1
    mask[size // 2 - size // 25:size // 2 + size // 25] = 1
    p = operators.mri(mask, maps, noise_sigma=0.01)
    x = torch.randn(1, 2, size, size, generator=g)
    y, gamma = p.A(x), 0.3 ** 2 / 0.01 ** 2
    aty, sigma = p.A_adjoint(y), torch.full((1,), 0.3)

    def dc(normal):
        relative_residual(p, cg(lambda v: v + gamma * normal(v), x + gamma * aty, x, 5), y)

    rows = []
    with torch.no_grad():
        prior = priors.load("mri").eval()
        net = cpu(lambda: prior.denoise(x, sigma))
        for label, normal in (("deepinv A^T(A x)", lambda v: p.A_adjoint(p.A(v))),
                              ("fused SenseMRI.A_adjoint_A", p.A_adjoint_A)):
            step = cpu(lambda n=normal: dc(n))
            rows.append({"problem": f"MRI {size} x {size}, {coils} coils, {label}",
                         "network CPU s / call": net, "data consistency CPU s / step": step,
                         "step / network": (net + step) / net})
        prior = priors.load("ct").eval()
        x = torch.randn(1, 1, ct_n, ct_n, generator=g)
        net = cpu(lambda: prior.denoise(x, sigma))
        for geometry in ("parallel", "fan"):
            p = _ct_physics(geometry, ct_n, ct_views, normal="toeplitz")  # the fast rows too
            y = p.A(x)
            a = cpu(lambda p=p: p.A(x), 1)
            at = cpu(lambda p=p, y=y: p.A_adjoint(y), 1)
            step = 7 * a + 6 * at
            label = f"CT {ct_n} x {ct_n}, {ct_views} views, {geometry}"
            rows.append({"problem": f"{label} (A {fmt(a)}, A^T {fmt(at)})",
                         "network CPU s / call": net, "data consistency CPU s / step": step,
                         "step / network": (net + step) / net})
            rows += rct.ct_fast_step_rows(p, x, net, step, DEFAULT_STEPS["dds"], label, cpu)
    return rows


# ------------------------------------------------------------------------------ main
def main(argv=None) -> str:
    p = arguments(__doc__, "MRI 128 x 64 with 8 coils, CT 64 x 64 with 90 views")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="what to run (default: all)")
    p.add_argument("--ct-steps", type=int, default=None,
                   help="DDS steps of the CT whole runs (default: the default run's 100)")
    p.add_argument("--ct-geometries", nargs="+", choices=("parallel", "fan"),
                   default=["parallel", "fan"])
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
                   help="network precision of the whole runs (a row each; RunOptions.precision)")
    p.add_argument("--_ct", nargs=4, help="(internal) geometry n views repeats")
    p.add_argument("--_run", nargs=4, help="(internal) kind scan out steps")
    a = p.parse_args(argv)
    if a._ct:
        geometry, n, views, repeats = a._ct
        ct_child(geometry, int(n), int(views), int(repeats), a.threads)
        return ""
    if a._run:
        kind, scan, out, steps = a._run
        run_child(kind, scan, out, int(steps) or None, a.threads, a.precision[0])
        return ""
    setup(a.threads)
    size, coils, ct_n, ct_views = (64, 8, 64, 90) if a.quick else (320, 16, 512, 720)
    repeats = 1 if a.quick else a.repeats
    run_steps = 3 if a.quick else None
    ct_steps = a.ct_steps if a.ct_steps is not None else run_steps
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.out) if a.out else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"realsize_mri_{2 * size}x{size}_{coils}coils.h5"
        jobs = []
        if "setup" in a.parts or "mri-run" in a.parts:
            _, t_write = _cpu(lambda: write_fastmri_file(path, size, coils,
                                                         0.2 if a.quick else 0.08))
        if "setup" in a.parts:
            fm_shape, fm_diff = fastmri_check(path)
            mri, quality, info = mri_rows(path, repeats, a.quick)
            sections += [
                f"## MRI: {info['kspace']} k-space, {info['mask lines']} of "
                f"{info['kspace'][-1]} lines (4x, {info['centre lines']} centre lines)", "",
                f"File written in {t_write:.1f} CPU s; fastMRI SliceDataset reads kspace "
                f"{tuple(fm_shape)}, target max |diff| {fm_diff:.1e}.", "",
                markdown_table(mri, ["step", "CPU s", "note"]), "",
                "CG-SENSE (30 iterations) magnitude NRMSE on the head:", "",
                markdown_table(quality), "",
                f"## CT: {ct_n} x {ct_n}, {ct_views} views (CPU s, medians of {repeats})", "",
                markdown_table(ct_rows(ct_n, ct_views, repeats, a.threads)), ""]
        if "mri-run" in a.parts:
            jobs += [(f"MRI {2 * size} x {size} -> {size} x {size}, {coils} coils, 4x, "
                      f"{precision}", "mri-run", path, run_steps, precision)
                     for precision in a.precision]
        if "ct-run" in a.parts:
            for geometry in a.ct_geometries:
                scan = folder / f"realsize_ct_{geometry}_{ct_n}_{ct_views}.h5"
                write_ct_file(scan, geometry, ct_n, ct_views)
                jobs += [(f"CT {geometry} {ct_n} x {ct_n}, {ct_views} views, {precision}",
                          "ct-run", scan, ct_steps, precision) for precision in a.precision]
        if "step-split" in a.parts:
            sections += ["## Per DDS step (process CPU s, this process)", "",
                         markdown_table(step_rows(size, 8, ct_n, ct_views, repeats)), ""]
            sections += rct.ct_normal_section(a.quick)
        if jobs:
            rows = whole_rows(jobs, a.threads, Path(tmp))
            sections += ["## Whole default runs (one slice; wall s unless marked CPU)", "",
                         markdown_table(rows), ""]
    report = "\n".join([
        "# Real-size scans: set-up pieces (MRI calibration, CT operators) and whole runs", "",
        header(), f"- OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"repeats {repeats}{', quick' if a.quick else ''}, parts {' '.join(a.parts)}", "",
        *sections])
    print(report)
    return report


PARTS = ("setup", "mri-run", "ct-run", "step-split")


if __name__ == "__main__":
    nice(10)
    main()
