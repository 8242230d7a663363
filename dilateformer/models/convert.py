"""Official DilateFormer checkpoints -> this project's state dicts, and safe loading and saving of weights.

Official files are pickles (``torch.save``). They are read with ``torch.load(weights_only=True)``, which
refuses any global that is not allow-listed; only :class:`argparse.Namespace` (the ``args`` entry of a
training checkpoint) is added to that list. A pickle that tries to call anything else is refused with a
ValueError. This project's own weights are safetensors files, written atomically (temp file, then
``os.replace``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dilateformer.files import atomic_path

__all__ = [
    "convert_official_checkpoint",
    "is_official_state_dict",
    "load_checkpoint_file",
    "load_into",
    "match_state_dict",
    "load_weights",
    "read_metadata",
    "save_weights",
    "describe_state_dict",
]

# Training checkpoints keep more than tensors; these are the only non-tensor globals they need.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

_OFFICIAL_DOWNSAMPLE = re.compile(r"^stages\.(\d+)\.downsample\.proj\.([01])\.(.+)$")


def is_official_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether the keys follow the official code (``patch_embed.proj.*``, ``stages.i.downsample.proj.*``)."""
    return any(k.startswith("patch_embed.") or _OFFICIAL_DOWNSAMPLE.match(k) for k in state_dict)


def _unwrap(obj: Any, use_ema: bool) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint must be a state dict or a training-checkpoint dict, got {type(obj).__name__}")
    order = ("model_ema", "state_dict_ema", "model", "state_dict") if use_ema else ("model", "state_dict")
    for key in order:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return inner
    if any(isinstance(v, Mapping) for v in obj.values()) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"checkpoint is a dict of {sorted(obj)[:8]} without a 'model' or 'state_dict' entry; "
            "pass the state dict itself"
        )
    return obj


def convert_official_checkpoint(obj: Mapping[str, Any], use_ema: bool = False) -> dict[str, torch.Tensor]:
    """An official DilateFormer state dict or training checkpoint, as a state dict for :class:`DilateFormer`.

    Args:
        obj: a raw official state dict, or a training checkpoint ``{'model': ..., 'model_ema': ...,
            'args': argparse.Namespace, ...}`` (as read by :func:`load_checkpoint_file`). A state dict already
            in this project's format passes through unchanged, so the function is safe to apply twice.
        use_ema: take ``model_ema`` (when present) instead of ``model``.

    Returns:
        A new dict of tensors: ``patch_embed.proj.N`` becomes ``stem.N``; the downsampling that the official
        code runs at the end of stage i (``stages.i.downsample.proj.{0,1}``) becomes the start of stage i + 1
        (``stages.{i+1}.downsample.{conv,norm}``); blocks, ``norm`` and ``head`` keep their names. The MSDA
        layers' 1x1-conv qkv weight ``(3C, C, 1, 1)`` (official, and this project's before its qkv became a
        Linear) becomes the Linear weight ``(3C, C)``. A DDP ``module.`` prefix is dropped.
    """
    state_dict = _unwrap(obj, use_ema)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} must be a tensor, got {type(value).__name__}")
        key = key.removeprefix("module.")
        if key.startswith("patch_embed.proj."):
            key = "stem." + key[len("patch_embed.proj.") :]
        else:
            match = _OFFICIAL_DOWNSAMPLE.match(key)
            if match:
                stage, index, rest = match.groups()
                key = f"stages.{int(stage) + 1}.downsample.{'conv' if index == '0' else 'norm'}.{rest}"
        if key.endswith("attn.qkv.weight") and value.dim() == 4 and value.shape[2:] == (1, 1):
            value = value.flatten(1)
        out[key] = value
    return out


def load_checkpoint_file(
    path: str | os.PathLike, use_ema: bool = False, convert: bool = True
) -> dict[str, torch.Tensor]:
    """Read weights from a ``.safetensors`` or ``torch.save`` file, safely, as this project's state dict.

    Pickle files load with ``weights_only=True`` plus :data:`SAFE_GLOBALS`; official keys are converted unless
    ``convert=False`` (for models such as timm's ViTs whose own keys are ``patch_embed.*`` too).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is corrupt, is not a checkpoint, or its pickle asks for code that is not allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"{str(path)!r} is not a readable safetensors file (corrupt or truncated?): {err}"
            ) from err
    else:
        try:
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(unpickling_refusal(path, err)) from err
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
            raise ValueError(f"{str(path)!r} is not a readable checkpoint (corrupt or truncated?): {err}") from err
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as err:
            # Bytes that are not a pickle at all (a text file named .pth) trip the unpickler in odd places.
            raise ValueError(
                f"{str(path)!r} is not a checkpoint (not a torch.save file; the unpickler hit {type(err).__name__})"
            ) from err
    try:
        if not convert:
            return {k.removeprefix("module."): v for k, v in _unwrap(obj, use_ema).items()}
        return convert_official_checkpoint(obj, use_ema=use_ema)
    except TypeError as err:
        raise ValueError(f"{str(path)!r} does not hold a state dict: {err}") from err


def unpickling_refusal(path: str | os.PathLike, error: BaseException) -> str:
    """One line for a pickle that a weights-only load refused: the blocked global, or "not a checkpoint".

    torch's own text suggests ``weights_only=False``, which would run the code the file asks for; it is not quoted.
    """
    text = str(error)
    blocked = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global: ([\w.]+)", text)
    if blocked:
        return (
            f"refused to load {str(path)!r}: its pickle asks to call {blocked.group(1)}, which a weights-only load "
            f"never runs (only tensors, containers and {[c.__qualname__ for c in SAFE_GLOBALS]} are accepted); "
            "if you trust where it came from, re-save its state dict as .safetensors there"
        )
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", text, flags=re.S)
    if detail:
        reason = " ".join(detail.group(1).split())[:200]
        return f"refused to load {str(path)!r}: its pickle uses what a weights-only load does not accept ({reason})"
    return f"{str(path)!r} is not a checkpoint (not a torch.save file)"


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    # A torch.save file starts with a zip ("PK") or pickle (0x80) header; safetensors with an 8-byte length.
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short guess at the architecture a state dict belongs to (embed_dim, depths, classes), for errors."""
    stem = state_dict.get("stem.9.weight")
    depths: dict[int, int] = {}
    for key in state_dict:
        match = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.", key)
        if match:
            stage, block = int(match[1]), int(match[2])
            depths[stage] = max(depths.get(stage, 0), block + 1)
    head = state_dict.get("head.weight")
    parts = []
    if stem is not None:
        parts.append(f"embed_dim={stem.shape[0]}")
    if depths:
        parts.append(f"depths={tuple(depths.get(i, 0) for i in range(max(depths) + 1))}")
    if head is not None:
        parts.append(f"num_classes={head.shape[0]}")
    return ", ".join(parts) if parts else "unrecognised keys"


