"""MSDA as one PyTorch operator: ``torch.ops.dilateformer.msda_forward`` and ``msda_backward``.

Registering the op with ``torch.library`` makes it a single node for autograd, FLOP counters, ``torch.export`` and
``torch.compile(fullgraph=True)``. While exporting, its CompositeImplicitAutograd kernel is the pure-ATen
:func:`~dilateformer.ops.decomposition.msda_decomposed`, which ``ExportedProgram.run_decompositions()`` and
``torch.onnx.export`` substitute, so exported files need no dilateformer to run. The kernels behind it are
chosen by the ``impl`` argument, from the table that the eager and compiled backends fill in with
:func:`register_impl`. ``impl="auto"`` is resolved when the kernel runs, from the tensors' device, so a graph that
holds the op (``torch.export``, ``torch.compile``) holds no backend choice: the same program runs the native
kernels on CPU and the CUDA kernels on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dilateformer.ops.decomposition import register_export_decomposition
from dilateformer.ops.kernels import compute_dtype

ForwardKernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]
BackwardKernel = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
_IMPLS: dict[str, tuple[ForwardKernel, BackwardKernel]] = {}


def register_impl(name: str, forward: ForwardKernel, backward: BackwardKernel) -> None:
    _IMPLS[name] = (forward, backward)


def _kernels(impl: str, q: torch.Tensor) -> tuple[ForwardKernel, BackwardKernel]:
    if impl == "auto":
        from dilateformer.ops.context import select_backend  # the backends import this module

        impl = select_backend("auto", q.device, q.dtype)
    return _IMPLS[impl]


@torch.library.custom_op("dilateformer::msda_forward", mutates_args=())
def msda_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilations: list[int],
    scale: float,
    border: str,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _kernels(impl, q)[0](q, k, v, kernel_size, dilations, scale, border)
    return out.to(q.dtype), lse


@msda_forward.register_fake
def _(q, k, v, kernel_size, dilations, scale, border, impl):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=compute_dtype(q.dtype))


@torch.library.custom_op("dilateformer::msda_backward", mutates_args=())
def msda_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
    dilations: list[int],
    scale: float,
    border: str,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _kernels(impl, q)[1](grad_out, q, k, v, out, lse, kernel_size, dilations, scale, border)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v), strict=True))


@msda_backward.register_fake
def _(grad_out, q, k, v, out, lse, kernel_size, dilations, scale, border, impl):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kernel_size, dilations, scale, border, impl = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.config = (kernel_size, dilations, scale, border, impl)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = msda_backward(grad_out.contiguous(), q, k, v, out, lse, *ctx.config)
    return grad_q, grad_k, grad_v, None, None, None, None, None


msda_forward.register_autograd(_backward, setup_context=_setup_context)
register_export_decomposition(torch.ops.dilateformer.msda_forward.default)
