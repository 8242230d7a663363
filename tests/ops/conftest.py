import pytest
import torch


@pytest.fixture
def static_compiled_shapes():
    """Compile each test size exactly instead of recompiling with symbolic sizes (see COMPILED_SHAPES)."""
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        yield
