"""Which MSDA backend ``backend="auto"`` picks, and the switch that forces one (like torch's sdpa_kernel)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

import torch

from dilateformer.ops.backends import BACKENDS

BACKEND_NAMES = ("auto", *BACKENDS)
AUTO_ORDER = {"cpu": ("native", "eager"), "cuda": ("triton", "compiled", "eager")}
"""Per device type, the backends ``auto`` tries, fastest first (measured by benchmarks/bench_msda.py)."""
_log = logging.getLogger("dilateformer.ops")
_ENV_VAR = "DILATEFORMER_BACKEND"
_state = threading.local()


def _check_name(name: str, argument: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{argument} must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def default_backend() -> str:
    """The backend used where a call says ``backend="auto"``: set by :func:`use_backend`, else by the
    ``DILATEFORMER_BACKEND`` environment variable, else ``"auto"``."""
    forced = getattr(_state, "forced", None)
    if forced is not None:
        return forced
    return _check_name(os.environ.get(_ENV_VAR, "auto"), f"environment variable {_ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one MSDA backend inside the block, for debugging and benchmarking.

    >>> with dilateformer.use_backend("eager"):
    ...     y = model(x)
    """
    _check_name(name, "backend")
    previous = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = previous


def select_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve ``requested`` to a backend that can run tensors of ``device`` and ``dtype``, or raise ValueError
    with the reason if a forced one cannot. ``auto`` logs why it skipped each backend, at DEBUG level on the
    ``dilateformer.ops`` logger."""
    name = default_backend() if requested == "auto" else requested
    if name == "auto":
        # Under an outer torch.compile or torch.export the op stays one opaque node, and the chosen kernels still
        # run inside it.
        for candidate in AUTO_ORDER.get(device.type, ()):
            reason = BACKENDS[candidate].can_run(device, dtype)
            if reason is None:
                return candidate
            _log.debug(
                "backend='auto' skips MSDA backend %r for %s %s tensors: it %s", candidate, device.type, dtype, reason
            )
        return "eager"
    reason = BACKENDS[name].can_run(device, dtype)
    if reason is not None:
        raise ValueError(f"MSDA backend {name!r} {reason}; backend='auto' picks one that runs it")
    return name
