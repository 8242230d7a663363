"""Where each query's dilated window lands, one image axis at a time.

Every backend agrees on the window through these tables. MSDA's window is separable: the key for query (y, x)
at slot (a, b) sits at (rows[y, a], cols[x, b]), so one table per axis describes the whole 2-D window.
"""

from __future__ import annotations

import functools

import torch

BORDERS = ("zero", "clamp")


@functools.lru_cache(maxsize=256)
def _window_table_cpu(length: int, kernel_size: int, dilation: int, border: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached across calls, so never an inference tensor: one made under inference_mode could not be saved for a
    # later backward.
    with torch.inference_mode(False):
        return _build_window_table(length, kernel_size, dilation, border)


def _build_window_table(
    length, kernel_size: int, dilation: int, border: str, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    # Tensor arithmetic on ``length`` only, so it may also be a symbolic size (torch.export) or a traced one
    # (torch.jit.trace): the decomposition builds its tables here and they stay dynamic in the exported graph.
    radius = (kernel_size - 1) // 2
    query = torch.arange(length, device=device).unsqueeze(1)
    slot = torch.arange(kernel_size, device=device).unsqueeze(0)
    if border == "zero":
        position = query + (slot - radius) * dilation
        valid = (position >= 0) & (position < length)
        return position.clamp(0, length - 1), valid
    # clamp: stay on the query's dilation sub-grid and slide the window inward at the borders.
    residue = query % dilation
    grid_len = (length - residue + dilation - 1) // dilation
    grid_pos = query // dilation
    start = torch.minimum((grid_pos - radius).clamp(min=0), (grid_len - kernel_size).clamp(min=0))
    grid_index = start + slot
    valid = grid_index < grid_len
    position = residue + torch.minimum(grid_index, grid_len - 1) * dilation
    return position, valid  # (length, kernel_size): grid_index broadcasts the query column over the slots


def window_table(
    length: int, kernel_size: int, dilation: int, border: str, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key coordinates along one axis for every query coordinate and window slot.

    Returns ``(position, valid)``, both of shape ``(length, kernel_size)``. ``position`` is always inside
    ``[0, length)`` so it can be used to index; ``valid`` is False where the window slot lies outside the image
    (``border="zero"``: that key counts as a zero vector) or outside a sub-grid shorter than the kernel
    (``border="clamp"``: that slot is excluded from the softmax).
    """
    position, valid = _window_table_cpu(length, kernel_size, dilation, border)
    return position.to(device), valid.to(device)


def head_groups(num_heads: int, dilations: tuple[int, ...]) -> list[tuple[slice, int]]:
    """The contiguous head slice and dilation of each group."""
    per_group = num_heads // len(dilations)
    return [(slice(i * per_group, (i + 1) * per_group), d) for i, d in enumerate(dilations)]
