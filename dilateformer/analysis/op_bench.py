"""The MSDA op benchmark: this project's backends against the baselines users would otherwise run, in one process.

Baselines:
- ``unfold``: MSDA the way the official DilateFormer code computes it, written independently here: per dilation
  group, ``F.unfold`` makes k*k copies of K and V, then two small matmuls and a softmax. It gets its inputs
  channels-first, as the official qkv conv makes them, so no layout change is timed against it.
- ``sdpa-global``: global attention over all H*W tokens through ``F.scaled_dot_product_attention``.
- ``byte-floor``: the time to move q, k, v and out once (forward) and the twelve tensors of forward plus backward
  once, at the copy bandwidth measured in the same run; its saved-memory column is q+k+v+out, the bound MSDA's
  fused backends are held to.

``run_floor_ratios`` holds one backend to a floor measured in the same interleaved rounds: ``torch.addcmul(q, k, v)``
reads three tensors of the op's size and writes a fresh one, as MSDA's forward must at least; its backward at
least reads three (grad_out, plus q, k, v, or what it saved) and writes three, so forward+backward is held to three
such floors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dilateformer.analysis.baselines import heads_last_to_channels_first, sdpa_global, unfold_msda
from dilateformer.analysis.measure import (
    MB,
    format_table,
    interleaved_median_ms,
    median_ms,
    saved_for_backward_bytes,
    to_mb,
)
from dilateformer.functional import multi_scale_dilated_attention


@dataclass(frozen=True)
class OpShape:
    name: str
    batch: int
    height: int
    width: int
    heads: int
    head_dim: int = 24
    kernel_size: int = 3
    dilations: tuple[int, ...] = (1, 2, 3)

    @property
    def qkv_shape(self) -> tuple[int, int, int, int, int]:
        return (self.batch, self.height, self.width, self.heads, self.head_dim)

    @property
    def tensor_bytes(self) -> int:
        return math.prod(self.qkv_shape) * 4


STANDARD_SHAPES = (
    OpShape("stage1 B8 56x56 3x24", 8, 56, 56, 3),
    OpShape("stage2 B8 28x28 6x24", 8, 28, 28, 6),
    OpShape("highres B2 128x128 3x24", 2, 128, 128, 3),
)


def copy_bandwidth_bytes_per_ms(nbytes: int = 64 * 2**20) -> float:
    """Read+write bandwidth of a plain tensor copy, in bytes per millisecond."""
    src = torch.empty(nbytes // 4)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats=10, warmup=3)
    return 2 * nbytes / ms


def _same_layout(x: torch.Tensor) -> torch.Tensor:
    return x


def candidates(shape: OpShape, backends: tuple[str, ...]) -> dict[str, tuple[Callable, Callable]]:
    """name -> (fn(q, k, v), layout): each implementation gets its inputs in its own layout, made before timing."""
    scale = shape.head_dim**-0.5
    table: dict[str, tuple[Callable, Callable]] = {
        name: (
            lambda q, k, v, name=name: multi_scale_dilated_attention(
                q, k, v, shape.kernel_size, shape.dilations, scale=scale, backend=name
            ),
            _same_layout,
        )
        for name in backends
    }
    table["unfold (official-style)"] = (
        lambda q, k, v: unfold_msda(q, k, v, shape.heads, shape.kernel_size, shape.dilations, scale),
        heads_last_to_channels_first,
    )
    table["sdpa-global"] = (lambda q, k, v: sdpa_global(q, k, v, scale), _same_layout)
    return table


def measure_candidate(fn: Callable, layout: Callable, shape: OpShape, repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (layout(torch.randn(shape.qkv_shape, generator=generator)).requires_grad_() for _ in range(3))

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward():
        out = fn(q, k, v)
        torch.autograd.backward(out, torch.ones_like(out))

    return {
        "forward_ms": median_ms(forward, repeats=repeats, warmup=1),
        "forward_backward_ms": median_ms(forward_backward, repeats=repeats, warmup=1),
        "saved_mb": to_mb(saved_for_backward_bytes(lambda: fn(q, k, v))),
    }


def run_op_benchmark(
    shapes: tuple[OpShape, ...] = STANDARD_SHAPES,
    backends: tuple[str, ...] = ("eager", "native", "compiled"),
    repeats: int = 10,
    global_token_limit: int = 128 * 128,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """One row per (shape, implementation): medians of forward and forward+backward ms, MB saved for backward,
    and speed ratios against the unfold baseline of the same shape."""
    bandwidth = copy_bandwidth_bytes_per_ms()
    rows = []
    for shape in shapes:
        measured = {}
        for name, (fn, layout) in candidates(shape, backends).items():
            if progress:
                progress(f"{shape.name}: {name}")
            if name == "sdpa-global" and shape.height * shape.width > global_token_limit:
                continue
            measured[name] = measure_candidate(fn, layout, shape, repeats)
        measured["byte-floor"] = {
            "forward_ms": 4 * shape.tensor_bytes / bandwidth,
            "forward_backward_ms": 12 * shape.tensor_bytes / bandwidth,
            "saved_mb": to_mb(4 * shape.tensor_bytes),
        }
        baseline = measured["unfold (official-style)"]
        for name, row in measured.items():
            rows.append(
                {
                    "shape": shape.name,
                    "impl": name,
                    **row,
                    "forward_speedup": baseline["forward_ms"] / row["forward_ms"],
                    "forward_backward_speedup": baseline["forward_backward_ms"] / row["forward_backward_ms"],
                    "saved_vs_qkvo": row["saved_mb"] * MB / (4 * shape.tensor_bytes),
                }
            )
    return rows


def run_scaling_sweep(
    sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
    backends: tuple[str, ...] = ("native",),
    batch: int = 1,
    heads: int = 3,
    repeats: int = 5,
    global_token_limit: int = 64 * 64,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Forward ms and MB saved for backward per image size: MSDA grows with H*W, global attention with (H*W)**2."""
    rows = []
    for size in sizes:
        shape = OpShape(f"{size}x{size}", batch, size, size, heads)
        for name, (fn, layout) in candidates(shape, backends).items():
            if name == "sdpa-global" and size * size > global_token_limit:
                continue
            if progress:
                progress(f"sweep {size}x{size}: {name}")
            measured = measure_candidate(fn, layout, shape, repeats)
            rows.append({"size": size, "tokens": size * size, "impl": name, **measured})
    return rows


