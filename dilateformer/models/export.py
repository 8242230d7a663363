"""Exporting DilateFormer: ONNX (through the pure-ATen reference MSDA) and ``torch.export``.

The fast MSDA backends run as the custom op ``dilateformer::msda_forward``, which ``torch.export`` and
``torch.compile`` keep as one node but ONNX has no translation for. ONNX export therefore traces under
``dilateformer.use_backend("reference")``, whose neighbourhood gather is made of plain ATen indexing and
softmax ops that the exporter translates; the exported graph computes exactly the same function.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dilateformer.functional import use_backend

__all__ = ["MIN_DYNAMIC_SIZE", "export_onnx", "export_program"]

# Symbolic sizes may not hit 1 anywhere in the graph (torch.export specialises sizes 0 and 1), and above 32 px
# the stride-32 map is at least 2 wide.
MIN_DYNAMIC_SIZE = 33


def _dynamic_shapes(dynamic: bool, max_size: int) -> dict[str, dict[int, Any]] | None:
    if not dynamic:
        return None
    # DYNAMIC rather than named Dims: the graph holds guards that are always true, such as
    # (2 + 2 * n) % (1 + n) == 0, but that the symbolic solver cannot prove; named Dims would refuse them.
    dim = torch.export.Dim.DYNAMIC
    return {
        "x": {
            0: dim(min=1, max=1024),
            2: dim(min=MIN_DYNAMIC_SIZE, max=max_size),
            3: dim(min=MIN_DYNAMIC_SIZE, max=max_size),
        }
    }


def _check_example(example: torch.Tensor, dynamic: bool) -> None:
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ValueError(f"example must be a (B, C, H, W) tensor, got {getattr(example, 'shape', example)!r}")
    if dynamic and example.shape[0] < 2:
        raise ValueError(f"with dynamic=True the example batch must hold 2 or more images, got {example.shape[0]}")
    if dynamic and min(example.shape[2:]) < MIN_DYNAMIC_SIZE:
        raise ValueError(
            f"with dynamic=True the example input must be at least {MIN_DYNAMIC_SIZE}x{MIN_DYNAMIC_SIZE} "
            f"(sizes 0 and 1 specialise the graph), got {tuple(example.shape[2:])}"
        )


def export_program(
    model: nn.Module, example: torch.Tensor, dynamic: bool = True, max_size: int = 4096
) -> torch.export.ExportedProgram:
    """``torch.export.export`` with symbolic batch, height and width (each >= 33 px when dynamic).

    MSDA stays one ``dilateformer::msda_forward`` node, so the program runs the fast kernels.
    """
    _check_example(example, dynamic)
    return torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(dynamic, max_size))


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example: torch.Tensor,
    dynamic: bool = True,
    max_size: int = 4096,
    opset_version: int | None = None,
) -> Path:
    """Export ``model`` to an ONNX file at ``path``, with symbolic batch, height and width if ``dynamic``.

    Puts the model in eval mode. Runs under the reference MSDA backend (see the module docstring); the file
    holds standard ONNX ops only and runs in onnxruntime.

    Args:
        model: a DilateFormer (or any module whose MSDA layers use the op front).
        path: output file.
        example: a representative input ``(B, C, H, W)``; at least 2 images of 33x33 when ``dynamic``
            (torch.export specialises sizes 0 and 1).
        dynamic: symbolic batch, height and width (each >= 33 px); otherwise the example's shape is fixed.
        max_size: upper bound of the symbolic height and width.
        opset_version: ONNX opset, the exporter's default if None.
    """
    _check_example(example, dynamic)
    model.eval()
    path = Path(path)
    kwargs: dict[str, Any] = {"dynamo": True, "input_names": ["images"], "output_names": ["output"]}
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    with use_backend("reference"), torch.no_grad(), warnings.catch_warnings():
        # Tracing through the window-table cache is intended: the tables are pure functions of the sizes.
        warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools.lru_cache`")
        # Strict (dynamo) capture: it traces through the reference backend's cached window tables with symbolic
        # sizes, where non-strict tracing would try to hash a SymInt.
        exported = torch.export.export(
            model, (example,), dynamic_shapes=_dynamic_shapes(dynamic, max_size), strict=True
        )
        program = torch.onnx.export(exported, (example,), **kwargs)
    program.save(str(path))
    return path
