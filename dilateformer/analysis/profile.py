"""Cost by resolution: a DilateFormer and its global-attention twin, side by side, at several input sizes.

Per model and size: parameters, forward GMACs (:func:`~dilateformer.analysis.measure.count_macs`, which sees
MSDA and global attention through the FLOP formulas of :mod:`dilateformer.ops.flops`), MB saved for backward,
forward ms and forward+backward ms.

GMACs and the memory estimate come from a run on the ``meta`` device: no data, no arithmetic, so they cost
milliseconds at any size. Global attention's cost grows with the square of the pixel count, so before each
real run the profiler checks the meta estimate against the memory budget and, once it has timed a smaller size
of the same model, predicts the run's time; a run that would not fit or would take too long is reported as
"out of memory" or "estimated" instead of being attempted.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dilateformer.analysis.measure import format_table, median_ms, saved_for_backward, to_mb
from dilateformer.analysis.measure import gmacs as measure_gmacs
from dilateformer.analysis.plots import loglog_figure, save_figure
from dilateformer.analysis.visualize import create_registered_model
from dilateformer.models import global_twin


@dataclass
class ProfileRow:
    """One model at one size. ``None`` marks a quantity not measured (see ``status``)."""

    model: str
    attention: str  # "msda" (the model as configured) or "global" (its twin)
    size: int
    batch: int
    params: int
    gmacs: float  # forward multiply-adds per image, in billions
    saved_mb: float | None  # measured MB saved for backward, whole batch, weights included
    activation_mb: float | None  # the part of saved_mb that is not parameters: what grows with the input
    saved_mb_estimate: float | None  # meta-device upper bound (explicit attention matrices), whole batch
    forward_ms: float | None
    forward_backward_ms: float | None
    status: str = "ok"  # "ok", "flops only", "out of memory", or "estimated: ..." with the reason

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# Largest --sizes entry: a 4096x4096 input is already 200 MB before the model; bigger is a typo, not a profile.
MAX_SIZE = 4096


def parse_sizes(text: str) -> list[int]:
    """``"224,512,1024"`` -> ``[224, 512, 1024]``; anything but ints in 1..MAX_SIZE is an :class:`ValueError`."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= MAX_SIZE:
            raise ValueError(
                f"--sizes takes positive integers up to {MAX_SIZE} separated by commas, e.g. 224,512; got {text!r}"
            )
        sizes.append(int(part))
    return sizes


