"""Autocast state capture for custom autograd Functions that run on any device type."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast_state(device_type: str) -> dict[str, Any]:
    """The autocast state of ``device_type`` now, as ``torch.autocast`` keyword arguments.

    A Function's backward runs on autograd's thread, outside the forward's autocast region. Re-entering this state
    there makes the backward's ops see the dtypes the forward's did, which ``torch.amp.custom_fwd``/``custom_bwd``
    do too, but for a single device type fixed at decoration time.
    """
    if not torch.amp.is_autocast_available(device_type):
        return {"device_type": device_type, "enabled": False}
    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
        "cache_enabled": torch.is_autocast_cache_enabled(),
    }


def autocast_region(state: dict[str, Any]) -> contextlib.AbstractContextManager:
    """Re-enter an :func:`autocast_state` in a backward. Where it was off, nothing is entered: ``torch.autocast``
    refuses device types it does not know (``meta``, on which saved bytes and FLOPs are counted) even disabled."""
    return torch.autocast(**state) if state["enabled"] else contextlib.nullcontext()
