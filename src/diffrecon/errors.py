"""User-facing errors. The CLI maps ``InputError`` to one line on stderr and exit code 2."""


class InputError(ValueError):
    """Bad user input (file, dataset, key, flag or argument). The message is one sentence
    that names the offending item and what was expected."""
