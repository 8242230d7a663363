"""The compiled backend: the same kernels as the eager backend, fused by torch.compile (inductor).

On CPU inductor emits vectorised C++ loops; on CUDA it emits Triton kernels. Each forward and backward becomes a
few fused loops that read q, k and v once per window slot from cache instead of writing k*k intermediate tensors.

Compilation happens on the first call for each configuration (kernel size, dilations, border, dtype, device type,
head count). The first call compiles for its exact shape; the first call at a *new* spatial size recompiles once
with symbolic sizes (PyTorch's automatic dynamic shapes), and later sizes reuse that code.
"""

from __future__ import annotations

import functools
import shutil

import torch

from dilateformer.ops import kernels, library

# One entry per configuration and direction, plus the dynamic-shape recompile of each.
_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled(fn):
    return torch.compile(fn, fullgraph=True)


def _run(fn, *args):
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, accumulated_recompile_limit=4096):
        return _compiled(fn)(*args)


def _forward(*args):
    return _run(kernels.msda_forward, *args)


def _backward(*args):
    return _run(kernels.msda_backward, *args)


library.register_impl("compiled", _forward, _backward)


def unavailable_reason(device: torch.device) -> str | None:
    """Why torch.compile cannot build kernels for this device here, or None when it can."""
    if device.type == "cpu":
        if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
            return "torch.compile needs a C++ compiler (g++ or clang++) on PATH to build CPU kernels"
        return None
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch.compile needs the triton package to build CUDA kernels"
        return None
    return f"torch.compile support for device type {device.type!r} is not set up"


def msda_compiled(q, k, v, kernel_size: int, dilations: tuple[int, ...], scale: float, border: str) -> torch.Tensor:
    out, _ = torch.ops.dilateformer.msda_forward(q, k, v, kernel_size, list(dilations), scale, border, "compiled")
    return out
