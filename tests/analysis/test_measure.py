"""The one measuring module: ``count_macs`` (any device, quadratic for global attention, fvcore agreeing), the
bytes saved for backward (any device, parameters apart) and the growth exponent."""

from __future__ import annotations

import warnings
from fractions import Fraction

import pytest
import timm
import torch

from dilateformer.analysis.measure import count_macs, loglog_slope, saved_for_backward, saved_for_backward_bytes
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


# ------------------------------------------------------------------------------------------- saved for backward


def test_saved_bytes_count_each_storage_once_and_split_out_the_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)
    saved = saved_for_backward(lambda: torch.relu(lin(x)), exclude=lin.parameters())
    # x and the weight (for grad_input) are saved, the bias is not; relu's output is a third storage.
    assert saved.excluded == 64 * 64 * 4
    assert saved.total == saved.excluded + x.numel() * 4 + 32 * 64 * 4
    assert saved_for_backward_bytes(lambda: torch.relu(lin(x))) == saved.total
    assert saved_for_backward_bytes(lambda: torch.relu(lin(x)), exclude=lin.parameters()) == saved.counted


def test_saved_bytes_on_meta_match_a_real_forward():
    # Every meta storage has address 0: a count keyed by address would see one storage here.
    torch.manual_seed(0)
    model = timm.create_model("dilateformer_nano", embed_dim=12, attn_types=("msda",) * 4).train()
    x = torch.randn(2, 3, 32, 32)
    on_cpu = saved_for_backward(lambda: model(x), exclude=list(model.parameters()))
    meta = model.to("meta")
    on_meta = saved_for_backward(lambda: meta(x.to("meta")), exclude=list(meta.parameters()))
    assert on_meta == on_cpu
    params = sum(p.numel() * p.element_size() for p in meta.parameters())
    assert 0 < on_cpu.excluded <= params and on_cpu.counted > x.numel() * 4


def test_loglog_slope_is_the_growth_exponent():
    xs = [64.0, 256.0, 1024.0, 4096.0]
    assert loglog_slope(xs, [3 * x for x in xs]) == pytest.approx(1.0)
    assert loglog_slope(xs, [0.5 * x**2 for x in xs]) == pytest.approx(2.0)
    # Points not measured (None) or not positive are left out; fewer than two distinct x leave no slope.
    assert loglog_slope(xs, [None, 2 * 256.0**1.5, 0.0, 2 * 4096.0**1.5]) == pytest.approx(1.5)
    assert loglog_slope(xs, [None, None, 5.0, None]) is None
    assert loglog_slope([8.0, 8.0], [1.0, 2.0]) is None


# ----------------------------------------------------------------------------------------------------- counting


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
