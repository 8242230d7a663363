"""Attention capture through the ``attn_drop`` hook, and the MSDA-vs-global attention figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import dilateformer  # noqa: F401  (registers the timm models)
from dilateformer.analysis.visualize import (
    attention_figure,
    attention_layers,
    capture_attention,
    check_queries,
    global_map,
    load_image,
    model_input_size,
    msda_windows,
    pick_msda_layer,
)
from dilateformer.models import global_twin
from dilateformer.nn.attention import GlobalAttention, MultiScaleDilatedAttention
from dilateformer.ops.neighborhood import head_groups, window_table


def _peaked_msda(dim=12, heads=3, border="zero") -> MultiScaleDilatedAttention:
    torch.manual_seed(0)
    layer = MultiScaleDilatedAttention(dim, heads, kernel_size=3, dilations=(1, 2, 3), border=border, layout="nhwc")
    with torch.no_grad():  # large weights: peaked, distinct probabilities, so a wrong slot would show
        layer.qkv.weight.mul_(8)
    return layer.eval()


def _expected_msda_probs(layer, x):
    """The probabilities recomputed independently from q and k and the window tables."""
    b, h, w, _ = x.shape
    qkv = x @ layer.qkv.weight.view(3 * layer.dim, layer.dim).T + layer.qkv.bias
    q, k, _ = qkv.view(b, h, w, 3, layer.num_heads, layer.head_dim).unbind(3)
    out = torch.zeros(b, h, w, layer.num_heads, 3, 3, dtype=torch.float64)
    for heads, d in head_groups(layer.num_heads, layer.dilations):
        rows, rvalid = window_table(h, 3, d, layer.border)
        cols, cvalid = window_table(w, 3, d, layer.border)
        for y in range(h):
            for xx in range(w):
                valid = rvalid[y][:, None] & cvalid[xx][None, :]
                keys = k[:, rows[y]][:, :, cols[xx]][..., heads, :]  # (B, k, k, h, d)
                logits = torch.einsum("bhd,bijhd->bhij", q[:, y, xx, heads], keys).double() * layer.scale
                logits = torch.where(valid, logits, torch.zeros((), dtype=logits.dtype))
                out[:, y, xx, heads] = logits.flatten(-2).softmax(-1).view_as(logits)
    return out


def test_capture_matches_independent_recompute_and_leaves_no_hooks():
    layer = _peaked_msda()
    x = torch.randn(2, 7, 9, 12)
    plain = layer(x)
    with capture_attention(layer, {"attn": layer}) as records:
        hooked = layer(x)
        assert layer.attn_drop._forward_hooks  # the hook is live inside the block
    rec = records["attn"]
    assert rec.kind == "msda" and rec.grid == (7, 9)
    assert rec.probs.shape == (2, 7, 9, 3, 3, 3)
    torch.testing.assert_close(rec.probs.double(), _expected_msda_probs(layer, x), atol=1e-5, rtol=1e-4)
    # Zero border: the slots outside the image take part in the softmax, so the window sums to one with them.
    torch.testing.assert_close(rec.probs.sum((-1, -2)), torch.ones(2, 7, 9, 3))
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)
    assert not layer.attn_drop._forward_hooks and not layer._forward_pre_hooks


def test_msda_windows_land_on_the_dilated_grid():
    layer = _peaked_msda()
    x = torch.randn(1, 8, 8, 12)
    with capture_attention(layer, {"a": layer}) as records:
        layer(x)
    windows = msda_windows(records["a"], (1, 6))
    assert [w.dilation for w in windows] == [1, 2, 3]
    for w in windows:
        d = w.dilation
        expected_rows = [1 + a * d for a in (-1, 0, 1)]
        expected_cols = [6 + b * d for b in (-1, 0, 1)]
        valid_rows = [0 <= r < 8 for r in expected_rows]
        valid_cols = [0 <= c < 8 for c in expected_cols]
        assert w.valid.tolist() == [[vr and vc for vc in valid_cols] for vr in valid_rows]
        assert all(r == e for r, e, v in zip(w.rows, expected_rows, valid_rows, strict=True) if v)
        assert all(c == e for c, e, v in zip(w.cols, expected_cols, valid_cols, strict=True) if v)
        group = records["a"].probs[0, 1, 6, w.heads.start : w.heads.stop].mean(0).numpy()
        np.testing.assert_allclose(w.weights, group)
    # Dilation 3 from row 1: the row above is outside the image and carries weight from the zero key.
    assert not windows[2].valid[0].any() and windows[2].weights[0].sum() > 0


def test_global_capture_is_the_softmax_over_all_tokens():
    torch.manual_seed(0)
    layer = GlobalAttention(12, 3, layout="nchw").eval()
    x = torch.randn(1, 12, 5, 6)
    plain = layer(x)
    with capture_attention(layer, [layer]) as records:
        hooked = layer(x)
    (rec,) = records.values()
    assert rec.kind == "global" and rec.grid == (5, 6) and rec.probs.shape == (1, 3, 30, 30)
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        qkv = layer.qkv(x.permute(0, 2, 3, 1).reshape(1, 30, 12))
    q, k, _ = qkv.view(1, 30, 3, 3, 4).permute(2, 0, 3, 1, 4)
    expected = ((q @ k.transpose(-1, -2)) * layer.scale).softmax(-1)
    torch.testing.assert_close(rec.probs, expected)
    gmap = global_map(rec, (2, 4))
    assert gmap.shape == (5, 6)
    assert math.isclose(float(gmap.sum()), 1.0, rel_tol=1e-5)
    np.testing.assert_allclose(gmap.reshape(-1), expected[0, :, 2 * 6 + 4].mean(0).numpy(), rtol=1e-5)


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return (
        dilateformer.models.create_dilateformer("dilateformer_nano").eval() if False else _create("dilateformer_nano")
    )


def _create(name, **kwargs):
    import timm

    return timm.create_model(name, **kwargs).eval()


def test_timm_attention_extract_sees_both_kinds_of_layer(nano):
    from timm.utils import AttentionExtract

    layers = attention_layers(nano)
    extract = AttentionExtract(nano, method="hook")
    assert set(extract.names) == {f"stages.{s}.blocks.{b}.attn.attn_drop" for s, b in layers}
    x = torch.randn(2, 3, 64, 64)
    maps = extract(x)
    for (s, b), layer in layers.items():
        probs = maps[f"stages.{s}.blocks.{b}.attn.attn_drop"]
        side = 64 // (4 * 2**s)
        if isinstance(layer, MultiScaleDilatedAttention):
            assert probs.shape == (2, side, side, layer.num_heads, 3, 3)
            torch.testing.assert_close(probs.sum((-1, -2)), torch.ones(probs.shape[:4]))
        else:
            assert probs.shape == (2, layer.num_heads, side * side, side * side)
            torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:3]))
    assert any(isinstance(m, MultiScaleDilatedAttention) for m in layers.values())
    assert any(isinstance(m, GlobalAttention) for m in layers.values())


def test_twin_shares_the_weights_and_sees_the_same_first_input(nano):
    twin = global_twin(nano).eval()
    assert isinstance(attention_layers(twin)[(0, 0)], GlobalAttention)
    for (name, a), (_, b) in zip(nano.named_parameters(), twin.named_parameters(), strict=True):
        torch.testing.assert_close(a.reshape(b.shape), b, msg=name)


def test_errors_name_the_problem(nano, tmp_path):
    with pytest.raises(ValueError, match="stages with MSDA: 0, 1"):
        pick_msda_layer(nano, 2, 0)
    with pytest.raises(ValueError, match="stage 0 has blocks 0-0"):
        pick_msda_layer(nano, 0, 5)
    with pytest.raises(ValueError, match="outside the image"):
        check_queries([(10, 500)], (300, 451))
    with pytest.raises(ValueError, match="outside the image"):
        check_queries([(-1, 5)], (300, 451))
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(bad)
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path / "missing.jpg")


def test_model_input_keeps_aspect_on_the_stride_grid():
    assert model_input_size((300, 451), 224) == (224, 352)
    assert model_input_size((10, 10), 224) == (224, 224)
    assert model_input_size((1000, 20), 32) == (1600, 32)


class _StandIn(nn.Module):
    """No global stage: the comparison must come from a twin, else a clear error."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 4, 4)
        self.stages = nn.ModuleList([nn.Module()])
        block = nn.Module()
        block.attn = MultiScaleDilatedAttention(12, 3, layout="nchw")
        self.stages[0].blocks = nn.ModuleList([block])

    def forward(self, x):
        x = self.stem(x)
        return self.stages[0].blocks[0].attn(x)


