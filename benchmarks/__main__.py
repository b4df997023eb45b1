"""Run benchmark scripts and collect their reports (``diffrecon bench`` calls this).

    python -m benchmarks [NAMES ...] [--quick] [--out DIR] [--list]

Each script runs as ``python -m benchmarks.<name> [--quick] --out DIR/<name>`` in its own
process; its report (stdout) is saved as ``DIR/<name>.md`` and echoed, and ``DIR/RESULTS.md``
gathers the machine header, the commands with their times and every report (written
atomically). Exit status 1 when a script fails (the others still run), 2 for an unknown name.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, header

HERE = Path(__file__).resolve().parent


def scripts() -> list[str]:
    """The benchmark scripts: this package's modules except ``common`` and private ones."""
    return sorted(p.stem for p in HERE.glob("*.py")
                  if not p.name.startswith("_") and p.stem != "common")


def run_script(name: str, quick: bool, out: Path) -> tuple[bool, str, str]:
    """(succeeded, command, report) of one script."""
    args = [*(["--quick"] if quick else []), "--out", str(out / name)]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=REPO,
                         stdout=subprocess.PIPE, text=True, check=False)
    command = f"`python -m benchmarks.{name} {' '.join(args)}` ({time.perf_counter() - t0:.0f} s)"
    if res.returncode != 0:
        return False, command, f"failed (exit {res.returncode}); its stderr is above the table"
    return True, command, res.stdout.strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="scripts to run (default: all)")
    p.add_argument("--quick", action="store_true", help="every script's smoke mode")
    p.add_argument("--out", type=Path, default=Path("diffrecon-bench"),
                   help="folder for the reports (default ./diffrecon-bench)")
    p.add_argument("--list", action="store_true", help="only list the scripts")
    a = p.parse_args(argv)
    available = scripts()
    unknown = [n for n in a.names if n not in available]
    if unknown:
        print(f"diffrecon bench: error: unknown benchmark {unknown[0]!r}; available: "
              f"{', '.join(available)}", file=sys.stderr)
        return 2
    names = a.names or available
    if a.list:
        print("\n".join(names))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    commands, sections, failed = [], [], []
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        ok, command, report = run_script(name, a.quick, a.out)
        (a.out / f"{name}.md").write_text(report + "\n")
        print(report, flush=True)
        commands.append(f"- {command}")
        sections.append(f"## {name}\n\n" + "\n".join(
            "#" + ln if ln.startswith("#") else ln for ln in report.splitlines()))
        failed += [] if ok else [name]
    doc = "\n\n".join(["# diffrecon benchmark results",
                       "Mode: --quick (CI smoke; numbers are NOT meaningful)" if a.quick
                       else "Mode: full", header(), "Commands:\n\n" + "\n".join(commands),
                       *sections]) + "\n"
    tmp = a.out / f"RESULTS.md.tmp-{os.getpid()}"
    tmp.write_text(doc)
    os.replace(tmp, a.out / "RESULTS.md")
    print(f"wrote {a.out / 'RESULTS.md'}", file=sys.stderr)
    if failed:
        print(f"diffrecon bench: error: benchmark(s) failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
