"""Running the held-out benchmark (``benchmarks/external.py``): each row through the
``diffrecon`` command line in a subprocess (cached per row), the oracle sweeps, the
in-process scikit-image references and the per-slice scores."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from benchmarks._external_tasks import Group, Row, Task, forward_check, simulate_group

SART_ITERS = 30


# ------------------------------------------------------------------------------ running
def diffrecon_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "diffrecon"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("diffrecon")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from diffrecon.cli.main import main; "
                                  "sys.exit(main())"]


def run_cli(args: list[str], log: Path, env: dict[str, str]) -> tuple[bool, str]:
    """Run ``diffrecon ARGS``; (ok, last stderr line). Output goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(diffrecon_cmd() + args, capture_output=True, text=True, env=env)
    log.write_text("$ diffrecon " + " ".join(args) + "\n" + proc.stdout + proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return proc.returncode == 0, (lines[-1] if lines else f"exit {proc.returncode}")


@dataclass
class Context:
    out: Path
    env: dict[str, str]
    prior: str | None
    overwrite: bool
    collect: bool = False                # report cached rows only, run nothing
    scans: dict[str, Path] = field(default_factory=dict)
    truths: dict[str, Path] = field(default_factory=dict)
    calib: dict[str, tuple[Path, float]] = field(default_factory=dict)


def calibrate(ctx: Context, task: Task, group: Group) -> tuple[Path, float]:
    """ESPIRiT maps of a multi-coil scan via ``diffrecon calib`` (once); (path, s/slice)."""
    key = f"{task.name}/{group.name}"
    if key in ctx.calib:
        return ctx.calib[key]
    maps = ctx.out / "calib" / task.name / f"{group.name}_maps.h5"
    meta = maps.with_suffix(".json")
    if not (maps.exists() and meta.exists()):
        maps.parent.mkdir(parents=True, exist_ok=True)
        maps.unlink(missing_ok=True)
        proc = subprocess.run(diffrecon_cmd() + ["calib", str(ctx.scans[key]), "-o", str(maps),
                                                 "--json"],
                              capture_output=True, text=True, env=ctx.env)
        if proc.returncode != 0:
            raise RuntimeError(f"diffrecon calib {ctx.scans[key]}: {proc.stderr.strip()}")
        meta.write_text(proc.stdout)
    info = json.loads(meta.read_text())
    info = info[0] if isinstance(info, list) else info
    ctx.calib[key] = (maps, float(info["wall_time_s"]) / len(group.images))
    return ctx.calib[key]


def cli_args(row: Row, ctx: Context, extra: tuple[tuple[str, Any], ...] = ()) -> list[str]:
    args = []
    if row.family != "default":
        args += ["--solver", row.solver]
        if row.steps is not None:
            args += ["--steps", str(row.steps)]
        if row.family == "diffusion":  # one draw per slice (the default run may average more)
            args += ["--samples", "1"]
        if row.family == "diffusion" and ctx.prior:
            args += ["--prior", ctx.prior]
    for k, v in (*row.options, *extra):
        args += ["--option", f"{k}={v}"]
    return args


def read_result(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    with h5py.File(path, "r") as f:
        rec = f["reconstruction"][()]
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    return rec, attrs


def score(pred: np.ndarray, truth: Path) -> list[dict[str, Any]]:
    """Per-slice fastMRI PSNR / SSIM with the data range of the slice's source volume."""
    from diffrecon.metrics import psnr, ssim

    t = np.load(truth)
    ref, names, vols = t["reference"], list(t["images"]), list(t["volumes"])
    out = []
    for k, name in enumerate(names):
        vmax = float(max(ref[j].max() for j, v in enumerate(vols) if v == vols[k]))
        g, p = ref[k][None].astype(np.float64), np.asarray(pred[k], np.float64)[None]
        out.append({"image": str(name), "psnr": psnr(g, p, vmax), "ssim": ssim(g, p, vmax)})
    return out


def run_config(ctx: Context, task: Task, row: Row, key: str,
               extra: tuple[tuple[str, Any], ...] = ()) -> dict[str, Any]:
    """Run one CLI configuration on every group of ``task`` (cached in ``<key>.json``)."""
    rdir = ctx.out / "results" / task.name
    cache = rdir / f"{key}.json"
    if cache.exists() and not ctx.overwrite:
        return json.loads(cache.read_text())
    if ctx.collect:
        return {"row": key, "error": "not run (--collect)"}
    slices, secs, prov, t_cli = [], 0.0, {}, time.perf_counter()
    for group in task.groups:
        gkey = f"{task.name}/{group.name}"
        res = rdir / key / f"{group.name}.h5"
        res.parent.mkdir(parents=True, exist_ok=True)
        args = ["run", str(ctx.scans[gkey]), "-o", str(res), "-q", *cli_args(row, ctx, extra)]
        calib_s = 0.0
        if task.modality == "mri" and row.family != "default":
            maps, calib_s = calibrate(ctx, task, group)
            args += ["--coil-maps", str(maps)]
        if ctx.overwrite:
            args.append("--overwrite")
        ok, msg = run_cli(args, ctx.out / "logs" / task.name / f"{key}-{group.name}.log",
                          ctx.env)
        if not ok:
            return {"row": key, "error": msg}
        rec, attrs = read_result(res)
        slices += score(rec, ctx.truths[gkey])
        secs += float(attrs.get("wall_time_s", math.nan)) + calib_s * len(group.images)
        prov = {k: attrs[k] for k in ("solver", "solver_options", "prior", "prior_sha256",
                                      "diffrecon_version", "device", "num_samples")
                if k in attrs}
    result = {"row": key, "slices": slices, "s_per_slice": secs / len(slices),
              "cli_wall_s": time.perf_counter() - t_cli, "provenance": prov,
              "args": cli_args(row, ctx, extra)}
    result.update(summarise(slices))
    cache.write_text(json.dumps(result, indent=1, default=str))
    return result


def options_of(result: dict[str, Any]) -> dict[str, Any]:
    """The solver options a result ran with (its provenance), {} when unknown."""
    opts = result.get("provenance", {}).get("solver_options") or "{}"
    try:
        return json.loads(opts) if isinstance(opts, str) else dict(opts)
    except (ValueError, TypeError):
        return {}


def summarise(slices: list[dict]) -> dict[str, float]:
    return {"psnr": float(np.mean([s["psnr"] for s in slices])),
            "ssim": float(np.mean([s["ssim"] for s in slices]))}


def default_value(row: Row, base: dict[str, Any]) -> float:
    """Centre of an oracle sweep: the value the default run used (its provenance)."""
    v = options_of(base).get(row.sweep[0])
    if isinstance(v, int | float) and not isinstance(v, bool) and v > 0:
        return float(v)
    from diffrecon.recon import solver_class

    v = getattr(solver_class(row.solver).Options(), row.sweep[0])
    if isinstance(v, int | float) and not isinstance(v, bool) and v > 0:
        return float(v)
    return {"lam": 1e-3, "iters": 30}[row.sweep[0]]


def log_sweep(evaluate, centre: float, factor: float, *, integer: bool = False,
              side: int = 2, max_extend: int = 4) -> tuple[float, dict[float, float]]:
    """Maximise ``evaluate(value)`` over centre * factor^j, j = -side..side, extending the
    grid one step at a time (at most ``max_extend`` steps) while the best value is at an
    edge. Integer grids are rounded (>= 1) and deduplicated. Returns (best value, {value:
    score}); a None score (failed run) counts as -inf."""
    def value(j):
        v = centre * factor ** j
        return max(1, int(round(v))) if integer else float(f"{v:.3g}")

    scores: dict[float, float] = {}

    def ev(j):
        v = value(j)
        if v not in scores:
            s = evaluate(v)
            scores[v] = -math.inf if s is None else s
        return scores[v]

    lo, hi = -side, side
    for j in range(lo, hi + 1):
        ev(j)
    for _ in range(max_extend):
        best = max(scores, key=scores.get)
        if best == value(lo) and not (integer and value(lo) == 1):
            lo -= 1
            ev(lo)
        elif best == value(hi):
            hi += 1
            ev(hi)
        else:
            break
    return max(scores, key=scores.get), scores


def run_oracle(ctx: Context, task: Task, row: Row, base: dict[str, Any], quick: bool
               ) -> dict[str, Any]:
    name, factor, kind = row.sweep
    centre = default_value(row, base) if "error" not in base else default_value(row, {})
    used = options_of(base)
    same = all(used.get(k) == v for k, v in row.options)  # default run = a sweep point?
    runs: dict[float, dict] = {}

    def evaluate(v):
        if same and "error" not in base and used.get(name) == v:
            r = dict(base, result_key=row.solver)
        else:
            key = f"{row.solver}@{name}={v}"
            r = dict(run_config(ctx, task, row, key, ((name, v),)), result_key=key)
        runs[v] = r
        return r.get("psnr")

    best, scores = log_sweep(evaluate, centre, factor, integer=kind == "int", side=1,
                             max_extend=0 if quick else 4)
    out = dict(runs[best])
    if "error" in out:
        return {"row": row.name, "error": out["error"]}
    if any("error" in r for r in runs.values()):
        out["partial"] = sorted(str(v) for v, r in runs.items() if "error" in r)
    out.update(row=row.name, oracle={name: best}, sweep={str(k): v for k, v in scores.items()},
               sweep_s_per_slice=sum(r.get("s_per_slice", 0.0) for r in runs.values()))
    return out


# ------------------------------------------------------------------------------ skimage rows
def run_external(ctx: Context, task: Task, row: Row) -> dict[str, Any]:
    """In-process scikit-image references (CT FBP / SART, SR bicubic), cached like rows.
    SART: iterations 1..SART_ITERS (relaxation 0.15), the best mean PSNR over the task (oracle);
    its s/slice is the time of that many iterations."""
    from skimage.transform import iradon, iradon_sart, resize

    rdir = ctx.out / "results" / task.name
    cache = rdir / f"{row.name}.json"
    if cache.exists() and not ctx.overwrite:
        return json.loads(cache.read_text())
    if ctx.collect:
        return {"row": row.name, "error": "not run (--collect)"}
    rdir.mkdir(parents=True, exist_ok=True)
    secs, preds = 0.0, {}              # group -> (iterations or 1, S, ...) predictions
    for group in task.groups:
        gkey = f"{task.name}/{group.name}"
        with h5py.File(ctx.scans[gkey], "r") as f:
            data = f["sinogram" if task.modality == "ct" else "measurement"][()]
            theta = np.rad2deg(f["angles"][()]) if task.modality == "ct" else None
        ref = np.load(ctx.truths[gkey])["reference"]
        t0 = time.perf_counter()
        if row.name == "skimage-fbp":
            pred = [np.stack([iradon(s.T.astype(np.float64), theta, output_size=ref.shape[-1],
                                     filter_name="ramp", circle=False) for s in data])]
        elif row.name == "skimage-bicubic":
            pred = [np.stack([resize(y.astype(np.float64), ref.shape[1:], order=3,
                                     mode="reflect", anti_aliasing=False) for y in data])]
        else:  # SART works on radon's zero-padded D x D grid: crop back to N x N
            n, d = ref.shape[-1], data.shape[-1]
            crop = slice(d // 2 - n // 2, d // 2 - n // 2 + n)
            pred, cur = [], [None] * len(data)
            for _ in range(SART_ITERS):
                cur = [iradon_sart(s.T.astype(np.float64), theta, image=c)
                       for s, c in zip(data, cur, strict=True)]
                pred.append(np.stack(cur)[:, crop, crop])
        secs += time.perf_counter() - t0
        preds[group.name] = pred
    runs = {it: [s for g in task.groups for s in score(preds[g.name][it], ctx.truths[
        f"{task.name}/{g.name}"])] for it in range(len(preds[task.groups[0].name]))}
    means = {it: summarise(v)["psnr"] for it, v in runs.items()}
    best = max(means, key=means.get)
    for g in task.groups:
        np.save(rdir / f"{row.name}-{g.name}.npy", preds[g.name][best].astype(np.float32))
    n = sum(len(g.images) for g in task.groups)
    result = {"row": row.name, "slices": runs[best], "provenance": {"solver": row.name},
              "s_per_slice": secs / n * (best + 1) / len(means), **summarise(runs[best])}
    if len(means) > 1:
        result.update(oracle={"iterations": best + 1},
                      sweep={str(it + 1): v for it, v in means.items()})
    cache.write_text(json.dumps(result, indent=1, default=str))
    return result


# ------------------------------------------------------------------------------ one task
def same_as_default(row: Row, base: dict[str, Any], prior: str | None) -> bool:
    """True when ``row`` would repeat the default run (same solver, steps, prior, one draw)."""
    if row.family != "diffusion" or row.options or prior or "error" in base:
        return False
    prov = base.get("provenance", {})
    return (prov.get("solver") == row.solver and options_of(base).get("steps") == row.steps
            and int(prov.get("num_samples", 1)) == 1)


def run_row(ctx: Context, task: Task, row: Row, done: dict[str, dict], quick: bool
            ) -> dict[str, Any]:
    if row.family == "external":
        return run_external(ctx, task, row)
    if row.sweep is not None:
        base = done.get(row.solver) or run_config(ctx, task, Row(row.solver, "classical",
                                                                 row.solver), row.solver)
        return run_oracle(ctx, task, row, base, quick)
    if row.family != "default" and same_as_default(row, done.get("default", {}), ctx.prior):
        return dict(done["default"], row=row.name, same_as="default")
    return run_config(ctx, task, row, row.name)


def run_task(ctx: Context, task: Task, rows: list[Row], quick: bool) -> dict[str, Any]:
    notes = []
    for group in task.groups:
        key = f"{task.name}/{group.name}"
        ctx.scans[key], ctx.truths[key] = simulate_group(task, group, ctx.out)
    try:
        notes.append(forward_check(task, task.groups[-1]))
    except Exception as exc:  # noqa: BLE001 - a failed check is reported, not fatal
        notes.append(f"forward-model check failed: {exc}")
    results: dict[str, dict] = {}
    done = {}
    for row in rows:
        t0 = time.perf_counter()
        try:
            r = run_row(ctx, task, row, done, quick)
        except Exception as exc:  # noqa: BLE001 - one broken row must not stop the table
            r = {"row": row.name, "error": f"{type(exc).__name__}: {exc}"}
        done[row.name] = results[row.name] = r
        status = r.get("error") or f"{r['psnr']:.2f} dB"
        print(f"[{task.name}] {row.name}: {status} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    if "fbp" in results and "skimage-fbp" in results:
        notes.append(fbp_consistency(ctx, task))
    return {"task": task, "rows": results, "notes": notes}


def fbp_consistency(ctx: Context, task: Task) -> str:
    """PSNR of diffrecon ``--solver fbp`` against skimage iradon on the same sinograms."""
    from diffrecon.metrics import psnr

    vals = []
    for group in task.groups:
        rec, _ = read_result(ctx.out / "results" / task.name / "fbp" / f"{group.name}.h5")
        sk = np.load(ctx.out / "results" / task.name / f"skimage-fbp-{group.name}.npy")
        vals += [psnr(s[None], r[None]) for s, r in zip(sk, rec, strict=True)]
    return (f"FBP consistency: PSNR(diffrecon fbp vs skimage iradon ramp, same sinograms) "
            f"= {np.mean(vals):.1f} dB (min {np.min(vals):.1f})")
