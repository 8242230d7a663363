"""``dilateformer yolo-compare``: train YOLO variants with one recipe and several seeds, and compare them.

Every variant is trained by Ultralytics' own trainer with the same data, epochs, image size, batch and recipe,
once per seed. Each finished (variant, seed) run leaves ``<output>/runs/<variant>-s<seed>/result.json``; a rerun
skips those and trains the others from scratch, so an interrupted comparison resumes at run granularity. The
settings that decide a result (data, epochs, imgsz, batch, recipe, device type, AMP) are written to
``<output>/settings.json`` by the first run; a rerun into the same folder with other settings is refused, so one
table never mixes two recipes.

The table holds, per variant: mAP50 and mAP50-95 (mean ± sample std over seeds), the difference of each to the
baseline (the first variant) with Welch's t-test (:func:`compare_to_baseline`), params, GFLOPs (2 x multiply-adds, by
:func:`dilateformer.analysis.measure.gflops`, which counts the attention products that Ultralytics' thop
count leaves out), peak training memory, training throughput and inference latency.

Ultralytics (AGPL-3.0) is imported only inside the functions that train and measure; the rest of this module
(settings, statistics, the table and the figure) works without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dilateformer.files import atomic_write_json

__all__ = [
    "DEFAULT_SEEDS",
    "DEFAULT_VARIANTS",
    "QUICK",
    "RECIPE",
    "CompareSettings",
    "Difference",
    "Variant",
    "compare_figure",
    "compare_table",
    "compare_to_baseline",
    "resolve_variant",
    "run_comparison",
    "summarize",
]

DEFAULT_VARIANTS: tuple[str, ...] = ("yolov8n", "yolov8n-msda", "yolov8n-global", "yolov8n-cbam", "yolov8n-psa")
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
# Training hyperparameters every variant shares, on top of Ultralytics' defaults. A fixed optimizer and learning
# rate (Ultralytics' "auto" picks them from the class count and run length, so they would differ between data
# sets), and one warmup epoch instead of three, so most of a short run trains at the full rate.
RECIPE: dict[str, Any] = {"optimizer": "AdamW", "lr0": 0.002, "warmup_epochs": 1.0}
SIGNIFICANCE_LEVEL = 0.05
# Images used by the locality measure of the trained global-attention variant.
LOCALITY_IMAGES = 8


@dataclasses.dataclass(frozen=True)
class CompareSettings:
    """What decides a comparison's numbers (and so its folder's settings key), plus where it runs.

    Args:
        epochs: training epochs per run.
        imgsz: training (and measuring) image size in pixels.
        batch: training batch size.
        device: ``"cpu"`` or one CUDA device (``"0"``, ``"cuda:1"``).
        amp: mixed-precision training (CUDA only; off by default, so memory is compared in float32).
        num_train, num_val, image_size, data_seed: the generated defect set, when no ``data`` is given.
    """

    epochs: int = 8
    imgsz: int = 256
    batch: int = 8
    device: str = "cpu"
    amp: bool = False
    num_train: int = 240
    num_val: int = 60
    image_size: int = 256
    data_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "imgsz", "batch", "num_train", "num_val", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.device, str) or not self.device:
            raise TypeError(f"device must be 'cpu' or one CUDA device ('0', 'cuda:1'), got {self.device!r}")
        if self.imgsz % 32:
            raise ValueError(f"imgsz must be a multiple of 32 (YOLO's largest stride), got {self.imgsz}")


# The --quick preset: tiny images, one epoch, three variants (the baseline, MSDA and its global twin, so the
# locality measure runs too), two seeds (so the significance test has numbers). About two minutes on 2 cores.
QUICK = {
    "variants": ("yolov8n", "yolov8n-msda", "yolov8n-global"),
    "seeds": (0, 1),
    "settings": CompareSettings(epochs=1, imgsz=64, batch=8, num_train=16, num_val=8, image_size=64),
}


# ------------------------------------------------------------------------------------------------ statistics


@dataclasses.dataclass(frozen=True)
class Difference:
    """A variant's metric against the baseline's: ``mean - baseline mean``, and whether the seeds say it is real.

    ``p`` is Welch's two-sided p-value and ``significant`` is ``p < 0.05``; both are ``None`` when either side
    has fewer than two seeds (no spread to compare against).
    """

    diff: float
    p: float | None
    significant: bool | None

    def label(self) -> str:
        if self.p is None:
            return f"{self.diff:+.3f} (n/a)"
        return f"{self.diff:+.3f} ({'yes' if self.significant else 'no'}, p={self.p:.2f})"


def compare_to_baseline(baseline: Sequence[float], other: Sequence[float]) -> Difference:
    """Welch's t-test of ``other`` against ``baseline`` (one value per seed each).

    Welch's test compares the difference of the means with the spread the seeds show on both sides, without
    assuming the two spreads are equal; with 3 seeds a side it calls a difference real (p < 0.05) once it is
    about 2.8 standard errors, the bar a 0.06 mAP gain from seed noise must clear. Identical values on both sides
    (zero spread) give p = 1 if the means agree and p = 0 if they do not.
    """
    a = [float(v) for v in baseline]
    b = [float(v) for v in other]
    if not a or not b:
        raise ValueError(f"baseline and other need at least one value each, got {len(a)} and {len(b)}")
    diff = statistics.fmean(b) - statistics.fmean(a)
    if len(a) < 2 or len(b) < 2:
        return Difference(diff, None, None)
    var_a, var_b = statistics.variance(a), statistics.variance(b)
    if var_a == 0 and var_b == 0:
        p = 1.0 if diff == 0 else 0.0
    else:
        from scipy import stats  # an Ultralytics dependency

        p = float(stats.ttest_ind(b, a, equal_var=False).pvalue)
    return Difference(diff, p, p < SIGNIFICANCE_LEVEL)


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(variants: Sequence[str], results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant (in ``variants`` order) from the per-run results, with differences to the first."""
    from dilateformer.analysis.measure import to_mb

    by_variant = {v: [r for r in results if r["variant"] == v] for v in variants}
    base = by_variant[variants[0]]
    rows = []
    for v in variants:
        runs = sorted(by_variant[v], key=lambda r: r["seed"])
        if not runs:
            continue
        row: dict[str, Any] = {"variant": v, "seeds": [r["seed"] for r in runs]}
        for key in ("map50", "map50_95"):
            mean, std = _mean_std([r[key] for r in runs])
            row[key] = {"mean": mean, "std": std, "per_seed": [r[key] for r in runs]}
            if v != variants[0] and base:
                d = compare_to_baseline([r[key] for r in base], [r[key] for r in runs])
                row[f"{key}_vs_baseline"] = dataclasses.asdict(d)
        row["params"] = runs[0]["params"]
        row["gflops"] = runs[0]["gflops"]
        row["train_memory_mb"] = to_mb(max(r["train_memory_bytes"] for r in runs))
        row["memory_method"] = runs[0]["memory_method"]
        row["train_img_s"] = statistics.fmean(r["train_img_s"] for r in runs)
        row["inference_ms"] = statistics.median(r["inference_ms"] for r in runs)
        row["run_wall_s"] = [r["wall_s"] for r in runs]
        rows.append(row)
    return rows


