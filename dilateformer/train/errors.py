"""The one exception type the train commands turn into a one-line message instead of a traceback."""

from __future__ import annotations


class CLIError(Exception):
    """A problem with the user's input (data, checkpoint, flags) that one line can explain and a user can fix."""
