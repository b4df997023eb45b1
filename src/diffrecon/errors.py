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