def _pm(stat: dict[str, Any]) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat["std"] is not None else f"{stat['mean']:.3f}"


MEMORY_METHODS = {
    "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated over the training epochs",
    "saved_for_backward": "bytes autograd saves for backward in one training forward at the training batch",
}


def compare_table(rows: Sequence[dict[str, Any]], settings: dict[str, Any]) -> str:
    """The comparison table with a header that names the data, recipe and methods, and a footer on the test."""
    from dilateformer.analysis.measure import format_table

    method = rows[0]["memory_method"] if rows else "saved_for_backward"
    mem_header = "train MB (CUDA peak)" if method == "cuda_max_memory_allocated" else "train MB (saved f. bwd)"
    headers = [
        "variant",
        "mAP50",
        "mAP50-95",
        "ΔmAP50 vs base",
        "ΔmAP50-95 vs base",
        "params",
        "GFLOPs",
        mem_header,
        "train img/s",
        "infer ms",
    ]
    table_rows = []
    for r in rows:
        d50 = r.get("map50_vs_baseline")
        d = r.get("map50_95_vs_baseline")
        table_rows.append(
            [
                r["variant"],
                _pm(r["map50"]),
                _pm(r["map50_95"]),
                Difference(**d50).label() if d50 else "baseline",
                Difference(**d).label() if d else "baseline",
                r["params"],
                round(r["gflops"], 2),
                round(r["train_memory_mb"], 1),
                round(r["train_img_s"], 1),
                round(r["inference_ms"], 1),
            ]
        )
    n_seeds = max((len(r["seeds"]) for r in rows), default=0)
    s = settings
    header = (
        f"yolo-compare: {s['data_name']}, {s['epochs']} epochs, imgsz {s['imgsz']}, batch {s['batch']}, "
        f"{n_seeds} seed(s), device {s['device']}\n"
        "mAP: mean ± sample std over seeds (best.pt on the validation set). GFLOPs: 2 x multiply-adds of one "
        f"{s['imgsz']}x{s['imgsz']} image, fused model, by dilateformer's count_macs (counts the attention products "
        "that Ultralytics' thop GFLOPs miss).\n"
        f"train MB: {MEMORY_METHODS[method]} (1 MB = 1e6 bytes). train img/s: images trained / training time "
        "(validation excluded), mean over seeds. infer ms: eval forward, batch 1, no_grad, median."
    )
    footer = (
        "Δ vs base: mean difference to the first variant; yes/no: whether Welch's t-test over the seeds finds it "
        f"beyond seed spread (two-sided p < {SIGNIFICANCE_LEVEL}); n/a: fewer than 2 seeds."
    )
    return f"{header}\n\n{format_table(headers, table_rows)}\n\n{footer}"


