"""The one exception type for bad user input.

The CLI turns an :class:`EdgesegError` into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""


class EdgesegError(Exception):
    """Bad input that the user can fix: a missing file, an unknown name, a mismatched config."""
