"""``dilateformer train``, step by step: locate the run, resolve its config, then build the model, the data and
the optimisation, restore a resumed run, and fit (the epoch loop with evaluation, checkpoints and logs).

:func:`run_train` reads top to bottom in that order; each step is one function of this module.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dilateformer.errors import CommandError
from dilateformer.files import atomic_path
from dilateformer.train.recipes import changed_on_resume, resolve_config

if TYPE_CHECKING:  # imported by the commands: the process-group module loads only when a command runs
    from dilateformer.train.distributed import DistInfo

RESUME_AUTO = "auto"
DEFAULT_DEVICE = "auto"
DEFAULT_LOG_INTERVAL = 50


def run_train(args: argparse.Namespace) -> int:
    from dilateformer.train import distributed

    info = distributed.init(args.device or DEFAULT_DEVICE)
    say = print if info.is_main else (lambda *a, **k: None)
    run = locate_run(args, info, say)
    config, notes = resolve_config(args, run.saved["config"] if run.saved else None)
    if run.saved is not None:
        for line in changed_on_resume(args, run.saved["config"]):
            warn(line)
    if not config["dataset"] and not config["data_dir"]:
        raise CommandError("no data: pass --data-dir DIR (ImageFolder with train/ and val/) or --dataset digits")
    if info.is_main:
        _check_writable(run.output)
    say(f"defaults ({notes[0]} recipe): " + (", ".join(notes[1:]) or "none"))

    torch.manual_seed(config["seed"])  # every rank builds the same weights (DDP also broadcasts rank 0's)
    classes = _classes(config)
    model, data_cfg = build_model(config, len(classes), info, resuming=run.saved is not None)
    config["img_size"] = config["img_size"] or data_cfg["input_size"][-1]
    data = build_data(config, classes, data_cfg, info)
    check_input_size(model, config["img_size"], info.device, config["model"])
    opt = build_optimization(model, config, data, info)
    progress = Progress()
    if run.saved is not None:
        progress = restore(run, model, opt, classes, info)
        if progress.start_epoch >= opt.num_epochs:
            say(
                f"{run.last_path} already finished all {opt.num_epochs} epochs (best top-1 {progress.best_top1:.2f}% "
                f"at epoch {progress.best_epoch + 1}); nothing to train: raise --epochs to train longer"
            )
            return 0
        say(
            f"resumed {run.last_path} at epoch {progress.start_epoch + 1}/{opt.num_epochs} "
            f"(best top-1 {progress.best_top1:.2f}%)"
        )
    return fit(model, config, data, opt, progress, run.output, info, say, args.log_interval or DEFAULT_LOG_INTERVAL)


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class RunLocation:
    """Where the run lives, and what a resumed run saved (``saved`` is None for a fresh run)."""

    output: Path
    last_path: Path | None = None
    weights: dict[str, torch.Tensor] | None = None
    saved: dict[str, Any] | None = None


def locate_run(args: argparse.Namespace, info: DistInfo, say: Callable) -> RunLocation:
    """A fresh run, ``--resume PATH``, ``--resume auto`` or a torchrun ``--max-restarts`` restart."""
    from dilateformer.train import checkpoint as ckpt
    from dilateformer.train import distributed

    resume = args.resume
    if resume is None and distributed.restart_count() > 0:
        resume = RESUME_AUTO
        say(f"torchrun restart #{distributed.restart_count()}: resuming from the run's last checkpoint")
    last_path = ckpt.find_last(resume) if resume and resume != RESUME_AUTO else None
    if args.output:
        output = Path(args.output)
    else:
        output = last_path.parent if last_path else _default_output(resolve_config(args, None)[0])
    if resume == RESUME_AUTO and (output / "last.safetensors").exists():
        last_path = output / "last.safetensors"
    elif resume == RESUME_AUTO:
        say(f"--resume auto: {output} holds no run yet; starting fresh")
    if last_path is not None:
        weights, _, saved = ckpt.load_last(last_path)
        return RunLocation(output, last_path, weights, saved)
    if info.is_main and (output / "last.safetensors").exists():
        raise CommandError(
            f"{output} already holds a run; continue it with --resume {output} (or --resume auto), "
            "or pick another --output"
        )
    return RunLocation(output)


def _default_output(config: dict[str, Any]) -> Path:
    data = config.get("dataset") or Path(config.get("data_dir") or "data").resolve().name
    return Path("output") / "train" / f"{config['model']}-{data}"


def _check_writable(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise CommandError(
            f"cannot write to output directory {output} ({error.strerror or error}); choose another --output"
        ) from None


def warn(line: str) -> None:
    print(f"dilateformer train: warning: {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- the model


def _classes(config: dict[str, Any]) -> list[str]:
    """The class names, from the training split (the model's head is sized by them)."""
    from dilateformer.train.data import build_dataset

    probe = build_dataset(config["dataset"] or "", config["data_dir"], "train", None, config["img_size"] or 32)
    return list(probe.classes)


def build_model(
    config: dict[str, Any], num_classes: int, info: DistInfo, resuming: bool
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model on ``info.device``, with its pretrained/initial weights and retrofit; and timm's data config."""
    from timm.data import resolve_data_config

    from dilateformer.train.modeling import create_model, load_file_into, parse_model_kwargs, retrofit

    if config["pretrained"] and not config["pretrained_path"]:
        raise CommandError("--pretrained needs --pretrained-path FILE (local weights; nothing is downloaded)")
    model = create_model(
        config["model"],
        num_classes,
        drop_path_rate=config["drop_path"],
        pretrained_path=config["pretrained_path"] if config["pretrained"] else None,
        model_kwargs=parse_model_kwargs(config["model_kwargs"]),
    )
    if config["initial_checkpoint"] and not resuming:
        load_file_into(model, config["initial_checkpoint"], strict=True, new_head_ok=False, flag="--initial-checkpoint")
    if config["retrofit"]:
        # After the pretrained weights went into the original structure; the keys stay the same, so resuming and
        # --initial-checkpoint files fit either way.
        model = retrofit(model, config["retrofit"])
    data_cfg = resolve_data_config({}, model=model)
    if config["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    return model.to(info.device), data_cfg


def check_input_size(model: torch.nn.Module, img_size: int, device: torch.device, name: str) -> None:
    """One forward at ``img_size`` on a 1-image batch: a model of fixed input size fails here in one line."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size, device=device))
    except (AssertionError, RuntimeError, ValueError) as error:
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise CommandError(
            f"model {name} cannot take {img_size}x{img_size} input ({first}); pick another --img-size"
        ) from None
    except MemoryError:
        raise CommandError(f"not enough memory for {name} at {img_size}x{img_size}; lower --img-size") from None
    finally:
        model.train(was_training)


def match_depthwise_grad_layout(model: torch.nn.Module) -> None:
    """Give depthwise conv weights, shape (C, 1, k, k), the strides their gradients come back with.

    The stride of a size-1 dimension is arbitrary, and the conv backward picks another one than the parameter
    has; DDP then copies that gradient into its bucket every step and warns "Grad strides do not match bucket
    view strides". Same values, same memory order: only the strides are made to agree.
    """
    for param in model.parameters():
        if param.dim() == 4 and param.shape[1] == 1:
            c, _, kh, kw = param.shape
            strided = torch.empty_strided(param.shape, (kh * kw, 1, kw, 1), dtype=param.dtype, device=param.device)
            param.data = strided.copy_(param.data)


# ----------------------------------------------------------------------------------------------- the data


@dataclass
class Data:
    classes: list[str]
    train_set: Any
    val_set: Any
    loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    sampler: torch.utils.data.DistributedSampler
    generator: torch.Generator  # re-seeded every epoch: the workers' seeds are a function of (seed, epoch)
    eval_crop: float
    data_cfg: dict[str, Any]


def build_data(config: dict[str, Any], classes: list[str], data_cfg: dict[str, Any], info: DistInfo) -> Data:
    """timm's train/eval transforms, the datasets, and their loaders (training data split by DistributedSampler)."""
    from timm.data import create_transform

    from dilateformer.train import distributed
    from dilateformer.train.data import balance_warning, build_dataset, patch_rand_augment, summarize_skipped

    img_size = config["img_size"]
    train_tf = patch_rand_augment(
        create_transform(
            img_size,
            is_training=True,
            scale=tuple(config["scale"]),
            hflip=config["hflip"],
            color_jitter=config["color_jitter"] or 0.0,
            auto_augment=config["aa"],
            re_prob=config["reprob"],
            interpolation=data_cfg["interpolation"],
            mean=data_cfg["mean"],
            std=data_cfg["std"],
        )
    )
    eval_crop = 1.0 if config["dataset"] == "digits" else data_cfg["crop_pct"]
    val_tf = create_transform(
        img_size,
        interpolation=data_cfg["interpolation"],
        mean=data_cfg["mean"],
        std=data_cfg["std"],
        crop_pct=eval_crop,
    )
    train_set = build_dataset(config["dataset"] or "", config["data_dir"], "train", train_tf, img_size)
    val_set = build_dataset(config["dataset"] or "", config["data_dir"], "val", val_tf, img_size, classes=classes)
    if info.is_main:
        for line in (summarize_skipped(train_set.skipped + val_set.skipped) if hasattr(train_set, "skipped") else None,
                     balance_warning(classes, _class_counts(train_set, len(classes)))):  # fmt: skip
            if line:
                warn(line)
    per_rank = len(train_set) // info.world_size
    batch_size = config["batch_size"]
    if per_rank < batch_size:
        raise CommandError(
            f"batch size {batch_size} is larger than the {per_rank} training images each process sees; lower -b"
        )
    if (config["mixup"] or config["cutmix"]) and batch_size % 2:
        raise CommandError(f"mixup/cutmix need an even batch size, got -b {batch_size}")
    sampler = torch.utils.data.DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config["seed"]
    )
    generator = torch.Generator()
    pin = info.device.type == "cuda"
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, sampler=sampler,
                                         num_workers=config["workers"], drop_last=True, generator=generator,
                                         pin_memory=pin)  # fmt: skip
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size,
                                             sampler=distributed.ShardSampler(len(val_set), info.rank, info.world_size),
                                             num_workers=config["workers"], generator=torch.Generator().manual_seed(0),
                                             pin_memory=pin)  # fmt: skip
    return Data(classes, train_set, val_set, loader, val_loader, sampler, generator, eval_crop, data_cfg)


