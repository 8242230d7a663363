"""FLOP formulas: MSDA's ops, and the attention kernels ``torch.utils.flop_counter`` leaves uncounted.

``FlopCounterMode`` counts an op only if it has a formula. Torch ships formulas for the CUDA attention kernels
but not for the one ``F.scaled_dot_product_attention`` runs on CPU (``_scaled_dot_product_flash_attention_for_cpu``)
nor for the XPU/out-of-tree and MPS ones, so without these registrations global attention costs nothing on CPU,
and a count on CPU disagrees with one on the meta device (where SDPA decomposes into counted matmuls). They are
registered when this module is imported, which ``import dilateformer`` does, and a target that already has a
formula (a newer torch's own) is left alone.

Unit: torch's, 2 FLOPs per multiply-add. :func:`fvcore_handles` gives the same counts to ``fvcore``, whose unit
is one multiply-add.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import flop_counter

from dilateformer.ops import library  # noqa: F401  (defines torch.ops.dilateformer.*)

__all__ = ["attention_backward_flops", "attention_flops", "fvcore_handles", "msda_backward_flops", "msda_flops"]

Shape = Sequence[int]


def msda_flops(q_shape: Shape, kernel_size: int) -> int:
    """Forward FLOPs of MSDA's two products (q.k and p.v) for ``q_shape = (B, H, W, heads, head_dim)``."""
    batch, height, width, heads, head_dim = q_shape
    return 2 * 2 * batch * height * width * heads * head_dim * kernel_size * kernel_size


def msda_backward_flops(q_shape: Shape, kernel_size: int) -> int:
    """Backward FLOPs: the recomputed logits and dp, dq, dk, dv are one product each, 5 against the forward's 2."""
    return msda_flops(q_shape, kernel_size) * 5 // 2


def _pairs(q_shape: Shape, k_shape: Shape) -> int:
    """Query-key pairs of ``(B, heads, N, d)`` attention; k may have fewer heads (grouped-query attention)."""
    *lead, queries, _ = q_shape
    keys = k_shape[-2]
    pairs = queries * keys
    for n in lead:
        pairs *= n
    return pairs


def attention_flops(q_shape: Shape, k_shape: Shape, v_shape: Shape) -> int:
    """Forward FLOPs of softmax attention, ``softmax(q @ k^T) @ v``: the two matmuls."""
    return 2 * _pairs(q_shape, k_shape) * (q_shape[-1] + v_shape[-1])


def attention_backward_flops(q_shape: Shape, k_shape: Shape, v_shape: Shape) -> int:
    """Backward FLOPs of a fused attention kernel: ``q @ k^T`` recomputed, then dp, dv, dq and dk."""
    return 2 * _pairs(q_shape, k_shape) * (3 * q_shape[-1] + 2 * v_shape[-1])


def _register(targets: Sequence[Any], formula: Callable[..., int]) -> None:
    # A target that already has a formula is skipped: a newer torch's own (the one to trust) or ours, on
    # importlib.reload; registering one twice raises.
    targets = [t for t in targets if t not in flop_counter.flop_registry]
    if targets:
        flop_counter.register_flop_formula(targets)(formula)


def _aten(*names: str) -> list[Any]:
    return [getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n)]  # older builds lack some


def _msda_forward(q_shape, k_shape, v_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    return msda_flops(q_shape, kernel_size)


def _msda_backward(grad_shape, q_shape, k_shape, v_shape, out, lse, kernel_size, *args, **kwargs) -> int:
    return msda_backward_flops(q_shape, kernel_size)


def _sdpa_forward(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(q_shape, k_shape, v_shape)


def _sdpa_backward(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_backward_flops(q_shape, k_shape, v_shape)


_register([torch.ops.dilateformer.msda_forward], _msda_forward)
_register([torch.ops.dilateformer.msda_backward], _msda_backward)
# Every variant takes (q, k, v, ...) forward and (grad_out, q, k, v, ...) backward.
_register(
    _aten(
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
        "_scaled_dot_product_attention_math_for_mps",
    ),
    _sdpa_forward,
)
_register(
    _aten(
        "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_fused_attention_overrideable_backward",
    ),
    _sdpa_backward,
)


# ------------------------------------------------------------------------------------------------- fvcore


def _jit_shape(value: Any) -> list[int]:
    sizes = value.type().sizes() if value.isCompleteTensor() else None
    if sizes is None:
        raise ValueError(f"fvcore handle: the traced graph has no static shape for {value.debugName()!r}")
    return sizes


def _fvcore_sdpa(inputs: list[Any], outputs: list[Any]) -> int:
    # (q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return attention_flops(*(_jit_shape(v) for v in inputs[:3])) // 2


def _fvcore_einsum(inputs: list[Any], outputs: list[Any]) -> int:
    # (equation, [operands], path). A product of two operands costs one multiply-add per combination of its
    # indices. fvcore's own count reads numpy's printed einsum_path, rounded to 4 significant digits.
    equation = inputs[0].toIValue().replace(" ", "")
    operands = equation.split("->")[0].split(",")
    if len(operands) != 2 or "." in equation:
        from fvcore.nn.jit_handles import einsum_flop_jit

        return einsum_flop_jit(inputs, outputs)
    sizes: dict[str, int] = {}
    for letters, value in zip(operands, inputs[1].node().inputs(), strict=True):
        for letter, n in zip(letters, _jit_shape(value), strict=True):
            sizes[letter] = max(sizes.get(letter, 1), n)
    macs = 1
    for n in sizes.values():
        macs *= n
    return macs


def fvcore_handles() -> dict[str, Callable[[list[Any], list[Any]], int]]:
    """Handles for ``fvcore.nn.FlopCountAnalysis(model, x).set_op_handle(**fvcore_handles())``.

    fvcore traces the model with ``torch.jit.trace`` and counts multiply-adds per graph node. Under tracing MSDA
    runs as its ATen decomposition, whose two products are matmuls that fvcore counts itself; it has no formula
    for ``aten::scaled_dot_product_attention``, which this supplies in its unit (multiply-adds). fvcore hooks every
    module, and a hook on an attention layer's ``attn_drop`` makes the
    layer compute explicit probabilities, with einsums (MSDA) and matmuls (global attention), so the einsum
    handle here replaces fvcore's for two-operand equations, which it rounds to 4 significant digits.
    """
    return {
        "aten::scaled_dot_product_attention": _fvcore_sdpa,
        "aten::einsum": _fvcore_einsum,
    }
