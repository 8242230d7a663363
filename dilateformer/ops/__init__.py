"""MSDA backends. Each has the same signature ``(q, k, v, kernel_size, dilations, scale, border) -> out``.

- ``reference``: the explicit k x k neighbourhood gather, differentiated by autograd. The oracle.
- ``eager``: shifted views with a hand-derived backward; plain PyTorch ops, no compiler.
- ``native``: one-pass C kernels for CPU tensors, built once per machine at first use (about 12 s).
- ``compiled``: the eager kernels fused by torch.compile (C++ on CPU, Triton on CUDA).
- ``triton``: hand-written Triton kernels for CUDA tensors; float32, float16 and bfloat16 only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dilateformer.ops import flops  # noqa: F401  (registers the FLOP formulas whenever dilateformer is imported)
from dilateformer.ops.compiled import msda_compiled
from dilateformer.ops.compiled import unavailable_reason as _compiled_unavailable
from dilateformer.ops.eager import msda_eager
from dilateformer.ops.native import msda_native
from dilateformer.ops.native import unavailable_reason as _native_unavailable
from dilateformer.ops.reference import msda_reference
from dilateformer.ops.triton import DTYPES as _TRITON_DTYPES
from dilateformer.ops.triton import msda_triton
from dilateformer.ops.triton import unavailable_reason as _triton_unavailable


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., torch.Tensor]
    unavailable_reason: Callable[[torch.device], str | None]
    dtypes: tuple[torch.dtype, ...] | None = None
    """The floating dtypes it runs, or None for all of them."""


def _always_available(device: torch.device) -> str | None:
    return None


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", msda_reference, _always_available),
    "eager": Backend("eager", msda_eager, _always_available),
    "native": Backend("native", msda_native, _native_unavailable),
    "compiled": Backend("compiled", msda_compiled, _compiled_unavailable),
    "triton": Backend("triton", msda_triton, _triton_unavailable, _TRITON_DTYPES),
}