def _class_counts(dataset, num_classes: int) -> list[int]:
    labels = [s.label for s in dataset.samples] if hasattr(dataset, "samples") else list(dataset.targets)
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()


# ---------------------------------------------------------------------------------------- the optimisation


@dataclass
class Optimization:
    lr: float
    optimizer: torch.optim.Optimizer
    scheduler: Any
    num_epochs: int
    criterion: torch.nn.Module
    mixup_fn: Callable | None
    model_ema: Any  # timm ModelEmaV3, or None
    scaler: torch.amp.GradScaler | None


# torch's Adam and AdamW have a fused kernel on CPU and CUDA: one pass over each parameter instead of about ten
# (Tiny at batch 8 on 2 CPU cores: the optimizer step 66 -> 17 ms, benchmarks/bench_breakdown.py's optimizer row).
FUSED_OPTIMIZERS = ("adam", "adamw")


def fused_kwargs(opt: str, device: torch.device) -> dict[str, bool]:
    """``{"fused": True}`` where timm's ``opt`` builds a torch optimizer with a fused kernel for ``device``."""
    return {"fused": True} if opt.lower() in FUSED_OPTIMIZERS and device.type in ("cpu", "cuda") else {}


def build_optimization(model: torch.nn.Module, config: dict[str, Any], data: Data, info: DistInfo) -> Optimization:
    """All from timm: the optimizer (linear lr scaling), a per-step schedule, mixup + loss, EMA; the AMP scaler."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    global_batch = config["batch_size"] * info.world_size
    lr = config["lr"] if config["lr"] is not None else config["lr_base"] * global_batch / config["lr_base_size"]
    optimizer = create_optimizer_v2(
        model, opt=config["opt"], lr=lr, weight_decay=config["weight_decay"], **fused_kwargs(config["opt"], info.device)
    )
    scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        sched=config["sched"],
        num_epochs=config["epochs"],
        warmup_epochs=config["warmup_epochs"],
        warmup_lr=config["warmup_lr"],
        min_lr=config["min_lr"],
        step_on_epochs=False,  # per-step schedule: smooth warmup even for short runs
        updates_per_epoch=len(data.loader),
    )
    mixup_fn = None
    if config["mixup"] > 0 or config["cutmix"] > 0:
        mixup_fn = Mixup(
            mixup_alpha=config["mixup"],
            cutmix_alpha=config["cutmix"],
            label_smoothing=config["smoothing"],
            num_classes=len(data.classes),
        )
        criterion = SoftTargetCrossEntropy()
    elif config["smoothing"] > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=config["smoothing"])
    else:
        criterion = torch.nn.CrossEntropyLoss()
    model_ema = ModelEmaV3(model, decay=config["model_ema_decay"]) if config["model_ema"] else None
    scaler = torch.amp.GradScaler("cuda") if config["amp"] and info.device.type == "cuda" else None
    return Optimization(lr, optimizer, scheduler, num_epochs, criterion, mixup_fn, model_ema, scaler)


# ------------------------------------------------------------------------------------------------ restore


@dataclass
class Progress:
    """Where the epoch loop starts: nothing done for a fresh run, the saved state's counters on resume."""

    start_epoch: int = 0
    num_updates: int = 0
    best_top1: float = float("-inf")
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)


