"""Capturing attention probabilities through the layers' ``attn_drop`` hook, without matplotlib.

While a forward hook sits on ``layer.attn_drop``, :class:`~dilateformer.nn.MultiScaleDilatedAttention` passes
its probabilities ``(B, H, W, heads, k, k)`` through ``attn_drop`` and :class:`~dilateformer.nn.GlobalAttention`
passes ``(B, heads, N, N)``. Unhooked layers keep their fast backends, so :func:`capture_attention` costs nothing
outside its ``with`` block. timm's ``Attention`` (ViT, DeiT, ...) calls ``attn_drop`` on its explicit path only,
so inside the block its ``fused_attn`` is switched off, and restored on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dilateformer.nn.attention import GlobalAttention, MultiScaleDilatedAttention


@dataclass
class CapturedAttention:
    """The probabilities one layer produced, with the grid they live on."""

    kind: str  # "msda", "global" (this package's layers) or "timm" (a timm attention module)
    probs: torch.Tensor  # msda: (B, H, W, heads, k, k); global: (B, heads, H*W, H*W); timm: (B, heads, N, N)
    grid: tuple[int, int] | None  # (H, W) token grid of the layer's input; None for timm (tokens are a sequence)
    layer: nn.Module


def is_timm_attention(layer: nn.Module) -> bool:
    """A timm attention module with an explicit-softmax path: an ``attn_drop`` submodule and a ``fused_attn`` flag."""
    return (
        not isinstance(layer, (GlobalAttention, MultiScaleDilatedAttention))
        and isinstance(getattr(layer, "attn_drop", None), nn.Module)
        and isinstance(getattr(layer, "fused_attn", None), bool)
    )


def attention_kind(layer: nn.Module) -> str:
    """``"msda"``, ``"global"`` or ``"timm"``; TypeError for a module whose probabilities cannot be captured."""
    if isinstance(layer, MultiScaleDilatedAttention):
        return "msda"
    if isinstance(layer, GlobalAttention):
        return "global"
    if is_timm_attention(layer):
        return "timm"
    raise TypeError(
        f"not a capturable attention layer: {type(layer).__name__} (expected this package's "
        "MultiScaleDilatedAttention or GlobalAttention, or a timm attention module with attn_drop and fused_attn)"
    )


def capturable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` whose probabilities :func:`capture_attention` can record, by name."""
    found = {}
    for name, module in model.named_modules():
        try:
            attention_kind(module)
        except TypeError:
            continue
        found[name] = module
    return found


def _grid_of(layer: nn.Module, x: torch.Tensor) -> tuple[int, int] | None:
    if not hasattr(layer, "layout"):
        return None
    return tuple(x.shape[2:4]) if layer.layout == "nchw" else tuple(x.shape[1:3])


@contextlib.contextmanager
def capture_attention(
    model: nn.Module, layers: Sequence[str | nn.Module] | Mapping[str, nn.Module]
) -> Iterator[dict[str, CapturedAttention]]:
    """Record the attention probabilities of ``layers`` during forwards run inside the block.

    ``layers`` are module names of ``model`` (``"stages.0.blocks.1.attn"``), modules, or a name -> module
    mapping. The yielded dict fills in as the model runs, keyed by name; each entry holds the last forward's
    probabilities, detached and on the CPU. The hooks are removed on exit, the layers go back to their fast
    backends, and timm layers get their ``fused_attn`` setting back.
    """
    if isinstance(layers, Mapping):
        named = dict(layers)
    else:
        by_module = {id(m): n for n, m in model.named_modules()}
        named = {}
        for item in layers:
            if isinstance(item, str):
                named[item] = model.get_submodule(item)
            else:
                named[by_module.get(id(item), f"layer{len(named)}")] = item
    records: dict[str, CapturedAttention] = {}
    grids: dict[str, tuple[int, int] | None] = {}
    handles = []
    fused: dict[nn.Module, bool] = {}
    try:
        for name, layer in named.items():
            kind = attention_kind(layer)
            if kind == "timm":
                fused.setdefault(layer, layer.fused_attn)
                layer.fused_attn = False  # the explicit path is the one that calls attn_drop

            def remember_grid(module, args, name=name):
                grids[name] = _grid_of(module, args[0])

            def record(module, args, output, name=name, kind=kind, layer=layer):
                # The hook's input is the softmax output, before dropout: the weights the layer actually computed.
                records[name] = CapturedAttention(kind, args[0].detach().float().cpu(), grids[name], layer)

            handles.append(layer.register_forward_pre_hook(remember_grid))
            handles.append(layer.attn_drop.register_forward_hook(record))
        yield records
    finally:
        for handle in handles:
            handle.remove()
        for layer, value in fused.items():
            layer.fused_attn = value
