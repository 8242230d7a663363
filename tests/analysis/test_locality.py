"""Locality statistics: exact on hand-made attention, equal to a float64 brute force, and captured from real models."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dilateformer.models  # noqa: F401  (registers the timm models)
from dilateformer.analysis.locality import (
    LayerLocality,
    locality_figure,
    locality_statistics,
    locality_table,
    measure_locality,
    suggest_blocks,
)
from dilateformer.analysis.locality import finish as finish_sums


def _in_window(query: tuple[int, int], key: tuple[int, int], kernel_size: int, dilation: int) -> bool:
    """MSDA's zero-border window, from its definition: offsets (-r..r) * dilation on both axes."""
    radius = kernel_size // 2
    return all(abs(k - q) % dilation == 0 and abs(k - q) // dilation <= radius for q, k in zip(query, key, strict=True))


def _stats(probs, grid, **kwargs) -> LayerLocality:
    sums = locality_statistics(probs, grid, **kwargs)
    keep = {k: v for k, v in kwargs.items() if k in ("num_prefix", "kernel_size", "dilations")}
    keep.setdefault("num_prefix", 0)
    keep.setdefault("kernel_size", 3)
    keep.setdefault("dilations", (1, 2, 3))
    return finish_sums(sums, name="x", grid=grid, stride_yx=kwargs.get("stride_yx", (1.0, 1.0)), **keep)


def _cells(grid):
    return [(y, x) for y in range(grid[0]) for x in range(grid[1])]


# ---------------------------------------------------------------------------------------- known answers


def test_uniform_attention_is_chance_level_with_entropy_one():
    grid, prefix = (5, 6), 2
    n = prefix + 30
    probs = torch.full((2, 3, n, n), 1.0 / n, dtype=torch.float64)
    r = _stats(probs, grid, num_prefix=prefix, stride_yx=(4.0, 4.0))
    assert r.entropy_ratio == pytest.approx(1.0, abs=1e-12)
    assert r.prefix_share == pytest.approx(prefix / n, abs=1e-12)
    for d in (1, 2, 3):
        assert r.window_share[d] == pytest.approx(r.uniform_window_share[d], abs=1e-12)
    assert r.union_share == pytest.approx(r.uniform_union_share, abs=1e-12)
    assert r.mean_distance_px == pytest.approx(r.uniform_distance_px, abs=1e-12)
    # Chance level from the definition: the share of the grid each query's window covers, averaged over queries.
    cells = _cells(grid)
    for d in (1, 2, 3):
        expected = sum(sum(_in_window(q, k, 3, d) for k in cells) for q in cells) / len(cells) ** 2
        assert r.uniform_window_share[d] == pytest.approx(expected, abs=1e-12)


def test_attention_on_the_query_itself_is_distance_zero_share_one_entropy_zero():
    grid = (4, 7)
    probs = torch.eye(28, dtype=torch.float64).expand(1, 2, 28, 28)
    r = _stats(probs, grid, stride_yx=(8.0, 8.0))
    assert r.mean_distance_px == 0 and r.entropy_ratio == 0 and r.prefix_share == 0
    assert r.window_share == {1: 1.0, 2: 1.0, 3: 1.0} and r.union_share == 1.0


def test_attention_on_one_key_gives_its_exact_distance_and_window_membership():
    grid, key, stride = (6, 5), (1, 3), (4.0, 2.0)
    cells = _cells(grid)
    probs = torch.zeros(1, 1, 30, 30, dtype=torch.float64)
    probs[..., key[0] * 5 + key[1]] = 1.0
    r = _stats(probs, grid, stride_yx=stride, kernel_size=3, dilations=(1, 2))
    expected = sum(math.hypot((q[0] - key[0]) * 4.0, (q[1] - key[1]) * 2.0) for q in cells) / 30
    assert r.mean_distance_px == pytest.approx(expected, rel=1e-12)
    for d in (1, 2):
        assert r.window_share[d] == pytest.approx(sum(_in_window(q, key, 3, d) for q in cells) / 30, abs=1e-12)
    union = sum(_in_window(q, key, 3, 1) or _in_window(q, key, 3, 2) for q in cells) / 30
    assert r.union_share == pytest.approx(union, abs=1e-12)


def test_prefix_mass_is_left_out_of_the_grid_statistics():
    # Half of every row on the cls token, half on the query itself: distance 0 and share 1 after renormalising.
    grid, n = (3, 3), 10
    probs = torch.zeros(1, 1, n, n, dtype=torch.float64)
    probs[..., 0] = 0.5
    probs[0, 0, 1:, 1:] += 0.5 * torch.eye(9, dtype=torch.float64)
    probs[0, 0, 0] = 1.0 / n  # the cls query's own row is ignored
    r = _stats(probs, grid, num_prefix=1)
    assert r.prefix_share == pytest.approx(0.5) and r.mean_distance_px == 0 and r.union_share == pytest.approx(1.0)
    assert r.entropy_ratio == pytest.approx(math.log(2) / math.log(n))


# ------------------------------------------------------------------------------------ brute-force reference


def _reference(probs, grid, num_prefix, stride, kernel_size, dilations):
    """Loops over queries and keys in float64, straight from the definitions."""
    b, h, n, _ = probs.shape
    cells = _cells(grid)
    dist = torch.zeros(h, dtype=torch.float64)
    window = torch.zeros(len(dilations), h, dtype=torch.float64)
    union = torch.zeros(h, dtype=torch.float64)
    pre = torch.zeros(h, dtype=torch.float64)
    ent = torch.zeros(h, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for qi, q in enumerate(cells):
                row = probs[bi, hi, num_prefix + qi].tolist()
                pre[hi] += sum(row[:num_prefix])
                ent[hi] += -sum(p * math.log(p) for p in row if p > 0) / math.log(n) if n > 1 else 0.0
                grid_row = row[num_prefix:]
                total = sum(grid_row)
                for ki, k in enumerate(cells):
                    p = grid_row[ki] / total
                    dist[hi] += p * math.hypot((q[0] - k[0]) * stride[0], (q[1] - k[1]) * stride[1])
                    inside = [_in_window(q, k, kernel_size, d) for d in dilations]
                    for di, hit in enumerate(inside):
                        window[di, hi] += p * hit
                    union[hi] += p * any(inside)
    count = b * len(cells)
    return dist / count, window / count, union / count, pre / count, ent / count


@settings(max_examples=15, deadline=None)
@given(
    height=st.integers(1, 5),
    width=st.integers(1, 5),
    num_prefix=st.integers(0, 2),
    heads=st.integers(1, 3),
    kernel_size=st.sampled_from([1, 3, 5]),
    dilations=st.lists(st.integers(1, 4), min_size=1, max_size=3, unique=True),
    stride=st.tuples(st.floats(0.5, 16), st.floats(0.5, 16)),
    seed=st.integers(0, 2**16),
)
def test_statistics_equal_a_float64_brute_force(height, width, num_prefix, heads, kernel_size, dilations, stride, seed):
    grid = (height, width)
    n = num_prefix + height * width
    gen = torch.Generator().manual_seed(seed)
    # Peaked random rows (large logits), with some exact zeros: the entropy's 0 * log 0 = 0 case.
    logits = 4 * torch.randn(2, heads, n, n, generator=gen, dtype=torch.float64)
    probs = logits.softmax(-1) * (torch.rand(2, heads, n, n, generator=gen, dtype=torch.float64) > 0.2)
    probs[..., num_prefix] += 1e-3  # every row keeps some grid mass to renormalise
    probs = probs / probs.sum(-1, keepdim=True)
    sums = locality_statistics(
        probs, grid, num_prefix=num_prefix, stride_yx=stride, kernel_size=kernel_size, dilations=dilations
    )
    means = sums.means()
    dist, window, union, pre, ent = _reference(probs, grid, num_prefix, stride, kernel_size, dilations)
    for got, want in ((means["distance"], dist), (means["window"], window), (means["union"], union),
                      (means["prefix"], pre), (means["entropy"], ent)):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_sums_of_batches_equal_the_statistics_of_the_whole():
    gen = torch.Generator().manual_seed(0)
    probs = torch.randn(4, 2, 13, 13, generator=gen, dtype=torch.float64).softmax(-1)
    whole = locality_statistics(probs, (3, 4), num_prefix=1).means()
    parts = locality_statistics(probs[:1], (3, 4), num_prefix=1) + locality_statistics(probs[1:], (3, 4), num_prefix=1)
    for key, value in parts.means().items():
        torch.testing.assert_close(value, whole[key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kernel_size=4), "kernel_size"),
        (dict(dilations=(1, 0)), "dilations"),
        (dict(num_prefix=2), "expected num_prefix 2"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        locality_statistics(torch.full((1, 1, 4, 4), 0.25), (2, 2), **kwargs)


# ---------------------------------------------------------------------------------------------- capturing


@pytest.fixture(scope="module")
def twin():
    import timm

    torch.manual_seed(0)
    return timm.create_model("dilateformer_nano", attn_types=("global",) * 4, embed_dim=12, num_classes=10, img_size=32)


def test_global_twin_every_stage_measured_on_its_own_grid(twin):
    twin.train()
    images = torch.randn(3, 3, 32, 32)
    results = measure_locality(twin, images, batch_size=2)
    assert twin.training  # the mode comes back
    assert [r.name for r in results] == [f"stages.{s}.blocks.0.attn" for s in range(4)]
    assert [r.grid for r in results] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert [r.stride_px for r in results] == [4.0, 8.0, 16.0, 32.0]
    for r in results:
        assert r.num_images == 3 and r.num_prefix == 0 and r.prefix_share == 0 and r.kind == "global"
        assert 0 <= r.union_share <= 1 + 1e-6 and 0 <= r.entropy_ratio <= 1 + 1e-6
        assert len(r.per_head["distance_px"]) == r.num_heads
    # Batching does not change the result: the statistics are accumulated, not averaged per batch.
    again = measure_locality(twin, [images[:1], images[1:]], batch_size=8, layers=["stages.0.blocks.0.attn"])
    assert again[0].mean_distance_px == pytest.approx(results[0].mean_distance_px, rel=1e-5)
    assert again[0].window_share[1] == pytest.approx(results[0].window_share[1], rel=1e-5)


def test_msda_layers_are_skipped_and_refused_by_name():
    import timm

    model = timm.create_model("dilateformer_nano", embed_dim=12, num_classes=10, img_size=32)
    results = measure_locality(model, torch.randn(1, 3, 32, 32))
    assert [r.name for r in results] == ["stages.2.blocks.0.attn", "stages.3.blocks.0.attn"]
    with pytest.raises(ValueError, match="MSDA"):
        measure_locality(model, torch.randn(1, 3, 32, 32), layers=["stages.0.blocks.0.attn"])
    with pytest.raises(ValueError, match="no global attention layer"):
        measure_locality(torch.nn.Conv2d(3, 3, 1), torch.randn(1, 3, 8, 8))


def test_vit_with_cls_token_matches_an_independent_softmax():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=0)
    fused = [b.attn.fused_attn for b in vit.blocks]
    inputs = {}
    vit.blocks[1].attn.register_forward_pre_hook(lambda m, args: inputs.__setitem__("x", args[0]))
    images = torch.randn(2, 3, 64, 64)
    (r0, r1) = measure_locality(vit, images)
    assert [b.attn.fused_attn for b in vit.blocks] == fused  # restored
    assert r1.name == "blocks.1.attn" and r1.grid == (4, 4) and r1.num_prefix == 1 and r1.stride_px == 16.0
    attn = vit.blocks[1].attn
    with torch.no_grad():
        q, k, _ = attn.qkv(inputs["x"]).view(2, 17, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).double()
    expected = _stats(probs, (4, 4), num_prefix=1, stride_yx=(16.0, 16.0))
    assert r1.mean_distance_px == pytest.approx(expected.mean_distance_px, rel=1e-5)
    assert r1.prefix_share == pytest.approx(expected.prefix_share, rel=1e-5)
    assert r1.union_share == pytest.approx(expected.union_share, rel=1e-5)
    assert r1.entropy_ratio == pytest.approx(expected.entropy_ratio, rel=1e-5)


def test_distilled_deit_has_two_prefix_tokens_and_dynamic_size_follows_the_input():
    import timm

    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, depth=1)
    (r,) = measure_locality(deit, torch.randn(1, 3, 64, 64))
    assert r.num_prefix == 2 and r.grid == (4, 4) and 0 < r.prefix_share < 1
    dyn = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=1, dynamic_img_size=True)
    (r,) = measure_locality(dyn, torch.randn(1, 3, 48, 80))
    assert r.grid == (3, 5) and r.num_prefix == 1