def _match_state_shapes(optimizer: torch.optim.Optimizer) -> None:
    """View per-parameter optimizer state in its parameter's shape where only the shape changed.

    Runs saved before MSDA's qkv became an ``nn.Linear`` hold its moments as ``(3C, C, 1, 1)``; the weights load
    through the checkpoint filter, and this keeps the moments in step (same values, same order).
    """
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape != param.shape and value.numel() == param.numel() > 1:
                state[key] = value.reshape(param.shape)


def restore(run: RunLocation, model: torch.nn.Module, opt: Optimization, classes: list[str], info: DistInfo):
    """Load a resumed run's weights, optimizer, scheduler, EMA and RNG states; returns where to go on."""
    from timm.utils import unwrap_model

    from dilateformer.train import checkpoint as ckpt
    from dilateformer.train.modeling import load_state_into

    saved = run.saved
    load_state_into(model, run.weights, source=str(run.last_path))
    opt.optimizer.load_state_dict(saved["optimizer"])
    _match_state_shapes(opt.optimizer)
    opt.scheduler.load_state_dict(saved["scheduler"])
    if opt.model_ema is not None:
        if saved.get("ema") is None:
            raise CommandError(f"--model-ema: {run.last_path} was trained without an EMA; resume without --model-ema")
        unwrap_model(opt.model_ema).load_state_dict(saved["ema"])
    if saved.get("class_names") != classes:
        raise CommandError(
            f"the data's classes {classes[:5]}... differ from the run's {saved.get('class_names', [])[:5]}..."
        )
    progress = Progress(saved["epoch"] + 1, saved["num_updates"], saved["best_top1"], saved["best_epoch"],
                        list(saved["history"]))  # fmt: skip
    ckpt.set_rng_state(saved["rng"])
    if info.is_main:
        progress.best_top1, progress.best_epoch = _ensure_best(
            run.output, progress.best_top1, progress.best_epoch, saved, run.weights, metadata_of(run.last_path)
        )
    return progress


