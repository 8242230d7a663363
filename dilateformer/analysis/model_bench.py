"""The model benchmark: throughput, training speed and saved-for-backward memory of DilateFormer models.

One function runs it and returns plain rows (:func:`run_model_benchmark`); another formats them
(:func:`format_model_benchmark`). ``benchmarks/bench_model.py`` and the CLI are thin callers.

Every row says which MSDA backend ran (``"auto"`` resolves to ``"native"`` on CPU). The eager columns run the
rest of the model op by op; the compiled column wraps the whole model in ``torch.compile``.

The ``official-style`` row is :class:`~dilateformer.analysis.baselines.OfficialStyleDilateFormer` with the same
weights: the official architecture run the way its code runs it (unfold MSDA, NCHW activations, explicit global
attention), made trainable. :func:`format_model_benchmark` prints every row's speed as a ratio to it, which is
what survives the noise of a shared machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dilateformer.analysis.baselines import compile_official_style, official_style_twin
from dilateformer.analysis.breakdown import category_totals, record_ops, sgemm_step, time_ops
from dilateformer.analysis.measure import format_table, gmacs, interleaved_median_ms, saved_for_backward_bytes, to_mb
from dilateformer.functional import use_backend
from dilateformer.models import create_dilateformer, global_twin
from dilateformer.ops.context import select_backend
from dilateformer.train.run import fused_kwargs

__all__ = [
    "run_model_benchmark",
    "format_model_benchmark",
    "run_training_breakdown",
    "format_training_breakdown",
    "MODEL_BENCH_COLUMNS",
    "GLOBAL_TWIN",
    "OFFICIAL_STYLE",
    "GEMM_FLOOR",
    "ATTAINABLE_FLOOR",
]

GLOBAL_TWIN = "global"
OFFICIAL_STYLE = "official-style"
GEMM_FLOOR = "GEMM floor"
ATTAINABLE_FLOOR = "attainable floor"
# A training step's FLOPs: the forward's, and twice them in the backward (input and weight gradients).
TRAIN_FLOP_FACTOR = 3
MODEL_BENCH_COLUMNS = (
    ("model", "model"),
    ("attention", "attention"),
    ("msda_backend", "MSDA backend"),
    ("params_m", "params (M)"),
    ("gmacs", "GMACs"),
    ("infer_eager_img_s", "infer eager (img/s)"),
    ("infer_compiled_img_s", "infer compiled (img/s)"),
    ("train_img_s", "train (img/s)"),
    ("saved_mb", "saved for bwd (MB)"),
)


_ATTENTION_LABELS = {
    "msda": "MSDA stages 1-2",
    GLOBAL_TWIN: "global everywhere",
    OFFICIAL_STYLE: "official-style (unfold MSDA)",
}


def _gmacs(name: str, attention: str, img_size: int) -> float:
    """GMACs of one image (:func:`~dilateformer.analysis.measure.gmacs`); on the meta device, so instant."""
    model = _build(name, attention, device="meta")
    return gmacs(model, torch.empty(1, model.in_chans, img_size, img_size, device="meta"))


def run_model_benchmark(
    models: Sequence[str] = ("dilateformer_tiny",),
    batch_size: int = 8,
    img_size: int = 224,
    include_twin: bool = True,
    include_official: bool = True,
    msda_backends: Sequence[str] = ("auto",),
    compiled: bool = True,
    train: bool = True,
    repeats: int = 5,
    warmup: int = 2,
    threads: int | None = None,
    floors: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure inference and training speed and saved-for-backward memory; one row per model and backend.

    With ``floors``, two more rows per model bound what its rows could reach (see :func:`format_model_benchmark`):
    the GEMM floor (a 2048x2048x2048 float32 matmul, timed in the same interleaved rounds, converted to images/s
    at the model's FLOPs) and the attainable floor (every op of the first MSDA row's step replayed alone at its
    real shapes, :mod:`dilateformer.analysis.breakdown`, summed).

    Args:
        models: registered DilateFormer names.
        batch_size: images per step.
        img_size: square input size.
        include_twin: add each model's global-attention twin (``attn_types=("global",) * 4``), which has the
            same parameter count.
        include_official: add the official-style baseline with the same weights (see the module docstring).
        msda_backends: MSDA backends to run the MSDA models under (``"auto"``, ``"eager"``, ``"compiled"``,
            ``"reference"``); the twin has no MSDA and is measured once.
        compiled: also measure inference with the whole model under ``torch.compile`` (slow to compile on CPU).
        train: also measure a training step (forward, backward, AdamW step) and the bytes autograd saves.
        repeats: timed repetitions per measurement (the median is reported).
        warmup: untimed repetitions first (they include any compilation).
        threads: ``torch.set_num_threads`` for the run, unchanged if None.
        floors: add the :data:`GEMM_FLOOR` and :data:`ATTAINABLE_FLOOR` rows of each model.
        log: progress messages, e.g. ``print``.

    Returns:
        Rows as dicts with the keys of :data:`MODEL_BENCH_COLUMNS` plus ``batch_size``, ``img_size``,
        ``threads`` and ``floor`` (None, or which floor a row is); a measurement that was not requested is None.
    """
    if batch_size < 1 or img_size < 1:
        raise ValueError(f"batch_size and img_size must be >= 1, got {batch_size} and {img_size}")
    say = log or (lambda message: None)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows = []
        for name in models:
            configs: list[tuple[str, str | None]] = [("msda", b) for b in msda_backends]
            if include_twin:
                configs.append((GLOBAL_TWIN, None))
            if include_official:
                configs.append((OFFICIAL_STYLE, None))
            subjects = [_Subject(name, attention, backend, batch_size, img_size) for attention, backend in configs]
            sgemm = _measure_interleaved(subjects, compiled, train, repeats, warmup, say, floors)
            rows += [subject.row for subject in subjects]
            if floors:
                gemm_floor = _floor_row(subjects[0].row, GEMM_FLOOR, f"{GEMM_FLOOR}: sgemm 2048^3, same rounds")
                flops = 2 * gemm_floor["gmacs"] * 1e9
                for key, rate in sgemm.items():
                    factor = TRAIN_FLOP_FACTOR if key == "train_img_s" else 1
                    gemm_floor[key] = rate * 1e9 / (flops * factor)
                gemm_floor["sgemm_gflops"] = sgemm
                rows.append(gemm_floor)
                say(f"{name}: GEMM floor at sgemm {', '.join(f'{r:.0f}' for r in sgemm.values())} GFLOP/s")
                rows.append(_attainable_floor_row(subjects[0], train, repeats, say))
        return rows
    finally:
        torch.set_num_threads(previous_threads)