def available_memory_bytes() -> int:
    """Memory the OS can hand out now (MemAvailable), or 8 GB where /proc/meminfo does not exist."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3


def build_pair(model_name: str, **kwargs) -> dict[str, nn.Module]:
    """The registered model and its global-attention twin (:func:`dilateformer.models.global_twin`)."""
    model = create_registered_model(model_name, **kwargs)
    twin = global_twin(model, copy_weights=False)
    return {"msda": model, "global": twin}


def estimate_saved_bytes(model: nn.Module, size: int, batch: int) -> int:
    """Bytes autograd would save for backward, from a meta-device forward.

    An upper bound: on the meta device ``scaled_dot_product_attention`` decomposes into explicit matmuls and
    softmax, so the N x N attention matrices count, while the fused CPU and CUDA kernels save only q, k, v,
    the output and a log-sum-exp.
    """
    meta = copy.deepcopy(model).to("meta").train()
    x = torch.empty(batch, 3, size, size, device="meta")
    return saved_for_backward(lambda: meta(x)).total


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(error).lower()


def profile_models(
    model_name: str,
    sizes: Sequence[int],
    batch: int = 1,
    *,
    timing: bool = True,
    repeats: int = 3,
    warmup: int = 1,
    memory_budget: int | None = None,
    time_budget_s: float = 120.0,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> list[ProfileRow]:
    """Profile ``model_name`` and its global twin at each size; see the module docstring for what is measured.

    Args:
        sizes: square input sides in pixels.
        batch: images per forward; GMACs are per image, MB and ms per batch.
        timing: False counts GMACs and estimates memory only (fast, deterministic: what tests use).
        repeats, warmup: timed and untimed calls per measurement (the median is reported).
        memory_budget: bytes a run may use; default 70% of the memory available now.
        time_budget_s: a run predicted to take longer (all its calls) is estimated instead of run.
        progress: called with one line per step, for long sweeps.
    """
    for name, value in (("sizes", sizes), ("batch", [batch]), ("repeats", [repeats])):
        if not value or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in value):
            raise ValueError(f"{name} must be positive ints, got {value!r}")
    say = progress or (lambda line: None)
    budget = memory_budget if memory_budget is not None else int(0.7 * available_memory_bytes())
    models = build_pair(model_name)
    rows: list[ProfileRow] = []
    rates: dict[str, float] = {}
    steps = len(models) * len(sizes)
    step = 0
    for attention, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        model.to(device)
        # fwd+bwd ms per forward GMAC, from this model's last timed size, else the other model's: a rough
        # rate, but enough to avoid starting a run that would take far beyond the budget.
        ms_per_gmac = rates.get(attention) or next(iter(rates.values()), None)
        for size in sorted(sizes):
            step += 1
            label = f"[{step}/{steps}] {model_name} ({attention}) {size}x{size} batch {batch}"
            say(f"{label}: counting multiply-adds")
            gmacs = measure_gmacs(model, torch.empty(1, 3, size, size), on_meta=True)
            row = ProfileRow(
                model=model_name,
                attention=attention,
                size=size,
                batch=batch,
                params=params,
                gmacs=gmacs,
                saved_mb=None,
                activation_mb=None,
                saved_mb_estimate=None,
                forward_ms=None,
                forward_backward_ms=None,
            )
            rows.append(row)
            try:
                estimate = estimate_saved_bytes(model, size, batch)
            except ValueError as error:
                # The model refuses this input for training (e.g. too small at batch 1): this row fails alone.
                row.status = f"failed: {str(error).split(':')[0]}"
                say(f"{label}: {row.status}")
                continue
            row.saved_mb_estimate = to_mb(estimate)
            if not timing:
                row.status = "flops only"
                continue
            if estimate > budget:
                row.status = f"out of memory (needs ~{estimate / 1e9:.1f} GB, budget {budget / 1e9:.1f} GB)"
                say(f"{label}: skipped, {row.status}")
                continue
            if ms_per_gmac is not None:
                predicted_ms = ms_per_gmac * gmacs * batch
                # fwd+bwd calls plus forward-only calls (about a third of the cost each) plus the memory pass.
                predicted_s = predicted_ms * (repeats + warmup) * 4 / 3 / 1e3 + predicted_ms / 3e3
                if predicted_s > time_budget_s:
                    row.forward_backward_ms = predicted_ms
                    row.forward_ms = predicted_ms / 3
                    row.status = f"estimated: ~{predicted_s:.0f} s to run > {time_budget_s:g} s budget"
                    say(f"{label}: skipped, {row.status}")
                    continue
            try:
                _measure(
                    model,
                    row,
                    size,
                    batch,
                    repeats,
                    warmup,
                    device,
                    lambda what, label=label: say(f"{label}: {what}"),
                )
            except (RuntimeError, MemoryError) as error:
                if not _is_oom(error):
                    raise
                row.status = "out of memory"
                say(f"{label}: out of memory")
                continue
            ms_per_gmac = rates[attention] = row.forward_backward_ms / (gmacs * batch)
        model.to("cpu")
    return rows


def _measure(model, row: ProfileRow, size, batch, repeats, warmup, device, say) -> None:
    x = torch.randn(batch, 3, size, size, device=device)
    model.train()
    say("memory saved for backward")
    saved = saved_for_backward(lambda: model(x), exclude=model.parameters())
    row.saved_mb, row.activation_mb = to_mb(saved.total), to_mb(saved.counted)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    say("forward + backward")
    row.forward_backward_ms = median_ms(forward_backward, repeats, warmup, device=device)
    model.zero_grad(set_to_none=True)
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    say("forward")
    row.forward_ms = median_ms(forward, repeats, warmup, device=device)


TABLE_HEADERS = [
    "model",
    "attention",
    "size",
    "params (M)",
    "GMACs/img",
    "saved MB",
    "act. MB",
    "fwd ms",
    "fwd+bwd ms",
    "status",
]


class Cell(float):
    """A number with its own text in :func:`format_table`: numeric, so its column stays right-aligned."""

    text: str

    def __new__(cls, value: float, text: str) -> Cell:
        cell = super().__new__(cls, value)
        cell.text = text
        return cell

    def __format__(self, spec: str) -> str:
        return self.text


def _cell(measured: float | None, estimate: float | None = None, digits: int = 1) -> Cell:
    if measured is not None:
        return Cell(measured, f"{measured:,.{digits}f}")
    if estimate is not None:
        return Cell(estimate, f"~{estimate:,.{digits}f}")
    return Cell(float("nan"), "-")


def profile_table(rows: Sequence[ProfileRow]) -> str:
    """The aligned text table the CLI prints. ``~`` marks an estimate, ``-`` a quantity not measured."""
    table_rows = []
    for r in rows:
        estimated = r.status.startswith("estimated")
        table_rows.append(
            [
                r.model,
                r.attention,
                f"{r.size}x{r.size}",
                _cell(r.params / 1e6, digits=2),
                _cell(r.gmacs, digits=3),
                _cell(r.saved_mb, r.saved_mb_estimate),
                _cell(r.activation_mb),
                _cell(None if estimated else r.forward_ms, r.forward_ms),
                _cell(None if estimated else r.forward_backward_ms, r.forward_backward_ms),
                r.status,
            ]
        )
    table = format_table(TABLE_HEADERS, table_rows)
    return "\n".join(line.rstrip() for line in table.splitlines())


def profile_figure(rows: Sequence[ProfileRow], output) -> None:
    """Log-log curves of cost against pixels per image, one curve per model, fitted slopes in the legends."""
    by_model: dict[str, list[ProfileRow]] = {}
    for r in rows:
        label = f"{r.model} ({'MSDA as configured' if r.attention == 'msda' else 'global twin'})"
        by_model.setdefault(label, []).append(r)

    def series(get: Callable[[ProfileRow], float | None]):
        return {label: ([r.size * r.size for r in rs], [get(r) for r in rs]) for label, rs in by_model.items()}

    batch = rows[0].batch if rows else 1
    ran = any(r.status == "ok" for r in rows)
    pixels = "pixels per image, H x W (log scale)"
    panels = [("forward multiply-adds per image", pixels, "GMACs", series(lambda r: r.gmacs))]
    if ran:
        ok = lambda value, r: value if r.status == "ok" else None  # noqa: E731
        panels += [
            (
                f"activations saved for backward (batch {batch})",
                pixels,
                "MB (weights excluded)",
                series(lambda r: ok(r.activation_mb, r)),
            ),
            (f"forward time (batch {batch})", pixels, "ms", series(lambda r: ok(r.forward_ms, r))),
            (
                f"forward + backward time (batch {batch})",
                pixels,
                "ms",
                series(lambda r: ok(r.forward_backward_ms, r)),
            ),
        ]
    else:
        title = f"saved for backward, meta upper bound (batch {batch})"
        panels.append((title, pixels, "MB", series(lambda r: r.saved_mb_estimate)))
    sizes = sorted({r.size for r in rows})
    fig = loglog_figure(
        panels,
        f"Cost by input size ({', '.join(map(str, sizes))} px square): slope = exponent of the pixel count "
        f"(1: linear, 2: quadratic)",
        panel_size=(5.4, 4.2),
        xticks={size * size: f"{size}²" for size in sizes},
    )
    save_figure(fig, output)
