"""The op recorder and replayer of dilateformer.analysis.breakdown: categories and FLOPs of recorded ops."""

import torch
from torch import nn

from dilateformer.analysis.breakdown import record_ops, time_ops


def test_convolutions_are_split_by_groups_and_a_grouped_backward_counts_its_own_flops():
    depthwise, dense = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 4, 3, padding=1)
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    records = record_ops(lambda: (depthwise(x).sum() + dense(x).sum()).backward())
    timings, unreplayed = time_ops(records, repeats=1, min_seconds=0.0)
    assert unreplayed == 0
    by_kind = {(t.category, t.record.name): t.flops for t in timings if "conv" in t.category}
    depthwise_forward = 2 * (2 * 6 * 5 * 5) * 9
    dense_forward = 2 * (2 * 4 * 5 * 5) * 6 * 9
    assert by_kind[("depthwise convs", "convolution")] == depthwise_forward
    assert by_kind[("dense convs", "convolution")] == dense_forward
    # Input and weight gradients, each costing the forward's FLOPs.
    assert by_kind[("depthwise convs", "convolution_backward")] == 2 * depthwise_forward
    assert by_kind[("dense convs", "convolution_backward")] == 2 * dense_forward
