"""User-facing errors.

A `LongMemError` is something the user can fix (a bad path, a bad flag, a corrupt or
mismatched file). The CLI prints its message as one line and exits with status 2, with
no traceback, so every message must say what is wrong *and* what to do about it.
"""


class LongMemError(Exception):
    """An error caused by user input; its message is shown as a single line."""
