from __future__ import annotations

import pytest
import torch

from dilateformer.functional import multi_scale_dilated_attention
from dilateformer.nn import GlobalAttention, MultiScaleDilatedAttention


def _manual_msda(layer: MultiScaleDilatedAttention, x_nchw: torch.Tensor) -> torch.Tensor:
    """The layer written out with the official conv/linear pieces, to pin the channel order."""
    batch, channels, height, width = x_nchw.shape
    qkv = torch.nn.functional.conv2d(x_nchw, layer.qkv.weight, layer.qkv.bias)  # (B, 3C, H, W)
    qkv = qkv.view(batch, 3, layer.num_heads, layer.head_dim, height, width).permute(1, 0, 4, 5, 2, 3)
    out = multi_scale_dilated_attention(*qkv, layer.kernel_size, layer.dilations, backend="reference")
    return layer.proj(out.reshape(batch, height, width, channels)).permute(0, 3, 1, 2)


def test_layer_matches_official_projection_layout():
    torch.manual_seed(0)
    layer = MultiScaleDilatedAttention(36, 6, dilations=(1, 2, 3))
    x = torch.randn(2, 36, 9, 11)
    torch.testing.assert_close(layer(x), _manual_msda(layer, x), rtol=1e-5, atol=1e-5)


def test_both_layouts_give_the_same_result_and_keep_their_layout():
    torch.manual_seed(0)
    nchw = MultiScaleDilatedAttention(24, 3, layout="nchw")
    nhwc = MultiScaleDilatedAttention(24, 3, layout="nhwc")
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.randn(2, 24, 7, 5)
    out_nchw = nchw(x)
    out_nhwc = nhwc(x.permute(0, 2, 3, 1))
    assert out_nchw.shape == (2, 24, 7, 5) and out_nhwc.shape == (2, 7, 5, 24)
    torch.testing.assert_close(out_nhwc.permute(0, 3, 1, 2), out_nchw, rtol=1e-5, atol=1e-6)


def test_parameter_names_and_shapes_match_the_official_keys():
    shapes = {k: tuple(v.shape) for k, v in MultiScaleDilatedAttention(72, 3).state_dict().items()}
    assert shapes == {"qkv.weight": (216, 72, 1, 1), "qkv.bias": (216,), "proj.weight": (72, 72), "proj.bias": (72,)}
    g_shapes = {k: tuple(v.shape) for k, v in GlobalAttention(72, 3).state_dict().items()}
    assert g_shapes == {"qkv.weight": (216, 72), "qkv.bias": (216,), "proj.weight": (72, 72), "proj.bias": (72,)}


def test_wrong_layout_is_caught_with_a_hint():
    layer = MultiScaleDilatedAttention(24, 3)
    with pytest.raises(ValueError, match="looks channels-last: build the layer with layout='nhwc'"):
        layer(torch.randn(1, 8, 8, 24))
    with pytest.raises(ValueError, match="4-D input"):
        layer(torch.randn(24, 8, 8))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=70, num_heads=3), "dim 70 should be divisible by num_heads 3"),
        (dict(dim=24, num_heads=4), "num_heads 4 cannot be split into 3 equal dilation groups"),
        (dict(dim=24, num_heads=3, kernel_size=2), "kernel_size must be an odd int"),
        (dict(dim=24, num_heads=3, layout="NCHW"), "layout must be one of"),
        (dict(dim=24, num_heads=3, border="same"), "border must be one of"),
        (dict(dim=0, num_heads=3), "dim must be a positive int"),
    ],
)
def test_bad_layer_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiScaleDilatedAttention(**kwargs)


def test_attention_probabilities_are_exposed_through_an_attn_drop_hook_only_when_asked():
    torch.manual_seed(0)
    layer = MultiScaleDilatedAttention(24, 3, kernel_size=3).eval()
    x = torch.randn(1, 24, 6, 7)
    plain = layer(x)
    captured = []
    handle = layer.attn_drop.register_forward_hook(lambda module, args, output: captured.append(output))
    hooked = layer(x)
    handle.remove()
    layer(x)
    assert len(captured) == 1
    probs = captured[0]
    assert probs.shape == (1, 6, 7, 3, 3, 3)
    torch.testing.assert_close(probs.sum((-1, -2)), torch.ones(1, 6, 7, 3))
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-6)


def test_attention_dropout_is_applied_in_training_only():
    torch.manual_seed(0)
    layer = MultiScaleDilatedAttention(24, 3, attn_drop=0.5)
    x = torch.randn(1, 24, 6, 6)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def test_global_attention_matches_explicit_softmax_and_hooks():
    torch.manual_seed(0)
    layer = GlobalAttention(24, 3, layout="nchw").eval()
    x = torch.randn(2, 24, 4, 5)
    captured = []
    layer.attn_drop.register_forward_hook(lambda m, a, out: captured.append(out))
    hooked = layer(x)
    layer.attn_drop._forward_hooks.clear()
    torch.testing.assert_close(layer(x), hooked, rtol=1e-5, atol=1e-6)
    assert captured[0].shape == (2, 3, 20, 20)


def test_layer_trains_a_step():
    layer = MultiScaleDilatedAttention(24, 3)
    x = torch.randn(2, 24, 8, 8, requires_grad=True)
    layer(x).square().mean().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("cls", [MultiScaleDilatedAttention, GlobalAttention])
def test_layers_script_and_trace_to_the_eager_result(cls, layout):
    """The graph-mode path (no Python checks, the registered op) computes what eager mode computes, and a
    torch.fx graph of an MSDA layer calls the op itself."""
    import warnings

    torch.manual_seed(0)
    layer = cls(24, 3, layout=layout).eval()
    x = torch.randn(2, 24, 7, 9) if layout == "nchw" else torch.randn(2, 7, 9, 24)
    traced = torch.fx.symbolic_trace(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still supported
        scripted = torch.jit.script(layer)
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)
    targets = {str(node.target) for node in traced.graph.nodes}
    assert ("dilateformer.msda_forward" in targets) == (cls is MultiScaleDilatedAttention)


def test_graph_mode_refuses_training_with_attention_dropout():
    layer = MultiScaleDilatedAttention(24, 3, attn_drop=0.1)
    torch.fx.symbolic_trace(layer.eval())  # in eval mode the dropout does nothing: fine
    with pytest.raises(RuntimeError, match="attn_drop > 0"):
        torch.fx.symbolic_trace(layer.train())