def test_figure_without_any_global_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="no global-attention layer"):
        attention_figure(np.zeros((64, 64, 3), np.uint8), _StandIn(), [(5, 5)], 0, 0)


def test_attention_figure_on_the_chelsea_photo(tmp_path, check_png):
    import skimage.data

    torch.manual_seed(0)
    model = _create("dilateformer_tiny")
    twin = global_twin(model).eval()
    out = tmp_path / "attention.png"
    attention_figure(skimage.data.chelsea(), model, [(80, 150), (200, 300)], 0, 1, out, twin=twin)
    # 5 columns (image, 3 dilation groups, global) x 2 queries at the figure's fixed size and 100 dpi.
    check_png(out, (1740, 820))
    own = tmp_path / "own_global.png"
    attention_figure(skimage.data.chelsea(), model, None, 1, 0, own)
    check_png(own, (1740, 490))


def test_cli_takes_a_run_dir_a_jpeg_output_and_a_negative_query(tmp_path, capsys):
    """Issue 16: a run directory as eval/predict take it, the format from --output's suffix, -1,-1 as a value."""
    from PIL import Image

    from dilateformer.analysis.visualize import create_registered_model
    from dilateformer.cli import main
    from dilateformer.models import save_weights

    model = create_registered_model("dilateformer_nano", num_classes=3)
    save_weights(model, tmp_path / "run" / "best.safetensors")
    Image.fromarray(np.full((64, 80, 3), 120, np.uint8)).save(tmp_path / "photo.png")
    out = tmp_path / "map.jpg"
    argv = ["visualize", str(tmp_path / "photo.png"), "--model", "dilateformer_nano", "--size", "64"]
    assert main([*argv, "--checkpoint", str(tmp_path / "run"), "--output", str(out)]) == 0
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes under a .jpg name
    assert main([*argv, "--query", "-1,-1", "--output", str(tmp_path / "q.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "query y=-1, x=-1 is outside the image" in err[0]


def test_figure_of_several_small_images_one_row_each(nano, tmp_path, check_png):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    twin = global_twin(nano).eval()
    fig = attention_figure(images, nano, [(3, 4), (20, 30)], twin=twin, size=32, labels=["first", "second"])
    titles = [ax.get_title() for ax in fig.axes]
    assert "first\nquery 1: y=3, x=4" in titles and "second\nquery 2: y=20, x=30" in titles
    # Stage 0 at 32x32 input: an 8x8 grid, so the global panel spans 64 keys; a small image is drawn pixel by pixel.
    assert sum("over all 64 keys" in t for t in titles) == 2
    assert fig.axes[0].images[0].get_interpolation() == "nearest"
    with pytest.raises(ValueError, match="one query per image"):
        attention_figure(images, nano, [(3, 4)], twin=twin, size=32)
    attention_figure(images, nano, twin=twin, size=32, output=tmp_path / "two.png")
    check_png(tmp_path / "two.png", (1740, 820))