def compare_figure(rows: Sequence[dict[str, Any]], output: str | Path, title: str) -> Path:
    """Four panels: mAP50-95 (mean ± std, seed points), GFLOPs, peak training memory, train throughput."""
    from dilateformer.analysis.plots import new_figure, save_figure

    names = [r["variant"] for r in rows]
    xs = list(range(len(rows)))
    fig, axes = new_figure(2, 2, (12, 8.5))
    ax = axes[0, 0]
    means = [r["map50_95"]["mean"] for r in rows]
    stds = [r["map50_95"]["std"] or 0.0 for r in rows]
    ax.bar(xs, means, yerr=stds, capsize=5, color="tab:blue", alpha=0.6, label="mean ± std over seeds")
    for x, r in zip(xs, rows, strict=True):
        seeds = r["map50_95"]["per_seed"]
        offsets = [x + (k - (len(seeds) - 1) / 2) * 0.12 for k in range(len(seeds))]
        ax.plot(offsets, seeds, "o", color="black", ms=4, label="one seed" if x == 0 else None)
    top = max([m + s for m, s in zip(means, stds, strict=True)] + [max(r["map50_95"]["per_seed"]) for r in rows])
    ax.set_ylim(0, max(top * 1.15, 0.01))
    ax.set_ylabel("mAP50-95 (validation)")
    ax.set_title("accuracy")
    ax.legend(fontsize=8, loc="lower right")
    method = rows[0]["memory_method"] if rows else "saved_for_backward"
    panels = [
        (axes[0, 1], "gflops", "GFLOPs per image (count_macs x 2)", "compute", "tab:orange"),
        (
            axes[1, 0],
            "train_memory_mb",
            "MB (CUDA peak)" if method == "cuda_max_memory_allocated" else "MB saved for backward",
            "training memory",
            "tab:red",
        ),
        (axes[1, 1], "train_img_s", "images per second", "training throughput", "tab:green"),
    ]
    for ax, key, ylabel, panel_title, color in panels:
        values = [r[key] for r in rows]
        bars = ax.bar(xs, values, color=color, alpha=0.7)
        ax.bar_label(bars, fmt="%.3g", fontsize=8, padding=2)
        ax.margins(y=0.15)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
    for ax in axes.flat:
        ax.set_xticks(xs, names, rotation=20, ha="right", fontsize=9)
        ax.set_xlabel("variant")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=12)
    return save_figure(fig, output)


# -------------------------------------------------------------------------------------------- files, settings


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def settings_key(settings: CompareSettings, data_yaml: Path) -> dict[str, Any]:
    """The settings a result depends on: a rerun into the same folder must match these exactly."""
    return {
        "data": str(data_yaml.resolve()),
        "data_sha256": _sha256(data_yaml),
        "epochs": settings.epochs,
        "imgsz": settings.imgsz,
        "batch": settings.batch,
        "amp": settings.amp,
        "device_type": "cpu" if settings.device == "cpu" else "cuda",
        "recipe": RECIPE,
    }


def check_settings(output: Path, key: dict[str, Any]) -> None:
    """Record ``key`` in ``output/settings.json``, or refuse (ValueError) if the folder holds other settings."""
    path = output / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in key.items() if old.get(k) != v]
        if changed:
            raise ValueError(
                f"--output {output} holds runs made with other settings ({'; '.join(changed)}); pass another "
                "--output, or delete that folder to start over"
            )
        return
    atomic_write_json(path, key)


# ------------------------------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Variant:
    """A model to compare: its table name and what to hand ``YOLO()`` (a bare YAML name or a path)."""

    name: str
    yaml: str