def _build(name: str, attention: str, device: str | None = None) -> nn.Module:
    model = create_dilateformer(name, drop_path_rate=0.1, device=device)
    if attention == GLOBAL_TWIN:
        return global_twin(model, copy_weights=False)
    return official_style_twin(model) if attention == OFFICIAL_STYLE else model


class _Subject:
    """One row of the table: a model, its input and MSDA backend, and the steps that are timed."""

    def __init__(self, name: str, attention: str, backend: str | None, batch_size: int, img_size: int) -> None:
        torch.manual_seed(0)
        self.model = _build(name, attention)
        self.official_style = attention == OFFICIAL_STYLE
        self.backend = backend or "auto"
        self.x = torch.randn(batch_size, self.model.in_chans, img_size, img_size)
        self.label = f"{name} [{_ATTENTION_LABELS[attention]}{'' if backend is None else ', MSDA ' + backend}]"
        self.row: dict[str, Any] = {
            "model": name,
            "attention": _ATTENTION_LABELS[attention],
            "msda_backend": "-" if backend is None else select_backend(backend, self.x.device, self.x.dtype),
            "params_m": sum(p.numel() for p in self.model.parameters()) / 1e6,
            "gmacs": _gmacs(name, "msda" if attention == OFFICIAL_STYLE else attention, img_size),
            "infer_eager_img_s": None,
            "infer_compiled_img_s": None,
            "train_img_s": None,
            "saved_mb": None,
            "batch_size": batch_size,
            "img_size": img_size,
            "threads": torch.get_num_threads(),
            "floor": None,
        }
        self.compiled_model: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.target = torch.randint(0, self.model.num_classes, (batch_size,))

    def infer_eager(self) -> None:
        with use_backend(self.backend), torch.inference_mode():
            self.model(self.x)

    def compile(self) -> float:
        if self.official_style:
            self.compiled_model = compile_official_style(self.model)  # routes around an inductor pattern bug
        else:
            self.compiled_model = torch.compile(self.model, fullgraph=True)
        start = time.perf_counter()
        self.infer_compiled()
        return time.perf_counter() - start

    def infer_compiled(self) -> None:
        assert self.compiled_model is not None
        with use_backend(self.backend), torch.no_grad():
            self.compiled_model(self.x)

    def train_step(self) -> None:
        self.forward_backward()
        assert self.optimizer is not None
        self.optimizer.step()

    def forward_backward(self) -> None:
        """The training step without the optimizer's update."""
        if self.optimizer is None:
            # The optimizer `dilateformer train` builds for AdamW: fused where torch has the kernel.
            kwargs = fused_kwargs("adamw", self.x.device)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, **kwargs)
        with use_backend(self.backend):
            self.optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(self.model(self.x), self.target).backward()

    def saved_mb(self) -> float:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        with use_backend(self.backend):
            return to_mb(saved_for_backward_bytes(lambda: self.model(self.x)))


