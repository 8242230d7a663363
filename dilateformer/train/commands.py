"""The ``train``, ``eval`` and ``predict`` commands (registered into ``dilateformer.cli``)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dilateformer.errors import CommandError
from dilateformer.files import atomic_path

RESUME_AUTO = "auto"


# ----------------------------------------------------------------------------------------------------------------
# Argument parsing


# Largest --img-size: at 4096 px one float32 RGB input is 200 MB and a DilateFormer-Tiny forward needs tens of GB;
# a larger value is a typo far more often than a plan, and it would end in the kernel's OOM kill with no message.
MAX_IMG_SIZE = 4096


def _float_pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers LOW,HIGH, got {text!r}") from None
    return low, high


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _ranged(kind: type, low: float | None = None, high: float | None = None, *, low_open=False, high_open=False):
    """An argparse ``type=`` that accepts ``kind`` values in a range, finite only, and says the range if not."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    wanted = f"{'an integer' if kind is int else 'a number'}{' ' + ' and '.join(parts) if parts else ''}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        bad = value != value or value in (float("inf"), float("-inf"))
        bad = bad or (low is not None and (value <= low if low_open else value < low))
        bad = bad or (high is not None and (value >= high if high_open else value > high))
        if bad:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    parse.range_text = " and ".join(parts) or "any finite value"
    return parse


_IMG_SIZE = _ranged(int, 1, MAX_IMG_SIZE)
_FRACTION = _ranged(float, 0, 1)
_NON_NEGATIVE = _ranged(float, 0)
_POSITIVE = _ranged(float, 0, low_open=True)


