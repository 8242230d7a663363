"""Ultralytics YOLO plug-in: MSDA layers for YOLOv8/YOLO11 model YAMLs, without forking Ultralytics.

Needs the optional extra ``pip install dilateformer[yolo]`` (Ultralytics is AGPL-3.0; the core package never
imports it). Importing this module registers the layers, so this is all a script needs::

    from ultralytics import YOLO
    import dilateformer.integrations.ultralytics  # registers MSDA, C2f_MSDA, C2PSA_MSDA, GlobalAttn

    model = YOLO("yolov8n-msda.yaml")  # a shipped YAML, by name (any scale letter: yolov8s-msda.yaml, ...)
    model.train(data="coco8.yaml", epochs=1)

See :mod:`dilateformer.integrations.ultralytics_modules` for the layers and their YAML arguments.
"""

from __future__ import annotations

from pathlib import Path

try:
    import ultralytics as _ultralytics  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "dilateformer.integrations.ultralytics needs Ultralytics: pip install 'dilateformer[yolo]' "
        "(Ultralytics is licensed AGPL-3.0)"
    ) from err

from dilateformer.integrations.ultralytics_modules import (
    C2PSA_MSDA,
    CFG_DIR,
    DEFAULT_DILATIONS,
    LAYERS,
    MSDA,
    C2f_MSDA,
    GlobalAttn,
    MSDABottleneck,
    default_num_heads,
    register,
    resolve_num_heads,
    shipped_yaml,
)

__all__ = [
    "C2PSA_MSDA",
    "CFG_DIR",
    "DEFAULT_DILATIONS",
    "LAYERS",
    "MSDA",
    "C2f_MSDA",
    "GlobalAttn",
    "MSDABottleneck",
    "available_yamls",
    "default_num_heads",
    "register",
    "resolve_num_heads",
    "yaml_path",
]


def available_yamls() -> list[str]:
    """File names of the shipped model YAMLs."""
    return sorted(p.name for p in CFG_DIR.glob("*.yaml"))


def yaml_path(name: str = "yolov8n-msda.yaml") -> Path:
    """Absolute path of a shipped model YAML, e.g. ``yaml_path("yolo11n-msda.yaml")``.

    Ultralytics reads a model's scale from the file name, so a path to the shipped file builds the scale in
    its name (``n``). For another scale pass the bare name to ``YOLO`` (``YOLO("yolov8s-msda.yaml")``):
    it resolves to the same file once this module is imported.

    Raises:
        TypeError: if ``name`` is not a string.
        ValueError: if ``name`` is not a shipped file name.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a YAML file name (str), got {type(name).__name__}")
    path = CFG_DIR / name
    if name not in available_yamls():
        hint = ""
        if shipped_yaml(name) is not None:
            hint = f"; for this scale pass the bare name to YOLO({name!r}), resolves after register()"
        raise ValueError(f"name must be one of {available_yamls()}, got {name!r}{hint}")
    return path


register()