# Table heading -> row key, in column order.
OP_COLUMNS = {
    "shape": "shape", "impl": "impl", "fwd ms": "forward_ms", "fwd+bwd ms": "forward_backward_ms",
    "saved MB": "saved_mb", "fwd x": "forward_speedup", "fwd+bwd x": "forward_backward_speedup",
    "saved/qkvo": "saved_vs_qkvo",
}  # fmt: skip
FLOOR_COLUMNS = {
    "shape": "shape", "floor ms": "floor_ms", "fwd ms": "forward_ms", "fwd/floor": "forward_vs_floor",
    "fwd+bwd ms": "forward_backward_ms", "fwd+bwd/3 floors": "forward_backward_vs_3_floors", "growth": "growth",
    "floor growth": "floor_growth", "pixels x": "pixel_growth",
}  # fmt: skip


def _rows_table(rows: list[dict], columns: dict[str, str]) -> str:
    return format_table(list(columns), [[row[key] for key in columns.values()] for row in rows])


def format_op_rows(rows: list[dict]) -> str:
    return _rows_table(rows, OP_COLUMNS)


def format_sweep_rows(rows: list[dict]) -> str:
    headers = ["size", "tokens", "impl", "fwd ms", "fwd+bwd ms", "saved MB"]
    body = [[r["size"], r["tokens"], r["impl"], r["forward_ms"], r["forward_backward_ms"], r["saved_mb"]] for r in rows]
    return format_table(headers, body)


FLOOR_SHAPES = (
    OpShape("stage1 B8 56x56 3x24", 8, 56, 56, 3),
    OpShape("B1 256x256 3x24", 1, 256, 256, 3),
    OpShape("B1 512x512 3x24", 1, 512, 512, 3),
)


def _floor_rounds(shape: OpShape, backend: str, repeats: int) -> list[float]:
    """Interleaved medians of the addcmul floor, the forward and the forward+backward (see run_floor_ratios)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape.qkv_shape, generator=generator).requires_grad_() for _ in range(3))
    grad_out = torch.randn(shape.qkv_shape, generator=generator)
    plain = [t.detach() for t in (q, k, v)]
    options = dict(kernel_size=shape.kernel_size, dilations=shape.dilations, backend=backend)

    def forward():
        with torch.no_grad():
            multi_scale_dilated_attention(q, k, v, **options)

    def forward_backward():
        out = multi_scale_dilated_attention(q, k, v, **options)
        torch.autograd.grad(out, (q, k, v), grad_out)

    return interleaved_median_ms([lambda: torch.addcmul(*plain), forward, forward_backward], repeats=repeats, warmup=2)


def run_floor_ratios(
    shapes: tuple[OpShape, ...] = FLOOR_SHAPES,
    backend: str = "native",
    repeats: int = 10,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Per shape, ms of the addcmul floor, of ``backend``'s forward and of its forward+backward through
    ``torch.autograd.grad`` with a fixed upstream gradient (no ``ones_like``, no ``.grad`` accumulation), all three
    timed in interleaved rounds, and their ratios: forward / floor, forward+backward / (3 floors). ``growth`` is
    forward+backward ms over that of the previous shape, for sweeps of growing images, and ``floor_growth`` the same
    for the floor: where the tensors outgrow a cache level (or a larger buffer is mapped afresh each call) the
    floor itself grows faster than the pixels."""
    rows: list[dict] = []
    for shape in shapes:
        if progress:
            progress(f"floor ratios: {shape.name}")
        floor, fwd, fwd_bwd = _floor_rounds(shape, backend, repeats)
        rows.append(
            {
                "shape": shape.name,
                "pixels": shape.batch * shape.height * shape.width,
                "floor_ms": floor,
                "forward_ms": fwd,
                "forward_backward_ms": fwd_bwd,
                "forward_vs_floor": fwd / floor,
                "forward_backward_vs_3_floors": fwd_bwd / (3 * floor),
                "growth": fwd_bwd / rows[-1]["forward_backward_ms"] if rows else float("nan"),
                "floor_growth": floor / rows[-1]["floor_ms"] if rows else float("nan"),
                "pixel_growth": shape.batch * shape.height * shape.width / rows[-1]["pixels"] if rows else float("nan"),
            }
        )
    return rows


def format_floor_rows(rows: list[dict]) -> str:
    return _rows_table(rows, FLOOR_COLUMNS)