def _device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked against the devices this machine has."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but this machine has no usable CUDA GPU; use cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but there are only {count} GPU(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def _choice_from(what: str, names: Callable[[], list[str]]):
    """An argparse ``type=`` for a timm component name, with the closest names as a hint."""

    def parse(text: str) -> str:
        import difflib

        known = names()
        if text.lower() in known:
            return text.lower()
        close = difflib.get_close_matches(text.lower(), known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; one of {', '.join(sorted(known)[:12])}, ..."
        raise argparse.ArgumentTypeError(f"unknown {what} {text!r}{hint}")

    return parse


def _optimizer_names() -> list[str]:
    from timm.optim import list_optimizers

    return list(list_optimizers())


SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly")


def _auto_augment(text: str) -> str:
    """A timm auto-augment policy, checked by building it (rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0, ...)."""
    if text.lower() in ("", "none", "off"):
        return text
    from timm.data import create_transform

    try:
        create_transform(32, is_training=True, auto_augment=text)
    except Exception as error:  # noqa: BLE001 - timm raises assertion, key and value errors for bad policies
        raise argparse.ArgumentTypeError(
            f"not a timm auto-augment policy: {text!r} ({type(error).__name__}: {error}); "
            "e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0, original, or none"
        ) from None
    return text


def _add_data_args(parser: argparse.ArgumentParser, train: bool) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data-dir",
        metavar="DIR",
        help="ImageFolder root with train/ and val/, one folder per class"
        + ("" if train else " (or a folder of class folders)"),
    )
    group.add_argument(
        "--dataset",
        metavar="NAME",
        help="built-in offline dataset instead of --data-dir: 'digits' (scikit-learn's handwritten digits, upsampled)",
    )
    group.add_argument(
        "--img-size", type=_IMG_SIZE, metavar="N", help=f"input resolution, 1..{MAX_IMG_SIZE} (default: recipe/model)"
    )
    group.add_argument(
        "--workers", "-j", type=_ranged(int, 0), metavar="N", help="data-loading worker processes (>= 0)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_train(subparsers)
    _register_eval(subparsers)
    _register_predict(subparsers)


def _register_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on an ImageFolder or the digits dataset (DeiT recipe, resumable, DDP via torchrun)",
        description=(
            "Train a DilateFormer (or any timm model). Flags follow timm's train.py. Defaults are the DeiT/"
            "DilateFormer ImageNet recipe; --dataset digits gets small-data defaults. Every unset flag is "
            "printed with the value chosen. Multi-process: torchrun --nproc_per_node=N -m dilateformer train ..."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_data_args(p, train=True)
    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="NAME", help="timm model name [dilateformer_tiny; digits: dilateformer_nano]")
    m.add_argument(
        "--model-kwargs",
        nargs="*",
        metavar="KEY=VALUE",
        help="extra model arguments, e.g. embed_dim=24 depths=1,1,1,1 attn_types=global,global,global,global",
    )
    m.add_argument("--pretrained", action="store_true", default=None, help="start from --pretrained-path weights")
    m.add_argument("--pretrained-path", metavar="FILE", help="local weights (ours or official) for --pretrained")
    m.add_argument(
        "--retrofit",
        metavar="BLOCKS",
        help="swap these blocks of a timm ViT to MSDA (kernel 3, dilations 1,2,3), keeping their weights, after "
        "loading --pretrained-path, e.g. 0-5 (see docs/retrofit.md)",
    )
    m.add_argument(
        "--initial-checkpoint", metavar="FILE", help="load these weights (all keys must fit) before training"
    )
    m.add_argument(
        "--drop-path",
        type=_ranged(float, 0, 1, high_open=True),
        metavar="P",
        help="stochastic depth rate, [0, 1) [0.1; digits: 0]",
    )
    m.add_argument("--grad-checkpointing", action="store_true", default=None, help="recompute activations")
    m.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=_positive_int, metavar="N", help="epochs [300; digits: 20]")
    o.add_argument(
        "-b", "--batch-size", type=_positive_int, metavar="N", help="batch size per process [128; digits 64]"
    )
    o.add_argument(
        "--lr", type=_POSITIVE, metavar="LR", help="learning rate, > 0 (default: --lr-base scaled by global batch)"
    )
    o.add_argument("--lr-base", type=_POSITIVE, metavar="LR", help="lr at --lr-base-size, > 0 [1e-3]")
    o.add_argument(
        "--lr-base-size", type=_positive_int, metavar="N", help="global batch of --lr-base, >= 1 [1024; digits: 64]"
    )
    o.add_argument(
        "--opt",
        type=_choice_from("optimizer", _optimizer_names),
        metavar="NAME",
        help="timm optimizer (timm.optim.list_optimizers()) [adamw]",
    )
    o.add_argument("--weight-decay", type=_NON_NEGATIVE, metavar="WD", help=">= 0 [0.05]")
    o.add_argument(
        "--sched",
        type=_choice_from("scheduler", lambda: list(SCHEDULERS)),
        metavar="NAME",
        help=f"timm scheduler: {', '.join(SCHEDULERS)} [cosine]",
    )
    o.add_argument("--warmup-epochs", type=_NON_NEGATIVE, metavar="N", help=">= 0 [10; digits: 2]")
    o.add_argument("--warmup-lr", type=_NON_NEGATIVE, metavar="LR", help=">= 0 [1e-6]")
    o.add_argument("--min-lr", type=_NON_NEGATIVE, metavar="LR", help=">= 0 [1e-5]")
    o.add_argument("--clip-grad", type=_POSITIVE, metavar="NORM", help="clip the gradient norm, > 0 [off]")
    o.add_argument("--amp", action="store_true", default=None, help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    a = p.add_argument_group("augmentation and regularisation (timm)")
    a.add_argument(
        "--aa",
        type=_auto_augment,
        metavar="POLICY",
        help="timm auto-augment policy or none [rand-m9-mstd0.5-inc1; digits: none]",
    )
    a.add_argument("--mixup", type=_NON_NEGATIVE, metavar="ALPHA", help="mixup alpha, >= 0 [0.8; digits: 0]")
    a.add_argument("--cutmix", type=_NON_NEGATIVE, metavar="ALPHA", help="cutmix alpha, >= 0 [1.0; digits: 0]")
    a.add_argument(
        "--smoothing", type=_ranged(float, 0, 1, high_open=True), metavar="EPS", help="label smoothing, [0, 1) [0.1]"
    )
    a.add_argument("--reprob", type=_FRACTION, metavar="P", help="random erasing probability, [0, 1] [0.25; digits: 0]")
    a.add_argument("--hflip", type=_FRACTION, metavar="P", help="horizontal flip probability, [0, 1] [0.5; digits: 0]")
    a.add_argument("--model-ema", action="store_true", default=None, help="keep an EMA of the weights (timm)")
    a.add_argument(
        "--model-ema-decay",
        type=_ranged(float, 0, 1, high_open=True),
        metavar="D",
        help="[0, 1) [0.99996; digits: 0.998]",
    )
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, metavar="N", help="random seed; data order is a function of (seed, epoch) [42]")
    r.add_argument("--output", metavar="DIR", help="run directory [output/train/MODEL-DATASET]")
    r.add_argument(
        "--resume",
        metavar="PATH",
        help="continue a run: its directory or last.safetensors; 'auto' resumes --output if it holds a run",
    )
    r.add_argument("--device", type=_device, default="auto", help="cpu, cuda, cuda:N or auto")
    r.add_argument("--log-interval", type=_positive_int, default=50, help="steps between log lines when not a TTY")
    p.set_defaults(func=run_train)


