"""The one exception type the data package raises for bad user input."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset file, folder or option is missing or malformed.

    The message is one sentence naming the file (or config option) and what was expected, so a user can fix
    the input without reading a traceback. It subclasses ValueError so generic callers can still catch it.
    """
