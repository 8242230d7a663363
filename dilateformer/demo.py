"""``dilateformer demo``: MSDA against its global-attention twin, in miniature, offline, on 2 CPU cores.

1. Train a small DilateFormer (MSDA in stages 1-2, global attention in 3-4) and its twin with global attention
   everywhere (the same parameters) on scikit-learn's digits; tabulate accuracy, params, GMACs, MB saved for
   backward and img/s.
2. Sweep the input resolution: MSDA's multiply-adds, time and memory grow linearly with the pixel count, global
   attention's multiply-adds and time quadratically.
3. Draw where a query pixel attends on a few validation digits, with the trained models at the 32x32 they were
   trained at (MSDA's dilated windows next to the twin's global map), with
   :func:`dilateformer.analysis.visualize.attention_figure`.
4. Measure how local the trained twin's global attention is on the validation digits
   (:func:`dilateformer.analysis.locality.measure_locality`): distance, mass inside MSDA's windows, entropy.

The demo trains (:mod:`dilateformer.train`) and measures (:mod:`dilateformer.analysis`), so it is its own layer
above both, below :mod:`dilateformer.cli`; :func:`register` adds its command.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dilateformer.analysis.measure import format_table, loglog_slope, median_ms, saved_for_backward_bytes, to_mb
from dilateformer.analysis.measure import gmacs as measure_gmacs
from dilateformer.errors import CommandError
from dilateformer.files import atomic_write_json
from dilateformer.models import global_twin
from dilateformer.ops.context import default_backend, select_backend

DEMO_MODEL = "dilateformer_nano"
MSDA_LAYOUT = ("msda", "msda", "global", "global")
# Validation digits drawn in the attention figure (the first image of each class, in this order).
FIGURE_DIGITS = (3, 5, 8)


# Epochs and sweep sizes of the full and the --quick run; --help prints them from here.
EPOCHS = {"full": 8, "quick": 1}
SIZES = {"full": [64, 128, 192, 256, 384], "quick": [32, 64]}
MIN_SIZE = 32  # the deepest stage's stride: a smaller input has no token left there


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command to the ``dilateformer`` CLI (see :mod:`dilateformer.cli`)."""
    from dilateformer.argtypes import positive_int

    def sizes_text(mode: str) -> str:
        return ",".join(map(str, SIZES[mode]))

    p = subparsers.add_parser(
        "demo",
        help="offline demo: MSDA vs its global-attention twin on digits, resolution sweep, attention maps, locality",
        description=(
            "Trains a small DilateFormer (MSDA in stages 1-2, global attention in 3-4) and its global-attention "
            "twin on scikit-learn's digits, prints accuracy, params, GMACs, MB saved for backward and img/s, "
            "sweeps the input resolution, draws where a query attends on validation digits and measures how local "
            "the trained twin's attention is. Offline; a few minutes on 2 CPU cores."
        ),
    )
    p.add_argument(
        "--output", default="output/demo", metavar="DIR", help="where demo.json and the PNGs go [output/demo]"
    )
    p.add_argument(
        "--epochs", type=positive_int, default=None, metavar="N",
        help=f"training epochs per model [{EPOCHS['full']}; quick: {EPOCHS['quick']}]",
    )  # fmt: skip
    p.add_argument(
        "--sizes", default=None, metavar="N,N,...",
        help=f"input sides of the resolution sweep, each >= {MIN_SIZE} [{sizes_text('full')}; "
        f"quick: {sizes_text('quick')}]",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny settings, under a minute (tests, smoke checks)")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the weights and the training-data order [0]")
    p.set_defaults(func=run_demo)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    mode = "quick" if args.quick else "full"
    epochs = args.epochs or EPOCHS[mode]
    if args.quick:
        return dict(epochs=epochs, embed_dim=12, img_size=32, batch=64, train_limit=256,
                    sizes=SIZES[mode], repeats=2, figure_digits=2)  # fmt: skip
    return dict(epochs=epochs, embed_dim=24, img_size=32, batch=64, train_limit=None,
                sizes=SIZES[mode], repeats=3, figure_digits=3)  # fmt: skip


