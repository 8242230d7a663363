"""The one way this project builds a timm model by name, and the global-attention twin of a DilateFormer.

Every command and analysis builds its models here, so an unknown name always gets the same "did you mean"
hint and constructor arguments timm rejects always name the model and the arguments.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import timm
from torch import nn

import dilateformer.models.dilateformer  # noqa: F401  (registers the DilateFormer family with timm)
from dilateformer.models.convert import load_into
from dilateformer.models.dilateformer import DilateFormer

__all__ = ["create_model", "global_twin"]


def create_model(
    name: str, *, known: Sequence[str] | None = None, pretrained: bool = False, **kwargs: Any
) -> nn.Module:
    """``timm.create_model(name, pretrained=pretrained, **kwargs)`` with one-line errors.

    Args:
        name: a timm model name, optionally with a ``.tag``.
        known: the names accepted (default: every timm model); the hint only suggests these.
        pretrained: as timm's; nothing is downloaded unless a ``pretrained_cfg_overlay`` file says where.
        **kwargs: constructor arguments.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: ``name`` is unknown (naming the closest known names), or the constructor rejects ``kwargs``.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    names = list(known) if known is not None else timm.list_models()
    if name.split(".", 1)[0] not in names:
        close = difflib.get_close_matches(name.split(".", 1)[0], names, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        where = f"known: {', '.join(names)}" if known is not None else "see timm.list_models('dilateformer*')"
        raise ValueError(f"unknown model {name!r}{hint} ({where})")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError) as error:
        raise ValueError(f"cannot build model {name} with {kwargs}: {error}") from None


def global_twin(model: nn.Module, *, copy_weights: bool = True, **kwargs: Any) -> DilateFormer:
    """``model``'s global-attention twin: the same configuration with every stage ``"global"``.

    The two have the same parameters, name for name and shape for shape (``twin.load_state_dict(
    model.state_dict())`` works), so with ``copy_weights`` the twin's first layer sees exactly the input
    ``model``'s first MSDA layer saw; the weights go through :func:`load_into`, so a ``num_classes`` override
    keeps a fresh classifier. The twin is built on ``model``'s device and dtype;
    ``kwargs`` override the configuration (e.g. ``device``). A model registered with timm
    gets its twin through timm, with the same ``pretrained_cfg``.
    """
    if not isinstance(model, DilateFormer):
        raise TypeError(f"model must be a DilateFormer, got {type(model).__name__}")
    first = next(model.parameters(), None)
    placement = {} if first is None else {"device": first.device, "dtype": first.dtype}
    config = {**model._init_kwargs, "attn_types": "global", **placement, **kwargs}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("architecture"):
        name = cfg["architecture"] + (f".{cfg['tag']}" if cfg.get("tag") else "")
        twin = create_model(name, **config)
    else:
        twin = DilateFormer(**config)
    if copy_weights:
        load_into(twin, model.state_dict(), source="the MSDA model's weights")
    return twin