def resolve_variant(text: str) -> Variant:
    """A ``--variants`` entry as a :class:`Variant`: a shipped or Ultralytics model name, or a YAML file.

    Names may leave out ``.yaml`` (``yolov8n``, ``yolov8s-msda``, ``yolo11n``). Needs Ultralytics.

    Raises:
        ValueError: if the entry is a URL, a missing file, a name nothing resolves, or not a detection model.
    """
    from ultralytics.nn.tasks import guess_model_task, yaml_model_load

    import dilateformer.integrations.ultralytics  # noqa: F401  (registers our layers and YAML names)

    text = text.strip()
    if "://" in text:
        raise ValueError(f"--variants {text}: give a model name or a local YAML file, not a URL")
    path = Path(text)
    is_path = path.suffix.lower() in {".yaml", ".yml"} and (path.parent != Path(".") or path.exists())
    if is_path and not path.is_file():
        raise ValueError(f"--variants {text}: no such YAML file")
    target = str(path.resolve()) if is_path else (text if path.suffix.lower() in {".yaml", ".yml"} else f"{text}.yaml")
    try:
        with _quiet_ultralytics():
            cfg = yaml_model_load(target)
    except (FileNotFoundError, OSError) as err:
        raise ValueError(
            f"--variants {text}: not a shipped model name (yolov8n-msda, yolov8n-global, yolov8n-cbam, "
            "yolov8n-psa, yolo11n-msda), an Ultralytics model name (yolov8n, yolo11n, ...) or an existing YAML file"
        ) from err
    except Exception as err:  # a YAML that does not parse: report it, do not train on it
        raise ValueError(f"--variants {text}: cannot read the model YAML ({type(err).__name__}: {err})") from err
    if not isinstance(cfg, dict) or "backbone" not in cfg or "head" not in cfg:
        raise ValueError(f"--variants {text}: not a model YAML (needs backbone: and head:)")
    task = guess_model_task(cfg)
    if task != "detect":
        raise ValueError(f"--variants {text}: a {task} model; yolo-compare trains detectors")
    return Variant(path.stem if is_path else Path(target).stem, target)


# ---------------------------------------------------------------------------------------------- Ultralytics


@contextlib.contextmanager
def _quiet_ultralytics() -> Iterator[None]:
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel(40)
    try:
        yield
    finally:
        LOGGER.setLevel(level)


@contextlib.contextmanager
def _no_downloads(amp: bool) -> Iterator[None]:
    """Stop the two downloads a training run attempts and does not need.

    No Ultralytics setting stops them: ``check_det_dataset`` fetches Arial.ttf for plots on every dataset check
    (even with ``plots=False``), and with AMP on CUDA ``check_amp`` fetches a pretrained YOLO26n to compare fp32
    against AMP outputs. Inside this block the first is a no-op and the second trusts ``--amp``.
    """
    from ultralytics.data import utils as data_utils
    from ultralytics.engine import trainer as trainer_module

    saved = data_utils.check_font, trainer_module.check_amp
    data_utils.check_font = lambda *args, **kwargs: None
    trainer_module.check_amp = lambda model: amp
    try:
        yield
    finally:
        data_utils.check_font, trainer_module.check_amp = saved


def _torch_device(device: str):
    import torch

    if device == "cpu":
        return torch.device("cpu")
    return torch.device(device if device.startswith("cuda") else f"cuda:{device}")


