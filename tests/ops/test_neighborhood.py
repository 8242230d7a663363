import pytest
import torch

from dilateformer.ops.neighborhood import head_groups, window_table


def test_zero_border_window_is_centred_and_marks_outside_positions():
    position, valid = window_table(6, 3, 2, "zero")
    assert position[3].tolist() == [1, 3, 5]
    assert valid[3].all()
    assert valid[0].tolist() == [False, True, True]
    assert valid[5].tolist() == [True, True, False]


@pytest.mark.parametrize("length", [1, 2, 5, 9, 16])
@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7])
@pytest.mark.parametrize("dilation", [1, 2, 3, 4])
def test_clamp_border_stays_on_the_subgrid_and_covers_k_keys(length, kernel_size, dilation):
    position, valid = window_table(length, kernel_size, dilation, "clamp")
    for query in range(length):
        keys = position[query][valid[query]].tolist()
        subgrid = list(range(query % dilation, length, dilation))
        assert all(key % dilation == query % dilation for key in keys)
        assert len(keys) == min(kernel_size, len(subgrid))
        assert len(set(keys)) == len(keys)
        # the window is a run of consecutive sub-grid points that contains the query itself
        start = subgrid.index(keys[0])
        assert keys == subgrid[start : start + len(keys)]
        assert query in keys


def test_clamp_border_matches_zero_border_in_the_interior():
    zero, _ = window_table(20, 5, 2, "zero")
    clamp, _ = window_table(20, 5, 2, "clamp")
    assert torch.equal(zero[4:16], clamp[4:16])
    assert not torch.equal(zero[:4], clamp[:4])


def test_head_groups_are_contiguous_and_equal():
    groups = head_groups(6, (1, 2, 3))
    assert [(s.start, s.stop, d) for s, d in groups] == [(0, 2, 1), (2, 4, 2), (4, 6, 3)]


def test_tables_first_built_in_inference_mode_still_serve_autograd():
    from dilateformer.functional import multi_scale_dilated_attention

    q = torch.randn(1, 13, 17, 2, 4)
    with torch.inference_mode():
        multi_scale_dilated_attention(q, q, q, 5, (1, 2), backend="reference")
    q.requires_grad_()
    multi_scale_dilated_attention(q, q, q, 5, (1, 2), backend="reference").sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
