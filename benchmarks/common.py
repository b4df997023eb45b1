"""The one shared module of the benchmark scripts: their command line, provenance header,
markdown tables, GMM metrics, aggregation over seeds.

Every benchmark script is a module of this package run from the repository root as
``python -m benchmarks.<name> [--quick] [--out DIR]``: its ``main(argv=None)`` parses
:func:`arguments`, prints a markdown report (and returns it), writes any files only under
``--out``, and has a ``--quick`` mode (CI smoke, seconds to minutes) next to its full mode.
``python -m benchmarks`` (``diffrecon bench``) runs them all. Benchmark seeds are >= 1000
(tests use seeds < 100).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
SEED0 = 1000          # first benchmark seed (held out from the tests' seeds < 100)
NAN = float("nan")


# ------------------------------------------------------------------------------ provenance
def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """HEAD commit of the repository (short), with '+dirty' when the tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        return (head or "unknown") + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    import deepinv

    import diffrecon

    return {"python": platform.python_version(), "torch": torch.__version__,
            "deepinv": getattr(deepinv, "__version__", "?"),
            "diffrecon": getattr(diffrecon, "__version__", "?")}


def header() -> str:
    """Markdown bullet list: machine, threads, versions, commit, date (UTC)."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    v = versions()
    lines = [
        f"- machine: {cpu_model()}, {os.cpu_count()} logical cores, torch threads "
        f"{torch.get_num_threads()}, CUDA device: {dev}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- git commit: {git_commit()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
    ]
    return "\n".join(lines)


def arguments(doc: str, quick: str) -> argparse.ArgumentParser:
    """The command line every benchmark script starts from: description (the first line of
    ``doc``), ``--quick`` (``quick`` says what the smoke mode runs), ``--out`` (folder for
    the files the script writes; None: it writes none, unless it says otherwise) and
    ``--threads`` (torch intra-op threads)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"CI smoke: {quick}")
    p.add_argument("--out", type=Path, default=None, help="folder for the files it writes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p


def setup(threads: int = 1) -> None:
    """Limit torch's intra-op threads (the benchmark machine is shared)."""
    torch.set_num_threads(max(1, int(threads)))


def nice(increment: int = 10) -> None:
    """Lower this process's CPU priority (scripts call this when run from the shell)."""
    try:
        os.nice(increment)
    except OSError:
        pass


# ------------------------------------------------------------------------------ tables
def fmt(x, digits: int = 3) -> str:
    """Numbers to short strings (3 significant digits), None/NaN to '—', others str()."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        if math.isinf(x) or abs(x) >= 1e5 or (x != 0 and abs(x) < 1e-3):
            return f"{x:.{digits - 1}e}"
        return f"{x:.0f}" if abs(x) >= 10 ** digits else f"{x:.{digits}g}"
    return str(x)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (dicts); ``columns`` default: keys of row 0."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out)


def parse_table(text: str) -> tuple[list[str], list[list[str]]]:
    """Inverse of ``markdown_table`` for the first table in ``text``: (columns, rows)."""
    lines: list[str] = []
    for ln in text.splitlines():
        if ln.strip().startswith("|"):
            lines.append(ln.strip())
        elif lines:  # the first table ends at its first non-table line
            break
    if len(lines) < 2:
        return [], []

    def cells(ln: str) -> list[str]:
        return [c.strip() for c in ln.strip("|").split("|")]

    return cells(lines[0]), [cells(ln) for ln in lines[2:]]


def mean_spread(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (spread 0 for one value, NaNs dropped)."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return NAN, NAN
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s


def fmt_ms(values: Iterable[float]) -> str:
    """'mean ± sd' over seeds (sd = sample standard deviation; just the mean for one seed)."""
    v = list(values)
    m, s = mean_spread(v)
    if math.isnan(m):
        return "—"
    return fmt(m) if len(v) == 1 else f"{fmt(m)} ± {fmt(s)}"


# ------------------------------------------------------------------------------ GMM metrics
def gmm_metrics(samples: Tensor, posterior, x_ref_seed: int, *, mean: Tensor | None = None,
                n_ref: int = 2000, n_directions: int = 500) -> dict[str, float]:
    """Exactness metrics of posterior ``samples`` (n, d) against the exact GMM ``posterior``.

    Draws two independent exact sets of ``n_ref`` samples and ``n_directions`` directions,
    all from ``torch.Generator().manual_seed(x_ref_seed)``. Returns
      sw: sliced W1 between the first n = min(n, n_ref) samples and the first exact set,
      floor: sliced W1 between the two exact sets (same n, same directions): the noise floor,
      tv: total variation of the recovered mixture weights (``mixture_weight_tv``),
      mean_err: ||m_hat - E[x | y]||_2 with m_hat = ``mean`` if given (e.g. a weighted
          particle mean) else the sample mean.
    """
    from diffrecon.priors.analytic import mixture_weight_tv, sliced_wasserstein

    x = samples.detach().reshape(samples.shape[0], -1).to(torch.float64).cpu()
    n = min(x.shape[0], n_ref)
    gen = torch.Generator().manual_seed(int(x_ref_seed))
    post = posterior.to("cpu")
    ref_a, ref_b = post.sample(n_ref, gen)[:n], post.sample(n_ref, gen)[:n]
    state = gen.get_state()
    sw = sliced_wasserstein(x[:n], ref_a, n_directions, gen)
    gen.set_state(state)  # the same directions for the floor
    floor = sliced_wasserstein(ref_b, ref_a, n_directions, gen)
    m_hat = x.mean(0) if mean is None else mean.detach().reshape(-1).to(torch.float64).cpu()
    return {"sw": float(sw), "floor": float(floor),
            "tv": float(mixture_weight_tv(x, post)),
            "mean_err": float((m_hat - post.mean()).norm())}


def pooled_smc_run(solver, y: Tensor, physics, prior, samples: int, n: int, seed: int):
    """The protocol's SMC sample set: ``k = ceil(samples / n)`` INDEPENDENT runs of ``n``
    particles pooled (algorithms.md's reference figures pool 2 runs of N = 1000 into 2000
    samples; drawing 2000 from one cloud of 1000 would duplicate points and compare ~1000
    distinct samples against a 2000-vs-2000 floor). Runs are rows of one batched solve
    (``y`` repeated; each row has its own generator). Returns (samples (k * (samples // k),
    d), pooled weighted mean (d,), mean final ESS / n, Reconstruction)."""
    k = -(-samples // n)
    rec = solver.solve(y.expand(k, *y.shape[1:]).contiguous(), physics, prior,
                       num_samples=samples // k, seed=seed)
    pooled = rec.samples.transpose(0, 1).reshape(-1, *rec.samples.shape[2:])
    ess = sum(rec.info["final_ess"]) / (k * n)
    return pooled, rec.mean.mean(0), ess, rec


__all__ = ["NAN", "REPO", "SEED0", "arguments", "cpu_model", "fmt", "fmt_ms", "git_commit",
           "gmm_metrics", "header", "markdown_table", "mean_spread", "nice", "parse_table",
           "pooled_smc_run", "setup", "versions"]
