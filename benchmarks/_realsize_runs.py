"""benchmarks/realsize.py, whole runs: one default run per scan in a fresh subprocess
(``run_child``), timed by wrapping the network and the scan operators, and the table
rows (``whole_rows``). Split from realsize.py (issue 14: files <= 400 lines); not a
benchmark script of its own."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from benchmarks.common import REPO, fmt, setup


# ------------------------------------------------------------------------------ whole runs
class _Clock:
    """Accumulates the wall time of the outermost calls of wrapped methods."""

    def __init__(self):
        self.seconds, self.calls, self._depth = 0.0, 0, 0

    def wrap(self, fn):
        def timed(*args, **kw):
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - t0
                    self.calls += 1
        return timed


# Operator calls of one DDS solve outside its step loop: A^T y for the signal shape and for
# the CG right-hand side, A of the final mean for the residual (the step loop makes 13 per
# step at cg_iters = 5: 6 normal-operator products and the step's residual).
PER_SOLVE_OPERATOR_CALLS = 3


def _faults() -> int:
    """Minor page faults of this process so far (memory the kernel had to hand out again)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_child(kind: str, scan: str, out: str, steps: int | None, threads: int,
              precision: str = "fp32") -> None:
    """Subprocess body: one default run of ``scan`` (module docstring); prints one JSON line."""
    setup(threads)
    import diffrecon.pipeline.run as prun
    from diffrecon import pipeline
    from diffrecon.datasets.io import read_result

    net, op, t_setup, t_prior, keep = _Clock(), _Clock(), [0.0], [0.0], {}
    load_problem, load_prior = prun.load_problem, prun.load_prior

    def timed_problem(*args, **kw):
        t0 = time.perf_counter()
        problem = load_problem(*args, **kw)
        t_setup[0] += time.perf_counter() - t0
        for phys in problem.physics:  # instance attributes: the solver's calls go through
            for name in ("A", "A_adjoint", "A_adjoint_A"):
                setattr(phys, name, op.wrap(getattr(phys, name)))
        keep["shape"] = (1, problem.channels, *problem.measurements[0].shape[-2:]) \
            if kind.startswith("ct") else None
        return problem

    def timed_prior(*args, **kw):
        t0 = time.perf_counter()
        prior = load_prior(*args, **kw)
        t_prior[0] += time.perf_counter() - t0
        keep["prior"], keep["denoise"], keep["sigmas"] = prior, prior.denoise, []

        def denoise(x, sigma):
            keep["sigmas"].append(sigma.detach().clone())
            keep["x_shape"] = tuple(x.shape)
            f0 = _faults()
            try:
                return keep["denoise"](x, sigma)
            finally:
                keep["faults"] = keep.get("faults", 0) + _faults() - f0
        prior.denoise = net.wrap(denoise)
        return prior

    prun.load_problem, prun.load_prior = timed_problem, timed_prior
    opts = {"device": "cpu", "slices": "0"}
    fields = {f.name for f in dataclasses.fields(pipeline.RunOptions)}  # older checkouts
    if "precision" in fields:
        opts["precision"] = precision  # explicit: the default "auto" may pick bf16
    if "threads" in fields:
        opts["threads"] = threads  # the run pins its own thread count (default 1)
    if kind == "mri-run":
        opts["acceleration"] = None  # the file holds its mask
    if steps is not None:
        opts["steps"] = steps
    c0, t0 = time.process_time(), time.perf_counter()
    summary = pipeline.reconstruct_file(scan, out, **opts)
    whole, whole_cpu = time.perf_counter() - t0, time.process_time() - c0
    res = read_result(out)
    a = res.attrs
    solve = float(a["solve_time_s"])
    try:  # the run's allocator settings (freed memory kept), absent in older checkouts
        from diffrecon.pipeline.concurrency import kept_memory
    except ImportError:
        kept_memory = contextlib.nullcontext
    # the bare network: same shape, same calls, same noise levels, same allocator settings
    with torch.no_grad(), kept_memory():
        x = torch.randn(keep["x_shape"], generator=torch.Generator().manual_seed(0))
        c1, t1, f1 = time.process_time(), time.perf_counter(), _faults()
        for sigma in keep["sigmas"]:
            keep["denoise"](x, sigma)
        bare, bare_cpu = time.perf_counter() - t1, time.process_time() - c1
        bare_faults = _faults() - f1
    ref = None
    with h5py.File(scan, "r") as f:
        ref = f["reconstruction_rss"][0] if "reconstruction_rss" in f else f["ground_truth"][0]
    rec = np.asarray(res.reconstruction[0], np.float64)
    psnr = float(10 * np.log10(ref.max() ** 2 / np.mean((rec - ref) ** 2)))
    print(json.dumps({
        "whole": whole, "whole_cpu": whole_cpu, "setup": t_setup[0], "prior_load": t_prior[0],
        "solve": solve, "network": net.seconds, "network_calls": net.calls,
        "operator": op.seconds, "operator_calls": op.calls, "bare": bare,
        "bare_cpu": bare_cpu, "network_faults": keep["faults"], "bare_faults": bare_faults,
        "nfe": int(a["nfe"]), "x_shape": list(keep["x_shape"]),
        "psnr": psnr, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "solver": summary.get("solver"), "prior": str(a["prior"]),
        "steps": int(a["solver_options"]["steps"]), "coils": a.get("coil_compression")}))


