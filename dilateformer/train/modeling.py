"""Building models for the commands: timm names with a closest-name hint, weights from our or official files."""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dilateformer import models
from dilateformer.errors import CommandError, one_line
from dilateformer.models import load_checkpoint_file, load_into


def parse_model_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``["embed_dim=24", "depths=1,1,1,1"]`` -> ``{"embed_dim": 24, "depths": (1, 1, 1, 1)}`` (Python literals)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--model-kwargs expects KEY=VALUE items, got {item!r}")
        value = _literal(text)
        if isinstance(value, str) and "," in value:
            # depths=1,1,1,1 is a tuple literal already; attn_types=global,global,... is bare words.
            value = tuple(_literal(part.strip()) for part in value.split(","))
        if isinstance(value, list):
            value = tuple(value)
        out[key.replace("-", "_")] = value
    return out


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as msda


def create_model(
    name: str,
    num_classes: int,
    *,
    drop_path_rate: float | None = None,
    pretrained_path: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """:func:`dilateformer.models.create_model` with one-line CLI errors; ``pretrained_path`` is a local file."""
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    kwargs["num_classes"] = num_classes
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        model = models.create_model(name, **kwargs)
    except ValueError as error:
        raise CommandError(one_line(str(error))) from None
    if pretrained_path:
        # Fine-tuning: the classifier of another size is left as initialised; everything else must fit.
        load_file_into(model, pretrained_path, strict=True)
    return model


def load_file_into(
    model: nn.Module, path: str | os.PathLike, strict: bool = True, new_head_ok: bool = True, flag: str = "checkpoint"
) -> None:
    """Load our safetensors, an official ``.pth`` or a training checkpoint; mismatches become a one-line error.

    ``new_head_ok=False`` refuses a classifier of another size instead of leaving it freshly initialised.
    """
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"{flag} {path} does not exist")
    try:
        own = {k: v.shape for k, v in model.state_dict().items()}
        # A model whose own keys are patch_embed.* (timm ViTs) takes them as they are, not as official DilateFormer.
        state = load_checkpoint_file(path, convert=not any(k.startswith("patch_embed.") for k in own))
        load_into(model, state, strict=strict, source=str(path))  # mismatches outside the head are named first
        if not new_head_ok:
            for key, value in state.items():
                if key.startswith("head.") and key in own and own[key] != value.shape:
                    raise CommandError(
                        f"{flag} {path}: its classifier {key} is {tuple(value.shape)}, this model's "
                        f"{tuple(own[key])} (the class count differs) and all keys must fit; "
                        "to fine-tune with a new head use --pretrained --pretrained-path FILE instead"
                    )
    except ValueError as error:
        raise CommandError(one_line(str(error))) from None


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        load_into(model, state, strict=True, source=source)
    except ValueError as error:
        raise CommandError(one_line(str(error))) from None


def retrofit(model: nn.Module, blocks: str, settings: dict[str, Any] | None = None) -> nn.Module:
    """``--retrofit BLOCKS``: those blocks of a timm ViT swapped to MSDA (:func:`dilateformer.retrofit.msda_vit`)."""
    from dilateformer.retrofit import msda_vit

    try:
        return msda_vit(model, blocks, **(settings or {}), measure=False)[0]
    except (TypeError, ValueError) as error:
        raise CommandError(f"--retrofit {blocks}: {error}") from None
