"""The one exception type users see: it says what failed, on which input, and how to fix it."""


class DiffmixError(Exception):
    """A user-facing error. The CLI prints its message without a traceback and exits with code 2."""