def whole_rows(jobs: list[tuple[str, str, Path, int | None, str]], threads: int, tmp: Path
               ) -> list[dict]:
    """One default run per job (label, kind, scan, steps, precision), each in a fresh
    subprocess."""
    from diffrecon.pipeline.options import DEFAULT_STEPS

    rows = []
    for label, kind, scan, steps, precision in jobs:
        out = tmp / f"{scan.stem}-{kind}-{precision}" / "result.h5"  # fresh: no ESPIRiT cache
        out.parent.mkdir(parents=True, exist_ok=True)
        args = ["--_run", kind, str(scan), str(out), str(steps or 0), "--threads",
                str(threads), "--precision", precision]
        res = subprocess.run(
            [sys.executable, "-c", f"from benchmarks.realsize import main; main({args!r})"],
            cwd=REPO, capture_output=True, text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if res.returncode != 0:
            raise RuntimeError(f"{label}: run failed:\n{res.stderr[-3000:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        other = r["whole"] - r["setup"] - r["solve"]
        row = {"run": label, "solver / prior": f"{r['solver']} {r['steps']} / {r['prior']}",
               "NFE": r["nfe"], "network input": "x".join(map(str, r["x_shape"])),
               "whole s": r["whole"], "whole CPU s": r["whole_cpu"], "set-up s": r["setup"],
               "network s": r["network"], "data consistency s": r["solve"] - r["network"],
               "operator s (calls)": f"{fmt(r['operator'])} ({r['operator_calls']})",
               "other s": other, "bare network s": r["bare"],
               "bare network CPU s": r["bare_cpu"],
               "page faults / network call (run, bare)": ", ".join(
                   f"{r[k] / max(r['network_calls'], 1):.0f}"
                   for k in ("network_faults", "bare_faults")),
               "whole / bare": r["whole"] / r["bare"],
               "whole / bare (CPU)": r["whole_cpu"] / r["bare_cpu"],
               "solve / bare": r["solve"] / r["bare"], "peak RSS GB": r["peak_rss_gb"],
               "PSNR dB": r["psnr"]}
        target = DEFAULT_STEPS.get("dds", r["steps"])
        if r["steps"] < target:  # extrapolated to the default run's steps (docstring)
            once = PER_SOLVE_OPERATOR_CALLS * r["operator"] / max(r["operator_calls"], 1)
            step = (r["solve"] - once) / r["steps"]
            whole_target = r["whole"] + (target - r["steps"]) * step
            row[f"whole s ({target} steps, extrapolated)"] = whole_target
            row[f"whole / bare ({target} steps, extrapolated)"] = whole_target / (
                target * r["bare"] / r["steps"])
        rows.append(row)
    return rows
