"""The one user-error type: a mistake a user can fix, reported by the CLI as one line instead of a traceback.

Library functions raise ``ValueError``/``TypeError`` for bad arguments, as Python and PyTorch do. Command code
raises :class:`CommandError` for what only a command knows is the user's (a missing ``--checkpoint``, an
incompatible run directory) and may add the flag's name to a library error. ``dilateformer.cli`` is the one
place that turns either into ``dilateformer COMMAND: error: ...`` and exit status 2.
"""

from __future__ import annotations

import re


class CommandError(Exception):
    """A problem with the user's input (flags, data, checkpoint) that one line can explain and a user can fix."""


def one_line(text: str) -> str:
    """Fold a multi-line message (a key listing) into one line for the terminal."""
    return "; ".join(part.strip() for part in text.splitlines() if part.strip()).replace(":;", ":")


def user_message(error: BaseException) -> str:
    """The one line to show for ``error``.

    An error raised in a DataLoader worker is re-raised in the main process with the worker's traceback as its
    message; the user needs only the original last line, so that is recovered (its type prefix dropped).
    """
    text = str(error)
    if "Original Traceback" not in text:
        return one_line(text) if "\n" in text.strip() else text
    original = re.findall(r"^[\w.]*(?:Error|Exception): (.*)$", text, flags=re.MULTILINE)
    if original:
        return original[-1]
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