def _train_run(variant: Variant, seed: int, settings: CompareSettings, data_yaml: Path, run_dir: Path) -> dict:
    """Train one (variant, seed) with Ultralytics' trainer, then measure the trained model."""
    import torch
    from ultralytics import YOLO

    device = _torch_device(settings.device)
    clock: dict[str, float] = {"train_s": 0.0, "images": 0, "peak": 0}

    def on_train_start(trainer) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def on_epoch_start(trainer) -> None:
        clock["t0"] = time.perf_counter()

    def on_epoch_end(trainer) -> None:  # runs before the epoch's validation
        clock["train_s"] += time.perf_counter() - clock["t0"]
        clock["images"] += len(trainer.train_loader.dataset)
        if device.type == "cuda":
            clock["peak"] = max(clock["peak"], torch.cuda.max_memory_allocated(device))

    start = time.perf_counter()
    model = YOLO(variant.yaml)
    model.add_callback("on_train_start", on_train_start)
    model.add_callback("on_train_epoch_start", on_epoch_start)
    model.add_callback("on_train_epoch_end", on_epoch_end)
    with _no_downloads(settings.amp):
        metrics = model.train(
            data=str(data_yaml),
            epochs=settings.epochs,
            imgsz=settings.imgsz,
            batch=settings.batch,
            seed=seed,
            deterministic=True,
            workers=0,
            device=settings.device,
            project=str(run_dir.parent.resolve()),
            name=run_dir.name,
            exist_ok=True,
            plots=False,
            amp=settings.amp,
            val=True,
            **RECIPE,
        )
    train_wall = time.perf_counter() - start
    best = run_dir / "weights" / "best.pt"
    measured = _measure(best, settings, device)
    if device.type == "cuda":
        measured["train_memory_bytes"] = int(clock["peak"])
        measured["memory_method"] = "cuda_max_memory_allocated"
    return {
        "variant": variant.name,
        "yaml": variant.yaml,
        "seed": seed,
        "map50": float(metrics.box.map50),
        "map50_95": float(metrics.box.map),
        "epochs": settings.epochs,
        "train_s": clock["train_s"],
        "train_images": int(clock["images"]),
        "train_img_s": clock["images"] / clock["train_s"] if clock["train_s"] else float("nan"),
        "train_wall_s": train_wall,
        "weights": str(best),
        **measured,
    }


def _load_trained(weights: Path, device):
    from ultralytics import YOLO

    return YOLO(str(weights)).model.float().to(device)


def _measure(weights: Path, settings: CompareSettings, device) -> dict[str, Any]:
    """Params, GFLOPs, inference ms and (CPU) the bytes saved for backward of the trained model."""
    import copy

    import torch

    from dilateformer.analysis.measure import gflops, median_ms, saved_for_backward_bytes

    model = _load_trained(weights, device)
    params = sum(p.numel() for p in model.parameters())
    x = torch.zeros(1, 3, settings.imgsz, settings.imgsz, device=device)
    fused = copy.deepcopy(model).fuse(verbose=False).eval()
    compute = gflops(fused, x)  # GFLOPs, not GMACs: the unit Ultralytics users read
    with torch.no_grad():
        inference_ms = median_ms(lambda: fused(x), repeats=10, warmup=2, device=device)
    trainable = copy.deepcopy(model).train().requires_grad_(True)
    batch = torch.zeros(settings.batch, 3, settings.imgsz, settings.imgsz, device=device)
    saved = saved_for_backward_bytes(lambda: trainable(batch))
    return {
        "params": params,
        "gflops": compute,
        "inference_ms": inference_ms,
        "train_memory_bytes": saved,
        "memory_method": "saved_for_backward",
    }


# ------------------------------------------------------------------------------------------------- locality


