"""Mixed precision for the models: autocast training steps and half-precision inference."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from tests.nn.test_amp import LOSS_RTOL


def _nano(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("dilateformer_nano", num_classes=10, **kwargs)


def _step(model, x, y, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attn_types", [None, ("global",) * 4], ids=["msda", "global-twin"])
def test_model_trains_under_cpu_autocast(dtype, attn_types):
    """The MLP's memory-saving autograd Function is on this path (train mode, plain layers)."""
    model = _nano(**({"attn_types": attn_types} if attn_types else {})).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    reference, _ = _step(model, x, y, None)
    loss, grads = _step(model, x, y, dtype)
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert loss == pytest.approx(reference, rel=LOSS_RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_runs_inference(dtype):
    model = _nano().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = model.to(dtype)(x.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=5e-2 * expected.abs().max().item())
