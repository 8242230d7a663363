"""The training configuration in one place: every ``train`` setting, its flag, its help and both recipes.

:class:`TrainConfig` is the single source: one field per ``dilateformer train`` flag, whose metadata holds the
flag's help, value parser and help group. ``train``'s parser, its help text (including the recipe defaults shown
as ``[300; digits: 20]``) and the list of keys resolved from a recipe are all derived from it.

``train`` fills every flag the user did not pass from the recipe of the chosen dataset (and, on resume, from the
run's saved config first), then prints the values it chose, so a run never depends on a silent default.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import Any

from dilateformer.argtypes import (
    choice_from,
    float_pair,
    fraction,
    non_negative_float,
    positive_float,
    positive_int,
    ranged,
)
from dilateformer.errors import CommandError

# Largest --img-size: at 4096 px one float32 RGB input is 200 MB and a DilateFormer-Tiny forward needs tens of GB;
# a larger value is a typo far more often than a plan, and it would end in the kernel's OOM kill with no message.
MAX_IMG_SIZE = 4096
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly")
IMG_SIZE = ranged(int, 1, MAX_IMG_SIZE)
_BELOW_ONE = ranged(float, 0, 1, high_open=True)

# Help groups, in the order ``train --help`` shows them.
DATA, MODEL, OPTIMISATION, AUGMENTATION, RUN = "data", "model", "optimisation", "augmentation and regularisation", "run"


def _optimizer_names() -> list[str]:
    from timm.optim import list_optimizers

    return list(list_optimizers())


def auto_augment(text: str) -> str:
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


def flag(
    default: Any,
    group: str,
    help: str,
    *,
    type: Any = None,
    metavar: str | None = None,
    aliases: tuple[str, ...] = (),
    nargs: str | None = None,
    unset: str | None = None,
) -> Any:
    """A :class:`TrainConfig` field and its ``--flag``: a ``bool`` default makes a switch (``store_true``).

    ``unset`` is what the help says a ``None`` default means (``off``, ``the model's``); without it no default
    is shown for ``None``.
    """
    meta = dict(group=group, help=help, type=type, metavar=metavar, aliases=aliases, nargs=nargs, unset=unset)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """Every ``train`` setting; a field ``batch_size`` is the flag ``--batch-size`` (and the YAML key)."""

    data_dir: str | None = flag(None, DATA, "ImageFolder root with train/ and val/, one folder per class",
                                metavar="DIR")  # fmt: skip
    dataset: str | None = flag(
        None, DATA, "built-in offline dataset instead of --data-dir: 'digits' (scikit-learn's handwritten digits, "
        "upsampled)", metavar="NAME")  # fmt: skip
    img_size: int | None = flag(None, DATA, f"input resolution, 1..{MAX_IMG_SIZE}", type=IMG_SIZE, metavar="N",
                                unset="the model's")  # fmt: skip
    workers: int = flag(4, DATA, "data-loading worker processes (>= 0)", type=ranged(int, 0), metavar="N",
                        aliases=("-j",))  # fmt: skip

    model: str = flag("dilateformer_tiny", MODEL, "timm model name", metavar="NAME")
    model_kwargs: tuple[str, ...] | None = flag(
        None, MODEL, "extra model arguments, e.g. embed_dim=24 depths=1,1,1,1 "
        "attn_types=global,global,global,global", metavar="KEY=VALUE", nargs="*")  # fmt: skip
    pretrained: bool = flag(False, MODEL, "start from --pretrained-path weights")
    pretrained_path: str | None = flag(None, MODEL, "local weights (ours or official) for --pretrained",
                                       metavar="FILE")  # fmt: skip
    retrofit: str | None = flag(
        None, MODEL, "swap these blocks of a timm ViT to MSDA (kernel 3, dilations 1,2,3), keeping their weights, "
        "after loading --pretrained-path, e.g. 0-5 (see docs/retrofit.md)", metavar="BLOCKS")  # fmt: skip
    initial_checkpoint: str | None = flag(None, MODEL, "load these weights (all keys must fit) before training",
                                          metavar="FILE")  # fmt: skip
    drop_path: float = flag(0.1, MODEL, "stochastic depth rate, [0, 1)", type=_BELOW_ONE, metavar="P")
    grad_checkpointing: bool = flag(False, MODEL, "recompute activations")
    compile: bool = flag(False, MODEL, "torch.compile the model")

    epochs: int = flag(300, OPTIMISATION, "epochs", type=positive_int, metavar="N")
    batch_size: int = flag(128, OPTIMISATION, "batch size per process", type=positive_int, metavar="N",
                           aliases=("-b",))  # fmt: skip
    lr: float | None = flag(None, OPTIMISATION, "learning rate, > 0", type=positive_float, metavar="LR",
                            unset="--lr-base scaled by the global batch")  # fmt: skip
    lr_base: float = flag(1e-3, OPTIMISATION, "lr at --lr-base-size, > 0", type=positive_float, metavar="LR")
    lr_base_size: int = flag(1024, OPTIMISATION, "global batch of --lr-base, >= 1", type=positive_int, metavar="N")
    opt: str = flag("adamw", OPTIMISATION, "timm optimizer (timm.optim.list_optimizers())",
                    type=choice_from("optimizer", _optimizer_names), metavar="NAME")  # fmt: skip
    weight_decay: float = flag(0.05, OPTIMISATION, ">= 0", type=non_negative_float, metavar="WD")
    sched: str = flag("cosine", OPTIMISATION, f"timm scheduler: {', '.join(SCHEDULERS)}",
                      type=choice_from("scheduler", lambda: list(SCHEDULERS)), metavar="NAME")  # fmt: skip
    warmup_epochs: float = flag(10, OPTIMISATION, ">= 0", type=non_negative_float, metavar="N")
    warmup_lr: float = flag(1e-6, OPTIMISATION, ">= 0", type=non_negative_float, metavar="LR")
    min_lr: float = flag(1e-5, OPTIMISATION, ">= 0", type=non_negative_float, metavar="LR")
    clip_grad: float | None = flag(None, OPTIMISATION, "clip the gradient norm, > 0", type=positive_float,
                                   metavar="NORM", unset="off")  # fmt: skip
    amp: bool = flag(False, OPTIMISATION, "mixed precision (fp16 on CUDA, bf16 on CPU)")

    aa: str | None = flag("rand-m9-mstd0.5-inc1", AUGMENTATION, "timm auto-augment policy or none",
                          type=auto_augment, metavar="POLICY", unset="none")  # fmt: skip
    scale: tuple[float, float] = flag((0.08, 1.0), AUGMENTATION, "random-resized-crop area range, 0..1",
                                      type=float_pair(low=0, high=1), metavar="LOW,HIGH")  # fmt: skip
    color_jitter: float | None = flag(0.4, AUGMENTATION, "colour jitter strength, >= 0", type=non_negative_float,
                                      metavar="S", unset="off")  # fmt: skip
    mixup: float = flag(0.8, AUGMENTATION, "mixup alpha, >= 0", type=non_negative_float, metavar="ALPHA")
    cutmix: float = flag(1.0, AUGMENTATION, "cutmix alpha, >= 0", type=non_negative_float, metavar="ALPHA")
    smoothing: float = flag(0.1, AUGMENTATION, "label smoothing, [0, 1)", type=_BELOW_ONE, metavar="EPS")
    reprob: float = flag(0.25, AUGMENTATION, "random erasing probability, [0, 1]", type=fraction, metavar="P")
    hflip: float = flag(0.5, AUGMENTATION, "horizontal flip probability, [0, 1]", type=fraction, metavar="P")
    model_ema: bool = flag(False, AUGMENTATION, "keep an EMA of the weights (timm)")
    model_ema_decay: float = flag(0.99996, AUGMENTATION, "[0, 1)", type=_BELOW_ONE, metavar="D")

    seed: int = flag(42, RUN, "random seed; data order is a function of (seed, epoch)", type=int, metavar="N")


# DeiT / DilateFormer ImageNet-1k recipe (the paper trains 300 epochs at global batch 1024): the field defaults.
IMAGENET = TrainConfig()

# 1,437 training images of 8x8 digits: a small model, no mixing or erasing (they wipe out such tiny images),
# no flips (a flipped 2 is not a 2), a short warmup, and lr 1e-3 at batch 64 rather than at 1024.
DIGITS = replace(
    IMAGENET,
    model="dilateformer_nano",
    epochs=20,
    batch_size=64,
    lr_base_size=64,
    warmup_epochs=2,
    aa=None,
    mixup=0.0,
    cutmix=0.0,
    reprob=0.0,
    drop_path=0.0,
    hflip=0.0,
    color_jitter=None,
    scale=(0.75, 1.0),
    img_size=32,
    model_ema_decay=0.998,
    workers=0,  # in-memory data: worker processes only add start-up time
)

RECIPES = {"imagenet": IMAGENET, "digits": DIGITS}

# The settings resolved from the recipe (or a resumed run's saved config) when no flag gives them.
CONFIG_KEYS = tuple(f.name for f in fields(TrainConfig))


def recipe_for(dataset: str | None) -> tuple[str, dict[str, Any]]:
    """The recipe's name and its settings as a fresh dict: ``digits`` for the digits dataset, else ImageNet's."""
    name = "digits" if dataset == "digits" else "imagenet"
    recipe = RECIPES[name]
    return name, {key: getattr(recipe, key) for key in CONFIG_KEYS}


def show(value: Any) -> str:
    """A default as the help shows it: ``1e-3`` rather than ``0.001``, ``0.08,1`` for a pair."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if value and abs(value) < 0.01:
            mantissa, exponent = f"{value:e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(show(v) for v in value)
    return str(value)


def help_text(name: str) -> str:
    """A field's help with both recipes' defaults: ``epochs [300; digits: 20]``, ``>= 0 [0.05]`` when they agree."""
    meta = TrainConfig.__dataclass_fields__[name].metadata
    imagenet, digits = getattr(IMAGENET, name), getattr(DIGITS, name)

    def shown(value: Any) -> str | None:
        if value is None:
            return meta["unset"]
        return None if value is False else show(value)

    first, second = shown(imagenet), shown(digits)
    if first is None and second is None:
        return meta["help"]
    if imagenet == digits:
        return f"{meta['help']} [{first}]"
    return f"{meta['help']} [{first or 'none'}; digits: {second or 'none'}]"


def add_arguments(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """Add one flag per :class:`TrainConfig` field, in help groups; returns the groups (the caller adds more)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for item in fields(TrainConfig):
        meta = item.metadata
        if meta["group"] not in groups:
            title = meta["group"] + (" (timm)" if meta["group"] == AUGMENTATION else "")
            groups[meta["group"]] = parser.add_argument_group(title)
        names = ["--" + item.name.replace("_", "-"), *meta["aliases"]]
        # Every default is None: "not given", so that the recipe (or a resumed run's config) fills it later.
        if isinstance(item.default, bool):
            groups[meta["group"]].add_argument(*names, action="store_true", default=None, help=help_text(item.name))
        else:
            groups[meta["group"]].add_argument(
                *names, type=meta["type"], nargs=meta["nargs"], metavar=meta["metavar"], help=help_text(item.name)
            )
    return groups


def resolve_config(args: argparse.Namespace, saved: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """Recipe <- saved run config (on resume) <- flags given (on the command line or in the ``-c`` YAML file).

    Returns the config and the notes to print: the recipe's name, then ``key=value`` for each setting the
    recipe chose.
    """
    explicit = {k: getattr(args, k) for k in CONFIG_KEYS if getattr(args, k, None) is not None}
    dataset = explicit.get("dataset", (saved or {}).get("dataset"))
    recipe_name, config = recipe_for(dataset)
    if saved:
        config.update({k: v for k, v in saved.items() if k in CONFIG_KEYS})
    config.update(explicit)
    if isinstance(config.get("aa"), str) and config["aa"].lower() in ("", "none", "off"):
        config["aa"] = None
    from_recipe = [k for k in CONFIG_KEYS if k not in explicit and not (saved and k in saved)]
    notes = [recipe_name] + [
        f"{k.replace('_', '-')}={show(config[k]) if isinstance(config[k], tuple) else config[k]}"
        for k in from_recipe
        if config.get(k) is not None
    ]
    return config, notes


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
    """Warnings for given settings that differ from the resumed run's config; a CommandError for fixed ones."""
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