def metadata_of(path: Path) -> dict[str, Any]:
    from dilateformer.train.checkpoint import read_metadata

    return read_metadata(path)


def _ensure_best(output: Path, best_top1: float, best_epoch: int, state, weights, last_meta) -> tuple[float, int]:
    """On resume, make sure ``best.safetensors`` holds the best epoch the state records.

    If it is missing (a save interrupted by an older version, or a deleted file) and the best epoch is the last
    one saved, it is rewritten from ``last``'s weights; otherwise the best is chosen again from the epochs to come.
    """
    from dilateformer.train import checkpoint as ckpt

    best_file = output / "best.safetensors"
    if best_epoch < 0 or best_file.exists():
        return best_top1, best_epoch
    if best_epoch == state["epoch"]:
        use_ema = state.get("ema") is not None
        tensors = state["ema"] if use_ema else weights
        meta = {k: v for k, v in last_meta.items() if k != "generation"}
        ckpt.save_checkpoint_weights(
            best_file, tensors, {**meta, "val_top1": best_top1, "weights": "ema" if use_ema else "model"}
        )
        warn(f"{best_file} was missing; rewrote it from the saved epoch {best_epoch + 1} (top-1 {best_top1:.2f}%)")
        return best_top1, best_epoch
    warn(
        f"{best_file} (epoch {best_epoch + 1}, top-1 {best_top1:.2f}%) is missing and cannot be rebuilt; "
        "the best is chosen again from the epochs still to run"
    )
    return float("-inf"), -1