def _register_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="top-1/top-5 of a checkpoint (ours or official) on a dataset",
        description="Evaluate a checkpoint: one of ours (a run dir or .safetensors) or an official .pth with --model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run directory, .safetensors or official .pth")
    p.add_argument("--model", metavar="NAME", help="model name, needed for checkpoints without our metadata")
    p.add_argument("--use-ema", action="store_true", help="official training checkpoints: evaluate model_ema")
    _add_data_args(p, train=False)
    p.add_argument("-b", "--batch-size", type=_positive_int, default=64, metavar="N")
    p.add_argument("--amp", action="store_true", help="mixed precision")
    p.add_argument("--device", type=_device, default="auto", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(func=run_eval)


def _register_predict(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="top-k class names and probabilities for images",
        description="Classify images with a checkpoint; class names come from the checkpoint (ImageNet for 1000).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run directory, .safetensors or official .pth")
    p.add_argument("--model", metavar="NAME", help="model name, needed for checkpoints without our metadata")
    p.add_argument("--use-ema", action="store_true", help="official training checkpoints: use model_ema")
    p.add_argument("--topk", type=_positive_int, default=5, metavar="K")
    p.add_argument(
        "--img-size", type=_IMG_SIZE, metavar="N", help=f"input resolution, 1..{MAX_IMG_SIZE} (default: checkpoint's)"
    )
    p.add_argument("--device", type=_device, default="auto", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(func=run_predict)


# ----------------------------------------------------------------------------------------------------------------
# train

# Flags whose unset value comes from the recipe (or, on resume, from the run's saved config).
CONFIG_KEYS = (
    "data_dir", "dataset", "img_size", "workers", "model", "model_kwargs", "pretrained", "pretrained_path",
    "initial_checkpoint", "retrofit", "drop_path", "grad_checkpointing", "compile", "epochs", "batch_size", "lr",
    "lr_base", "lr_base_size", "opt", "weight_decay", "sched", "warmup_epochs", "warmup_lr", "min_lr", "clip_grad",
    "amp", "aa", "mixup", "cutmix", "smoothing", "reprob", "hflip", "model_ema", "model_ema_decay", "seed",
)  # fmt: skip


def resolve_config(args: argparse.Namespace, saved: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """Recipe defaults <- saved run config (on resume) <- flags given on the command line."""
    from dilateformer.train.recipes import recipe_for

    explicit = {k: getattr(args, k) for k in CONFIG_KEYS if getattr(args, k, None) is not None}
    dataset = explicit.get("dataset", (saved or {}).get("dataset"))
    recipe_name, config = recipe_for(dataset)
    config.update({"data_dir": None, "dataset": None, "model_kwargs": None, "pretrained": False,
                   "pretrained_path": None, "initial_checkpoint": None, "retrofit": None})  # fmt: skip
    if saved:
        config.update({k: v for k, v in saved.items() if k in CONFIG_KEYS})
    config.update(explicit)
    if isinstance(config.get("aa"), str) and config["aa"].lower() in ("", "none", "off"):
        config["aa"] = None
    from_recipe = [k for k in CONFIG_KEYS if k not in explicit and not (saved and k in saved)]
    notes = [recipe_name] + [f"{k.replace('_', '-')}={config[k]}" for k in from_recipe if config.get(k) is not None]
    return config, notes


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


def run_train(args: argparse.Namespace) -> int:
    from timm.data import Mixup, create_transform, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    from dilateformer.train import checkpoint as ckpt
    from dilateformer.train import distributed
    from dilateformer.train.data import balance_warning, build_dataset, patch_rand_augment, summarize_skipped
    from dilateformer.train.engine import amp_dtype, evaluate, train_one_epoch
    from dilateformer.train.modeling import (
        create_model,
        load_file_into,
        load_state_into,
        parse_model_kwargs,
        unwrap,
    )

    info = distributed.init(args.device)
    say = print if info.is_main else (lambda *a, **k: None)

    # --- where we are: fresh run, --resume PATH, --resume auto, or a torchrun --max-restarts restart
    resume = args.resume
    if resume is None and distributed.restart_count() > 0:
        resume = RESUME_AUTO
        say(f"torchrun restart #{distributed.restart_count()}: resuming from the run's last checkpoint")
    saved_state = None
    last_path = None
    if resume and resume != RESUME_AUTO:
        last_path = ckpt.find_last(resume)
    preliminary, _ = resolve_config(args, None)
    output = Path(args.output) if args.output else (last_path.parent if last_path else _default_output(preliminary))
    if resume == RESUME_AUTO and (output / "last.safetensors").exists():
        last_path = output / "last.safetensors"
    elif resume == RESUME_AUTO:
        say(f"--resume auto: {output} holds no run yet; starting fresh")
    if last_path is not None:
        weights, _, saved_state = ckpt.load_last(last_path)
    elif info.is_main and (output / "last.safetensors").exists():
        raise CommandError(
            f"{output} already holds a run; continue it with --resume {output} (or --resume auto), "
            "or pick another --output"
        )
    config, notes = resolve_config(args, saved_state["config"] if saved_state else None)
    if saved_state is not None:
        for line in changed_on_resume(args, saved_state["config"]):
            warn(line)
    if not config["dataset"] and not config["data_dir"]:
        raise CommandError("no data: pass --data-dir DIR (ImageFolder with train/ and val/) or --dataset digits")
    if info.is_main:
        _check_writable(output)
    say(f"defaults ({notes[0]} recipe): " + (", ".join(notes[1:]) or "none"))

    # --- model (seeded identically on every rank; DDP also broadcasts rank 0's weights)
    torch.manual_seed(config["seed"])
    num_classes_guess = None
    model_kwargs = parse_model_kwargs(config["model_kwargs"])
    # Classes come from the data; build the datasets' class list before the model.
    img_size_cfg = config["img_size"]
    probe = build_dataset(config["dataset"] or "", config["data_dir"], "train", None, img_size_cfg or 32)
    classes = list(probe.classes)
    num_classes_guess = len(classes)
    if config["pretrained"] and not config["pretrained_path"]:
        raise CommandError("--pretrained needs --pretrained-path FILE (local weights; nothing is downloaded)")
    model = create_model(
        config["model"],
        num_classes_guess,
        drop_path_rate=config["drop_path"],
        pretrained_path=config["pretrained_path"] if config["pretrained"] else None,
        model_kwargs=model_kwargs,
    )
    if config["initial_checkpoint"] and saved_state is None:
        load_file_into(model, config["initial_checkpoint"], strict=True, new_head_ok=False, flag="--initial-checkpoint")
    if config["retrofit"]:
        # After the pretrained weights went into the original structure; the keys stay the same, so resuming and
        # --initial-checkpoint files fit either way.
        model = _retrofit(model, config["retrofit"])
    data_cfg = resolve_data_config({}, model=model)
    img_size = config["img_size"] or data_cfg["input_size"][-1]
    config["img_size"] = img_size
    if config["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    model.to(info.device)
    param_count = sum(p.numel() for p in model.parameters())

    # --- data
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
    check_input_size(model, img_size, info.device, config["model"])
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
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=config["workers"],
        drop_last=True,
        generator=generator,
        pin_memory=info.device.type == "cuda",
    )
    val_loader = torch.utils.data.DataLoader(
        val_set,
        batch_size=batch_size,
        sampler=distributed.ShardSampler(len(val_set), info.rank, info.world_size),
        num_workers=config["workers"],
        generator=torch.Generator().manual_seed(0),
        pin_memory=info.device.type == "cuda",
    )

    # --- optimisation (all from timm)
    global_batch = batch_size * info.world_size
    lr = config["lr"] if config["lr"] is not None else config["lr_base"] * global_batch / config["lr_base_size"]
    optimizer = create_optimizer_v2(model, opt=config["opt"], lr=lr, weight_decay=config["weight_decay"])
    scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        sched=config["sched"],
        num_epochs=config["epochs"],
        warmup_epochs=config["warmup_epochs"],
        warmup_lr=config["warmup_lr"],
        min_lr=config["min_lr"],
        step_on_epochs=False,  # per-step schedule: smooth warmup even for short runs
        updates_per_epoch=len(loader),
    )
    mixup_fn = None
    if config["mixup"] > 0 or config["cutmix"] > 0:
        mixup_fn = Mixup(
            mixup_alpha=config["mixup"],
            cutmix_alpha=config["cutmix"],
            label_smoothing=config["smoothing"],
            num_classes=len(classes),
        )
        criterion = SoftTargetCrossEntropy()
    elif config["smoothing"] > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=config["smoothing"])
    else:
        criterion = torch.nn.CrossEntropyLoss()
    model_ema = ModelEmaV3(model, decay=config["model_ema_decay"]) if config["model_ema"] else None
    scaler = torch.amp.GradScaler("cuda") if config["amp"] and info.device.type == "cuda" else None

    # --- resume
    start_epoch, num_updates, best_top1, best_epoch, history = 0, 0, float("-inf"), -1, []
    if saved_state is not None:
        load_state_into(model, weights, source=str(last_path))
        optimizer.load_state_dict(saved_state["optimizer"])
        scheduler.load_state_dict(saved_state["scheduler"])
        if model_ema is not None:
            if saved_state.get("ema") is None:
                raise CommandError(f"--model-ema: {last_path} was trained without an EMA; resume without --model-ema")
            unwrap(model_ema).load_state_dict(saved_state["ema"])
        if saved_state.get("class_names") != classes:
            raise CommandError(
                f"the data's classes {classes[:5]}... differ from the run's {saved_state.get('class_names', [])[:5]}..."
            )
        start_epoch = saved_state["epoch"] + 1
        num_updates = saved_state["num_updates"]
        best_top1, best_epoch = saved_state["best_top1"], saved_state["best_epoch"]
        history = list(saved_state["history"])
        ckpt.set_rng_state(saved_state["rng"])
        if info.is_main:
            best_top1, best_epoch = _ensure_best(
                output, best_top1, best_epoch, saved_state, weights, metadata_of(last_path)
            )
        if start_epoch >= num_epochs:
            say(
                f"{last_path} already finished all {num_epochs} epochs (best top-1 {best_top1:.2f}% at epoch "
                f"{best_epoch + 1}); nothing to train: raise --epochs to train longer"
            )
            return 0
        say(f"resumed {last_path} at epoch {start_epoch + 1}/{num_epochs} (best top-1 {best_top1:.2f}%)")

    train_model = model
    if info.distributed:
        # Gradients as views into the buckets: no copy per step, and no stride-mismatch warning for the
        # parameters whose layout differs from the bucket's (the qkv 1x1 convs).
        match_depthwise_grad_layout(model)
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None, gradient_as_bucket_view=True
        )
    if config["compile"]:
        train_model = torch.compile(train_model)

    say(
        f"training {config['model']} ({param_count / 1e6:.2f} M params, {len(classes)} classes) on "
        f"{len(train_set)} images ({config['dataset'] or config['data_dir']}), val {len(val_set)}, "
        f"{info.world_size} process(es) x batch {batch_size}, lr {lr:.3g}, {num_epochs} epochs, "
        f"img {img_size}, device {info.device}"
        + (f", {str(amp_dtype(info.device)).removeprefix('torch.')} autocast" if config["amp"] else "")
        + f"; output {output}"
    )
    metadata = {
        "model": config["model"],
        "model_kwargs": model_kwargs,
        "num_classes": len(classes),
        "class_names": classes,
        "img_size": img_size,
        "mean": list(data_cfg["mean"]),
        "std": list(data_cfg["std"]),
        "crop_pct": eval_crop,
        "interpolation": data_cfg["interpolation"],
        "dataset": config["dataset"] or str(config["data_dir"]),
    }
    if config["retrofit"]:
        from dilateformer.retrofit import retrofit_config

        metadata["retrofit"] = retrofit_config(model)  # eval, predict and retrofit rebuild the model from it
    writer = _tensorboard(output) if info.is_main else None

    for epoch in range(start_epoch, num_epochs):
        generator.manual_seed(seed_epoch(config["seed"], epoch, info.rank))
        sampler.set_epoch(epoch)
        train_stats, num_updates = train_one_epoch(
            train_model,
            loader,
            optimizer,
            criterion,
            scheduler,
            info,
            epoch=epoch,
            num_epochs=num_epochs,
            num_updates=num_updates,
            mixup_fn=mixup_fn,
            model_ema=model_ema,
            amp=config["amp"],
            scaler=scaler,
            clip_grad=config["clip_grad"],
            log_interval=args.log_interval,
        )
        scheduler.step(epoch + 1)
        val = evaluate(model, val_loader, info, amp=config["amp"], desc="val")
        ema_val = (
            evaluate(unwrap(model_ema), val_loader, info, amp=config["amp"], desc="val ema") if model_ema else None
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
            "lr": optimizer.param_groups[0]["lr"],
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
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "ema": unwrap(model_ema).state_dict() if model_ema else None,
                "best_top1": best_top1,
                "best_epoch": best_epoch,
                "history": history,
                "class_names": classes,
                "rng": ckpt.rng_state(),
            }
            if is_best:
                # Best first, then last: a kill in between leaves last at the previous epoch, whose resume redoes
                # this epoch and writes best again. The other order could commit a last that points at a best
                # that was never written.
                best_weights = unwrap(model_ema).state_dict() if model_ema else model.state_dict()
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
            f"lr {optimizer.param_groups[0]['lr']:.3g}  {train_stats.img_per_s:.1f} img/s  "
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


