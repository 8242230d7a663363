"""Figure helpers for ``visualize``, ``profile`` and ``benchmark``: bare figures, log-log scaling plots.

Importing this module imports no matplotlib: each drawing function imports it when it runs, and the figures are
:class:`matplotlib.figure.Figure` objects rendered by Agg on ``savefig``, so no pyplot backend is ever selected
(headless servers and CI need none, and a notebook's own backend stays as it was).

Every figure here has a title, axis labels with units and a legend, and is written at a fixed size and dpi (no
``bbox_inches="tight"``), so a PNG's pixel size is known in advance and tests can check it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dilateformer.analysis.measure import loglog_slope

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100

Series = Mapping[str, tuple[Sequence[float], Sequence[float | None]]]


def new_figure(rows: int, cols: int, figsize: tuple[float, float]):
    """``(figure, axes)``: a ``rows x cols`` grid (``axes`` always 2-D) at :data:`DPI`, constrained layout.

    A bare :class:`matplotlib.figure.Figure`, not a pyplot one: no global backend is selected or switched (a
    notebook keeps its own), no figure manager holds it, and ``savefig`` renders through Agg on its own.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def plot_loglog_panel(
    ax, series: Series, title: str, xlabel: str, ylabel: str, xticks: Mapping[float, str] | None = None
) -> None:
    """One log-log panel: a curve per series with its fitted slope in the legend, and slope-1/2 guides."""
    import numpy as np
    from matplotlib.ticker import NullFormatter

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
    ax.legend(fontsize=8, loc="best")


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
    fig, axes = new_figure(rows, cols, (panel_size[0] * cols, panel_size[1] * rows + 0.5))
    for ax, (title, xlabel, ylabel, series) in zip(axes.flat, panels, strict=False):
        plot_loglog_panel(ax, series, title, xlabel, ylabel, xticks)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(suptitle, fontsize=13)
    return fig


def save_figure(fig: Figure, output: str | Path) -> Path:
    """Write ``fig`` at its own size and dpi (format from the suffix, PNG if none) and close it."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Constrained layout settles over passes where axes keep a fixed aspect (images): one pass can leave the
    # suptitle overlapping the panel titles. Two layout-only passes before the rendered one let it converge.
    for _ in range(2):
        fig.draw_without_rendering()
    fig.savefig(path, dpi=fig.dpi, format=path.suffix.lstrip(".").lower() or "png")
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:  # a figure the caller made with pyplot: release it (a no-op for ours)
        pyplot.close(fig)
    return path


def benchmark_figure(
    op_rows: Sequence[Mapping], sweep_rows: Sequence[Mapping], model_rows: Sequence[Mapping], output
) -> Path:
    """The ``benchmark`` PNG: op times per implementation and shape, the scaling sweep, and model throughput.

    ``op_rows`` need ``shape``, ``impl``, ``forward_ms``, ``forward_backward_ms``; ``sweep_rows`` need ``tokens``,
    ``impl``, ``forward_ms`` and ``saved_mb``; ``model_rows`` (``model``, ``attention``, ``msda_backend``) are
    drawn from their columns ending in ``img_s``. Empty inputs drop their panel.
    """
    panels: list[str] = []
    if op_rows:
        panels.append("ops")
    if sweep_rows:
        panels += ["sweep_ms", "sweep_mb"]
    if any(r.get(k) for r in model_rows for k in r if str(k).endswith("img_s")):
        panels.append("models")
    n = max(1, len(panels))
    cols = 2 if n == 4 else min(n, 3)
    rows_n = math.ceil(n / cols)
    fig, axes = new_figure(rows_n, cols, (6.0 * cols, 4.6 * rows_n + 0.5))
    flat = list(axes.flat)
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    for ax, panel in zip(flat, panels, strict=False):
        if panel == "ops":
            _grouped_bars(
                ax,
                op_rows,
                group="shape",
                series="impl",
                value="forward_backward_ms",
                ylabel="forward + backward time (ms, log scale)",
            )
            ax.set_title("MSDA op: forward + backward per implementation")
        elif panel == "sweep_ms":
            series = _by_impl(sweep_rows, "forward_ms")
            plot_loglog_panel(ax, series, "op scaling: forward time", "tokens (H x W)", "forward time (ms)")
        elif panel == "sweep_mb":
            series = _by_impl(sweep_rows, "saved_mb")
            plot_loglog_panel(ax, series, "op scaling: memory saved for backward", "tokens (H x W)", "MB")
        else:
            _model_bars(ax, model_rows)
    fig.suptitle("dilateformer benchmark: MSDA backends vs unfold, global SDPA and the byte floor", fontsize=13)
    return save_figure(fig, output)


def _by_impl(rows: Sequence[Mapping], value: str) -> dict[str, tuple[list[float], list[float | None]]]:
    out: dict[str, tuple[list[float], list[float | None]]] = {}
    for r in rows:
        xs, ys = out.setdefault(str(r["impl"]), ([], []))
        xs.append(float(r["tokens"]))
        ys.append(r.get(value))
    return out


def _grouped_bars(ax, rows: Sequence[Mapping], group: str, series: str, value: str, ylabel: str) -> None:
    groups = list(dict.fromkeys(str(r[group]) for r in rows))
    names = list(dict.fromkeys(str(r[series]) for r in rows))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, g in enumerate(groups):
            match = [r for r in rows if str(r[group]) == g and str(r[series]) == name and r.get(value)]
            if match:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(float(match[0][value]))
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("shape")
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _model_bars(ax, rows: Sequence[Mapping]) -> None:
    keys = [k for k in rows[0] if str(k).endswith("img_s") and any(r.get(k) for r in rows)]
    labels = [f"{r.get('model', '?')}\n{r.get('attention', '')} ({r.get('msda_backend', '-')})".strip() for r in rows]
    height = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        ys = [j + (i - (len(keys) - 1) / 2) * height for j in range(len(rows))]
        values = [float(r.get(key) or 0) for r in rows]
        bars = ax.barh(ys, values, height, label=key.removesuffix("_img_s").replace("_", " "))
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.15)  # room for the value labels at the bar ends
    ax.set_xlabel("throughput (images per second)")
    ax.set_ylabel("model, attention (MSDA backend)")
    ax.set_title("models: throughput")
    ax.legend(fontsize=8, loc="lower right")
