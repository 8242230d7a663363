"""The compiled backend: the same kernels as the eager backend, fused by torch.compile (inductor).

On CPU inductor emits vectorised C++ loops; on CUDA it emits Triton kernels. Each forward and backward becomes a
few fused loops that read q, k and v once per window slot from cache instead of writing k*k intermediate tensors.

Compilation happens on the first call for each configuration (kernel size, dilations, border, dtype, device type,
head count), for the exact sizes of that call. The first call in which a size differs recompiles with that size
symbolic, after which new values of it reuse the code: at most one recompile each for batch, height and width
(sizes of 1 are specialised by PyTorch).
"""

from __future__ import annotations

import functools
import importlib.util
import shutil

import torch

from dilateformer.ops import eager

# One entry per configuration and direction, plus the dynamic-shape recompile of each.
_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled(fn):
    return torch.compile(fn, fullgraph=True)


def _run(fn, *args):
    # Sizes start static; a size that changes becomes symbolic at its first change (PyTorch's automatic dynamic
    # shapes). Marking batch, height and width symbolic up front was tried: one compile fewer, but the symbolic
    # backward took minutes of sympy work to compile on CPU.
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT, accumulated_recompile_limit=4096):
        return _compiled(fn)(*args)


def msda_compiled_forward(*args):
    """:func:`dilateformer.ops.eager.msda_forward`, compiled."""
    return _run(eager.msda_forward, *args)


def msda_compiled_backward(*args):
    """:func:`dilateformer.ops.eager.msda_backward`, compiled."""
    return _run(eager.msda_backward, *args)


def _find_unavailable_reasons() -> dict[str, str | None]:
    # Probed once at import: a PATH lookup per call would also break torch.compile tracing of the caller.
    reasons: dict[str, str | None] = {"cpu": None, "cuda": None}
    if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        reasons["cpu"] = "torch.compile needs a C++ compiler (g++ or clang++) on PATH to build CPU kernels"
    if importlib.util.find_spec("triton") is None:
        reasons["cuda"] = "torch.compile needs the triton package to build CUDA kernels"
    return reasons


_UNAVAILABLE_REASONS = _find_unavailable_reasons()


def unavailable_reason(device: torch.device) -> str | None:
    """Why torch.compile cannot build kernels for this device here, or None when it can."""
    if device.type not in _UNAVAILABLE_REASONS:
        return f"torch.compile support for device type {device.type!r} is not set up"
    return _UNAVAILABLE_REASONS[device.type]
