"""Which MSDA backend ``backend="auto"`` picks, and the switch that forces one (like torch's sdpa_kernel)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

from dilateformer.ops import BACKENDS

BACKEND_NAMES = ("auto", *BACKENDS)
AUTO_ORDER = {"cpu": ("native", "eager"), "cuda": ("triton", "compiled", "eager")}
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
    """Resolve ``requested`` to a concrete backend, or raise if a forced one cannot run here."""
    name = default_backend() if requested == "auto" else requested
    if name == "auto":
        # Fastest first, measured by benchmarks/bench_msda.py. Under an outer torch.compile or torch.export the
        # op stays one opaque node, and the chosen kernels still run inside it.
        for candidate in AUTO_ORDER.get(device.type, ()):
            if _runs_dtype(candidate, dtype) and BACKENDS[candidate].unavailable_reason(device) is None:
                return candidate
        return "eager"
    reason = BACKENDS[name].unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"MSDA backend {name!r} is not available on {device.type}: {reason}")
    if not _runs_dtype(name, dtype):
        supported = ", ".join(str(d).removeprefix("torch.") for d in BACKENDS[name].dtypes or ())
        raise ValueError(f"MSDA backend {name!r} runs {supported}, got {dtype}; backend='auto' picks one that runs it")
    return name


def _runs_dtype(name: str, dtype: torch.dtype) -> bool:
    dtypes = BACKENDS[name].dtypes
    return dtypes is None or dtype in dtypes
