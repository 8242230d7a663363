"""MSDA as one PyTorch operator: ``torch.ops.dilateformer.msda_forward`` and ``msda_backward``.

Registering the op with ``torch.library`` makes it a single node for autograd, FLOP counters, ``torch.export`` and
``torch.compile(fullgraph=True)``. While exporting, its CompositeImplicitAutograd kernel is the pure-ATen
:func:`~dilateformer.ops.decomposition.msda_decomposed`, which ``ExportedProgram.run_decompositions()`` and
``torch.onnx.export`` substitute, so exported files need no dilateformer to run. The kernels behind it are
the ``impl`` argument's entry of :data:`dilateformer.ops.backends.BACKENDS`, looked up when the kernel runs, and
``impl="auto"`` is resolved then too, from the tensors' device and dtype. So a graph that holds the op
(``torch.export``, ``torch.compile``) holds no backend choice: the same program runs the native kernels on CPU and
the CUDA kernels on a GPU.
"""

from __future__ import annotations

import torch

from dilateformer.ops.backends import BACKENDS, Backend
from dilateformer.ops.context import select_backend
from dilateformer.ops.decomposition import register_export_decomposition
from dilateformer.ops.eager import compute_dtype


def _kernels(impl: str, q: torch.Tensor) -> Backend:
    if impl == "auto":
        impl = select_backend("auto", q.device, q.dtype)
    backend = BACKENDS.get(impl)
    if backend is None or not backend.in_op:
        names = ("auto", *(name for name, b in BACKENDS.items() if b.in_op))
        raise ValueError(f"impl must be one of {names}, got {impl!r}")
    return backend


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
    out, lse = _kernels(impl, q).forward(q, k, v, kernel_size, dilations, scale, border)
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
    grads = _kernels(impl, q).backward(grad_out, q, k, v, out, lse, kernel_size, dilations, scale, border)
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