def _measure_interleaved(
    subjects: list[_Subject],
    compiled: bool,
    train: bool,
    repeats: int,
    warmup: int,
    say: Callable[[str], None],
    sgemm: bool,
) -> dict[str, float]:
    """Fill each subject's row. Every timed round runs each subject once, in turn, so that a slow phase of a shared
    machine slows every row alike and the ratios between rows hold. With ``sgemm``, each round also times the
    reference matmul; returns its GFLOP/s per phase (the row keys)."""
    batch = subjects[0].x.shape[0]
    gemm, gemm_flops = sgemm_step()
    rates: dict[str, float] = {}

    def throughputs(key: str, steps: list[Callable[[], None]]) -> list[float]:
        ms = interleaved_median_ms([*steps, gemm] if sgemm else steps, repeats=repeats, warmup=warmup)
        if sgemm:
            rates[key] = gemm_flops / (ms.pop() / 1e3) / 1e9
        return [batch / (t / 1e3) for t in ms]

    for subject in subjects:
        subject.model.eval()
    for subject, value in zip(
        subjects, throughputs("infer_eager_img_s", [s.infer_eager for s in subjects]), strict=True
    ):
        subject.row["infer_eager_img_s"] = value
        say(f"{subject.label}: inference eager {value:.1f} img/s")
    if compiled:
        for subject in subjects:
            say(f"{subject.label}: compiled in {subject.compile():.0f} s")
        steps = [s.infer_compiled for s in subjects]
        for subject, value in zip(subjects, throughputs("infer_compiled_img_s", steps), strict=True):
            subject.row["infer_compiled_img_s"] = value
            say(f"{subject.label}: inference compiled {value:.1f} img/s")
    if train:
        for subject in subjects:
            subject.model.train()
        for subject, value in zip(subjects, throughputs("train_img_s", [s.train_step for s in subjects]), strict=True):
            subject.row["train_img_s"] = value
            subject.row["saved_mb"] = subject.saved_mb()
            say(f"{subject.label}: train {value:.1f} img/s, saved for backward {subject.row['saved_mb']:.0f} MB")
    return rates


def _floor_row(like: dict[str, Any], floor: str, attention: str) -> dict[str, Any]:
    row = {key: None for key, _ in MODEL_BENCH_COLUMNS}
    row.update(
        model=like["model"],
        attention=attention,
        msda_backend=like["msda_backend"],
        gmacs=like["gmacs"],
        batch_size=like["batch_size"],
        img_size=like["img_size"],
        threads=like["threads"],
        floor=floor,
    )
    return row


