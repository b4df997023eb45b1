"""The ``diffrecon`` command: the typer app (``cli.app``, with its error mapping) and its
verbs, one module per family: ``run``, ``simulate``, ``tools`` (info, calib, evaluate,
view, bench), ``calibrate``, ``train`` (train-prior) and ``demo``."""

from __future__ import annotations

import os
import sys

# importing the verb modules registers the verbs
from diffrecon.cli import calibrate, demo, run, simulate, tools, train  # noqa: F401
from diffrecon.cli.app import PROG, app


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (``diffrecon``).

    Under torchrun (``WORLD_SIZE`` > 1) the process leaves with ``os._exit`` after flushing:
    all results are written and the process group destroyed by then, and skipping C++
    static destructors avoids gloo's occasional "terminate called without an active
    exception" abort at interpreter shutdown (seen about once in 30 two-rank runs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _app(argv)
    code = 0
    try:
        _app(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _app(argv: list[str] | None):
    """The typer app; a Ctrl-C while typer builds the command (before the error mapping of
    ``cli.app`` runs) is one line and exit 130 too, not a traceback."""
    try:
        return app(args=argv, prog_name=PROG)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: error: interrupted\n")
        raise SystemExit(130) from None


__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