def _val_images(data_yaml: Path, count: int, imgsz: int):
    """Up to ``count`` validation images, resized to ``imgsz`` square, as a float batch in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image
    from ultralytics.data.utils import IMG_FORMATS, check_det_dataset

    with _no_downloads(False), _quiet_ultralytics():
        data = check_det_dataset(str(data_yaml))
    vals = data["val"] if isinstance(data["val"], list) else [data["val"]]
    files: list[Path] = []
    for v in vals:
        v = Path(v)
        if v.is_dir():
            files += sorted(p for p in v.rglob("*") if p.suffix.lstrip(".").lower() in IMG_FORMATS)
        elif v.suffix == ".txt":
            files += [Path(line.strip()) for line in v.read_text().splitlines() if line.strip()]
    if not files:
        raise ValueError(f"{data_yaml}: no validation images found for the locality measure")
    arrays = [
        np.asarray(Image.open(f).convert("RGB").resize((imgsz, imgsz), Image.BILINEAR), dtype=np.float32)
        for f in files[:count]
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0


def _locality(run: dict[str, Any], data_yaml: Path, settings: CompareSettings, output: Path) -> dict[str, Any]:
    from dilateformer.analysis.locality import locality_figure, locality_table, measure_locality

    model = _load_trained(Path(run["weights"]), _torch_device(settings.device)).eval()
    images = _val_images(data_yaml, LOCALITY_IMAGES, settings.imgsz).to(next(model.parameters()).device)
    from dilateformer.integrations.ultralytics_modules import DEFAULT_DILATIONS

    # The windows of the MSDA variant at the same places (dilations 1-4): the attention it would be limited to.
    results = measure_locality(model, images, kernel_size=3, dilations=DEFAULT_DILATIONS)
    title = f"{run['variant']} (seed {run['seed']}, trained): attention locality at {settings.imgsz}px"
    figure = locality_figure(results, output / "locality.png", title=title)
    return {
        "variant": run["variant"],
        "seed": run["seed"],
        "weights": run["weights"],
        "images": int(images.shape[0]),
        "table": locality_table(results),
        "layers": [r.as_dict() for r in results],
        "png": str(figure),
    }


def _has_global_attention(run: dict[str, Any]) -> bool:
    text = Path(run["yaml"]).read_text() if Path(run["yaml"]).is_file() else ""
    if not text:
        from dilateformer.integrations.ultralytics_modules import shipped_yaml

        shipped = shipped_yaml(run["yaml"])
        text = shipped.read_text() if shipped else ""
    return "GlobalAttn" in text


# ------------------------------------------------------------------------------------------------------ run


def default_data(output: Path, settings: CompareSettings) -> Path:
    """The synthetic defect set, generated (once) into ``output/data/defects-<settings>``."""
    from dilateformer.integrations.defects import make_defect_dataset

    name = f"defects-s{settings.data_seed}-{settings.num_train}x{settings.num_val}-{settings.image_size}px"
    return Path(
        make_defect_dataset(
            output / "data" / name,
            seed=settings.data_seed,
            num_train=settings.num_train,
            num_val=settings.num_val,
            image_size=settings.image_size,
        )
    )


def run_comparison(
    variants: Sequence[Variant],
    seeds: Sequence[int],
    settings: CompareSettings,
    output: str | Path,
    data: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train every variant with every seed (skipping finished runs), then write the table, JSON and PNGs.

    Returns the JSON payload (also written to ``output/yolo-compare.json``), whose ``table`` is the printed
    table. Raises ValueError for settings that clash with the folder's earlier runs.
    """
    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    if not variants or not seeds:
        raise ValueError("variants and seeds must not be empty")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"--variants: two variants share a name ({names}); rename one of the YAML files")
    start = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    data_yaml = Path(data) if data is not None else default_data(output, settings)
    if not data_yaml.is_file():
        raise FileNotFoundError(f"--data {data_yaml}: no such data YAML")
    key = settings_key(settings, data_yaml)
    check_settings(output, key)
    jobs = [(v, s) for v in variants for s in seeds]
    results: list[dict[str, Any]] = []
    for i, (variant, seed) in enumerate(jobs, 1):
        run_dir = output / "runs" / f"{variant.name}-s{seed}"
        result_path = run_dir / "result.json"
        if result_path.is_file():
            result = json.loads(result_path.read_text())
            if result.get("settings") == key:
                results.append(result)
                progress(f"[{i}/{len(jobs)}] {variant.name} seed {seed}: finished earlier, skipped ({result_path})")
                continue
        if run_dir.exists():  # an unfinished run (killed mid-way): start it over, never resume a half epoch
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        result = _train_run(variant, seed, settings, data_yaml, run_dir)
        result["wall_s"] = time.perf_counter() - t0
        result["settings"] = key
        atomic_write_json(result_path, result)
        results.append(result)
        progress(
            f"[{i}/{len(jobs)}] {variant.name} seed {seed}: mAP50-95 {result['map50_95']:.3f}, "
            f"{result['wall_s']:.0f} s ({i}/{len(jobs)} done)"
        )
    rows = summarize(names, results)
    shown = {**key, "data_name": data_yaml.parent.name or str(data_yaml), "device": settings.device}
    table = compare_table(rows, shown)
    title = (
        f"yolo-compare on {shown['data_name']}: {settings.epochs} epochs, {settings.imgsz}px, "
        f"{len(seeds)} seed(s) per variant"
    )
    figure = compare_figure(rows, output / "yolo-compare.png", title)
    locality = None
    global_runs = [r for r in results if _has_global_attention(r)]
    if global_runs:
        first = min(global_runs, key=lambda r: (names.index(r["variant"]), seeds.index(r["seed"])))
        locality = _locality(first, data_yaml, settings, output)
    import ultralytics

    payload = {
        "command": "yolo-compare",
        "settings": key,
        "device": settings.device,
        "seeds": list(seeds),
        "variants": [dataclasses.asdict(v) for v in variants],
        "ultralytics": ultralytics.__version__,
        "rows": rows,
        "runs": results,
        "table": table,
        "png": str(figure),
        "locality": locality,
        "runs_wall_s": sum(r["wall_s"] for r in results),
        "total_wall_s": time.perf_counter() - start,
    }
    atomic_write_json(output / "yolo-compare.json", payload)
    return payload