# ---------------------------------------------------------------------------------------------------- fit


def seed_epoch(seed: int, epoch: int, rank: int) -> int:
    """Seed every RNG for one epoch so that the epoch is a function of (seed, epoch, rank) and its start state.

    This is what makes resume exact: a run killed mid-epoch restarts that epoch from the last checkpoint and
    draws the same augmentations, mixup coefficients and drop-path masks as the uninterrupted run.
    """
    value = (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**32)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return value


def _wrap_for_training(model: torch.nn.Module, config: dict[str, Any], info: DistInfo) -> torch.nn.Module:
    """DDP when distributed, then ``torch.compile`` if asked; ``model`` itself stays the unwrapped module."""
    train_model = model
    if info.distributed:
        # Gradients as views into the buckets: no copy per step, and no stride-mismatch warning for the
        # parameters whose layout differs from the bucket's (the depthwise convs).
        match_depthwise_grad_layout(model)
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None, gradient_as_bucket_view=True
        )
    if config["compile"]:
        train_model = torch.compile(train_model)
    return train_model


def _checkpoint_metadata(model: torch.nn.Module, config: dict[str, Any], data: Data) -> dict[str, Any]:
    """What ``eval``, ``predict`` and ``retrofit`` need to rebuild the model from the weights file alone."""
    from dilateformer.train.modeling import parse_model_kwargs

    metadata = {
        "model": config["model"],
        "model_kwargs": parse_model_kwargs(config["model_kwargs"]),
        "num_classes": len(data.classes),
        "class_names": data.classes,
        "img_size": config["img_size"],
        "mean": list(data.data_cfg["mean"]),
        "std": list(data.data_cfg["std"]),
        "crop_pct": data.eval_crop,
        "interpolation": data.data_cfg["interpolation"],
        "dataset": config["dataset"] or str(config["data_dir"]),
    }
    if config["retrofit"]:
        from dilateformer.retrofit import retrofit_config

        metadata["retrofit"] = retrofit_config(model)
    return metadata


