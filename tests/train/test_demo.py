"""``dilateformer demo --quick`` runs end to end offline and writes its table, sweep and attention PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def test_demo_quick(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "demo"
    done = run_cli("demo", "--quick", "--output", str(out), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith(str(out.resolve()))
    result = json.loads((out / "demo.json").read_text())
    msda, twin = result["table"]
    # The twin swaps the attention only: the parameter count is identical.
    assert msda["params"] == twin["params"] and msda["gflops"] > 0 and msda["saved_mb"] > 0
    assert {r["size"] for r in result["sweep"]} == {32, 64}
    # FLOPs grow with the pixel count: at least linearly for both models.
    assert all(s["gflops"] > 0.9 for s in result["slopes"].values())
    png = Image.open(out / "attention_chelsea.png")
    pixels = np.asarray(png.convert("L"), dtype=np.float32)
    assert png.width > 300 and png.height > 200 and pixels.std() > 10  # a real figure, not a blank canvas
    for header in ("val top-1 %", "params", "GFLOPs@32", "MB saved", "img/s", "growth exponents"):
        assert header in done.stdout
