"""Training-run steps that need no full run: restoring optimizer state saved in an older parameter shape."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dilateformer.train.run import _match_state_shapes


def test_moments_saved_for_a_conv_qkv_step_a_linear_qkv_like_never_changed():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 12, kernel_size=1)  # the qkv of runs saved before it became a Linear
    linear = nn.Linear(4, 12)
    linear.weight.data.copy_(conv.weight.detach().flatten(1))
    linear.bias.data.copy_(conv.bias.detach())
    old = torch.optim.AdamW(conv.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    for _ in range(2):
        old.zero_grad()
        conv(x[:, :, None, None]).square().sum().backward()
        old.step()
    linear.weight.data.copy_(conv.weight.detach().flatten(1))
    linear.bias.data.copy_(conv.bias.detach())

    new = torch.optim.AdamW(linear.parameters(), lr=0.1)
    new.load_state_dict(copy.deepcopy(old.state_dict()))  # as from a file: no state shared with old
    _match_state_shapes(new)
    assert all(v.shape == p.shape for p, s in new.state.items() for v in s.values() if v.dim() > 0)
    for opt, forward in ((old, lambda: conv(x[:, :, None, None]).flatten(1)), (new, lambda: linear(x))):
        opt.zero_grad()
        forward().square().sum().backward()
        opt.step()
    torch.testing.assert_close(linear.weight, conv.weight.flatten(1), rtol=1e-6, atol=1e-6)


def test_adamw_from_timm_runs_fused_and_steps_like_the_loop():
    from timm.optim import create_optimizer_v2

    from dilateformer.train.run import fused_kwargs

    assert fused_kwargs("sgd", torch.device("cpu")) == {} and fused_kwargs("AdamW", torch.device("meta")) == {}
    torch.manual_seed(0)
    models = [nn.Linear(6, 3), nn.Linear(6, 3)]
    models[1].load_state_dict(models[0].state_dict())
    fused, loop = (
        create_optimizer_v2(m, opt="adamw", lr=0.01, weight_decay=0.05, **kw)
        for m, kw in zip(models, (fused_kwargs("adamw", torch.device("cpu")), {}), strict=True)
    )
    assert fused.defaults["fused"] and not loop.defaults.get("fused")
    x = torch.randn(16, 6)
    for _ in range(3):
        for model, opt in zip(models, (fused, loop), strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    torch.testing.assert_close(models[0].weight, models[1].weight, rtol=1e-5, atol=1e-6)
