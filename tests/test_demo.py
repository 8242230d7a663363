"""``dilateformer demo --quick`` runs end to end offline and writes its table, sweep, attention and locality PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dilateformer import demo
from dilateformer.models import global_twin
from tests.train.conftest import _run_cli


def test_the_twins_gmacs_grow_faster_than_linearly_and_msdas_linearly() -> None:
    # The demo's own count and growth exponent, on CPU like the demo. Before global attention was counted on
    # CPU, both models came out at exponent 1.00.
    sizes = [128, 256]
    msda = demo._build(embed_dim=12, img_size=32)
    slopes = {}
    for name, model in (("msda", msda), ("global", global_twin(msda, copy_weights=False))):
        slopes[name] = demo._slope([s * s for s in sizes], [demo.gmacs(model, s) for s in sizes])
    assert slopes["msda"] == pytest.approx(1.0, abs=0.05)
    assert slopes["global"] > slopes["msda"] + 0.25


@pytest.mark.slow
def test_demo_quick(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = _run_cli("demo", "--quick", "--output", str(out), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith(str(out.resolve()))
    result = json.loads((out / "demo.json").read_text())
    msda, twin = result["table"]
    # The twin swaps the attention only: the parameter count is identical.
    assert msda["params"] == twin["params"] and msda["gmacs"] > 0 and msda["saved_mb"] > 0
    assert {r["size"] for r in result["sweep"]} == {32, 64}
    # Multiply-adds grow with the pixel count: linearly for MSDA, faster for the twin (its attention is counted).
    slopes = [s["gmacs"] for s in result["slopes"].values()]
    assert 0.9 < slopes[0] < slopes[1]
    for name in ("attention_digits.png", "locality_twin.png"):
        png = Image.open(out / name)
        pixels = np.asarray(png.convert("L"), dtype=np.float32)
        assert png.width > 300 and png.height > 200 and pixels.std() > 10  # a real figure, not a blank canvas
    assert result["attention_png"].endswith("attention_digits.png")
    # The twin's locality at the training size, one record per stage, on the grids of a 32x32 input.
    records = result["locality"]
    assert [r["grid"] for r in records] == [[8, 8], [4, 4], [2, 2], [1, 1]]
    for r in records:
        assert r["num_images"] == 360 and r["num_prefix"] == 0
        assert r["mean_distance_px"] >= 0 and 0 <= r["entropy_ratio"] <= 1 + 1e-6
        shares = [r["union_share"], *r["window_share"].values(), *r["uniform_window_share"].values()]
        assert all(0 <= v <= 1 + 1e-6 for v in shares)
        assert r["union_share"] >= max(r["window_share"].values()) - 1e-6  # the union holds every window
    for header in ("val top-1 %", "params", "GMACs@32", "MB saved", "img/s", "growth exponents", "win d1", "x chance"):
        assert header in done.stdout