def _parse_sizes(text: str | None, default: list[int]) -> list[int]:
    if not text:
        return default
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(s < MIN_SIZE for s in sizes):
        raise CommandError(f"--sizes must be comma-separated integers >= {MIN_SIZE}, got {text!r}")
    return sizes


def _build(embed_dim: int, img_size: int) -> nn.Module:
    from dilateformer.models import create_model

    return create_model(
        DEMO_MODEL, num_classes=10, embed_dim=embed_dim, attn_types=MSDA_LAYOUT, img_size=img_size, drop_path_rate=0.0
    )


def gmacs(model: nn.Module, size: int) -> float:
    """Forward GMACs (billions of multiply-adds) for one ``size x size`` image, attention included."""
    return measure_gmacs(model, torch.zeros(1, 3, size, size))


def saved_mb(model: nn.Module, size: int, batch: int) -> float:
    """MB (10^6 bytes) autograd saves for backward in one training forward of ``batch`` images."""
    model.train()
    x = torch.randn(batch, 3, size, size)
    return to_mb(saved_for_backward_bytes(lambda: model(x).sum()))


def infer_ms(model: nn.Module, size: int, batch: int, repeats: int) -> float:
    model.eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        return median_ms(lambda: model(x), repeats=repeats, warmup=1)


def _train(model: nn.Module, epochs: int, loaders, say) -> tuple[float, float]:
    """The digits recipe (``recipes.DIGITS``: AdamW + cosine from timm), with the lr and warmup of a run of a few
    epochs (2e-3, one epoch) instead of its 20; returns (val top-1 %, train img/s)."""
    from dataclasses import replace

    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from dilateformer.train.distributed import DistInfo
    from dilateformer.train.engine import evaluate, train_one_epoch
    from dilateformer.train.recipes import DIGITS

    recipe = replace(DIGITS, lr=2e-3, warmup_epochs=min(1, epochs - 1), warmup_lr=1e-5)
    train_loader, val_loader = loaders
    optimizer = create_optimizer_v2(model, opt=recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=recipe.sched, num_epochs=epochs, warmup_epochs=recipe.warmup_epochs,
        warmup_lr=recipe.warmup_lr, min_lr=recipe.min_lr, step_on_epochs=False, updates_per_epoch=len(train_loader),
    )  # fmt: skip
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.smoothing)
    info, updates, speed = DistInfo(), 0, float("nan")
    for epoch in range(epochs):
        stats, updates = train_one_epoch(
            model, train_loader, optimizer, criterion, scheduler, info,
            epoch=epoch, num_epochs=epochs, num_updates=updates, log_interval=10**9,
        )  # fmt: skip
        val = evaluate(model, val_loader, info)
        speed = stats.img_per_s
        say(f"  epoch {epoch + 1}/{epochs}  loss {stats.loss:.3f}  val top-1 {val.top1:.1f}%  {speed:.0f} img/s")
    return val.top1, speed


def _loaders(settings: dict[str, Any], seed: int):
    from timm.data import create_transform

    from dilateformer.train.data import DigitsDataset

    size = settings["img_size"]
    train_tf = create_transform(size, is_training=True, scale=(0.75, 1.0), hflip=0.0, color_jitter=0.0)
    val_tf = create_transform(size, crop_pct=1.0)
    train_set = DigitsDataset("train", image_size=size, transform=train_tf)
    val_set = DigitsDataset("val", image_size=size, transform=val_tf)
    if settings["train_limit"]:
        train_set = torch.utils.data.Subset(train_set, range(settings["train_limit"]))
    generator = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=settings["batch"], shuffle=True, drop_last=True, generator=generator
    )
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=256)
    return train_loader, val_loader


def _slope(xs: list[float], ys: list[float]) -> float:
    """:func:`~dilateformer.analysis.measure.loglog_slope`, NaN where it has no answer (demo.json stays numeric)."""
    slope = loglog_slope(xs, ys)
    return float("nan") if slope is None else slope


