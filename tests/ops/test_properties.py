"""Property tests: every backend agrees with the reference on random shapes, kernels, dilations, borders."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dilateformer.functional import multi_scale_dilated_attention as msda
from tests.ops.helpers import COMPILED_SHAPES, assert_backend_matches_reference, random_qkv

SIZES = st.integers(1, 20)
KERNELS = st.sampled_from([1, 3, 5, 7])


@st.composite
def msda_problems(draw, sizes=SIZES, kernels=KERNELS):
    groups = draw(st.integers(1, 3))
    return dict(
        shape=(
            draw(st.integers(1, 3)),
            draw(sizes),
            draw(sizes),
            groups * draw(st.integers(1, 2)),
            draw(st.integers(1, 4)),
        ),
        kernel_size=draw(kernels),
        dilations=tuple(draw(st.integers(1, 4)) for _ in range(groups)),
        border=draw(st.sampled_from(["zero", "clamp"])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=msda_problems())
def test_eager_agrees_with_reference(problem):
    assert_backend_matches_reference(problem, "eager")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=msda_problems())
def test_native_agrees_with_reference(problem):
    assert_backend_matches_reference(problem, "native")


@pytest.mark.slow
@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(shape=st.sampled_from(COMPILED_SHAPES), border=st.sampled_from(["zero", "clamp"]), seed=st.integers(0, 2**16))
def test_compiled_agrees_with_reference(shape, border, seed, static_compiled_shapes):
    # Sizes come from the shared COMPILED_SHAPES so the examples reuse compiled kernels; the data is random.
    problem = dict(shape=shape, seed=seed, kernel_size=3, dilations=(1, 3), border=border)
    assert_backend_matches_reference(problem, "compiled")


@settings(max_examples=30, deadline=None)
@given(problem=msda_problems(sizes=st.integers(1, 8)))
def test_output_is_a_convex_combination_of_window_values(problem):
    q, k, v = random_qkv(problem["shape"], seed=problem["seed"], requires_grad=False)
    ones = torch.ones_like(v)
    options = dict(kernel_size=problem["kernel_size"], dilations=problem["dilations"], border=problem["border"])
    weight_sum = msda(q, k, ones, **options, backend="eager")
    if problem["border"] == "clamp":
        torch.testing.assert_close(weight_sum, ones)  # every slot is a real key
    else:
        assert (weight_sum <= 1 + 1e-12).all() and (weight_sum > 0).all()  # zero keys absorb some weight
