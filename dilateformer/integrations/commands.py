"""``dilateformer defects`` and ``yolo-compare``: argument parsing and one-line error reporting only.

Ultralytics (AGPL-3.0, the ``[yolo]`` extra) is imported only when ``yolo-compare`` runs, so ``dilateformer
--help`` and ``dilateformer defects`` work without it.
"""

from __future__ import annotations

import argparse

# ------------------------------------------------------------------------------------------------- defects


def _add_defects(subparsers) -> None:
    """Owned by the defect-dataset work: ``dilateformer defects --output DIR [--seed N] ...``."""


# -------------------------------------------------------------------------------------------- yolo-compare


def _add_yolo_compare(subparsers) -> None:
    """Owned by the YOLO comparison work: ``dilateformer yolo-compare [--data YAML] [--variants ...] ...``."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``defects`` and ``yolo-compare`` to the ``dilateformer`` command line."""
    _add_defects(subparsers)
    _add_yolo_compare(subparsers)