def run_demo(args: argparse.Namespace) -> int:
    from dilateformer.functional import use_backend

    started = time.perf_counter()
    settings = _settings(args)
    settings["sizes"] = _parse_sizes(args.sizes, settings["sizes"])
    output = Path(args.output)
    try:
        output.mkdir(parents=True, exist_ok=True)
        (output / ".write-test").write_bytes(b"")
        (output / ".write-test").unlink()
    except OSError as error:
        raise CommandError(f"cannot write to {output} ({error.strerror or error}); choose another --output") from None

    def say(text: str = "") -> None:
        print(text, flush=True)

    # "auto" resolves to the native C kernels on CPU: no per-shape compilation while the sweep visits many sizes.
    backend = default_backend()
    resolved = select_backend(backend, torch.device("cpu"), torch.float32)
    mode = "quick" if args.quick else "full"
    say(f"dilateformer demo ({mode}; MSDA backend {resolved}; {torch.get_num_threads()} threads)")
    with use_backend(resolved):
        result = _run(settings, args.seed, output, say)
    result["wall_seconds"] = time.perf_counter() - started
    atomic_write_json(output / "demo.json", result)  # an interrupted write never leaves a truncated demo.json
    say(f"\ndone in {result['wall_seconds']:.0f}s; outputs in {output.resolve()}")
    return 0


