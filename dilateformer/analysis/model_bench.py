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
from dilateformer.analysis.measure import format_table, gmacs, interleaved_median_ms, saved_for_backward_bytes, to_mb
from dilateformer.functional import use_backend
from dilateformer.models import create_dilateformer, global_twin
from dilateformer.ops.context import select_backend

__all__ = ["run_model_benchmark", "format_model_benchmark", "MODEL_BENCH_COLUMNS", "GLOBAL_TWIN", "OFFICIAL_STYLE"]

GLOBAL_TWIN = "global"
OFFICIAL_STYLE = "official-style"
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
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure inference and training speed and saved-for-backward memory; one row per model and backend.

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
        log: progress messages, e.g. ``print``.

    Returns:
        Rows as dicts with the keys of :data:`MODEL_BENCH_COLUMNS` plus ``batch_size``, ``img_size`` and
        ``threads``; a measurement that was not requested is None.
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
            _measure_interleaved(subjects, compiled, train, repeats, warmup, say)
            rows += [subject.row for subject in subjects]
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
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        with use_backend(self.backend):
            self.optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(self.model(self.x), self.target).backward()
            self.optimizer.step()

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
) -> None:
    """Fill each subject's row. Every timed round runs each subject once, in turn, so that a slow phase of a shared
    machine slows every row alike and the ratios between rows hold."""
    batch = subjects[0].x.shape[0]

    def throughputs(steps: list[Callable[[], None]]) -> list[float]:
        return [batch / (ms / 1e3) for ms in interleaved_median_ms(steps, repeats=repeats, warmup=warmup)]

    for subject in subjects:
        subject.model.eval()
    for subject, value in zip(subjects, throughputs([s.infer_eager for s in subjects]), strict=True):
        subject.row["infer_eager_img_s"] = value
        say(f"{subject.label}: inference eager {value:.1f} img/s")
    if compiled:
        for subject in subjects:
            say(f"{subject.label}: compiled in {subject.compile():.0f} s")
        for subject, value in zip(subjects, throughputs([s.infer_compiled for s in subjects]), strict=True):
            subject.row["infer_compiled_img_s"] = value
            say(f"{subject.label}: inference compiled {value:.1f} img/s")
    if train:
        for subject in subjects:
            subject.model.train()
        for subject, value in zip(subjects, throughputs([s.train_step for s in subjects]), strict=True):
            subject.row["train_img_s"] = value
            subject.row["saved_mb"] = subject.saved_mb()
            say(f"{subject.label}: train {value:.1f} img/s, saved for backward {subject.row['saved_mb']:.0f} MB")


def format_model_benchmark(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`run_model_benchmark` as an aligned text table, with the setup on the first line."""
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
    baseline = next((row for row in rows if row["attention"] == _ATTENTION_LABELS[OFFICIAL_STYLE]), None)
    if baseline is None:
        return f"{header}\n{table}"
    speed_keys = [key for key, _ in MODEL_BENCH_COLUMNS if key.endswith("img_s")] + ["saved_mb"]
    titles = dict(MODEL_BENCH_COLUMNS)

    def ratio(row: dict[str, Any], key: str) -> float | str:
        if row.get(key) is None or not baseline.get(key):
            return "-"
        return row[key] / baseline[key]

    ratios = format_table(
        ["model", "attention", "MSDA backend", *(titles[key] for key in speed_keys)],
        [
            [row["model"], row["attention"], row["msda_backend"], *(ratio(row, key) for key in speed_keys)]
            for row in rows
        ],
    )
    caption = "relative to the official-style model (speed: higher is faster; memory: lower is less)"
    return f"{header}\n{table}\n\n{caption}\n{ratios}"
