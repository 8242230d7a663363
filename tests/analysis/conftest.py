"""Shared checks for the figures the analysis commands write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def _check_png(path: Path, size: tuple[int, int], min_std: float = 10.0) -> np.ndarray:
    """A valid PNG of ``size`` (width, height) pixels whose pixels vary: not blank, not one flat colour."""
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size == size
        pixels = np.asarray(img.convert("RGB"), dtype=np.float64)
    assert pixels.std() > min_std, f"{path} looks blank (pixel std {pixels.std():.1f})"
    # Something drawn in the middle too, not just a frame: the central third is not uniform either.
    h, w = pixels.shape[:2]
    assert pixels[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].std() > min_std / 2
    return pixels


@pytest.fixture
def check_png():
    return _check_png
