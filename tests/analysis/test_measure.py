"""``count_macs``: the package's one FLOP count, on any device, quadratic for global attention, fvcore agreeing."""

from __future__ import annotations

import warnings
from fractions import Fraction

import pytest
import timm
import torch

from dilateformer.analysis.measure import count_macs
from dilateformer.nn import GlobalAttention, MultiScaleDilatedAttention
from dilateformer.ops.flops import fvcore_handles

TWIN = {"attn_types": ("global",) * 4}


def test_counts_inference_on_meta_as_on_cpu_and_leaves_the_model_as_it_was():
    model = timm.create_model("dilateformer_nano", **TWIN)  # training mode, as created
    x = torch.randn(1, 3, 64, 64)
    on_cpu = count_macs(model, x)
    assert on_cpu == count_macs(model, x, on_meta=True) > 0
    assert model.training and next(model.parameters()).device.type == "cpu"


def test_rejects_what_is_not_a_model_or_tensors():
    model = timm.create_model("dilateformer_nano", device="meta")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        count_macs(lambda x: x, torch.zeros(1))
    with pytest.raises(TypeError, match="inputs must be one or more tensors"):
        count_macs(model)
    with pytest.raises(TypeError, match="inputs must be one or more tensors"):
        count_macs(model, [1, 3, 64, 64])


def _divided_differences(xs: list[int], ys: list[int]) -> list[Fraction]:
    """Newton's divided differences f[x0], f[x0, x1], ...: the k-th is the x^k coefficient of a degree-k fit."""
    table = [Fraction(y) for y in ys]
    out = [table[0]]
    for order in range(1, len(xs)):
        table = [(table[i + 1] - table[i]) / (xs[i + order] - xs[i]) for i in range(len(table) - 1)]
        out.append(table[0])
    return out


@pytest.mark.parametrize("attn_types", ["global", "msda"])
def test_macs_are_exactly_quadratic_in_pixels_for_global_attention_and_linear_for_msda(attn_types):
    # c + a*P + b*P^2 exactly, P the pixel count: b is global attention's q.k and p.v, 2 * N^2 * C per block
    # with N = P / 16 / 4^i tokens in stage i (nano: one block per stage, C = 24 * 2^i).
    model = timm.create_model("dilateformer_nano", device="meta", attn_types=attn_types)
    sizes = [32, 64, 96, 128]
    pixels = [s * s for s in sizes]
    macs = [count_macs(model, torch.empty(1, 3, s, s, device="meta")) for s in sizes]
    _, linear, quadratic, cubic = _divided_differences(pixels, macs)
    assert cubic == 0 and linear > 0
    expected = sum(Fraction(2 * 24 * 2**i, (16 * 4**i) ** 2) for i in range(4)) if attn_types == "global" else 0
    assert quadratic == expected


# ----------------------------------------------------------------------------------------------------- fvcore


def _fvcore(model, x, **handles):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation and tracer warnings
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, x).set_op_handle(**fvcore_handles(), **handles)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return analysis.total(), analysis.by_operator()


def test_fvcore_counts_the_attention_layers_products():
    torch.manual_seed(0)
    dim, side, k = 16, 8, 3
    x = torch.randn(1, dim, side, side)
    msda = MultiScaleDilatedAttention(dim, 4, k, (1, 2), layout="nchw").eval()
    pixels = side * side
    projections = pixels * (3 * dim * dim + dim * dim)  # qkv and proj
    total, by_op = _fvcore(msda, x)
    assert by_op["einsum"] == 2 * pixels * dim * k * k  # q.k and p.v over each query's k x k window
    assert total == projections + 2 * pixels * dim * k * k == count_macs(msda, x)
    attention = GlobalAttention(dim, 4, layout="nchw").eval()
    total, _ = _fvcore(attention, x)
    assert total == projections + 2 * pixels * pixels * dim == count_macs(attention, x)


def test_fvcore_agrees_with_count_macs_on_a_model_once_norms_and_pooling_are_left_out():
    model = timm.create_model("dilateformer_nano").eval()
    x = torch.randn(1, 3, 64, 64)
    # fvcore ignores a handle set to None only for ops it has no handle of its own for: replace them with zero.
    skip = {
        op: lambda inputs, outputs: 0 for op in ("aten::batch_norm", "aten::layer_norm", "aten::adaptive_avg_pool2d")
    }
    total, by_op = _fvcore(model, x, **skip)
    assert by_op["einsum"] > 0 and by_op["matmul"] > 0  # MSDA's and global attention's products are in
    assert total == count_macs(model, x)