def fit(
    model: torch.nn.Module,
    config: dict[str, Any],
    data: Data,
    opt: Optimization,
    progress: Progress,
    output: Path,
    info: DistInfo,
    say: Callable,
    log_interval: int,
) -> int:
    """The epoch loop: train, evaluate (and the EMA), save best then last, write metrics and a summary line."""
    from timm.utils import unwrap_model

    from dilateformer.train import checkpoint as ckpt
    from dilateformer.train import distributed
    from dilateformer.train.engine import amp_dtype, evaluate, train_one_epoch

    train_model = _wrap_for_training(model, config, info)
    model_ema, num_epochs = opt.model_ema, opt.num_epochs
    param_count = sum(p.numel() for p in model.parameters())
    say(
        f"training {config['model']} ({param_count / 1e6:.2f} M params, {len(data.classes)} classes) on "
        f"{len(data.train_set)} images ({config['dataset'] or config['data_dir']}), val {len(data.val_set)}, "
        f"{info.world_size} process(es) x batch {config['batch_size']}, lr {opt.lr:.3g}, {num_epochs} epochs, "
        f"img {config['img_size']}, device {info.device}"
        + (f", {str(amp_dtype(info.device)).removeprefix('torch.')} autocast" if config["amp"] else "")
        + f"; output {output}"
    )
    metadata = _checkpoint_metadata(model, config, data)
    writer = _tensorboard(output) if info.is_main else None
    best_top1, best_epoch, num_updates, history = (progress.best_top1, progress.best_epoch, progress.num_updates,
                                                   progress.history)  # fmt: skip

    for epoch in range(progress.start_epoch, num_epochs):
        data.generator.manual_seed(seed_epoch(config["seed"], epoch, info.rank))
        data.sampler.set_epoch(epoch)
        train_stats, num_updates = train_one_epoch(
            train_model,
            data.loader,
            opt.optimizer,
            opt.criterion,
            opt.scheduler,
            info,
            epoch=epoch,
            num_epochs=num_epochs,
            num_updates=num_updates,
            mixup_fn=opt.mixup_fn,
            model_ema=model_ema,
            amp=config["amp"],
            scaler=opt.scaler,
            clip_grad=config["clip_grad"],
            log_interval=log_interval,
        )
        opt.scheduler.step(epoch + 1)
        val = evaluate(model, data.val_loader, info, amp=config["amp"], desc="val")
        ema_val = (
            evaluate(unwrap_model(model_ema), data.val_loader, info, amp=config["amp"], desc="val ema")
            if model_ema
            else None
        )
        judged = ema_val or val
        is_best = judged.top1 > best_top1
        if is_best:
            best_top1, best_epoch = judged.top1, epoch
        row = {
            "epoch": epoch + 1,
            "train_loss": train_stats.loss,
            "train_acc": train_stats.top1,
            "val_loss": val.loss,
            "val_top1": val.top1,
            "val_top5": val.top5,
            "ema_val_top1": ema_val.top1 if ema_val else "",
            "lr": opt.optimizer.param_groups[0]["lr"],
            "img_per_s": train_stats.img_per_s,
            "epoch_seconds": train_stats.seconds,
        }
        history.append(row)
        if info.is_main:
            meta = {**metadata, "epoch": epoch + 1, "val_top1": val.top1}
            state = {
                "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()},
                "epoch": epoch,
                "num_updates": num_updates,
                "optimizer": opt.optimizer.state_dict(),
                "scheduler": opt.scheduler.state_dict(),
                "ema": unwrap_model(model_ema).state_dict() if model_ema else None,
                "best_top1": best_top1,
                "best_epoch": best_epoch,
                "history": history,
                "class_names": data.classes,
                "rng": ckpt.rng_state(),
            }
            if is_best:
                # Best first, then last: a kill in between leaves last at the previous epoch, whose resume redoes
                # this epoch and writes best again. The other order could commit a last that points at a best
                # that was never written.
                best_weights = unwrap_model(model_ema).state_dict() if model_ema else model.state_dict()
                ckpt.save_checkpoint_weights(
                    output / "best.safetensors", best_weights, _best_meta(meta, judged.top1, model_ema)
                )
            ckpt.save_last(output, model.state_dict(), meta, state)
            _write_csv(output / "metrics.csv", history)
            if writer is not None:
                for key, value in row.items():
                    if key != "epoch" and value != "":
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
        distributed.barrier(info)
        ema_text = f" ema {ema_val.top1:.2f}%" if ema_val else ""
        say(
            f"epoch {epoch + 1}/{num_epochs}  train loss {train_stats.loss:.4f} acc {train_stats.top1:.2f}%  "
            f"val loss {val.loss:.4f} top-1 {val.top1:.2f}% top-5 {val.top5:.2f}%{ema_text}  "
            f"lr {opt.optimizer.param_groups[0]['lr']:.3g}  {train_stats.img_per_s:.1f} img/s  "
            f"{train_stats.seconds:.1f}s{'  *best*' if is_best else ''}",
            flush=True,
        )
    if writer is not None:
        writer.close()
    best_file = output / "best.safetensors"
    if info.is_main and not best_file.exists():
        raise CommandError(f"{best_file} is missing at the end of the run; resume with --resume {output} to rewrite it")
    say(f"done: best val top-1 {best_top1:.2f}% at epoch {best_epoch + 1}; weights {best_file}")
    return 0


def _best_meta(meta: dict[str, Any], top1: float, model_ema) -> dict[str, Any]:
    return {**meta, "val_top1": top1, "weights": "ema" if model_ema else "model"}


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite the whole CSV from the checkpointed history: after a resume it matches the weights exactly."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(output / "tensorboard"))