def _retrofit(model: torch.nn.Module, blocks: str, settings: dict[str, Any] | None = None) -> torch.nn.Module:
    from dilateformer.retrofit import msda_vit

    try:
        return msda_vit(model, blocks, **(settings or {}), measure=False)[0]
    except (TypeError, ValueError) as error:
        raise CommandError(f"--retrofit {blocks}: {error}") from None


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


def warn(line: str) -> None:
    print(f"dilateformer train: warning: {line}", file=sys.stderr, flush=True)


def metadata_of(path: Path) -> dict[str, Any]:
    from dilateformer.train.checkpoint import read_metadata

    return read_metadata(path)


def _best_meta(meta: dict[str, Any], top1: float, model_ema) -> dict[str, Any]:
    return {**meta, "val_top1": top1, "weights": "ema" if model_ema else "model"}


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


# Settings that a resumed run cannot change (the saved weights or optimizer state would not fit them), and the
# ones whose change is allowed but breaks exact reproduction of the uninterrupted run.
RESUME_FIXED = ("model", "model_kwargs", "model_ema", "dataset", "retrofit")
RESUME_INEXACT = {
    "batch_size": "the learning rate and the data order change with it",
    "workers": "the data order and augmentation draws change with it",
    "img_size": "the transforms and the positional grid change with it",
    "seed": "the data order changes with it",
    "data_dir": "the samples are different",
}


