"""Run the benchmark scripts and write one results file with provenance.

    python benchmarks/run_all.py [--quick] [--out benchmarks/RESULTS.run_all.md] [--others]

Runs gmm_table (which includes deepinv's samplers via gmm_deepinv), speed and uncertainty
in-process with ``--quick`` when given, and writes the machine header, the commands and every
table to ``--out`` atomically (temporary file, then rename). ``--others`` also runs the other
benchmark scripts present in benchmarks/ (gmm_smc, gmm_dds, gmm_dps_reddiff, denoise_prior)
as subprocesses and appends their output. Image-quality tables are not re-run here (hours of
CPU): a full run embeds the last ``benchmarks/images.py`` tables. ``benchmarks/RESULTS.md`` is
the curated summary (target table, diagnoses) assembled from these outputs by hand.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import gmm_table, speed, uncertainty  # noqa: E402
from benchmarks.common import REPO, header, nice, setup  # noqa: E402

SCRIPTS = {"gmm_table": gmm_table.main, "speed": speed.main, "uncertainty": uncertainty.main}
OTHERS = ("gmm_smc", "gmm_dds", "gmm_dps_reddiff", "denoise_prior")
IMAGES_TABLES = REPO / "benchmarks" / "images_results" / "tables.md"


def image_quality_section(quick: bool) -> str:
    """Image-quality tables are not re-run here (hours of CPU): the last ``images.py`` output
    is embedded in a full run; a --quick run only points to it."""
    if quick or not IMAGES_TABLES.is_file():
        return ("## Image quality (table 2)\n\nNot re-run by run_all: "
                "`python benchmarks/images.py` regenerates it (hours on CPU; `--quick` is its "
                "smoke version); its last full tables are in "
                "`benchmarks/images_results/tables.md`.")
    return (IMAGES_TABLES.read_text().strip() + "\n\n(Embedded from the last "
            "`python benchmarks/images.py` run; run_all does not re-run it.)")


def demote(text: str) -> str:
    """Push a script's headings one level down (## -> ###) under its section."""
    return "\n".join("#" + ln if ln.startswith("#") else ln for ln in text.splitlines())


def run_others(quick: bool) -> list[str]:
    parts = []
    for name in OTHERS:
        path = REPO / "benchmarks" / f"{name}.py"
        if not path.is_file():
            continue
        cmd = [sys.executable, str(path)] + (["--quick"] if quick else [])
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        body = res.stdout if res.returncode == 0 else (
            f"failed (exit {res.returncode}):\n\n```\n{res.stderr[-2000:]}\n```")
        parts.append(f"## {name}\n\nCommand: `python benchmarks/{name}.py"
                     f"{' --quick' if quick else ''}` ({time.perf_counter() - t0:.0f} s)\n\n"
                     + demote(body))
    return parts


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="run every script in --quick mode")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS.run_all.md"),
                   help="output file (default benchmarks/RESULTS.run_all.md; RESULTS.md is the "
                        "curated summary built from these outputs and is not overwritten)")
    p.add_argument("--others", action="store_true", help="also run the other scripts")
    p.add_argument("--only", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    setup(a.threads)
    flag = ["--quick"] if a.quick else []
    sections, commands = [], []
    for name in a.only:
        t0 = time.perf_counter()
        text = SCRIPTS[name](flag + ["--threads", str(a.threads)])
        commands.append(f"- `python benchmarks/{name}.py {' '.join(flag)} --threads "
                        f"{a.threads}` ({time.perf_counter() - t0:.0f} s)")
        sections.append(text)
    if a.others:
        sections += run_others(a.quick)
    doc = "\n\n".join([
        "# diffrecon benchmark results",
        ("Mode: --quick (CI smoke; numbers are NOT meaningful)" if a.quick else "Mode: full"),
        header(), "Commands:\n\n" + "\n".join(commands), *sections,
        image_quality_section(a.quick)]) + "\n"
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(doc)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return doc


if __name__ == "__main__":
    nice()
    main(sys.argv[1:])
