"""Default hyper-parameters: the DeiT/DilateFormer ImageNet recipe, and small-data defaults for digits.

``train`` fills every flag the user did not pass from the recipe of the chosen dataset (and, on resume, from the
run's saved config first), then prints the values it chose, so a run never depends on a silent default.
"""

from __future__ import annotations

from typing import Any

# DeiT / DilateFormer ImageNet-1k recipe (the paper trains 300 epochs at global batch 1024).
IMAGENET: dict[str, Any] = {
    "model": "dilateformer_tiny",
    "epochs": 300,
    "batch_size": 128,
    "lr": None,  # None: lr_base * global_batch / lr_base_size (linear scaling)
    "lr_base": 1e-3,
    "lr_base_size": 1024,
    "weight_decay": 0.05,
    "opt": "adamw",
    "sched": "cosine",
    "warmup_epochs": 10,
    "warmup_lr": 1e-6,
    "min_lr": 1e-5,
    "aa": "rand-m9-mstd0.5-inc1",
    "mixup": 0.8,
    "cutmix": 1.0,
    "smoothing": 0.1,
    "reprob": 0.25,
    "drop_path": 0.1,
    "hflip": 0.5,
    "color_jitter": 0.4,
    "scale": (0.08, 1.0),
    "img_size": None,  # None: the model's default input size
    "model_ema": False,
    "model_ema_decay": 0.99996,
    "clip_grad": None,
    "workers": 4,
    "seed": 42,
    "amp": False,
    "grad_checkpointing": False,
    "compile": False,
}

# 1,437 training images of 8x8 digits: a small model, no mixing or erasing (they wipe out such tiny images),
# no flips (a flipped 2 is not a 2), a short warmup, and lr 1e-3 at batch 64 rather than at 1024.
DIGITS: dict[str, Any] = {
    **IMAGENET,
    "model": "dilateformer_nano",
    "epochs": 20,
    "batch_size": 64,
    "lr_base_size": 64,
    "warmup_epochs": 2,
    "min_lr": 1e-5,
    "aa": None,
    "mixup": 0.0,
    "cutmix": 0.0,
    "reprob": 0.0,
    "drop_path": 0.0,
    "hflip": 0.0,
    "color_jitter": None,
    "scale": (0.75, 1.0),
    "img_size": 32,
    "model_ema_decay": 0.998,
    "workers": 0,  # in-memory data: worker processes only add start-up time
}

RECIPES = {"imagenet": IMAGENET, "digits": DIGITS}


def recipe_for(dataset: str | None) -> tuple[str, dict[str, Any]]:
    name = "digits" if dataset == "digits" else "imagenet"
    return name, dict(RECIPES[name])