def changed_on_resume(args: argparse.Namespace, saved: dict[str, Any]) -> list[str]:
    """Warnings for explicit flags that differ from the resumed run's config; a CommandError for fixed ones."""
    lines = []
    for key in CONFIG_KEYS:
        value = getattr(args, key, None)
        if value is None or key not in saved:
            continue
        old = saved[key]
        if isinstance(value, (list, tuple)) or isinstance(old, (list, tuple)):
            value, old = list(value), list(old or [])
        if value == old:
            continue
        flag = "--" + key.replace("_", "-")
        if key in RESUME_FIXED:
            raise CommandError(
                f"--resume: the run used {flag} {old}, this command asks for {value}; that cannot change in a "
                "resumed run (start a new run with another --output)"
            )
        why = RESUME_INEXACT.get(key, "the rest of the run differs from an uninterrupted one")
        lines.append(f"resuming with {flag} {value} instead of the run's {old}: {why}; the result is not exact")
    return lines


def _class_counts(dataset, num_classes: int) -> list[int]:
    labels = [s.label for s in dataset.samples] if hasattr(dataset, "samples") else list(dataset.targets)
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()


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


# ----------------------------------------------------------------------------------------------------------------
# eval and predict


def _resolve_checkpoint_file(path: str) -> Path:
    from dilateformer.train.checkpoint import read_metadata

    target = Path(path)
    if target.is_dir():
        if (target / "best.safetensors").exists():
            return target / "best.safetensors"
        if (target / "last.safetensors").exists():
            print(
                f"dilateformer: note: {target} has no best.safetensors; using last.safetensors "
                f"(epoch {read_metadata(target / 'last.safetensors').get('epoch', '?')})",
                file=sys.stderr,
            )
            return target / "last.safetensors"
        raise CommandError(f"--checkpoint: {target} holds no best.safetensors or last.safetensors")
    if not target.exists():
        raise CommandError(f"--checkpoint: {target} does not exist")
    return target


