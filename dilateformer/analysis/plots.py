"""Figure helpers for ``visualize``, ``profile`` and ``benchmark``: a headless backend, log-log scaling plots.

Every figure here has a title, axis labels with units and a legend, and is written at a fixed size and dpi (no
``bbox_inches="tight"``), so a PNG's pixel size is known in advance and tests can check it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the commands run on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

DPI = 100

Series = Mapping[str, tuple[Sequence[float], Sequence[float | None]]]


def loglog_slope(xs: Sequence[float], ys: Sequence[float | None]) -> float | None:
    """Least-squares slope of log(y) against log(x) over the points with a positive y (None: fewer than 2)."""
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and y > 0 and x > 0]
    if len(points) < 2:
        return None
    lx = np.log([p[0] for p in points])
    ly = np.log([p[1] for p in points])
    if np.ptp(lx) == 0:
        return None
    return float(np.polyfit(lx, ly, 1)[0])


def plot_loglog_panel(
    ax, series: Series, title: str, xlabel: str, ylabel: str, xticks: Mapping[float, str] | None = None
) -> None:
    """One log-log panel: a curve per series with its fitted slope in the legend, and slope-1/2 guides."""
    markers = "osD^v<>"
    all_x: list[float] = []
    all_y: list[float] = []
    for i, (label, (xs, ys)) in enumerate(series.items()):
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and y > 0]
        if not pts:
            continue
        slope = loglog_slope(xs, ys)
        suffix = f" (slope {slope:.2f})" if slope is not None else ""
        ax.plot(*zip(*pts, strict=True), marker=markers[i % len(markers)], label=f"{label}{suffix}")
        all_x += [p[0] for p in pts]
        all_y += [p[1] for p in pts]
    if all_x and min(all_x) < max(all_x):
        # Guides anchored at the smallest point: how linear (N) and quadratic (N^2) growth would look.
        x0, y0 = min(all_x), min(y for x, y in zip(all_x, all_y, strict=True) if x == min(all_x))
        xs_ref = np.array([x0, max(all_x)])
        for power, style in ((1, ":"), (2, "--")):
            ax.plot(xs_ref, y0 * (xs_ref / x0) ** power, style, color="grey", lw=1, label=f"slope {power} guide")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if xticks:
        # Label the measured points themselves (e.g. "224²"): log-scale minor labels collide when close.
        ax.set_xticks(list(xticks), list(xticks.values()))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def loglog_figure(
    panels: Sequence[tuple[str, str, str, Series]],
    suptitle: str,
    panel_size=(5.0, 4.2),
    xticks: Mapping[float, str] | None = None,
) -> Figure:
    """A grid of log-log panels, each ``(title, xlabel, ylabel, series)``, sharing optional x tick labels."""
    n = max(1, len(panels))
    cols = 2 if n == 4 else min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(panel_size[0] * cols, panel_size[1] * rows + 0.5),
        dpi=DPI,
        squeeze=False,
        layout="constrained",
    )
    for ax, (title, xlabel, ylabel, series) in zip(axes.flat, panels, strict=False):
        plot_loglog_panel(ax, series, title, xlabel, ylabel, xticks)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(suptitle, fontsize=13)
    return fig


def save_figure(fig: Figure, output: str | Path) -> Path:
    """Write ``fig`` as a PNG at its own size and dpi, creating parent folders, and close it."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, format="png")
    plt.close(fig)
    return path
