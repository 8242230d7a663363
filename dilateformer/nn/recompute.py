"""Autograd Functions that save less for backward by recomputing cheap elementwise ops there.

Autograd keeps every intermediate that a later op's backward reads: after ``norm -> linear``, both the norm's input
(for the norm's backward) and its output (for the linear's weight gradient). Each Function here keeps only the
input of its chain and recomputes the rest in backward, one memory-bound elementwise pass instead of a stored
activation:

- :func:`gelu_mlp`: an optional LayerNorm, then fc1 -> GELU -> fc2; keeps the input and fc1's output.
- :func:`batch_norm_gelu`: training-mode BatchNorm then GELU; keeps the BatchNorm input and its batch statistics.

Results equal the plain ops' (the forward runs the same kernels); gradients equal them to rounding.

Autocast-correct on every device: the backward runs under the autocast state the forward ran under (what
``torch.amp.custom_bwd`` does for one fixed device type), so its matmuls see the dtypes the forward's did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dilateformer.nn.amp import autocast_region, autocast_state
from dilateformer.nn.linear import linear, runs_own_forward

__all__ = ["gelu_mlp", "batch_norm_gelu", "batch_norm_gelu_applies"]


class _GeluMlpFunction(torch.autograd.Function):
    """[LayerNorm ->] fc1 -> GELU -> fc2 that keeps only the input and fc1's output for backward.

    Autograd would also keep GELU's output (4C per position, for fc2's weight gradient) and, with the norm, the
    norm's output (C per position, for fc1's weight gradient); recomputing both in backward cuts the saved
    activations from 10C to 5C per position.
    """

    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, norm_weight, norm_bias, norm_eps):
        ctx.autocast = autocast_state(x.device.type)
        ctx.approximate = approximate
        ctx.has_bias = (fc1_bias is not None, fc2_bias is not None)
        ctx.norm_eps = norm_eps
        normed = x if norm_eps is None else F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, norm_eps)
        # Autograd is off in here, so float32 CPU matmuls may take oneDNN's kernels (up to 6% faster fwd + bwd at
        # stage 3); not under autocast, which would not see them.
        matmul = F.linear if ctx.autocast["enabled"] else linear
        hidden = matmul(normed, fc1_weight, fc1_bias)
        ctx.save_for_backward(x, fc1_weight, fc2_weight, hidden, norm_weight, norm_bias)
        return matmul(F.gelu(hidden, approximate=approximate), fc2_weight, fc2_bias)

    @staticmethod
    def backward(ctx, grad_out):
        with autocast_region(ctx.autocast):
            return _GeluMlpFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, fc1_weight, fc2_weight, hidden, norm_weight, norm_bias = ctx.saved_tensors
        if ctx.norm_eps is None:
            normed = x
        else:  # the forward's kernel again, so the recomputed output (and its statistics) are the forward's bits
            normed, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, ctx.norm_eps)
        act = F.gelu(hidden, approximate=ctx.approximate)
        grad_out2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_fc2_weight = grad_out2d.t() @ act.reshape(-1, act.shape[-1])
        grad_fc2_bias = grad_out2d.sum(0) if ctx.has_bias[1] else None
        grad_hidden = torch.ops.aten.gelu_backward(grad_out @ fc2_weight, hidden, approximate=ctx.approximate)
        grad_hidden2d = grad_hidden.reshape(-1, grad_hidden.shape[-1])
        grad_fc1_weight = grad_hidden2d.t() @ normed.reshape(-1, normed.shape[-1])
        grad_fc1_bias = grad_hidden2d.sum(0) if ctx.has_bias[0] else None
        needs_x = ctx.needs_input_grad[0]
        grad_normed = grad_hidden @ fc1_weight if needs_x or ctx.norm_eps is not None else None
        grads = (grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias, None)
        if ctx.norm_eps is None:
            return grad_normed, *grads, None, None, None
        grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
            grad_normed.to(normed.dtype),  # under autocast the matmul's gradient has its lower dtype
            x,
            x.shape[-1:],
            mean,
            rstd,
            norm_weight,
            norm_bias,
            [needs_x, ctx.needs_input_grad[6], ctx.needs_input_grad[7]],
        )
        return grad_x, *grads, grad_norm_weight, grad_norm_bias, None


def gelu_mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    approximate: str = "none",
    norm: nn.LayerNorm | None = None,
) -> torch.Tensor:
    """``fc2(GELU(fc1(norm(x))))`` (``norm`` skipped if None) that saves only ``x`` and fc1's output for backward.

    ``norm`` must be a LayerNorm over the last dimension; its output and GELU's are recomputed in backward.
    """
    if norm is None:
        return _GeluMlpFunction.apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, None, None, None)
    if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (x.shape[-1],):
        raise ValueError(f"norm must be an nn.LayerNorm over the last dimension ({x.shape[-1]}), got {norm!r}")
    return _GeluMlpFunction.apply(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, norm.weight, norm.bias, norm.eps
    )


class _BatchNormGeluFunction(torch.autograd.Function):
    """Training-mode BatchNorm then GELU that keeps only the BatchNorm input and its batch statistics.

    Autograd would keep the BatchNorm output too (GELU's backward reads it): one more activation of the input's
    size, which in the conv stem is a full-resolution map.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, approximate):
        ctx.autocast = autocast_state(x.device.type)
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps, ctx.approximate = eps, approximate
        return F.gelu(out, approximate=approximate)

    @staticmethod
    def backward(ctx, grad_out):
        with autocast_region(ctx.autocast):
            x, weight, bias, mean, invstd = ctx.saved_tensors
            shape = (1, -1) + (1,) * (x.dim() - 2)
            scale = invstd * weight
            # In the forward's dtype: under autocast x may be of a lower dtype than the statistics and weights.
            out = torch.addcmul((bias - mean * scale).view(shape), x, scale.view(shape)).to(x.dtype)
            grad_bn = torch.ops.aten.gelu_backward(grad_out.to(x.dtype), out, approximate=ctx.approximate)
            grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad_bn, x, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3])
            )
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def batch_norm_gelu_applies(norm: nn.Module, act: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`batch_norm_gelu` may stand in for ``act(norm(x))``: a plain, unhooked, affine BatchNorm in
    training mode with running statistics, a plain GELU, and a gradient to compute, outside a compiler (which
    recomputes elementwise ops on its own)."""
    return (
        type(norm) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        and runs_own_forward(norm, type(norm))
        and runs_own_forward(act, nn.GELU)
        and norm.training
        and norm.affine
        and norm.track_running_stats
        and torch.is_grad_enabled()
        and (x.requires_grad or norm.weight.requires_grad or norm.bias.requires_grad)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and x.shape[0] * x[0, 0].numel() > 1  # nn.BatchNorm's own error for one value per channel
    )


def batch_norm_gelu(norm: nn.modules.batchnorm._BatchNorm, act: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    """``act(norm(x))`` for a training-mode BatchNorm (see :func:`batch_norm_gelu_applies`), updating its running
    statistics as ``norm(x)`` would, that saves only ``x`` and the batch statistics for backward."""
    assert norm.running_mean is not None and norm.running_var is not None and norm.num_batches_tracked is not None
    norm.num_batches_tracked.add_(1)
    momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    return _BatchNormGeluFunction.apply(
        x, norm.weight, norm.bias, norm.running_mean, norm.running_var, momentum, norm.eps, act.approximate
    )
