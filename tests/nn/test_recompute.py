"""The recomputing Functions: same outputs, same gradients (float64) and running statistics, less saved."""

import pytest
import torch
from torch import nn

from dilateformer.analysis.measure import saved_for_backward_bytes
from dilateformer.nn.recompute import batch_norm_gelu, batch_norm_gelu_applies, gelu_mlp


def _outputs_and_grads(forward, inputs, params, grad):
    for t in (*inputs, *params):
        t.grad = None
    out = forward()
    out.backward(grad)
    return [out, *(t.grad for t in (*inputs, *params))]


@pytest.mark.parametrize("with_norm", [True, False])
def test_gelu_mlp_matches_the_plain_ops_and_saves_less(with_norm):
    torch.manual_seed(0)
    norm = nn.LayerNorm(6, eps=1e-6).double()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    fc1, fc2 = nn.Linear(6, 24).double(), nn.Linear(24, 6).double()
    x = torch.randn(2, 3, 4, 6, dtype=torch.double, requires_grad=True)
    used = norm if with_norm else nn.Identity()

    def fused():
        return gelu_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, "none", norm if with_norm else None)

    def plain():
        return fc2(nn.functional.gelu(fc1(used(x))))

    params = [*fc1.parameters(), *fc2.parameters(), *(norm.parameters() if with_norm else ())]
    grad = torch.randn(2, 3, 4, 6, dtype=torch.double)
    for got, expected in zip(
        _outputs_and_grads(fused, [x], params, grad), _outputs_and_grads(plain, [x], params, grad), strict=True
    ):
        torch.testing.assert_close(got, expected)
    assert torch.autograd.gradcheck(
        lambda x, w, b: gelu_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, "tanh", _ln(norm, w, b)),
        (x, norm.weight, norm.bias),
    )
    assert saved_for_backward_bytes(fused) < saved_for_backward_bytes(plain)


def _ln(norm, weight, bias):
    # A LayerNorm whose parameters are the given tensors, so gradcheck perturbs them.
    clone = nn.LayerNorm(norm.normalized_shape, eps=norm.eps).double()
    del clone.weight, clone.bias
    clone.weight, clone.bias = weight, bias
    return clone


def test_gelu_mlp_rejects_a_norm_that_is_not_a_last_dimension_layer_norm():
    x = torch.randn(2, 6)
    fc1, fc2 = nn.Linear(6, 24), nn.Linear(24, 6)
    for norm in (nn.LayerNorm(3), nn.BatchNorm1d(6)):
        with pytest.raises(ValueError, match="norm must be an nn.LayerNorm"):
            gelu_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, norm=norm)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [True, False])
def test_batch_norm_gelu_matches_the_plain_modules(momentum, channels_last):
    torch.manual_seed(0)
    fused_bn, plain_bn = (nn.BatchNorm2d(5, momentum=momentum).double() for _ in range(2))
    for bn in (fused_bn, plain_bn):
        torch.manual_seed(1)
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    act = nn.GELU()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 5, 4, 6, dtype=torch.double).contiguous(memory_format=fmt).requires_grad_()
    grad = torch.randn(3, 5, 4, 6, dtype=torch.double)
    assert batch_norm_gelu_applies(fused_bn, act, x)
    for _ in range(2):  # twice, so the running statistics' update rule is checked, not only their first value
        got = _outputs_and_grads(lambda: batch_norm_gelu(fused_bn, act, x), [x], list(fused_bn.parameters()), grad)
        expected = _outputs_and_grads(lambda: act(plain_bn(x)), [x], list(plain_bn.parameters()), grad)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e)
    assert got[0].is_contiguous(memory_format=fmt)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused_bn, name), getattr(plain_bn, name))
    assert torch.autograd.gradcheck(
        lambda x, w, b: _bn_gelu_with(fused_bn, w, b, x), (x, fused_bn.weight, fused_bn.bias)
    )
    assert saved_for_backward_bytes(lambda: batch_norm_gelu(fused_bn, act, x)) < saved_for_backward_bytes(
        lambda: act(plain_bn(x))
    )


def _bn_gelu_with(bn, weight, bias, x):
    clone = nn.BatchNorm2d(bn.num_features).double()
    del clone.weight, clone.bias
    clone.weight, clone.bias = weight, bias
    return batch_norm_gelu(clone, nn.GELU(), x)


def test_batch_norm_gelu_applies_only_where_nothing_could_notice():
    bn, act = nn.BatchNorm2d(4), nn.GELU()
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    assert batch_norm_gelu_applies(bn, act, x)
    assert not batch_norm_gelu_applies(bn.eval(), act, x)
    bn.train()
    assert not batch_norm_gelu_applies(bn, nn.ReLU(), x)
    assert not batch_norm_gelu_applies(nn.BatchNorm2d(4, affine=False), act, x)
    assert not batch_norm_gelu_applies(nn.BatchNorm2d(4, track_running_stats=False), act, x)
    with torch.no_grad():
        assert not batch_norm_gelu_applies(bn, act, x)
    handle = bn.register_forward_hook(lambda *args: None)
    assert not batch_norm_gelu_applies(bn, act, x)
    handle.remove()
    # One value per channel: the plain BatchNorm's own error must surface.
    assert not batch_norm_gelu_applies(bn, act, torch.randn(1, 4, 1, 1, requires_grad=True))
