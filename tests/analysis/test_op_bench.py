"""The op benchmark's floor table: the ratios it prints follow from the times it measured."""

from __future__ import annotations

import math

import pytest

from dilateformer.analysis.op_bench import OpShape, format_floor_rows, run_floor_ratios


def test_floor_ratios_and_growth_follow_from_the_measured_times():
    shapes = (OpShape("small", 1, 8, 8, 3), OpShape("wide", 1, 8, 16, 3))
    first, second = run_floor_ratios(shapes, backend="native", repeats=1)
    assert math.isnan(first["growth"]) and math.isnan(first["floor_growth"])
    assert second["pixel_growth"] == 2
    assert second["growth"] == pytest.approx(second["forward_backward_ms"] / first["forward_backward_ms"])
    assert second["floor_growth"] == pytest.approx(second["floor_ms"] / first["floor_ms"])
    assert first["forward_backward_vs_3_floors"] == pytest.approx(
        first["forward_backward_ms"] / (3 * first["floor_ms"])
    )
    assert "floor growth" in format_floor_rows([first, second]).splitlines()[0]
