"""MSDA as one PyTorch operator: FLOP counting, torch.compile and torch.export see a single node."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dilateformer.functional import multi_scale_dilated_attention as msda
from dilateformer.nn import MultiScaleDilatedAttention
from tests.ops.helpers import random_qkv


def test_flop_counter_sees_the_attention_products():
    q, k, v = random_qkv((2, 8, 6, 4, 5), dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        out = msda(q, k, v, kernel_size=3, dilations=(1, 2), backend="eager")
        forward_flops = counter.get_total_flops()
        out.sum().backward()
    # q.k and p.v: 2 FLOPs per multiply-add, k*k keys per query channel
    assert forward_flops == 2 * 2 * 2 * 8 * 6 * 4 * 5 * 9
    assert counter.get_total_flops() == forward_flops * 7 // 2


def test_reference_backend_is_plain_autograd_and_not_the_custom_op():
    q, k, v = random_qkv((1, 4, 4, 2, 3))
    out = msda(q, k, v, dilations=(1, 2), backend="reference")
    assert "msda" not in type(out.grad_fn).__name__.lower()


@pytest.mark.slow
def test_layer_compiles_with_fullgraph_and_exports_as_one_node():
    layer = MultiScaleDilatedAttention(24, 3, backend="eager")
    x = torch.randn(2, 24, 10, 12)
    expected = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected)
    exported = torch.export.export(layer, (x,))
    msda_nodes = [n for n in exported.graph.nodes if "dilateformer.msda_forward" in str(n.target)]
    assert len(msda_nodes) == 1
    torch.testing.assert_close(exported.module()(x), expected)