def _attainable_floor_row(subject: _Subject, train: bool, repeats: int, say: Callable[[str], None]) -> dict[str, Any]:
    """The sum of the bare-op times of the subject's eager inference and training step, as images/s."""
    row = _floor_row(subject.row, ATTAINABLE_FLOOR, f"{ATTAINABLE_FLOOR}: sum of bare ops")
    batch = subject.x.shape[0]
    subject.model.eval()
    timings, _ = time_ops(record_ops(subject.infer_eager), repeats=repeats)
    row["infer_eager_img_s"] = batch / (sum(t.total_ms for t in timings) / 1e3)
    if train:
        subject.model.train()
        subject.forward_backward()  # the optimizer's state exists, so the recorded step is a steady one
        assert subject.optimizer is not None
        timings, _ = time_ops(record_ops(subject.forward_backward, subject.optimizer.step), repeats=repeats)
        row["train_img_s"] = batch / (sum(t.total_ms for t in timings) / 1e3)
    train_text = "" if row["train_img_s"] is None else f", {row['train_img_s']:.2f} img/s training"
    say(f"{subject.label}: attainable floor {row['infer_eager_img_s']:.2f} img/s inference{train_text}")
    return row


def format_model_benchmark(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`run_model_benchmark` as aligned text tables, with the setup on the first line.

    The first table holds every row, floors included. Where floors were measured, the next gives each model row's
    speed as a percentage of its model's floors: the GEMM floor is the model's FLOPs (x3 for training) at the rate
    of a large square matmul, which no layer of smaller or thinner shapes reaches; the attainable floor is the sum
    of the model's own ops, each timed alone, which is what the model would cost with nothing between its ops.
    The last table gives every row relative to the official-style model of the same run.
    """
    if not rows:
        return "(no rows)"
    first = rows[0]
    header = (
        f"batch {first['batch_size']}, {first['img_size']}x{first['img_size']}, fp32, "
        f"{first['threads']} threads, torch {torch.__version__}"
    )
    table = format_table(
        [title for _, title in MODEL_BENCH_COLUMNS],
        [["-" if row.get(key) is None else row[key] for key, _ in MODEL_BENCH_COLUMNS] for row in rows],
    )
    parts = [header, table]
    speed_keys = [key for key, _ in MODEL_BENCH_COLUMNS if key.endswith("img_s")]
    titles = dict(MODEL_BENCH_COLUMNS)
    measured = [row for row in rows if row.get("floor") is None]
    floors = {(row["model"], row["floor"]): row for row in rows if row.get("floor") is not None}
    if floors:
        share_rows = []
        for row in measured:
            for floor in (GEMM_FLOOR, ATTAINABLE_FLOOR):
                reference = floors.get((row["model"], floor))
                if reference is not None:
                    share_rows.append(
                        [
                            row["model"],
                            row["attention"],
                            floor,
                            *(_ratio(row, reference, key, 100) for key in speed_keys),
                        ]
                    )
        parts += [
            "",
            "share of the floor (%)",
            format_table(["model", "attention", "floor", *map(titles.get, speed_keys)], share_rows),
        ]
    baseline = next((row for row in rows if row["attention"] == _ATTENTION_LABELS[OFFICIAL_STYLE]), None)
    if baseline is None:
        return "\n".join(parts)
    ratio_keys = [*speed_keys, "saved_mb"]
    ratios = format_table(
        ["model", "attention", "MSDA backend", *(titles[key] for key in ratio_keys)],
        [
            [row["model"], row["attention"], row["msda_backend"], *(_ratio(row, baseline, key) for key in ratio_keys)]
            for row in measured
        ],
    )
    parts += ["", "relative to the official-style model (speed: higher is faster; memory: lower is less)", ratios]
    return "\n".join(parts)


def _ratio(row: dict[str, Any], reference: dict[str, Any], key: str, scale: float = 1.0) -> float | str:
    if row.get(key) is None or not reference.get(key):
        return "-"
    return scale * row[key] / reference[key]


def run_training_breakdown(
    name: str = "dilateformer_tiny",
    batch_size: int = 8,
    img_size: int = 224,
    msda_backend: str = "auto",
    repeats: int = 3,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Where one training step's time goes (forward, backward, AdamW step), by category of op.

    The step is timed whole, in rounds interleaved with the reference matmul; then every op it ran is replayed
    alone at its real shapes (:mod:`dilateformer.analysis.breakdown`). Returns a dict with ``step_ms``,
    ``sgemm_gflops``, ``step_gflop`` (the model's FLOPs x3), ``totals`` (:func:`category_totals`), ``timings``
    (most expensive op signatures first), ``unreplayed`` (op calls that could not be replayed) and the setup.
    """
    say = log or (lambda message: None)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        subject = _Subject(name, "msda", msda_backend, batch_size, img_size)
        subject.model.train()
        gemm, gemm_flops = sgemm_step()
        step_ms, gemm_ms = interleaved_median_ms([subject.train_step, gemm], repeats=repeats, warmup=1)
        say(f"{subject.label}: training step {step_ms:.0f} ms")
        assert subject.optimizer is not None
        records = record_ops(subject.forward_backward, subject.optimizer.step)
        say(f"recorded {len(records)} op calls; replaying them")
        timings, unreplayed = time_ops(records, repeats=repeats)
        return {
            "model": name,
            "msda_backend": subject.row["msda_backend"],
            "batch_size": batch_size,
            "img_size": img_size,
            "threads": torch.get_num_threads(),
            "step_ms": step_ms,
            "sgemm_gflops": gemm_flops / (gemm_ms / 1e3) / 1e9,
            "step_gflop": TRAIN_FLOP_FACTOR * 2 * subject.row["gmacs"] * batch_size,
            "totals": category_totals(timings),
            "timings": timings,
            "unreplayed": unreplayed,
        }
    finally:
        torch.set_num_threads(previous_threads)


def format_training_breakdown(result: dict[str, Any], top: int = 12) -> str:
    """:func:`run_training_breakdown`'s result as a table by category, then its ``top`` costliest op signatures.

    "at sgemm rate" is a category's FLOPs at the reference matmul's rate: next to the GEMM row it is the GEMM
    floor, and the gap to the bare time is what the model's GEMM shapes lose to the square matmul.
    """
    step, rate = result["step_ms"], result["sgemm_gflops"]
    rows = []
    for category, total in result["totals"].items():
        flop = total["flops"] / 1e9
        rows.append(
            [
                category,
                total["ops"],
                total["ms"],
                100 * total["ms"] / step,
                flop if flop else "-",
                flop / (total["ms"] / 1e3) if flop and total["ms"] else "-",
                1e3 * flop / rate if flop else "-",
            ]
        )
    bare = sum(total["ms"] for total in result["totals"].values())
    rows += [
        [
            "sum of bare ops (attainable floor)",
            sum(t["ops"] for t in result["totals"].values()),
            bare,
            100 * bare / step,
            "-",
            "-",
            "-",
        ],
        [
            "measured step",
            "-",
            step,
            100.0,
            result["step_gflop"],
            result["step_gflop"] / (step / 1e3),
            1e3 * result["step_gflop"] / rate,
        ],
        ["between ops (step - sum)", "-", step - bare, 100 * (step - bare) / step, "-", "-", "-"],
    ]
    header = (
        f"{result['model']}, one training step (forward, backward, AdamW), batch {result['batch_size']}, "
        f"{result['img_size']}x{result['img_size']}, fp32, {result['threads']} threads, MSDA {result['msda_backend']}; "
        f"sgemm 2048^3 {rate:.0f} GFLOP/s in the same rounds"
    )
    table = format_table(
        ["category", "op calls", "bare ms", "% of step", "GFLOP", "GFLOP/s bare", "ms at sgemm rate"], rows
    )
    top_rows = [
        [t.category, t.record.name, _shapes(t.record), t.count, t.ms, t.flops / 1e6 / t.ms if t.flops and t.ms else "-"]
        for t in result["timings"][:top]
    ]
    ops = format_table(["category", "op", "argument shapes", "calls", "ms each", "GFLOP/s"], top_rows)
    note = f"{result['unreplayed']} op calls could not be replayed and are left out" if result["unreplayed"] else ""
    return "\n".join(filter(None, [header, table, note, "", f"the {top} costliest op signatures", ops]))


def _shapes(record: Any) -> str:
    shapes = [a.shape for a in record.args if hasattr(a, "shape")]
    return " ".join("x".join(map(str, shape)) or "scalar" for shape in shapes[:3])
