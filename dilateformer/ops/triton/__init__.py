"""The triton backend: hand-written Triton kernels for CUDA tensors (``kernels.py``), forward and backward.

Three launches per call at most, each covering every dilation group: the forward (out and lse), then in the
backward the query side (dq, plus ``D = dout . out`` per query) and the key side (dk and dv, gathered). Sizes are
runtime arguments, so new batch or image sizes reuse the compiled kernels; a new kernel size, head_dim, dtype or
border compiles once (a few seconds), cached on disk by Triton like any Triton kernel.

The kernels accumulate in float32 and run float32, float16 and bfloat16. float64 is refused here (``auto`` picks
the next backend for it, see :data:`DTYPES`). With ``TRITON_INTERPRET=1`` set before the first call, the same
kernels run in Triton's interpreter on CPU tensors: that is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""What the kernels run: all accumulate in float32, so float64 would silently lose precision."""

_NUM_WARPS = 4


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def load_kernels() -> ModuleType:
    """The kernel module, imported once: compiled or interpreted for the rest of the process (see kernels.py)."""
    from dilateformer.ops.triton import kernels

    return kernels


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (decided when they are first loaded)."""
    if load_kernels.cache_info().currsize:
        return load_kernels().INTERPRETED
    return _interpreter_requested()


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` here, or None when they can."""
    if not _HAS_TRITON:
        return "the triton package is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreted():
        return None
    return (
        f"the Triton kernels run on CUDA tensors, got device type {device.type!r} "
        "(CPU tensors run only in Triton's interpreter, with TRITON_INTERPRET=1 set before the first call)"
    )


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in DTYPES:
        raise TypeError(
            f"the triton backend runs float32, float16 and bfloat16 (accumulating in float32), got {dtype}; "
            "use backend='compiled' or 'eager' for it (backend='auto' does)"
        )


def block_sizes(head_dim: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_D): head_dim padded to a power of two, and as many queries as keep a tile near 4096
    float32 values (a few registers per thread for each of q, the accumulator and one key/value row)."""
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    return max(16, min(64, 4096 // block_d)), block_d


@functools.lru_cache(maxsize=64)
def _dilation_table(dilations: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Cached so a call makes no host-to-device copy; never an inference tensor (it may outlive an inference block).
    with torch.inference_mode(False):
        return torch.tensor(dilations, dtype=torch.int32, device=device)


def _inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v sharing one set of strides with contiguous channels, as the kernels read them. Views of a fused qkv
    projection already do; anything else is copied (one extra read and write of each tensor)."""
    strides = q.stride()
    if strides[-1] != 1 or k.stride() != strides or v.stride() != strides:
        return q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v


def _launch_args(q: torch.Tensor, kernel_size: int, dilations, scale: float, border: str):
    batch, height, width, heads, head_dim = q.shape
    block_q, block_d = block_sizes(head_dim)
    pixels = batch * height * width
    sizes = (pixels, height, width, heads, heads // len(dilations), *q.stride()[:4], float(scale))
    constants = dict(K=kernel_size, HEAD_DIM=head_dim, BLOCK_Q=block_q, BLOCK_D=block_d, ZERO=border == "zero")
    grid = (-(-pixels // block_q) * heads,)
    return grid, _dilation_table(tuple(dilations), q.device), sizes, constants


def msda_triton_forward(q, k, v, kernel_size: int, dilations, scale: float, border: str):
    """(out, lse): out in q's dtype, lse (B, H, W, heads) in float32."""
    _check_dtype(q.dtype)
    q, k, v = _inputs(q, k, v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    grid, table, sizes, constants = _launch_args(q, kernel_size, dilations, scale, border)
    kernel = load_kernels().msda_forward_kernel
    kernel[grid](q, k, v, out, lse, table, *sizes, **constants, num_warps=_NUM_WARPS)
    return out, lse


def msda_triton_backward(grad_out, q, k, v, out, lse, kernel_size: int, dilations, scale: float, border: str):
    """(dq, dk, dv) in q's dtype, from the forward's out and lse."""
    _check_dtype(q.dtype)
    q, k, v = _inputs(q, k, v)
    grad_out, out, lse = grad_out.to(q.dtype).contiguous(), out.to(q.dtype).contiguous(), lse.float().contiguous()
    grads = tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    if q.numel() == 0:
        return grads
    grid, table, sizes, constants = _launch_args(q, kernel_size, dilations, scale, border)
    delta = torch.empty_like(lse)
    kernels = load_kernels()
    kernels.msda_backward_queries_kernel[grid](
        grad_out, q, k, v, out, lse, grads[0], delta, table, *sizes, **constants, num_warps=_NUM_WARPS
    )
    kernels.msda_backward_keys_kernel[grid](
        grad_out, q, k, v, lse, delta, grads[1], grads[2], table, *sizes, **constants, num_warps=_NUM_WARPS
    )
    return grads
