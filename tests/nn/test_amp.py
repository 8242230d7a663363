"""Mixed precision for the layers: training steps under CPU autocast, and the autocast-state helper."""

from __future__ import annotations

import pytest
import torch

from dilateformer.nn import GlobalAttention, MultiScaleDilatedAttention
from dilateformer.nn.amp import autocast_state

# Relative distance to the fp32 loss. Rounding through a few layers stays well inside this (measured: up to 0.9% with
# fp16, whose CPU kernels round more often than their CUDA ones); a wrong cast or an unscaled branch does not.
LOSS_RTOL = {torch.bfloat16: 3e-2, torch.float16: 3e-2}


def autocast_step(module: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> tuple[float, list]:
    """loss = mean(module(x)^2) under CPU autocast (or fp32 when dtype is None); returns it and the grads."""
    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = module(x).float().square().mean()
    loss.backward()
    return loss.item(), [p.grad for p in module.parameters()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer_cls", [MultiScaleDilatedAttention, GlobalAttention])
def test_layers_train_under_cpu_autocast(layer_cls, dtype):
    torch.manual_seed(0)
    layer = layer_cls(48, 6, layout="nchw") if layer_cls is MultiScaleDilatedAttention else layer_cls(48, 6)
    x = torch.randn(2, 48, 9, 11) if layer_cls is MultiScaleDilatedAttention else torch.randn(2, 9, 11, 48)
    reference, _ = autocast_step(layer, x, None)
    loss, grads = autocast_step(layer, x, dtype)
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert loss == pytest.approx(reference, rel=LOSS_RTOL[dtype])


def test_msda_output_is_in_the_autocast_dtype():
    layer = MultiScaleDilatedAttention(24, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(1, 24, 6, 6)).dtype == torch.bfloat16


def test_autocast_state_round_trips():
    assert autocast_state("cpu")["enabled"] is False
    with torch.autocast("cpu", dtype=torch.float16):
        state = autocast_state("cpu")
    assert state["enabled"] is True and state["dtype"] == torch.float16
    with torch.autocast(**state):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
