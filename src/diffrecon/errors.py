"""User-facing errors. The CLI maps ``InputError`` to one line on stderr and exit code 2.

Library code raises ordinary exceptions (``ValueError``, ``TypeError``) naming the offending
option; the edges (file readers, the pipeline, the CLI) turn the ones caused by the user's
input into ``InputError`` with :func:`as_input_error`.
"""


class InputError(ValueError):
    """Bad user input (file, dataset, key, flag or argument). The message is one sentence
    that names the offending item and what was expected."""


def as_input_error(exc: Exception, where: str) -> InputError:
    """``exc`` as an InputError: itself when it is one, else prefixed with ``where``."""
    return exc if isinstance(exc, InputError) else InputError(f"{where}: {exc}")


def printable(text: str) -> str:
    """``text`` safe to print as part of one line: every character that is not printable
    is escaped as Python's repr would (newline -> ``\\n``, ESC -> ``\\x1b``, U+202E ->
    ``\\u202e``), and the bytes of a file name that is not UTF-8 (lone surrogates, as
    Python decodes them) are shown as ``\\xNN``. Printable text, spaces included, is
    unchanged."""
    out = []
    for ch in str(text):
        if ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # os.fsdecode's surrogateescape of byte NN
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(repr(ch)[1:-1] if ch not in "'\"" else ch)
    return "".join(out)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT / SIGTERM). A KeyboardInterrupt, so that no
    ``except Exception`` swallows it and atomic writers delete their temporaries; the CLI
    prints the message as one line and exits with ``exit_code`` (128 + signal number)."""

    def __init__(self, signum: int):
        import signal

        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; complete results are kept, rerun to resume")
        self.exit_code = 128 + int(signum)


class RankLost(KeyboardInterrupt):
    """Under torchrun, another rank died, was stopped or stopped responding, so this rank
    stops too (a KeyboardInterrupt for the same reasons as :class:`Interrupted`); the CLI
    prints the message as one line and exits 1. Complete results are kept; rerun to
    resume."""

    exit_code = 1
