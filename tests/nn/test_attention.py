from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from dilateformer.functional import multi_scale_dilated_attention
from dilateformer.nn import GlobalAttention, MultiScaleDilatedAttention


def _manual_msda(layer: MultiScaleDilatedAttention, x_nchw: torch.Tensor) -> torch.Tensor:
    """The layer written out with the official conv/linear pieces, to pin the channel order."""
    batch, channels, height, width = x_nchw.shape
    # The official 1x1 conv, with the Linear's weight as its kernel.
    qkv = torch.nn.functional.conv2d(x_nchw, layer.qkv.weight[..., None, None], layer.qkv.bias)  # (B, 3C, H, W)
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


def test_parameter_names_match_the_official_keys_and_both_layers_share_shapes():
    expected = {"qkv.weight": (216, 72), "qkv.bias": (216,), "proj.weight": (72, 72), "proj.bias": (72,)}
    for layer in (MultiScaleDilatedAttention(72, 3), GlobalAttention(72, 3)):
        assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == expected


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


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("cls", [MultiScaleDilatedAttention, GlobalAttention])
def test_forward_residual_is_the_sum_and_keeps_calling_hooks(cls, layout):
    torch.manual_seed(0)
    layer = cls(24, 3, layout=layout).eval()
    shape = (2, 24, 7, 9) if layout == "nchw" else (2, 7, 9, 24)
    x, residual = torch.randn(shape), torch.randn(shape)
    with torch.no_grad():
        expected = residual.double() + layer.double()(x.double())
        layer.float()
        got = layer.forward_residual(x, residual)  # float32 inference: the sum inside proj's oneDNN kernel
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        calls = []
        handle = layer.proj.register_forward_hook(lambda module, args, output: calls.append(output.shape))
        torch.testing.assert_close(layer.forward_residual(x, residual), got, rtol=1e-6, atol=1e-6)
        handle.remove()
    assert len(calls) == 1
    layer.train()
    out = layer.forward_residual(x, residual.requires_grad_())
    out.sum().backward()
    torch.testing.assert_close(residual.grad, torch.ones_like(residual))


def test_graph_mode_refuses_training_with_attention_dropout():
    layer = MultiScaleDilatedAttention(24, 3, attn_drop=0.1)
    torch.fx.symbolic_trace(layer.eval())  # in eval mode the dropout does nothing: fine
    with pytest.raises(RuntimeError, match="attn_drop > 0"):
        torch.fx.symbolic_trace(layer.train())


class _LowRankDelta(nn.Module):
    """A LoRA-style wrapper: the wrapped Linear plus ``up @ down`` (not an nn.Linear, as peft's are not)."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        generator = torch.Generator().manual_seed(1)
        self.down = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) * 0.1)
        self.up = nn.Parameter(torch.randn(base.out_features, rank, generator=generator) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.down.T @ self.up.T


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_qkv_is_called_as_a_module_hooks_and_wrappers_take_effect(layout):
    """Float32 CPU inference, where the oneDNN fast path runs: a hook on qkv fires and can change its output, and
    a LoRA-like replacement of qkv gives the layer with the merged weight."""
    torch.manual_seed(0)
    layer = MultiScaleDilatedAttention(24, 3, layout=layout).eval()
    x = torch.randn(2, 24, 7, 9) if layout == "nchw" else torch.randn(2, 7, 9, 24)
    with torch.no_grad():
        plain = layer(x)
        seen = []
        handle = layer.qkv.register_forward_hook(lambda module, args, out: seen.append(args[0].shape) or out * 2)
        hooked = layer(x)
        handle.remove()
        assert seen == [(2, 7, 9, 24)]  # channels-last in, whatever the layout
        assert not torch.allclose(hooked, plain, atol=1e-3)

        merged = MultiScaleDilatedAttention(24, 3, layout=layout).eval()
        merged.load_state_dict(layer.state_dict())
        layer.qkv = _LowRankDelta(layer.qkv)
        merged.qkv.weight += layer.qkv.up @ layer.qkv.down
        wrapped = layer(x)
        assert not torch.allclose(wrapped, plain, atol=1e-3)
        torch.testing.assert_close(wrapped, merged(x), rtol=1e-5, atol=1e-5)


# torch.ao's eager quantization is deprecated in favour of torchao, and still the one that ships with torch.
@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_dynamic_quantization_replaces_qkv_and_stays_close_to_float():
    torch.manual_seed(0)
    layer = MultiScaleDilatedAttention(48, 6).eval()
    x = torch.randn(2, 48, 8, 8)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(layer), {nn.Linear}, dtype=torch.qint8)
    assert isinstance(quantized.qkv, torch.ao.nn.quantized.dynamic.Linear)
    with torch.no_grad():
        expected, got = layer(x), quantized(x)
    assert not torch.equal(got, expected)  # the int8 kernels ran
    assert (got - expected).norm() < 0.05 * expected.norm()


def test_old_conv_qkv_weights_load_and_old_pickles_unpickle():
    """State dicts and whole pickled modules from before qkv became a Linear (a (3C, C, 1, 1) conv) still work."""
    torch.manual_seed(0)
    layer = MultiScaleDilatedAttention(24, 3).eval()
    x = torch.randn(2, 24, 6, 5)
    with torch.no_grad():
        expected = layer(x)
    old_state = {k: v[..., None, None] if k == "qkv.weight" else v for k, v in layer.state_dict().items()}
    fresh = MultiScaleDilatedAttention(24, 3).eval()
    fresh.load_state_dict(old_state)
    assert old_state["qkv.weight"].dim() == 4  # the caller's dict is left alone
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)

    old = copy.deepcopy(layer)
    conv = nn.Conv2d(24, 72, 1).eval()
    conv.load_state_dict({"weight": old_state["qkv.weight"], "bias": old_state["qkv.bias"]})
    old._modules["qkv"] = conv  # the module as an older version pickled it
    payload = pickle.dumps(old)
    rng = torch.get_rng_state()
    revived = pickle.loads(payload)
    assert torch.equal(torch.get_rng_state(), rng)  # unpickling draws nothing from the global generator
    assert type(revived.qkv) is nn.Linear and revived.qkv.weight.shape == (72, 24)
    assert not revived.qkv.training
    with torch.no_grad():
        assert torch.equal(revived(x), expected)
