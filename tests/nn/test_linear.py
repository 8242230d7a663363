"""dilateformer.nn.linear: oneDNN linear layers in eager float32 CPU inference, invisible everywhere else."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import profile
from torch.utils.flop_counter import FlopCounterMode

from dilateformer.nn.linear import apply_linear, linear, linear_add, onednn_inference_applies

ONEDNN_OP = "mkldnn::_linear_pointwise"


def _ops(fn):
    with profile() as prof:
        result = fn()
    return result, {event.name for event in prof.events()}


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear_and_uses_onednn_only_in_inference(gelu, bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 24, generator=generator)
    weight = torch.randn(40, 24, generator=generator)
    b = torch.randn(40, generator=generator) if bias else None
    expected = F.linear(x, weight, b)
    expected = F.gelu(expected) if gelu else expected
    with torch.no_grad():
        got, names = _ops(lambda: linear(x, weight, b, gelu=gelu))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (ONEDNN_OP in names) == torch.backends.mkldnn.is_available()
    # Autograd, float64 and FLOP counting see plain aten ops.
    weight.requires_grad_()
    got, names = _ops(lambda: linear(x, weight, b, gelu=gelu))
    assert ONEDNN_OP not in names and got.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(linear(x.double(), weight.double(), None), F.linear(x.double(), weight.double()))
        with FlopCounterMode(display=False) as counter:
            linear(x, weight, b, gelu=gelu)
    assert counter.get_total_flops() == 2 * 105 * 24 * 40


def test_linear_add_fuses_the_sum_in_inference_only():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 24, generator=generator)
    weight, bias = torch.randn(40, 24, generator=generator), torch.randn(40, generator=generator)
    # A channels-last NCHW map seen as NHWC, as the blocks pass their residual.
    other = torch.randn(2, 40, 5, 7, generator=generator).contiguous(memory_format=torch.channels_last)
    other = other.permute(0, 2, 3, 1)
    expected = other.double() + F.linear(x.double(), weight.double(), bias.double())
    with torch.no_grad():
        got, names = _ops(lambda: linear_add(x, weight, bias, other))
        assert ("mkldnn::_linear_pointwise" in names) == torch.backends.mkldnn.is_available()
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        # A broadcast addend is not the post-op's shape: the plain sum.
        got, names = _ops(lambda: linear_add(x, weight, None, bias))
        assert ONEDNN_OP not in names
        torch.testing.assert_close(got, bias + F.linear(x, weight))
    got, names = _ops(lambda: linear_add(x, weight.requires_grad_(), bias, other))
    assert ONEDNN_OP not in names and got.requires_grad


def test_compiling_and_tracing_never_take_the_onednn_path():
    x, weight = torch.randn(2, 4), torch.randn(3, 4)
    with torch.no_grad():
        assert onednn_inference_applies(x, weight) == torch.backends.mkldnn.is_available()
        assert not onednn_inference_applies(x.double(), weight.double())
        compiled = torch.compile(lambda t: linear(t, weight, None, gelu=True), fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), F.gelu(F.linear(x, weight)))
        traced = torch.jit.trace(lambda t: linear(t, weight, None), (x,))
    assert "mkldnn" not in str(traced.graph)


def test_apply_linear_keeps_calling_hooked_and_wrapped_layers():
    class Shifted(nn.Linear):
        def forward(self, input):
            return super().forward(input) + 1.0

    torch.manual_seed(0)
    layer, x = nn.Linear(8, 6), torch.randn(4, 8)
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(apply_linear(layer, x), expected)
        calls = []
        handle = layer.register_forward_hook(lambda module, args, output: calls.append(output))
        _, names = _ops(lambda: apply_linear(layer, x))
        handle.remove()
        assert len(calls) == 1 and ONEDNN_OP not in names
        shifted = Shifted(8, 6)
        shifted.load_state_dict(layer.state_dict())
        torch.testing.assert_close(apply_linear(shifted, x), expected + 1.0)


def test_autocast_runs_the_linear_in_its_dtype():
    x, weight = torch.randn(2, 8), torch.randn(3, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_inference_applies(x, weight)
        got = linear(x, weight, None, gelu=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.gelu(F.linear(x, weight)), rtol=0.05, atol=0.05)