def match_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    source: str = "checkpoint",
    allow_missing_head: bool = False,
    max_listed: int = 12,
) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` (official or ours) that fit ``model``, or an error naming every mismatch.

    A classifier (``head.*``) of another size is left out, so weights fine-tune to a new class count. A
    ``(3C, C)`` qkv Linear weight and a ``(3C, C, 1, 1)`` qkv conv weight are reshaped into each other, so
    weights also move between this project's models and a model that keeps the official 1x1-conv qkv.

    Raises:
        ValueError: with ``strict``, any missing or unexpected key, or any shape mismatch outside the head;
            the message lists them and describes the architecture the checkpoint looks like. With
            ``allow_missing_head``, a checkpoint without a classifier is accepted.
    """
    if not any(k.startswith("patch_embed.") for k in model.state_dict()):
        # timm ViTs own patch_embed.* keys: their checkpoints are not official DilateFormer ones.
        state_dict = convert_official_checkpoint(state_dict)
    own = model.state_dict()
    matched: dict[str, torch.Tensor] = {}
    mismatched, head_skipped = [], []
    # Walk the model's keys, so that the messages list mismatches from the stem to the head.
    for key, target in own.items():
        if key not in state_dict:
            continue
        value = state_dict[key]
        if value.shape != target.shape:
            if value.numel() == target.numel() and key.endswith("attn.qkv.weight"):
                value = value.reshape(target.shape)
            elif key.startswith("head."):
                head_skipped.append(key)
                continue
            else:
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
                continue
        matched[key] = value
    missing = [k for k in own if k not in state_dict and not (allow_missing_head and k.startswith("head."))]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected or mismatched):
        lines = [
            f"{source} does not fit this model (checkpoint: {describe_state_dict(state_dict)}; "
            f"model: {describe_state_dict(own)}):"
        ]
        for title, items in (
            ("shape mismatches", mismatched),
            ("missing keys", missing),
            ("unexpected keys", unexpected),
        ):
            if items:
                shown = "\n    ".join(items[:max_listed])
                more = f"\n    ... and {len(items) - max_listed} more" if len(items) > max_listed else ""
                lines.append(f"  {len(items)} {title}:\n    {shown}{more}")
        raise ValueError("\n".join(lines))
    return matched


def load_into(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True, source: str = "checkpoint"
) -> None:
    """Load a state dict (official or ours) into ``model``, with the checks of :func:`match_state_dict`.

    A classifier of another size is skipped and keeps its fresh initialisation.
    """
    model.load_state_dict(match_state_dict(model, state_dict, strict=strict, source=source), strict=False)


def safetensors_payload(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The ``(tensors, metadata)`` that :func:`save_weights` hands to safetensors' ``save_file``.

    For savers that commit several files together (the training checkpoint's ``last`` pair).
    """
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    # safetensors refuses shared storage and non-contiguous tensors; weights are small enough to clone.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return tensors, {"format": "pt", **{k: json.dumps(v) for k, v in (metadata or {}).items()}}


def save_weights(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save weights as safetensors, atomically: a crash mid-write never leaves a truncated ``path``.

    ``metadata`` values are JSON-encoded (read them back with :func:`read_metadata`). Missing parent
    directories are created. Returns ``path``.
    """
    from safetensors.torch import save_file

    tensors, meta = safetensors_payload(model_or_state_dict, metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a safetensors file written by :func:`save_weights` (values JSON-decoded).

    Raises:
        ValueError: the file is missing, corrupt or not safetensors.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read checkpoint {path} ({err}); is it a complete .safetensors file?") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "format":  # safetensors' own marker, not ours
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:  # written by another tool: keep the raw string
            out[key] = value
    return out


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file written by :func:`save_weights`: (state dict, metadata).

    To load into a model use :func:`load_into`; for official ``torch.save`` files, :func:`load_checkpoint_file`.

    Raises:
        ValueError: the file is missing, corrupt or not safetensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    try:
        return load_file(str(path), device="cpu"), metadata
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read checkpoint {path} ({err}); is it a complete .safetensors file?") from None
