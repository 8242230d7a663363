"""Issue 16: numpy integer dilations are ints; a complex input gets a TypeError that says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dilateformer.nn import MultiScaleDilatedAttention


def test_numpy_integer_dilations_are_accepted_as_ints() -> None:
    from_numpy = MultiScaleDilatedAttention(24, num_heads=3, dilations=np.array([1, 2, 3]))
    from_scalars = MultiScaleDilatedAttention(24, num_heads=3, dilations=[np.int64(1), np.int32(2), 3])
    assert from_numpy.dilations == from_scalars.dilations == (1, 2, 3)
    assert all(type(d) is int for d in from_numpy.dilations)
    with pytest.raises(TypeError, match="every dilation must be an int"):
        MultiScaleDilatedAttention(24, num_heads=3, dilations=np.array([1.0, 2.0, 3.0]))


def test_complex_input_is_a_type_error_naming_the_dtype() -> None:
    layer = MultiScaleDilatedAttention(24, num_heads=3)
    with pytest.raises(TypeError, match="real floating-point input, got torch.complex64"):
        layer(torch.randn(1, 24, 8, 8, dtype=torch.complex64))
