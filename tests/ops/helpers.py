"""Shared test data for the MSDA op tests."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

# The compiled backend's tests share this one size: on 2 cores each new size costs a compile of forward and backward
# (the clamp border's backward takes minutes with a cold cache), and a symbolic-size recompile takes longer still.
# Other sizes are the other backends' tests' business: the kernels are the eager backend's, fused.
COMPILED_SHAPES = [(2, 9, 7, 4, 8)]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
OFFICIAL_CASES = FIXTURES / "msda_single_group_cases.safetensors"


def official_cases() -> list[dict]:
    """The official code's single-group cases, converted to the op's (B, H, W, heads, head_dim) layout."""
    with safe_open(OFFICIAL_CASES, "pt") as f:
        meta = json.loads(f.metadata()["cases"])
    tensors = load_file(OFFICIAL_CASES)
    cases = []
    for case in meta:
        b, h, d, y, x = case["batch"], case["heads"], case["head_dim"], case["height"], case["width"]

        def channels_first(t, b=b, h=h, d=d, y=y, x=x):
            return t.view(b, h, d, y, x).permute(0, 3, 4, 1, 2).contiguous()

        def channels_last(t, b=b, h=h, d=d, y=y, x=x):
            return t.reshape(b, y, x, h, d)

        name = case["name"]
        cases.append(
            {
                **case,
                "q": channels_first(tensors[f"{name}.q"]),
                "k": channels_first(tensors[f"{name}.k"]),
                "v": channels_first(tensors[f"{name}.v"]),
                "out": channels_last(tensors[f"{name}.out"]),
                "grad_out": channels_last(tensors[f"{name}.grad_out"]),
                "grad_q": channels_first(tensors[f"{name}.grad_q"]),
                "grad_k": channels_first(tensors[f"{name}.grad_k"]),
                "grad_v": channels_first(tensors[f"{name}.grad_v"]),
            }
        )
    return cases


def random_qkv(shape, dtype=torch.float64, seed=0, requires_grad=True):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator, dtype=dtype).requires_grad_(requires_grad) for _ in range(3))


def forward_backward(fn, q, k, v, grad_out=None):
    out = fn(q, k, v)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(123), dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


def assert_backend_matches_reference(problem: dict, backend: str) -> None:
    """Forward and input gradients of ``backend`` equal the reference backend's within 1e-9 in float64.

    ``problem`` holds ``shape``, ``seed``, ``kernel_size``, ``dilations`` and ``border``.
    """
    from dilateformer.functional import multi_scale_dilated_attention

    q, k, v = random_qkv(problem["shape"], seed=problem["seed"])
    options = dict(kernel_size=problem["kernel_size"], dilations=problem["dilations"], border=problem["border"])
    reference = functools.partial(multi_scale_dilated_attention, **options, backend="reference")
    candidate = functools.partial(multi_scale_dilated_attention, **options, backend=backend)
    out_ref, grads_ref = forward_backward(reference, q, k, v)
    out_new, grads_new = forward_backward(candidate, q, k, v)
    torch.testing.assert_close(out_new, out_ref, rtol=0, atol=1e-9)
    for a, b in zip(grads_new, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
