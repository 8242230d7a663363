"""The reference backend: MSDA written out in full, the oracle every other backend is tested against.

It gathers each query's k x k dilated neighbourhood of keys and values (the "unfold"), so it holds k*k copies of
K and V. Autograd differentiates it directly: there is no hand-written backward here to be wrong.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dilateformer.ops.eager import compute_dtype
from dilateformer.ops.neighborhood import head_groups, window_table


def msda_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int,
    dilations: tuple[int, ...],
    scale: float,
    border: str,
    *,
    probs_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """MSDA by explicit neighbourhood gather.

    ``probs_transform``, if given, receives the attention probabilities of all heads, shaped
    ``(B, H, W, heads, k, k)`` (query position, head, window slot), and returns the tensor used in their place:
    the hook for attention dropout and for reading the attention maps out.
    """
    batch, height, width, num_heads, head_dim = q.shape
    input_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    groups = head_groups(num_heads, dilations)
    all_probs, all_values = [], []
    for heads, dilation in groups:
        rows, rows_valid = window_table(height, kernel_size, dilation, border, q.device)
        cols, cols_valid = window_table(width, kernel_size, dilation, border, q.device)
        # (H, W, k, k) index grids: query (y, x), slot (a, b) -> key (rows[y, a], cols[x, b]).
        key_rows = rows[:, None, :, None]
        key_cols = cols[None, :, None, :]
        valid = rows_valid[:, None, :, None] & cols_valid[None, :, None, :]
        keys = k[:, key_rows, key_cols, heads]  # (B, H, W, k, k, h, d)
        values = v[:, key_rows, key_cols, heads]
        logits = torch.einsum("nyxhd,nyxijhd->nyxhij", q[..., heads, :], keys) * scale
        mask = valid[None, :, :, None]  # broadcast over batch and heads
        if border == "zero":
            # Outside the image a key is a zero vector: logit 0, value 0, still part of the softmax.
            logits = torch.where(mask, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
            values = values * valid[None, :, :, :, :, None, None].to(values.dtype)
        else:
            logits = logits.masked_fill(~mask, float("-inf"))
        all_probs.append(logits.flatten(-2).softmax(-1).view_as(logits))
        all_values.append(values)
    probs = torch.cat(all_probs, dim=3)
    if probs_transform is not None:
        probs = probs_transform(probs)
    outputs = [
        torch.einsum("nyxhij,nyxijhd->nyxhd", probs[..., heads, :, :], values)
        for (heads, _), values in zip(groups, all_values, strict=True)
    ]
    return torch.cat(outputs, dim=3).to(input_dtype)