def load_for_inference(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Model + metadata from our checkpoint (self-describing) or an official one (needs --model)."""
    from timm.data import resolve_data_config

    from dilateformer.models import load_checkpoint_file
    from dilateformer.train.checkpoint import read_checkpoint_weights, read_metadata
    from dilateformer.train.modeling import create_model, load_state_into

    path = _resolve_checkpoint_file(args.checkpoint)
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    if "model" in meta:
        state, _ = read_checkpoint_weights(path)
        name = args.model or meta["model"]
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (meta.get("model_kwargs") or {}).items()}
        num_classes = int(meta["num_classes"])
    else:
        if not args.model:
            raise CommandError(f"{path} has no model metadata (not written by dilateformer train); pass --model NAME")
        try:
            state = load_checkpoint_file(path, use_ema=getattr(args, "use_ema", False))
        except (ValueError, FileNotFoundError) as error:
            raise CommandError(str(error).splitlines()[0]) from None
        head = state.get("head.weight")
        num_classes = int(head.shape[0]) if head is not None else 1000
        name, kwargs = args.model, {}
    model = create_model(name, num_classes, model_kwargs=kwargs)
    if meta.get("retrofit"):
        settings = {k: v for k, v in meta["retrofit"].items() if k != "blocks"}
        settings["dilations"] = tuple(settings.get("dilations", (1, 2, 3)))
        model = _retrofit(model, meta["retrofit"]["blocks"], settings)
    load_state_into(model, state, source=str(path))
    model.to(device).eval()
    data_cfg = resolve_data_config({}, model=model)
    img_size = getattr(args, "img_size", None) or meta.get("img_size") or data_cfg["input_size"][-1]
    info = {
        "path": str(path),
        "model": name,
        "num_classes": num_classes,
        "class_names": meta.get("class_names"),
        "img_size": img_size,
        "mean": tuple(meta.get("mean", data_cfg["mean"])),
        "std": tuple(meta.get("std", data_cfg["std"])),
        "crop_pct": meta.get("crop_pct", data_cfg["crop_pct"]),
        "interpolation": meta.get("interpolation", data_cfg["interpolation"]),
    }
    return model, info


def _eval_transform(info: dict[str, Any]):
    from timm.data import create_transform

    return create_transform(
        info["img_size"],
        interpolation=info["interpolation"],
        mean=info["mean"],
        std=info["std"],
        crop_pct=info["crop_pct"],
    )


def run_eval(args: argparse.Namespace) -> int:
    from dilateformer.train import distributed
    from dilateformer.train.data import ImageFolderDataset, build_dataset
    from dilateformer.train.engine import evaluate

    dist_info = distributed.init(args.device)
    model, info = load_for_inference(args, dist_info.device)
    transform = _eval_transform(info)
    if args.dataset:
        dataset = build_dataset(args.dataset, None, "val", transform, info["img_size"])
    elif args.data_dir:
        root = Path(args.data_dir)
        split = next((root / n for n in ("val", "validation") if (root / n).is_dir()), root)
        dataset = ImageFolderDataset(split, transform=transform)
    else:
        raise CommandError("no data: pass --data-dir DIR (ImageFolder, its val/ is used) or --dataset digits")
    names = info["class_names"]
    if names is not None and list(dataset.classes) != list(names):
        raise CommandError(
            f"the dataset's classes {dataset.classes[:5]}... differ from the checkpoint's {names[:5]}..."
        )
    if len(dataset.classes) != info["num_classes"]:
        raise CommandError(f"the dataset has {len(dataset.classes)} classes, the model {info['num_classes']}")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=distributed.ShardSampler(len(dataset), dist_info.rank, dist_info.world_size),
        num_workers=args.workers if args.workers is not None else 2,
    )
    start = time.perf_counter()
    stats = evaluate(model, loader, dist_info, amp=args.amp)
    if dist_info.is_main:
        print(
            f"{info['model']} {info['path']}: top-1 {stats.top1:.2f}%  top-5 {stats.top5:.2f}%  loss {stats.loss:.4f}  "
            f"({stats.images} images at {info['img_size']}px, {time.perf_counter() - start:.1f}s)"
        )
        print(json.dumps({"top1": stats.top1, "top5": stats.top5, "loss": stats.loss, "images": stats.images}))
    return 0


def _class_names(info: dict[str, Any]) -> list[str]:
    if info["class_names"]:
        return list(info["class_names"])
    if info["num_classes"] == 1000:
        from timm.data import ImageNetInfo

        imagenet = ImageNetInfo()
        return [imagenet.index_to_description(i) for i in range(1000)]
    return [f"class {i}" for i in range(info["num_classes"])]


@torch.no_grad()
def run_predict(args: argparse.Namespace) -> int:
    from dilateformer.train.data import load_image

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    for image_path in args.images:
        if not Path(image_path).is_file():
            raise CommandError(f"image {image_path} does not exist")
    model, info = load_for_inference(args, device)
    transform = _eval_transform(info)
    names = _class_names(info)
    k = min(args.topk, info["num_classes"])
    for image_path in args.images:
        batch = transform(load_image(image_path)).unsqueeze(0).to(device)
        probs = model(batch).float().softmax(-1)[0]
        top = probs.topk(k)
        print(image_path)
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            print(f"  {100 * p:6.2f}%  {names[i]}")
    return 0
