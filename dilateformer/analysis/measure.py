"""Measuring helpers shared by the benchmarks, the profiler and the demo: medians, saved bytes, multiply-adds."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dilateformer.ops  # noqa: F401  (registers the FLOP formulas for MSDA and the CPU attention kernels)


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], repeats: int = 10, warmup: int = 2, device=None) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved_median_ms(fns: Sequence[Callable[[], object]], repeats: int = 10, warmup: int = 2) -> list[float]:
    """Median wall time of each ``fn()`` in milliseconds, timed in rounds that call every fn once in turn.

    On a shared machine whose speed drifts, interleaving slows every candidate alike, so ratios between them hold
    where back-to-back runs of one candidate after another would not.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, own in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            own.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(own) for own in times]


def saved_for_backward_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct tensor storages that autograd saves while ``fn()`` builds its graph.

    Counts each storage once (a view of a saved tensor costs nothing extra), which is what backward keeps alive.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        except (NotImplementedError, RuntimeError):  # tensor subclasses without a plain storage
            storages[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def count_macs(model: nn.Module, *inputs: torch.Tensor, on_meta: bool = False) -> int:
    """Multiply-adds of one inference forward, ``model(*inputs)`` in eval mode under ``torch.no_grad``.

    The package's one FLOP count: ``torch.utils.flop_counter.FlopCounterMode``'s total (2 FLOPs per multiply-add)
    halved, with MSDA and the attention kernels counted through :mod:`dilateformer.ops.flops`. Divide by ``1e9``
    for GMACs, the unit every table here prints. The count depends on shapes only, so it is the same on any
    device; ``on_meta=True`` counts a weightless copy of the model on the ``meta`` device, which does no
    arithmetic and so costs milliseconds at any input size (the inputs only lend their shapes and dtypes).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError(f"inputs must be one or more tensors, got {[type(x).__name__ for x in inputs]}")
    if on_meta:
        model = copy.deepcopy(model).to("meta")
        inputs = tuple(torch.empty_like(x, device="meta") for x in inputs)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(training)
    return counter.get_total_flops() // 2


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain aligned text table: text left-aligned, numbers right-aligned."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) if rows else False for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)]).rstrip()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
