"""The eager backend: the kernels of :mod:`dilateformer.ops.kernels` run op by op, no compiler needed."""

from __future__ import annotations

import torch

from dilateformer.ops import kernels, library

library.register_impl("eager", kernels.msda_forward, kernels.msda_backward)


def msda_eager(q, k, v, kernel_size: int, dilations: tuple[int, ...], scale: float, border: str) -> torch.Tensor:
    out, _ = torch.ops.dilateformer.msda_forward(q, k, v, kernel_size, list(dilations), scale, border, "eager")
    return out
