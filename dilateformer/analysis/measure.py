"""The package's one home for measuring: medians, bytes saved for backward, multiply-adds, units, growth exponents.

Benchmarks, the profiler, the demo and the integrations all measure through these helpers and print in their
units: memory in MB (:data:`MB`, 10^6 bytes), compute in GMACs (10^9 multiply-adds, :func:`gmacs`); GFLOPs
(:func:`gflops`, 2 per multiply-add) only where a table is labelled so for readers of tools that print them.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dilateformer.ops  # noqa: F401  (registers the FLOP formulas for MSDA and the CPU attention kernels)

# The units every table, JSON key and figure of the package uses: MB = 10^6 bytes, GMACs = 10^9 multiply-adds.
MB = 1e6
GIGA = 1e9


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


@dataclass(frozen=True)
class SavedBytes:
    """What autograd keeps for backward: ``total`` bytes, of which ``excluded`` belong to the excluded tensors."""

    total: int
    excluded: int

    @property
    def counted(self) -> int:
        """``total - excluded``: with the parameters excluded, the activations, which grow with the input."""
        return self.total - self.excluded


def saved_for_backward(fn: Callable[[], object], *, exclude: Iterable[torch.Tensor] = ()) -> SavedBytes:
    """Bytes of the distinct tensor storages that autograd saves while ``fn()`` builds its graph.

    The package's one saved-bytes count. Each storage counts once (a view of a saved tensor costs nothing extra),
    which is what backward keeps alive; storages shared with a tensor in ``exclude`` (typically
    ``model.parameters()``, which exist whatever the input) are summed apart in ``excluded``. Storages are told
    apart by identity, not address, so the count holds on the ``meta`` device, where every address is 0: a
    weightless meta forward gives the same count as a real one, at no cost.
    """
    excluded_keys = {_storage_key(t)[0] for t in exclude}
    # key -> (bytes, storage): holding each storage until the end means no address is freed and reused meanwhile.
    storages: dict[int, tuple[int, object]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes, owner = _storage_key(t)
        if nbytes >= storages.get(key, (0,))[0]:
            storages[key] = (nbytes, owner)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    total = sum(n for n, _ in storages.values())
    return SavedBytes(total, sum(n for key, (n, _) in storages.items() if key in excluded_keys))


def saved_for_backward_bytes(fn: Callable[[], object], *, exclude: Iterable[torch.Tensor] = ()) -> int:
    """:attr:`SavedBytes.counted` of :func:`saved_for_backward`: bytes saved for backward, less ``exclude``'s."""
    return saved_for_backward(fn, exclude=exclude).counted


def _storage_key(t: torch.Tensor) -> tuple[int, int, object]:
    """``(identity, bytes, owner)`` of the storage behind ``t``."""
    try:
        storage = t.untyped_storage()
    except (NotImplementedError, RuntimeError):  # tensor subclasses without a plain storage: the tensor is its own
        return id(t), t.numel() * t.element_size(), t
    return storage._cdata, storage.nbytes(), storage


def count_macs(model: nn.Module, *inputs: torch.Tensor, on_meta: bool = False) -> int:
    """Multiply-adds of one inference forward, ``model(*inputs)`` in eval mode under ``torch.no_grad``.

    The package's one FLOP count: ``torch.utils.flop_counter.FlopCounterMode``'s total (2 FLOPs per multiply-add)
    halved, with MSDA and the attention kernels counted through :mod:`dilateformer.ops.flops`. :func:`gmacs` gives
    it in GMACs, the unit every table here prints. The count depends on shapes only, so it is the same on any
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


def gmacs(model: nn.Module, *inputs: torch.Tensor, on_meta: bool = False) -> float:
    """:func:`count_macs` in GMACs (billions of multiply-adds), the compute unit every table here prints."""
    return count_macs(model, *inputs, on_meta=on_meta) / GIGA


def gflops(model: nn.Module, *inputs: torch.Tensor, on_meta: bool = False) -> float:
    """Billions of FLOPs, 2 per multiply-add (``2 * gmacs``): only for tables read next to tools that print GFLOPs."""
    return 2 * gmacs(model, *inputs, on_meta=on_meta)


def to_mb(nbytes: float) -> float:
    """Bytes in MB (1 MB = 10^6 bytes), the memory unit every table here prints."""
    return nbytes / MB


def loglog_slope(xs: Sequence[float], ys: Sequence[float | None]) -> float | None:
    """Least-squares slope of log(y) against log(x): the growth exponent, 1 for linear growth, 2 for quadratic.

    Points whose x or y is not positive (or y is None: not measured) are left out; None if fewer than two
    distinct x remain.
    """
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y is not None and y > 0 and x > 0]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


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