def test_yolo_global_attn_layers_on_their_feature_maps():
    import importlib
    from importlib.resources import files

    importlib.import_module("tests.integrations.conftest")  # Ultralytics offline: before it is first imported
    from ultralytics import YOLO

    import dilateformer.integrations.ultralytics  # noqa: F401  (registers GlobalAttn)

    yolo = YOLO(str(files("dilateformer.integrations") / "cfg" / "yolov8n-global.yaml"))
    results = measure_locality(yolo, torch.rand(1, 3, 64, 64))
    assert [(r.grid, r.stride_px) for r in results] == [((8, 8), 8.0), ((4, 4), 16.0), ((2, 2), 32.0)]


# ---------------------------------------------------------------------------------------------- reporting


def _result(name, union, entropy=0.5):
    return LayerLocality(name, (4, 4), 8.0, 0, 10.0, {1: union}, union, {1: 0.2}, 0.0, entropy, 0.2, 20.0)


def test_suggest_blocks_thresholds_the_chosen_metric():
    results = [_result("a", 0.9, 0.2), _result("b", 0.3, 0.9), _result("c", 0.5, 0.5)]
    assert suggest_blocks(results) == ["a", "c"]
    assert suggest_blocks(results, threshold=2.0, metric="union_over_chance") == ["a", "c"]
    assert suggest_blocks(results, threshold=0.5, metric="entropy_ratio") == ["a", "c"]
    with pytest.raises(ValueError, match="metric"):
        suggest_blocks(results, metric="distance")


def test_table_and_figure(tmp_path, check_png):
    results = [_result("stages.0.blocks.0.attn", 0.8), _result("stages.1.blocks.0.attn", 0.4)]
    table = locality_table(results)
    assert "stages.1.blocks.0.attn" in table and "x chance" in table and "4.00" in table  # 0.8 / 0.2
    check_png(locality_figure(results, tmp_path / "loc.png"), (1600, 520))
