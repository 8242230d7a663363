"""Flag-value parsers shared by every command: argparse ``type=`` functions that say what they expected.

The lowest layer (no torch, no other dilateformer module), so ``train``, ``analysis``, ``integrations`` and
``retrofit`` can all use them. Each raises :class:`argparse.ArgumentTypeError`, which argparse reports as one
``dilateformer COMMAND: error: argument --flag: expected ..., got '...'`` line.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def ranged(
    kind: type,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    multiple_of: int | None = None,
) -> Callable[[str], int | float]:
    """A parser of ``kind`` (int or float) values in a range, finite only, that names the range when refusing.

    ``low_open``/``high_open`` exclude the bound; ``multiple_of`` (ints) also asks for a multiple of it.
    """
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    range_text = " and ".join(parts)
    wanted = f"{'an integer' if kind is int else 'a number'}{' ' + range_text if parts else ''}"
    if multiple_of is not None:
        wanted += f", a multiple of {multiple_of}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        bad = not math.isfinite(value)
        bad = bad or (low is not None and (value <= low if low_open else value < low))
        bad = bad or (high is not None and (value >= high if high_open else value > high))
        bad = bad or (multiple_of is not None and value % multiple_of != 0)
        if bad:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.range_text = range_text or "any finite value"  # type: ignore[attr-defined]
    return parse


positive_int = ranged(int, 1)
positive_float = ranged(float, 0, low_open=True)
non_negative_float = ranged(float, 0)
fraction = ranged(float, 0, 1)


def int_list(*, distinct: bool = False) -> Callable[[str], tuple[int, ...]]:
    """A parser of ``"1,2,3"`` -> ``(1, 2, 3)``: positive integers separated by commas (``distinct``: no repeats)."""
    wanted = f"{'distinct ' if distinct else ''}positive integers separated by commas"

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            values = ()
        if not values or min(values) < 1 or (distinct and len(set(values)) != len(values)):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return values

    return parse


def float_pair(*, low: float = -math.inf, high: float = math.inf) -> Callable[[str], tuple[float, float]]:
    """A parser of ``"LOW,HIGH"`` -> ``(LOW, HIGH)`` with ``low <= LOW <= HIGH <= high``."""

    def parse(text: str) -> tuple[float, float]:
        try:
            first, second = (float(v) for v in text.split(","))
        except ValueError:
            first = second = math.nan
        if not low <= first <= second <= high:
            raise argparse.ArgumentTypeError(
                f"expected two numbers LOW,HIGH with {low:g} <= LOW <= HIGH <= {high:g}, got {text!r}"
            )
        return first, second

    return parse


def choice_from(what: str, names: Callable[[], list[str]]) -> Callable[[str], str]:
    """A parser of one of ``names()`` (called at parse time, case-insensitive), with the closest names as a hint."""

    def parse(text: str) -> str:
        import difflib

        known = names()
        if text.lower() in known:
            return text.lower()
        close = difflib.get_close_matches(text.lower(), known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; one of {', '.join(sorted(known)[:12])}, ..."
        raise argparse.ArgumentTypeError(f"unknown {what} {text!r}{hint}")

    return parse
