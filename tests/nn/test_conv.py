"""dilateformer.nn.conv: conv -> eval BatchNorm [-> GELU] as one oneDNN conv in inference, plain everywhere else."""

import pytest
import torch
from torch import nn
from torch.profiler import profile

from dilateformer.nn.conv import conv_bn_act, conv_bn_act_applies

ONEDNN_OP = "mkldnn::_convolution_pointwise"


def _chain(conv_bias: bool, affine: bool, approximate: str | None, groups: int = 1, stride: int = 2):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=stride, padding=2, dilation=2, groups=groups, bias=conv_bias)
    norm = nn.BatchNorm2d(16, affine=affine)
    with torch.no_grad():  # statistics and affine parameters far from the identity, so a wrong fold shows
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.2, 3.0)
        if affine:
            norm.weight.normal_()
            norm.bias.normal_()
    act = None if approximate is None else nn.GELU(approximate=approximate)
    return conv, norm.eval(), act


def _plain(conv, norm, act, x):
    out = norm(conv(x))
    return out if act is None else act(out)


@pytest.mark.parametrize("approximate", [None, "none", "tanh"])
@pytest.mark.parametrize(("conv_bias", "affine", "groups"), [(False, True, 1), (True, False, 1), (True, True, 4)])
def test_fused_chain_equals_the_modules_and_runs_one_onednn_conv(approximate, conv_bias, affine, groups):
    conv, norm, act = _chain(conv_bias, affine, approximate, groups)
    x = torch.randn(2, 8, 13, 10).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert conv_bn_act_applies(conv, norm, act, x)  # x86 and aarch64 builds of torch ship oneDNN
        with profile() as prof:
            got = conv_bn_act(conv, norm, act, x)
        # The float64 modules are the reference; float32 modules differ from it by about as much as the fold.
        expected = _plain(conv.double(), norm.double(), act, x.double())
        conv.float(), norm.float()
    assert ONEDNN_OP in {event.name for event in prof.events()}
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_anything_that_could_notice_takes_the_plain_modules():
    conv, norm, act = _chain(False, True, "none")
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        assert not conv_bn_act_applies(conv, norm.train(), act, x)  # training BN uses batch statistics
        norm.eval()
        assert not conv_bn_act_applies(conv, norm, act, x.double())
        assert not conv_bn_act_applies(conv, norm, nn.ReLU(), x)
        handle = conv.register_forward_hook(lambda *args: None)
        assert not conv_bn_act_applies(conv, norm, act, x)
        handle.remove()
        no_stats = nn.BatchNorm2d(16, track_running_stats=False).eval()
        assert not conv_bn_act_applies(conv, no_stats, act, x)
    assert not conv_bn_act_applies(conv, norm, act, x.requires_grad_())