def _run(settings: dict[str, Any], seed: int, output: Path, say) -> dict[str, Any]:
    torch.manual_seed(seed)
    loaders = _loaders(settings, seed)
    size, embed = settings["img_size"], settings["embed_dim"]
    models = {"MSDA (msda,msda,global,global)": _build(embed, size)}
    torch.manual_seed(seed)  # the twin starts from its own draw with the same seed, as a separate run would
    models["global twin (global x4)"] = global_twin(models["MSDA (msda,msda,global,global)"], copy_weights=False)
    n_train = len(loaders[0].dataset)
    rows, summary = [], []

    say(f"\n1. training on digits ({n_train} train / {len(loaders[1].dataset)} val images, {size}x{size}), "
        f"{settings['epochs']} epoch(s) each")  # fmt: skip
    for name, model in models.items():
        say(f"{name}:")
        torch.manual_seed(seed)
        top1, train_speed = _train(model, settings["epochs"], loaders, say)
        params = sum(p.numel() for p in model.parameters())
        macs = gmacs(model, size)
        memory = saved_mb(model, size, settings["batch"])
        infer = settings["batch"] / infer_ms(model, size, settings["batch"], settings["repeats"]) * 1e3
        rows.append([name, top1, params, macs, memory, train_speed, infer])
        summary.append(dict(model=name, val_top1=top1, params=params, gmacs=macs, saved_mb=memory,
                            train_img_s=train_speed, infer_img_s=infer))  # fmt: skip
    say("")
    say(format_table(
        ["model", "val top-1 %", "params", f"GMACs@{size}", f"MB saved (b{settings['batch']})", "train img/s",
         "infer img/s"], rows))  # fmt: skip

    say("\n2. resolution sweep: forward time (batch 1) and MB saved for backward (batch 2)")
    sweep: list[dict[str, Any]] = []
    sizes = settings["sizes"]
    for name, model in models.items():
        for s in sizes:
            ms = infer_ms(model, s, 1, settings["repeats"])
            mb = saved_mb(model, s, 2)  # batch 2: BatchNorm cannot train on a single 1x1 map
            sweep.append(dict(model=name, size=s, pixels=s * s, forward_ms=ms, saved_mb=mb, gmacs=gmacs(model, s)))
    sweep_rows = []
    slopes = {}
    for name in models:
        mine = [r for r in sweep if r["model"] == name]
        base = mine[0]
        for r in mine:
            sweep_rows.append([name, f"{r['size']}x{r['size']}", r["pixels"] / base["pixels"], r["forward_ms"],
                               r["forward_ms"] / base["forward_ms"], r["saved_mb"], r["saved_mb"] / base["saved_mb"],
                               r["gmacs"]])  # fmt: skip
        # Slope over the top half of the sweep, where the attention term dominates the fixed costs.
        tail = mine[len(mine) // 2 :] if len(mine) > 2 else mine
        px = [r["pixels"] for r in tail]
        slopes[name] = dict(
            time=_slope(px, [r["forward_ms"] for r in tail]),
            memory=_slope(px, [r["saved_mb"] for r in tail]),
            gmacs=_slope(px, [r["gmacs"] for r in tail]),
        )
    say(format_table(["model", "input", "pixels x", "fwd ms", "time x", "MB saved", "memory x", "GMACs"],
                     sweep_rows))  # fmt: skip
    say("growth exponents (log-log slope vs pixel count over the larger sizes; 1 = linear, 2 = quadratic):")
    for name, slope in slopes.items():
        say(f"  {name}: time {slope['time']:.2f}, memory {slope['memory']:.2f}, GMACs {slope['gmacs']:.2f}")
    if slopes[list(models)[1]]["memory"] < 1.5:
        say(
            "  note: the twin's global attention runs through fused scaled_dot_product_attention, which keeps no "
            "N x N matrix for backward, so its saved memory grows linearly here; its GMACs and time are quadratic. "
            "Implementations that materialise the attention matrix (as the official code does) also grow "
            "quadratically in memory."
        )

    val_set = loaders[1].dataset
    say(f"\n3. attention maps on validation digits, at the {size}x{size} the models were trained at")
    png = output / "attention_digits.png"
    _attention_png(models, png, val_set, settings["figure_digits"], size)
    say(f"  wrote {png}")

    say(f"\n4. how local is the trained twin's global attention? ({len(val_set)} validation digits, {size}x{size})")
    locality, locality_png = _locality(models["global twin (global x4)"], loaders[1], output, size, say)
    return dict(settings=settings, table=summary, sweep=sweep, slopes=slopes, attention_png=str(png),
                locality=locality, locality_png=str(locality_png))  # fmt: skip


def _stroke_query(image) -> tuple[float, float]:
    """The ink pixel nearest the image centre: a query on the digit's stroke, not on the empty background."""
    import numpy as np

    grey = np.asarray(image.convert("L"), dtype=np.float32)
    ys, xs = np.nonzero(grey >= 0.5 * grey.max())
    centre = ((grey.shape[0] - 1) / 2, (grey.shape[1] - 1) / 2)
    best = int(np.argmin((ys - centre[0]) ** 2 + (xs - centre[1]) ** 2))
    return float(ys[best]), float(xs[best])


def _attention_png(models: dict[str, nn.Module], png: Path, val_set, count: int, size: int) -> None:
    from dilateformer.analysis.visualize import attention_figure

    msda, twin = list(models.values())
    msda.eval()
    twin.eval()
    digits = FIGURE_DIGITS[:count]
    images = [val_set.images[val_set.targets.index(d)] for d in digits]
    attention_figure(
        images, msda, queries=[_stroke_query(i) for i in images], stage=0, block=0, output=png, twin=twin, size=size,
        labels=[f"validation digit {d}" for d in digits],
        title=f"Where a query on the stroke looks, trained models at their training size {size}x{size}: "
        "MSDA stages.0.blocks.0 vs the global twin's same block",
    )  # fmt: skip


def _locality(twin: nn.Module, val_loader, output: Path, size: int, say) -> tuple[list[dict[str, Any]], Path]:
    from dilateformer.analysis.locality import (
        TABLE_LEGEND,
        locality_figure,
        locality_table,
        measure_locality,
        union_over_chance,
    )

    results = measure_locality(twin, val_loader, batch_size=64)
    say(locality_table(results))
    say(f"  {TABLE_LEGEND}")
    for r in results:
        if r.uniform_union_share >= 0.999:
            say(f"  {r.name} ({r.grid[0]}x{r.grid[1]} grid): every key is inside the windows; it cannot tell")
        else:
            say(f"  {r.name} ({r.grid[0]}x{r.grid[1]} grid): {100 * r.union_share:.0f}% of the mass inside MSDA's "
                f"windows, uniform attention would put {100 * r.uniform_union_share:.0f}% there "
                f"({union_over_chance(r):.2f}x chance); distance {r.mean_distance_px:.1f} px vs "
                f"{r.uniform_distance_px:.1f} px uniform")  # fmt: skip
    title = f"How local is the trained global twin's attention? validation digits, {size}x{size}"
    png = locality_figure(results, output / "locality_twin.png", title=title)
    say(f"  wrote {png}")
    return [r.as_dict() for r in results], png
