"""The ``diffrecon`` typer app and its error mapping (the CLI edge).

Errors: an ``InputError`` or a usage error prints ONE line ``diffrecon: error: <message>`` on
stderr (odd characters of file names escaped) and exits 2; any other exception prints one
line and exits 1 (the traceback only with ``--debug`` or ``DIFFRECON_DEBUG=1``). Outputs
are written atomically, so a failed command leaves no output file. The verbs live in
``run``, ``simulate``, ``tools``, ``train`` and ``demo`` and register themselves on ``app``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x vendors click as typer._click
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - older typer on top of click
    from click import exceptions as _cx
from diffrecon.errors import InputError, printable

PROG = "diffrecon"


def _debug(args) -> bool:
    return os.environ.get("DIFFRECON_DEBUG", "") not in ("", "0") or "--debug" in (args or [])


def _fail(message: str, code: int) -> int:
    """Print ``diffrecon: error: <message>`` as exactly one line: newlines, control
    characters and undecodable bytes of file names are shown escaped (``errors.printable``),
    never emitted."""
    typer.echo(f"{PROG}: error: {printable(str(message).strip())}", err=True)
    return code


class _Stopped(Exception):  # noqa: N818 - carries (message, exit code)
    """A KeyboardInterrupt (Ctrl-C, or ``errors.Interrupted`` for SIGTERM) carried past
    typer, which would turn it into a silent exit 130."""


class OneLineErrors(TyperGroup):
    """Top-level group: maps every failure to one stderr line and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:  # errors.Interrupted: SIGTERM 143, SIGINT 130
            raise _Stopped(str(exc) or "interrupted", getattr(exc, "exit_code", 130)) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(args=argv, prog_name=prog_name or PROG, complete_var=complete_var,
                              standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
            if code == 130:  # typer's silent Exit(130) for a Ctrl-C while it parses
                _fail("interrupted", 130)
        except _cx.NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
            code = 2
        except _cx.UsageError as exc:
            where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
            code = _fail(where + exc.format_message(), 2)
        except _cx.ClickException as exc:
            code = _fail(exc.format_message(), exc.exit_code)
        except typer.Abort:
            code = _fail("aborted", 1)
        except InputError as exc:
            if _debug(argv):
                traceback.print_exc()
            code = _fail(str(exc), 2)
        except _Stopped as exc:
            code = _fail(*exc.args)
        except KeyboardInterrupt:
            code = _fail("interrupted", 130)
        except Exception as exc:  # noqa: BLE001 - the CLI edge
            if _debug(argv):
                traceback.print_exc()
                code = _fail(f"internal error: {type(exc).__name__}: {exc}", 1)
            else:
                code = _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug "
                             f"for the traceback)", 1)
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(cls=OneLineErrors, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Posterior sampling for imaging inverse problems (MRI, CT, deblurring, "
                       "super-resolution) with diffusion priors. Scan and result files are "
                       "HDF5 (fastMRI layout for MRI).")


@app.callback()
def _root(debug: Annotated[bool, typer.Option(
        "--debug", help="Show tracebacks for internal errors (also DIFFRECON_DEBUG=1).")] = False):
    """Posterior sampling for imaging inverse problems with diffusion priors."""
    # --debug is read from argv by OneLineErrors (_debug); it must not leak into the
    # environment, where it would outlive this invocation in-process (tests, notebooks).


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def make_parent(path: Path) -> Path:
    """Create the output's directory (mkdir -p), as a user expects of `-o study/scan.h5`."""
    if path is not None and not path.parent.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise typer.BadParameter(f"cannot create directory {path.parent}: {exc.strerror}",
                                     param_hint="'-o' / '--output'") from None
    return path
