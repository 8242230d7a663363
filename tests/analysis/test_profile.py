"""``profile``: FLOPs that match the official count, memory and time that degrade to estimates, not crashes."""

from __future__ import annotations

import json

import pytest

from dilateformer.analysis.profile import (
    ProfileRow,
    parse_sizes,
    profile_figure,
    profile_models,
    profile_table,
)


def test_tiny_at_224_counts_the_official_gmacs():
    rows = profile_models("dilateformer_tiny", [224], batch=1, timing=False)
    msda, twin = rows
    assert (msda.attention, twin.attention) == ("msda", "global")
    assert msda.gmacs == pytest.approx(3.162, rel=0.01)
    assert msda.params == twin.params == 17_238_744
    # Global attention at stage 1 (3136 tokens) costs more than MSDA's 9 keys per query.
    assert twin.gmacs > 1.5 * msda.gmacs
    assert msda.status == twin.status == "flops only"
    assert msda.forward_ms is None and msda.saved_mb is None


def test_flops_grow_linearly_for_msda_and_faster_for_the_twin():
    rows = profile_models("dilateformer_nano", [64, 128, 256], timing=False)
    by = {(r.attention, r.size): r.gmacs for r in rows}
    # Nano keeps MSDA in stages 1-2 only, so its growth is a little above linear; the twin's is far above.
    msda_growth = by[("msda", 256)] / by[("msda", 64)]
    twin_growth = by[("global", 256)] / by[("global", 64)]
    assert 16 <= msda_growth < 20
    assert twin_growth > 1.5 * msda_growth


@pytest.mark.parametrize("text", ["0", "-3", "224,abc", "", "224,,512", "2.5", "224;512"])
def test_sizes_that_are_not_positive_ints_are_refused(text):
    with pytest.raises(ValueError, match="positive integers"):
        parse_sizes(text)


def test_sizes_parse():
    assert parse_sizes("224, 512,1024") == [224, 512, 1024]


def test_a_timed_sweep_degrades_to_estimates_and_out_of_memory():
    sizes = [64, 96]
    rows = profile_models("dilateformer_nano", sizes, timing=True, repeats=1, warmup=0, time_budget_s=1e9)
    assert all(r.status == "ok" for r in rows)
    for r in rows:
        assert r.forward_ms > 0 and r.forward_backward_ms > 0
        assert 0 < r.activation_mb < r.saved_mb
    small, large = (r for r in rows if r.attention == "msda")
    assert large.activation_mb > 2 * small.activation_mb  # activations follow the pixel count

    # A zero time budget: the very first run goes ahead (nothing to predict from); every later one, the twin's
    # included, is predicted from the time per GFLOP measured so far instead of being run.
    rows = profile_models("dilateformer_nano", sizes, timing=True, repeats=1, warmup=0, time_budget_s=0)
    first, *others = rows
    assert (first.attention, first.size, first.status) == ("msda", 64, "ok")
    for r in others:
        assert r.status.startswith("estimated") and r.forward_backward_ms > 0 and r.saved_mb is None
    twin_large = rows[-1]
    assert twin_large.forward_backward_ms > first.forward_backward_ms  # more FLOPs, longer prediction

    # A memory budget below any estimate: nothing runs, nothing crashes.
    rows = profile_models("dilateformer_nano", [64], timing=True, memory_budget=1)
    assert all(r.status.startswith("out of memory") for r in rows)
    assert all(r.forward_ms is None and r.gmacs > 0 for r in rows)

    table = profile_table(rows)
    assert "out of memory" in table and "~" in table

    # An input the model refuses for training fails its own row with the model's reason.
    rows = profile_models("dilateformer_nano", [32], timing=True, repeats=1, warmup=0)
    assert all(r.status.startswith("failed: input (32, 32) is too small") for r in rows)
    assert all(r.gmacs > 0 for r in rows)


def _rows() -> list[ProfileRow]:
    rows = []
    for attention, power in (("msda", 1.0), ("global", 1.8)):
        for size in (64, 128, 256):
            n = (size / 64) ** 2
            rows.append(
                ProfileRow(
                    model="dilateformer_nano",
                    attention=attention,
                    size=size,
                    batch=2,
                    params=1000,
                    gmacs=0.1 * n**power,
                    saved_mb=10 + 5 * n,
                    activation_mb=5 * n,
                    saved_mb_estimate=12 + 5 * n**power,
                    forward_ms=3 * n**power,
                    forward_backward_ms=9 * n**power,
                    status="ok" if size < 256 or attention == "msda" else "out of memory",
                )
            )
    return rows


def test_table_is_aligned():
    lines = profile_table(_rows()).splitlines()
    assert len(lines) == 8
    header = lines[0]
    # Every column ends where its header's underline ends: right-aligned numbers line up.
    ends = [i + 1 for i, (a, b) in enumerate(zip(lines[1], lines[1][1:] + " ", strict=True)) if a == "-" and b == " "]
    for line in lines[2:]:
        for end in ends[3:-1]:  # the numeric columns
            assert line[end - 1] != " ", f"misaligned at column {end}: {line!r}"
    assert header.split()[:3] == ["model", "attention", "size"]


def test_profile_figure(tmp_path, check_png):
    out = tmp_path / "profile.png"
    profile_figure(_rows(), out)
    check_png(out, (1080, 890))
    only_flops = [ProfileRow(**{**r.as_dict(), "status": "flops only"}) for r in _rows()]
    out2 = tmp_path / "flops.png"
    profile_figure(only_flops, out2)
    check_png(out2, (1080, 470))
    json.dumps([r.as_dict() for r in _rows()])  # rows serialise as they are
