"""The analysis library draws without pyplot: importing it, or drawing a figure, leaves matplotlib's backend alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LIBRARY = (
    "dilateformer",
    "dilateformer.analysis.capture",
    "dilateformer.analysis.locality",
    "dilateformer.analysis.measure",
    "dilateformer.analysis.plots",
    "dilateformer.analysis.profile",
    "dilateformer.analysis.visualize",
    "dilateformer.demo",
)


def test_importing_the_library_imports_no_matplotlib_and_drawing_selects_no_backend(tmp_path, check_png):
    # A fresh interpreter, as a notebook would start: what the test session imported must not hide an import.
    code = textwrap.dedent(
        f"""
        import importlib, sys
        for name in {LIBRARY!r}:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "matplotlib")
        assert not loaded, f"importing the library loaded {{loaded[:5]}}"

        from dilateformer.analysis.plots import loglog_figure, save_figure

        xs = [64.0, 256.0, 1024.0]
        series = {{"linear": (xs, [2 * x for x in xs]), "quadratic": (xs, [x * x / 100 for x in xs])}}
        fig = loglog_figure([("cost", "pixels", "GMACs", series)], "two growth rates")
        save_figure(fig, sys.argv[1])
        # Drawing used matplotlib itself, never pyplot: no backend was selected, so a notebook keeps its own.
        assert "matplotlib.pyplot" not in sys.modules, "drawing imported pyplot"
        """
    )
    png = tmp_path / "slopes.png"
    done = subprocess.run([sys.executable, "-c", code, str(png)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    check_png(png, (500, 470))  # loglog_figure's default 5.0 x (4.2 + 0.5) inches at 100 dpi
