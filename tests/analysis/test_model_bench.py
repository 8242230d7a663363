"""The model benchmark's function API (dilateformer.analysis.model_bench), on a tiny configuration."""

import functools

import pytest

from dilateformer.analysis.model_bench import (
    ATTAINABLE_FLOOR,
    GEMM_FLOOR,
    MODEL_BENCH_COLUMNS,
    TRAIN_FLOP_FACTOR,
    format_model_benchmark,
    format_training_breakdown,
    run_model_benchmark,
    run_training_breakdown,
)


def test_run_model_benchmark_rows_and_table():
    rows = run_model_benchmark(
        models=("dilateformer_nano",),
        batch_size=2,
        img_size=48,
        msda_backends=("eager",),
        compiled=False,
        repeats=1,
        warmup=0,
        floors=False,
    )
    assert [row["attention"] for row in rows] == [
        "MSDA stages 1-2",
        "global everywhere",
        "official-style (unfold MSDA)",
    ]
    assert rows[0]["msda_backend"] == "eager" and rows[1]["msda_backend"] == rows[2]["msda_backend"] == "-"
    for row in rows:
        assert {key for key, _ in MODEL_BENCH_COLUMNS} <= set(row)
        assert row["infer_eager_img_s"] > 0 and row["train_img_s"] > 0 and row["saved_mb"] > 0
        assert row["infer_compiled_img_s"] is None
    assert rows[0]["params_m"] == rows[1]["params_m"] == rows[2]["params_m"]
    # The official-style model keeps K and V unfolded k*k times, so it must save more.
    assert rows[2]["saved_mb"] > rows[0]["saved_mb"]
    table = format_model_benchmark(rows)
    assert "batch 2, 48x48" in table and "global everywhere" in table and "saved for bwd (MB)" in table
    ratios = table.split("relative to the official-style model")[1].splitlines()
    baseline_line = next(line for line in ratios if "official-style" in line)
    assert baseline_line.split()[-4:] == ["1.00", "-", "1.00", "1.00"]
    expected_memory = f"{rows[0]['saved_mb'] / rows[2]['saved_mb']:.2f}"
    assert next(line for line in ratios if "MSDA stages 1-2" in line).split()[-1] == expected_memory
    with pytest.raises(ValueError, match="batch_size"):
        run_model_benchmark(batch_size=0)


@pytest.fixture
def quick_replay(monkeypatch):
    """Replays every op the given number of times only, not for a minimum time, and a small reference matmul, to
    keep the tests short."""
    from dilateformer.analysis import breakdown, model_bench

    monkeypatch.setattr(model_bench, "time_ops", functools.partial(breakdown.time_ops, min_seconds=0.0))
    monkeypatch.setattr(model_bench, "sgemm_step", functools.partial(breakdown.sgemm_step, size=256))


def test_floor_rows_follow_from_the_sgemm_rate_and_the_bare_ops(quick_replay):
    rows = run_model_benchmark(
        models=("dilateformer_nano",),
        batch_size=2,
        img_size=32,
        include_twin=False,
        include_official=False,
        compiled=False,
        repeats=1,
        warmup=0,
    )
    model, gemm, attainable = rows
    assert (model["floor"], gemm["floor"], attainable["floor"]) == (None, GEMM_FLOOR, ATTAINABLE_FLOOR)
    rates = gemm["sgemm_gflops"]
    flops = 2 * model["gmacs"] * 1e9
    assert gemm["infer_eager_img_s"] == pytest.approx(rates["infer_eager_img_s"] * 1e9 / flops)
    assert gemm["train_img_s"] == pytest.approx(rates["train_img_s"] * 1e9 / (TRAIN_FLOP_FACTOR * flops))
    assert attainable["infer_eager_img_s"] > 0 and attainable["train_img_s"] > 0
    table = format_model_benchmark(rows)
    shares = table.split("share of the floor (%)")[1].splitlines()
    gemm_line = next(line for line in shares if GEMM_FLOOR in line)
    expected = 100 * model["infer_eager_img_s"] / gemm["infer_eager_img_s"]
    assert float(gemm_line.split()[-3].replace(",", "")) == pytest.approx(expected, rel=0.05)
    assert "relative to the official-style model" not in table


def test_training_breakdown_covers_the_step(quick_replay):
    result = run_training_breakdown("dilateformer_nano", batch_size=2, img_size=32, repeats=1)
    totals = result["totals"]
    assert result["unreplayed"] == 0
    for category in ("MSDA", "GEMM", "global attention (SDPA)", "depthwise convs", "dense convs", "norms", "optimizer"):
        assert totals[category]["ops"] > 0 and totals[category]["ms"] > 0, category
    # Forward and backward FLOPs: the step's are the forward's (GMACs x 2) times three, to the FLOP formulas'
    # rounding of the backward (MSDA's and SDPA's backward formulas are their own, not exactly 2x).
    counted = sum(total["flops"] for total in totals.values())
    assert counted == pytest.approx(result["step_gflop"] * 1e9, rel=0.1)
    table = format_training_breakdown(result, top=3)
    assert "sum of bare ops (attainable floor)" in table and "measured step" in table
    assert table.count("\n") > len(totals) + 5
