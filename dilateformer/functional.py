"""The MSDA op: one function, validated at the boundary, dispatched to the fastest backend that can run it."""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from dilateformer.ops.context import BACKEND_NAMES, default_backend, select_backend, use_backend
from dilateformer.ops.decomposition import msda_decomposed
from dilateformer.ops.neighborhood import BORDERS
from dilateformer.ops.reference import msda_reference

__all__ = ["multi_scale_dilated_attention", "use_backend", "BACKEND_NAMES", "BORDERS"]


def _is_int(value) -> bool:
    # numbers.Integral: numpy integers (e.g. from np.array([1, 2, 3])) are ints too.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_kernel_size(kernel_size) -> int:
    if not _is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
    return kernel_size


def check_dilations(dilations) -> tuple[int, ...]:
    if _is_int(dilations):
        dilations = (dilations,)
    if isinstance(dilations, np.ndarray) and dilations.ndim == 1:
        dilations = dilations.tolist()
    if not isinstance(dilations, Sequence) or isinstance(dilations, str):
        raise TypeError(f"dilations must be a sequence of ints, got {type(dilations).__name__}")
    if len(dilations) == 0:
        raise ValueError("dilations must name at least one dilation rate, got an empty sequence")
    for d in dilations:
        if not _is_int(d):
            raise TypeError(f"every dilation must be an int, got {d!r} in dilations={tuple(dilations)!r}")
        if d < 1:
            raise ValueError(f"every dilation must be >= 1, got {d} in dilations={tuple(dilations)!r}")
    return tuple(int(d) for d in dilations)


def check_border(border) -> str:
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    return border


def check_heads_divisible(num_heads: int, dilations: tuple[int, ...], what: str = "heads") -> None:
    if num_heads % len(dilations) != 0:
        raise ValueError(
            f"{what} {num_heads} cannot be split into {len(dilations)} equal dilation groups "
            f"(dilations={dilations}); use a head count divisible by {len(dilations)}"
        )


_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_tensors(q, k, v) -> None:
    if q.dim() != 5:
        raise ValueError(f"q must be 5-D (batch, height, width, heads, head_dim), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if not q.is_floating_point():
        raise TypeError(f"q, k and v must be floating point, got {q.dtype}")


def _autocast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast MSDA runs in the autocast dtype, as matmul and SDPA do (still accumulating in float32)."""
    device_type = q.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.dtype in _AUTOCAST_DTYPES else t for t in (q, k, v))


@contextlib.contextmanager
def quiet_at_trace_time() -> Iterator[None]:
    """Under torch.jit.trace sizes are traced tensors, and each check on them warns that the trace keeps its
    verdict as a constant. That is intended: the checks hold for the traced input and compute nothing.

    Also a decorator, for input checks of layers and models."""
    if not torch.jit.is_tracing():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def multi_scale_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int = 3,
    dilations: Sequence[int] = (1, 2, 3),
    *,
    scale: float | None = None,
    border: str = "zero",
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-Scale Dilated Attention (Jiao et al., DilateFormer, IEEE TMM 2023).

    Every query attends to a ``kernel_size x kernel_size`` window of keys around it, sampled with a dilation that
    depends on the query's head group. Cost and memory are O(H * W * kernel_size**2), not O((H * W)**2).

    Args:
        q, k, v: ``(batch, height, width, heads, head_dim)``, heads-last (NATTEN's layout), same shape, dtype and
            device. Half-precision inputs are accumulated in float32. Under ``torch.autocast`` float32 and half
            inputs run in the autocast dtype.
        kernel_size: odd window size k >= 1.
        dilations: one dilation rate per head group. The heads are split into ``len(dilations)`` contiguous,
            equal groups; group i samples its window with stride ``dilations[i]``.
        scale: logit scale, default ``head_dim ** -0.5``.
        border: ``"zero"`` (default, the official DilateFormer behaviour the released weights were trained with):
            window positions outside the image are zero keys and values, which still take part in the softmax
            with logit 0. ``"clamp"`` (the NATTEN/DiNAT convention): the window slides inward at the borders so
            every query sees k*k real keys of its own dilation sub-grid (the whole sub-grid where it is shorter).
        backend: ``"auto"`` picks the fastest backend for the tensors' device when the kernel runs (``"native"``
            on CPU, ``"triton"`` on CUDA, ``"compiled"`` for CUDA float64, ``"eager"`` where none can run), so
            traced and exported graphs carry no backend choice. A name from ``BACKEND_NAMES`` forces one (so does
            :func:`dilateformer.use_backend`), and a forced backend that cannot run raises ValueError.

    Returns:
        A tensor of q's shape and dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    q, k, v = _autocast(q, k, v)
    with quiet_at_trace_time():
        _check_tensors(q, k, v)
        kernel_size = check_kernel_size(kernel_size)
        dilations = check_dilations(dilations)
        border = check_border(border)
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        num_heads, head_dim = q.shape[3], q.shape[4]
        check_heads_divisible(num_heads, dilations, what="q's heads (dim 3)")
        if scale is None:
            scale = float(head_dim**-0.5)
        elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        empty = bool(q.numel() == 0)
    if empty:
        # Empty batch (or zero-width image): nothing to attend to, and still differentiable.
        return q * 0 + k.sum() * 0 + v.sum() * 0
    if torch.jit.is_tracing():
        # A TorchScript trace (torch.onnx.export(dynamo=False), OpenVINO, YOLO's torchscript export) cannot hold
        # the custom op and stay loadable without dilateformer: trace the pure-ATen form instead.
        out, _ = msda_decomposed(q, k, v, kernel_size, list(dilations), float(scale), border)
        return out
    requested = default_backend() if backend == "auto" else backend
    # "auto" is resolved inside the op when it runs, so a traced or exported graph carries no backend choice.
    name = requested if requested == "auto" else select_backend(requested, q.device, q.dtype)
    if name == "reference":
        return msda_reference(q, k, v, kernel_size, dilations, float(scale), border)
    out, _ = torch.ops.dilateformer.msda_forward(q, k, v, kernel_size, list(dilations), float(scale), border, name)
    return out
