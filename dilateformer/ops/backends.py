"""The one table of MSDA backends: each entry's kernels for the op and the check that says whether it can run.

:mod:`dilateformer.ops.library` looks the op's kernels up here by its ``impl`` argument, and
:func:`dilateformer.ops.context.select_backend` walks the entries' ``can_run`` checks for ``backend="auto"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dilateformer.ops import compiled, eager, native, triton

ForwardKernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""``(q, k, v, kernel_size, dilations, scale, border) -> (out, lse)``, lse of shape (B, H, W, heads)."""
BackwardKernel = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""``(grad_out, q, k, v, out, lse, kernel_size, dilations, scale, border) -> (grad_q, grad_k, grad_v)``."""
CanRun = Callable[[torch.device, torch.dtype], "str | None"]
"""None when the backend runs tensors of this device and dtype here, else why not, phrased to follow
"MSDA backend 'name' ...", e.g. "is not available on cuda: the triton package is not installed"."""


@dataclass(frozen=True)
class Backend:
    name: str
    forward: ForwardKernel | None
    """The op's forward kernel; None for ``reference``, which is not a kernel of the op (see :attr:`in_op`)."""
    backward: BackwardKernel | None
    can_run: CanRun

    @property
    def in_op(self) -> bool:
        """Whether it runs as ``torch.ops.dilateformer.msda_forward(..., impl=name)``. The reference backend does
        not: the functional front calls :func:`~dilateformer.ops.reference.msda_reference`, which autograd
        differentiates through its explicit gather."""
        return self.forward is not None


def _checks(
    unavailable: Callable[[torch.device], str | None] | None = None, dtypes: tuple[torch.dtype, ...] | None = None
) -> CanRun:
    """A ``can_run`` from a device check (why the backend cannot run on a device, or None) and the dtypes it runs
    (None: every floating dtype)."""

    def can_run(device: torch.device, dtype: torch.dtype) -> str | None:
        why = None if unavailable is None else unavailable(device)
        if why is not None:
            return f"is not available on {device.type}: {why}"
        if dtypes is not None and dtype not in dtypes:
            return f"runs {', '.join(str(d).removeprefix('torch.') for d in dtypes)}, got {dtype}"
        return None

    return can_run


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", None, None, _checks()),
    "eager": Backend("eager", eager.msda_forward, eager.msda_backward, _checks()),
    "native": Backend(
        "native", native.msda_native_forward, native.msda_native_backward, _checks(native.unavailable_reason)
    ),
    "compiled": Backend(
        "compiled",
        compiled.msda_compiled_forward,
        compiled.msda_compiled_backward,
        _checks(compiled.unavailable_reason),
    ),
    "triton": Backend(
        "triton",
        triton.msda_triton_forward,
        triton.msda_triton_backward,
        _checks(triton.unavailable_reason, triton.DTYPES),
    ),
}
