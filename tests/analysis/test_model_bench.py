"""The model benchmark's function API (dilateformer.analysis.model_bench), on a tiny configuration."""

import pytest

from dilateformer.analysis.model_bench import MODEL_BENCH_COLUMNS, format_model_benchmark, run_model_benchmark


def test_run_model_benchmark_rows_and_table():
    rows = run_model_benchmark(
        models=("dilateformer_nano",),
        batch_size=2,
        img_size=48,
        msda_backends=("eager",),
        compiled=False,
        repeats=1,
        warmup=0,
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
