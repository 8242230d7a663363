"""Where a model's time goes, by wall clock: every op of a step, replayed alone at its real shapes, by category.

:func:`record_ops` runs a step once under a dispatch mode that only writes down each op and the shapes, strides
and dtypes of its arguments (no timing happens under the mode, whose per-op Python cost would distort it).
:func:`time_ops` then replays every distinct op on fresh tensors of those layouts and takes the median of its
wall time; ops with the same signature (the blocks of a stage) are timed once and counted as often as they ran.
The sum of a category is what its ops cost as bare kernels, and the sum of all categories is the model's
*attainable floor*: the step's time if nothing between the ops (allocation, cache misses across ops, Python,
autograd) cost anything. The gap between that sum and the measured step is reported, not hidden.

torch.profiler is not used: it adds per-op overhead and changes compiled timings.

:func:`sgemm_gflops` is the reference rate: a square float32 matmul, the best case of the GEMM library.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

import dilateformer.ops  # noqa: F401  (registers the FLOP formulas of the MSDA ops)

__all__ = [
    "CATEGORIES",
    "OpRecord",
    "OpTiming",
    "record_ops",
    "time_ops",
    "category_totals",
    "categorize",
    "sgemm_gflops",
    "sgemm_step",
]

CATEGORIES = (
    "MSDA",
    "GEMM",
    "global attention (SDPA)",
    "depthwise convs",
    "dense convs",
    "norms",
    "elementwise & copies",
    "optimizer",
)
_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_linear_pointwise"}
_CONVS = {"convolution", "convolution_backward", "mkldnn_convolution", "_convolution"}
_NORMS = {
    "native_layer_norm",
    "native_layer_norm_backward",
    "native_batch_norm",
    "native_batch_norm_backward",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training",
}
SGEMM_SIZE = 2048


@dataclass(frozen=True)
class _TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    # Integer and bool tensors (targets, indices, flags) keep their values: random ones may be invalid.
    value: torch.Tensor | None = field(default=None, compare=False, hash=False)
    value_key: tuple | None = None


@dataclass(frozen=True)
class OpRecord:
    """One op of a recorded step: the op, its argument layouts, and the phase it ran in."""

    func: Any
    args: tuple
    kwargs: tuple
    phase: str  # "step" or "optimizer"

    @property
    def name(self) -> str:
        return self.func._schema.name.split("::")[-1]

    @property
    def namespace(self) -> str:
        return self.func._schema.name.split("::")[0]


@dataclass
class OpTiming:
    """A distinct op signature: how often the step ran it, its fastest ms per call, FLOPs per call, category."""

    record: OpRecord
    count: int
    ms: float
    flops: int
    category: str

    @property
    def total_ms(self) -> float:
        return self.count * self.ms


def _spec(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    keep = not (value.is_floating_point() or value.is_complex())
    kept = value.detach().clone() if keep else None
    return _TensorSpec(
        tuple(value.shape),
        tuple(value.stride()),
        value.storage_offset(),
        value.dtype,
        kept,
        tuple(kept.flatten().tolist()) if kept is not None and kept.numel() <= 64 else None,
    )


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[OpRecord] = []
        self.phase = "step"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.records.append(
            OpRecord(
                func, tuple(tree_map(_spec, list(args))), tuple(sorted(tree_map(_spec, kwargs).items())), self.phase
            )
        )
        return func(*args, **kwargs)


def record_ops(step: Callable[[], object], optimizer_step: Callable[[], object] | None = None) -> list[OpRecord]:
    """The ops that ``step()`` (then ``optimizer_step()``, whose ops are the ``"optimizer"`` phase) dispatch.

    Paths that stand aside under a dispatch mode (the oneDNN inference linears of :mod:`dilateformer.nn.linear`)
    record their plain aten equivalent.
    """
    recorder = _Recorder()
    with recorder:
        step()
        if optimizer_step is not None:
            recorder.phase = "optimizer"
            optimizer_step()
    return recorder.records


def categorize(record: OpRecord) -> str:
    """The :data:`CATEGORIES` entry of one op."""
    if record.phase == "optimizer":
        return "optimizer"
    if record.namespace == "dilateformer":
        return "MSDA"
    name = record.name
    if name in _GEMMS:
        return "GEMM"
    if "scaled_dot_product" in name:
        return "global attention (SDPA)"
    if name in _CONVS:
        groups = _conv_groups(record)
        return "depthwise convs" if groups > 1 else "dense convs"
    if name in _NORMS:
        return "norms"
    return "elementwise & copies"


def _conv_groups(record: OpRecord) -> int:
    args = record.args
    # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    # convolution_backward(grad, input, weight, bias_sizes, stride, padding, dilation, transposed, out_pad, groups,
    #                      output_mask)
    index = 9 if record.name == "convolution_backward" else 8
    return int(args[index]) if len(args) > index else 1


def _grouped_conv_backward_flops(record: OpRecord) -> int:
    # torch's FLOP formula for convolution_backward transposes the weight's shape, which for a grouped conv counts
    # every group against every channel (x groups). Each requested gradient costs what the forward does.
    grad, weight, mask = record.args[0], record.args[2], record.args[10]
    forward = 2 * math.prod(grad.shape) * math.prod(weight.shape[1:])
    return forward * (int(mask[0]) + int(mask[1]))


def _materialize(value: Any, generator: torch.Generator) -> Any:
    if isinstance(value, list):
        return [_materialize(v, generator) for v in value]
    if isinstance(value, tuple):
        return tuple(_materialize(v, generator) for v in value)
    if not isinstance(value, _TensorSpec):
        return value
    if value.value is not None:
        return value.value.clone()
    extent = value.offset + 1 + sum((n - 1) * s for n, s in zip(value.shape, value.stride, strict=True) if n > 0)
    if 0 in value.shape:
        extent = value.offset
    base = torch.randn(max(extent, 1), generator=generator, dtype=torch.float32).to(value.dtype)
    return base.as_strided(value.shape, value.stride, value.offset)


def _key(record: OpRecord) -> tuple:
    return (record.func, _hashable(record.args), _hashable(record.kwargs), record.phase)


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, torch.dtype | torch.device | torch.memory_format | torch.layout):
        return str(value)
    return value


def time_ops(
    records: Sequence[OpRecord], repeats: int = 5, warmup: int = 1, min_seconds: float = 0.05
) -> tuple[list[OpTiming], int]:
    """Each distinct op of ``records`` timed alone on fresh random tensors: the fastest of at least ``repeats``
    calls, and of more (up to 200) for an op whose calls take less than ``min_seconds`` in all. The fastest call
    is the op's own floor, which is what the sum of bare ops is meant to be.

    Returns:
        The timings, most expensive first, and the number of op calls that could not be replayed (their time is
        left out and reported by :func:`category_totals`' callers).
    """
    counts: Counter = Counter()
    first: dict[tuple, OpRecord] = {}
    for record in records:
        key = _key(record)
        counts[key] += 1
        first.setdefault(key, record)
    generator = torch.Generator().manual_seed(0)
    timings, failed = [], 0
    for key, record in first.items():
        args = _materialize(list(record.args), generator)
        kwargs = {k: _materialize(v, generator) for k, v in record.kwargs}
        try:
            with torch.no_grad():
                for _ in range(warmup):
                    record.func(*args, **kwargs)
                times: list[float] = []
                began = time.perf_counter()
                # Small ops are called until they have run for min_seconds, and the fastest call counts: on a
                # shared machine a burst of parallel work can stall the next calls for whole scheduler ticks.
                while len(times) < repeats or (time.perf_counter() - began < min_seconds and len(times) < 200):
                    start = time.perf_counter()
                    record.func(*args, **kwargs)
                    times.append((time.perf_counter() - start) * 1e3)
                with FlopCounterMode(display=False) as counter:
                    record.func(*args, **kwargs)
        except (RuntimeError, ValueError, IndexError, TypeError):
            failed += counts[key]
            continue
        flops = counter.get_total_flops()
        if record.name == "convolution_backward" and _conv_groups(record) > 1:
            flops = _grouped_conv_backward_flops(record)
        timings.append(OpTiming(record, counts[key], min(times), flops, categorize(record)))
    timings.sort(key=lambda t: -t.total_ms)
    return timings, failed


def category_totals(timings: Sequence[OpTiming]) -> dict[str, dict[str, float]]:
    """Per category of :data:`CATEGORIES` (all present, possibly zero): op calls, ms, FLOPs."""
    totals = {c: {"ops": 0, "ms": 0.0, "flops": 0} for c in CATEGORIES}
    for timing in timings:
        total = totals[timing.category]
        total["ops"] += timing.count
        total["ms"] += timing.total_ms
        total["flops"] += timing.count * timing.flops
    return totals


def sgemm_step(size: int = SGEMM_SIZE) -> tuple[Callable[[], None], int]:
    """A square float32 matmul to time next to a model, and its FLOPs (``2 * size**3``)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    out = torch.empty(size, size)

    def step() -> None:
        torch.mm(a, b, out=out)

    return step, 2 * size**3


def sgemm_gflops(repeats: int = 5, warmup: int = 1, size: int = SGEMM_SIZE) -> float:
    """Median GFLOP/s of a ``size`` cubed float32 matmul on this machine, now."""
    step, flops = sgemm_step(size)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times) / 1e9
