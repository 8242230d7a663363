"""Ultralytics YOLO layers built on MSDA, and the hook that lets Ultralytics model YAMLs name them.

This module imports ``ultralytics`` (AGPL-3.0) and is never imported by the core package. Importing it
registers the layers (:func:`register`), so a pickled checkpoint that references these classes registers them
as it loads: ``YOLO("best.pt")`` needs no explicit call, only an installed ``dilateformer``.

Layers (names as written in a model YAML; ``c1``, the input channels, always comes from the previous layer):

- ``MSDA``: ``[-1, 1, MSDA, [num_heads, kernel_size, dilations]]``, every argument optional. Output shape
  equals input shape. A plain :class:`~dilateformer.nn.MultiScaleDilatedAttention` (same parameters).
- ``C2f_MSDA``: ``[-1, n, C2f_MSDA, [c2, shortcut, e, num_heads, kernel_size, dilations]]``. A C2f block whose
  bottlenecks are a 3x3 conv followed by MSDA. ``c2`` and ``n`` are width- and depth-scaled like C2f's.
- ``C2PSA_MSDA``: ``[-1, n, C2PSA_MSDA, [c2, e, num_heads, kernel_size, dilations]]``. A C2PSA block whose PSA
  attention is MSDA; like C2PSA it keeps the channel count (``c2`` scales to the input width).
- ``GlobalAttn``: ``[-1, 1, GlobalAttn, [num_heads]]``. Multi-head attention over all positions, MSDA's twin,
  for comparisons.
- ``CBAM``: ``[-1, 1, CBAM, [kernel_size]]``. Ultralytics' own channel + spatial attention
  (``ultralytics.nn.modules.CBAM``), which its ``parse_model`` ships but cannot place (it would not fill in
  ``c1``); registered here so comparisons can name it. Output shape equals input shape.

Heads default to a multiple of ``len(dilations)`` that divides the channels, with a head width near 32. The
default dilations ``(1, 2, 3, 4)`` fit every YOLO width: Ultralytics rounds layer widths to a multiple of 8,
and the hidden width of C2f/C2PSA blocks is half of it, a multiple of 4.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.nn.modules import C2PSA, CBAM, C2f, Conv

from dilateformer.functional import check_dilations
from dilateformer.nn.attention import GlobalAttention, MultiScaleDilatedAttention

__all__ = [
    "C2PSA_MSDA",
    "DEFAULT_DILATIONS",
    "LAYERS",
    "MSDA",
    "C2f_MSDA",
    "GlobalAttn",
    "MSDABottleneck",
    "default_num_heads",
    "register",
    "resolve_num_heads",
    "shipped_yaml",
]

DEFAULT_DILATIONS: tuple[int, ...] = (1, 2, 3, 4)
TARGET_HEAD_DIM = 32
CFG_DIR = Path(__file__).with_name("cfg")


# ----------------------------------------------------------------------------------------------- head counts


def _check_channels(channels: object, owner: str) -> int:
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise TypeError(
            f"{owner}: input channels c1 must be a positive int, got {channels!r}; in a model YAML c1 is "
            "filled in from the previous layer once dilateformer.integrations.ultralytics.register() has run"
        )
    return channels


def default_num_heads(channels: int, groups: int, owner: str = "MSDA") -> int:
    """The head count used when a YAML leaves ``num_heads`` out.

    Picks, among the multiples of ``groups`` (the number of dilation rates) that divide ``channels``, the one
    whose head width ``channels // heads`` is closest to 32 (the wider one on a tie).

    Raises:
        ValueError: if ``channels`` is not divisible by ``groups``, so no head count can work.
    """
    channels = _check_channels(channels, owner)
    if channels % groups != 0:
        raise ValueError(
            f"{owner} at {channels} channels: the {groups} dilation groups need a channel count divisible "
            f"by {groups}, and {channels} is not; pass fewer dilations (e.g. dilations=[1, 2]) or change the "
            "width"
        )
    candidates = [h for h in range(groups, channels + 1, groups) if channels % h == 0]
    return min(candidates, key=lambda h: (abs(channels // h - TARGET_HEAD_DIM), -(channels // h)))


def resolve_num_heads(channels: int, num_heads: int | None, dilations: tuple[int, ...], owner: str = "MSDA") -> int:
    """``num_heads`` checked against ``channels`` and ``dilations``, or the default when it is ``None``."""
    if num_heads is None:
        return default_num_heads(channels, len(dilations), owner)
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise TypeError(f"{owner}: num_heads must be a positive int or None (automatic), got {num_heads!r}")
    groups = len(dilations)
    if channels % num_heads != 0 or num_heads % groups != 0:
        fits = [h for h in range(groups, channels + 1, groups) if channels % h == 0][:6]
        hint = f"e.g. {fits} or null for the default" if fits else "no head count fits; pass fewer dilations"
        raise ValueError(
            f"{owner} at {channels} channels: num_heads={num_heads} must divide the channels and be a "
            f"multiple of len(dilations)={groups} (dilations={list(dilations)}); {hint}"
        )
    return num_heads


# ---------------------------------------------------------------------------------------------------- layers


class MSDA(MultiScaleDilatedAttention):
    """Multi-Scale Dilated Attention as a YOLO layer: ``(B, c1, H, W) -> (B, c1, H, W)``.

    Identical to :class:`dilateformer.nn.MultiScaleDilatedAttention` with ``layout="nchw"`` (same parameters,
    same output); only the argument order follows Ultralytics (input channels first, then the YAML arguments).

    Args:
        c1: input (and output) channels, filled in from the previous layer.
        num_heads: attention heads; ``None`` picks :func:`default_num_heads`.
        kernel_size: odd window size.
        dilations: dilation rate of each head group.
        qkv_bias, attn_drop, proj_drop, border, backend: as in :class:`MultiScaleDilatedAttention`.
    """

    def __init__(
        self,
        c1: int,
        num_heads: int | None = None,
        kernel_size: int = 3,
        dilations: Sequence[int] = DEFAULT_DILATIONS,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        border: str = "zero",
        backend: str = "auto",
    ) -> None:
        c1 = _check_channels(c1, type(self).__name__)
        dilations = check_dilations(dilations)
        heads = resolve_num_heads(c1, num_heads, dilations, type(self).__name__)
        super().__init__(
            c1,
            heads,
            kernel_size=kernel_size,
            dilations=dilations,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            border=border,
            layout="nchw",
            backend=backend,
        )


class GlobalAttn(GlobalAttention):
    """Global multi-head attention as a YOLO layer, MSDA's twin: ``(B, c1, H, W) -> (B, c1, H, W)``.

    Heads default to the same count :class:`MSDA` would pick with its default dilations, so the two differ
    only in where each query looks.
    """

    def __init__(
        self,
        c1: int,
        num_heads: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        c1 = _check_channels(c1, type(self).__name__)
        heads = resolve_num_heads(c1, num_heads, DEFAULT_DILATIONS, type(self).__name__)
        super().__init__(c1, heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, layout="nchw")


class MSDABottleneck(nn.Module):
    """A 3x3 Conv-BN-act followed by MSDA, with an optional residual: the bottleneck of :class:`C2f_MSDA`."""

    def __init__(
        self,
        c: int,
        shortcut: bool = True,
        num_heads: int | None = None,
        kernel_size: int = 3,
        dilations: Sequence[int] = DEFAULT_DILATIONS,
    ) -> None:
        super().__init__()
        self.cv1 = Conv(c, c, 3, 1)
        self.attn = MSDA(c, num_heads, kernel_size, dilations)
        self.add = bool(shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.cv1(x))
        return x + y if self.add else y


def _check_block_args(owner: str, c1: object, c2: object, n: object, e: object) -> None:
    _check_channels(c1, owner)
    if not isinstance(c2, int) or isinstance(c2, bool) or c2 < 1:
        raise TypeError(f"{owner}: output channels c2 must be a positive int, got {c2!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise TypeError(f"{owner}: repeats n must be a positive int, got {n!r}")
    if not isinstance(e, (int, float)) or isinstance(e, bool) or not 0 < e <= 1:
        raise ValueError(f"{owner}: expansion e must be a number in (0, 1], got {e!r}")


@contextlib.contextmanager
def _context(owner: str, c2: int, e: float) -> Iterator[None]:
    """Re-raise a head/dilation error from an inner MSDA with the block's own arguments in front."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{owner}(c2={c2}, e={e}) runs MSDA at hidden width int(c2 * e): {err}") from err


class C2f_MSDA(C2f):  # noqa: N801 (the YAML name)
    """C2f with MSDA bottlenecks: ``(B, c1, H, W) -> (B, c2, H, W)``.

    Same split-and-concatenate structure as Ultralytics' C2f (it is a subclass, so export and fusing treat it
    as one), with each bottleneck a 3x3 conv followed by :class:`MSDA` at the hidden width ``int(c2 * e)``.

    Args:
        c1: input channels (from the previous layer).
        c2: output channels (width-scaled by the YAML's scale).
        n: bottlenecks (depth-scaled).
        shortcut: residual connection around each bottleneck.
        e: hidden width ratio.
        num_heads, kernel_size, dilations: the MSDA settings, as in :class:`MSDA`.
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        n: int = 1,
        shortcut: bool = False,
        e: float = 0.5,
        num_heads: int | None = None,
        kernel_size: int = 3,
        dilations: Sequence[int] = DEFAULT_DILATIONS,
    ) -> None:
        owner = type(self).__name__
        _check_block_args(owner, c1, c2, n, e)
        super().__init__(c1, c2, n, shortcut, 1, e)
        with _context(owner, c2, e):
            self.m = nn.ModuleList(
                MSDABottleneck(self.c, shortcut, num_heads, kernel_size, dilations) for _ in range(n)
            )


class C2PSA_MSDA(C2PSA):  # noqa: N801 (the YAML name)
    """C2PSA with MSDA as the attention of each PSA block: ``(B, c1, H, W) -> (B, c1, H, W)``.

    Each PSA block keeps its structure (``x + attn(x)``, then ``x + ffn(x)``); its attention is :class:`MSDA`
    at the hidden width ``int(c1 * e)`` instead of global attention.

    Args:
        c1: input channels (from the previous layer).
        c2: output channels; must equal ``c1``, as in C2PSA.
        n: PSA blocks (depth-scaled).
        e: hidden width ratio.
        num_heads, kernel_size, dilations: the MSDA settings, as in :class:`MSDA`.
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        n: int = 1,
        e: float = 0.5,
        num_heads: int | None = None,
        kernel_size: int = 3,
        dilations: Sequence[int] = DEFAULT_DILATIONS,
    ) -> None:
        owner = type(self).__name__
        _check_block_args(owner, c1, c2, n, e)
        if c1 != c2:
            raise ValueError(
                f"{owner} keeps the channel count: c2 (scaled to {c2}) must equal the input channels "
                f"c1={c1}; give it the same nominal width as the layer before it"
            )
        super().__init__(c1, c2, n, e)
        with _context(owner, c2, e):
            for block in self.m:
                block.attn = MSDA(self.c, num_heads, kernel_size, dilations)


LAYERS: dict[str, type[nn.Module]] = {
    "MSDA": MSDA,
    "C2f_MSDA": C2f_MSDA,
    "C2PSA_MSDA": C2PSA_MSDA,
    "GlobalAttn": GlobalAttn,
    "CBAM": CBAM,  # Ultralytics' class, unchanged: only its c1 needs the plug-in
}
# Layers whose output has the input's width, and those whose YAML starts with the output width c2 (like C2f).
_KEEPS_WIDTH = frozenset({"MSDA", "GlobalAttn", "CBAM"})
_SETS_WIDTH = frozenset({"C2f_MSDA", "C2PSA_MSDA"})
_PROBE = "_DilateformerChannelProbe"


# ------------------------------------------------------------------------------------------- parse_model hook


class _ChannelProbe(nn.Module):
    """Placeholder row appended to a YAML while it is parsed: receives parse_model's channel list."""

    def __init__(self, channels: object = None) -> None:
        super().__init__()
        self.channels = list(channels) if isinstance(channels, list) else None


def _literal(value: Any) -> Any:
    if isinstance(value, str):
        with contextlib.suppress(ValueError, SyntaxError):
            return ast.literal_eval(value)
    return value


def _count(module: nn.Module) -> int:
    return len(module) if isinstance(module, nn.Sequential) else 1


def _first(module: nn.Module) -> nn.Module:
    return module[0] if isinstance(module, nn.Sequential) else module


def _build_row(name: str, c1: int, c2: int, n: int, args: list[Any], act: nn.Module | None) -> nn.Module:
    cls = LAYERS[name]
    args = [_literal(a) for a in args]
    previous = Conv.default_act
    if act is not None:  # the YAML's `activation:`, which parse_model applied to the stand-in's Conv
        Conv.default_act = act
    try:
        if name in _KEEPS_WIDTH:
            layers = [cls(c1, *args) for _ in range(n)]
            return nn.Sequential(*layers) if n > 1 else layers[0]
        return cls(c1, c2, n, *args[1:])
    finally:
        Conv.default_act = previous


def _wrap_parse_model(original):
    """parse_model that also builds our layers, delegating everything else to Ultralytics' own parse_model.

    Ultralytics keeps its channel bookkeeping in local sets that cannot be extended, so each of our rows is
    parsed as a stand-in with the same channel semantics (``nn.Identity`` for width-keeping layers, ``Conv``
    for layers whose first argument is the output width c2, scaled the same way). A trailing probe row gets
    the channel list (YAML string arguments resolve against parse_model's locals, and ``ch`` is one of them).
    The stand-ins are then replaced by our layers, built with the widths and depth-scaled repeats read back.
    """

    def parse_model(d, ch, verbose=True):
        rows = [*d["backbone"], *d["head"]]
        ours = {i: row for i, row in enumerate(rows) if isinstance(row[2], str) and row[2] in LAYERS}
        if not ours:
            return original(d, ch, verbose)
        probe = copy.deepcopy(d)
        n_backbone = len(probe["backbone"])
        for i, (f, n, name, args) in ours.items():
            if not isinstance(f, int):
                raise ValueError(f"layer {i} ({name}): 'from' must be a single layer index, got {f!r}")
            if name in _SETS_WIDTH and (not args or not isinstance(_literal(args[0]), int)):
                raise ValueError(f"layer {i} ({name}): first argument must be the output width c2: {args}")
            standin = [f, n, "nn.Identity", []] if name in _KEEPS_WIDTH else [f, n, "Conv", [args[0]]]
            section, j = ("backbone", i) if i < n_backbone else ("head", i - n_backbone)
            probe[section][j] = standin
        probe["head"] = [*probe["head"], [-1, 1, _PROBE, ["ch"]]]
        model, save = original(probe, ch, False)
        layers = list(model)
        channels = layers.pop().channels
        if not isinstance(channels, list) or len(channels) != len(rows):
            raise RuntimeError(
                "dilateformer could not read the layer widths from this Ultralytics version's parse_model; "
                "please report the Ultralytics version"
            )
        shown = {}
        for i, (f, _, name, args) in ours.items():
            c1 = ch if i == 0 else channels[f if f >= 0 else i + f]
            standin = layers[i]
            act = getattr(_first(standin), "act", None) if name in _SETS_WIDTH else None
            try:
                module = _build_row(name, c1, channels[i], _count(standin), list(args), act)
            except (TypeError, ValueError) as err:
                raise type(err)(f"model YAML layer {i} [{f}, ..., {name}, {args}]: {err}") from err
            module.np = sum(p.numel() for p in module.parameters())
            module.i, module.f, module.type = i, f, f"{type(_first(module)).__module__}.{name}"
            layers[i] = module
            shown[i] = [c1, *args] if name in _KEEPS_WIDTH else [c1, channels[i], _count(standin), *args[1:]]
        if verbose:
            _log_table(d, rows, layers, shown)
        return nn.Sequential(*layers), save

    parse_model.__wrapped__ = original
    parse_model._dilateformer = True
    return parse_model


def _log_table(d: dict, rows: list[list[Any]], layers: list[nn.Module], shown: dict[int, list[Any]]) -> None:
    """parse_model's layer table, for a model with our layers (other rows show their YAML arguments)."""
    from ultralytics.utils import LOGGER

    scales, scale = d.get("scales"), d.get("scale")
    depth = scales[scale or next(iter(scales))][0] if scales else d.get("depth_multiple", 1.0)
    LOGGER.info(f"\n{'':>3}{'from':>20}{'n':>3}{'params':>10}  {'module':<45}{'arguments':<30}")
    for i, ((f, n, _, args), m) in enumerate(zip(rows, layers, strict=True)):
        n = max(round(n * depth), 1) if n > 1 else n
        LOGGER.info(f"{i:>3}{f!s:>20}{n:>3}{m.np:10.0f}  {m.type:<45} {shown.get(i, args)!s:<30}")


# -------------------------------------------------------------------------------------- names, DDP, register

_SHIPPED = re.compile(r"^(?P<family>yolov8|yolo11)(?P<scale>[nslmx])?-(?P<kind>msda|global|cbam|psa)\.ya?ml$")


def shipped_yaml(name: str | Path) -> Path | None:
    """The shipped model YAML a bare file name refers to, or ``None``.

    ``yolov8n-msda.yaml`` and its scale siblings (``yolov8s-msda.yaml`` ... and the scale-free
    ``yolov8-msda.yaml``) all resolve to the one shipped file, which holds every scale; Ultralytics reads the
    scale from the requested name. Same for ``yolo11*-msda.yaml`` and ``yolov8*-{global,cbam,psa}.yaml``.
    """
    text = str(name)
    if Path(text).name != text:  # a path with a directory: not ours to resolve
        return None
    match = _SHIPPED.match(text)
    if match is None:
        return None
    path = CFG_DIR / f"{match['family']}n-{match['kind']}.yaml"
    return path if path.is_file() else None


def _wrap_check_yaml(original):
    def check_yaml(file, *args, **kwargs):
        if not Path(str(file)).exists() and (path := shipped_yaml(file)) is not None:
            return str(path)
        return original(file, *args, **kwargs)

    check_yaml.__wrapped__ = original
    check_yaml._dilateformer = True
    return check_yaml


DDP_IMPORT = "import dilateformer.integrations.ultralytics  # registers dilateformer's YOLO layers here"


def _add_ddp_import(script: str) -> str:
    """The DDP worker script with our import after its ``sys.path`` setup (or first, if it has none)."""
    if DDP_IMPORT in script:
        return script
    lines = script.splitlines(keepends=True)
    for k, line in enumerate(lines):
        if line.lstrip().startswith("sys.path ="):
            indent = line[: len(line) - len(line.lstrip())]
            lines.insert(k + 1, f"{indent}{DDP_IMPORT}\n")
            return "".join(lines)
    return f"{DDP_IMPORT}\n{script}"


def _wrap_generate_ddp_file(original):
    def generate_ddp_file(trainer):
        file = original(trainer)
        path = Path(file)
        path.write_text(_add_ddp_import(path.read_text(encoding="utf-8")), encoding="utf-8")
        return file

    generate_ddp_file.__wrapped__ = original
    generate_ddp_file._dilateformer = True
    return generate_ddp_file


def register() -> None:
    """Make Ultralytics model YAMLs able to name ``MSDA``, ``C2f_MSDA``, ``C2PSA_MSDA``, ``GlobalAttn`` and ``CBAM``.

    Idempotent, and run automatically when this module is imported. It patches, at run time and in this
    process only (no Ultralytics file is edited):

    - ``ultralytics.nn.tasks``: the layer names join its namespace, and ``parse_model`` builds our rows with
      their input width taken from the previous layer (see :func:`_wrap_parse_model`);
    - ``ultralytics.nn.tasks.check_yaml``: bare names of the shipped YAMLs (any scale letter) resolve to
      ``dilateformer/integrations/cfg``;
    - ``ultralytics.utils.dist.generate_ddp_file``: the script each DDP worker runs imports
      ``dilateformer.integrations.ultralytics`` first, so workers register the layers too;
    - ``torch.serialization``'s safe globals: our classes, for ``ULTRALYTICS_SAFE_LOAD=1`` (weights-only).
    """
    from ultralytics.nn import tasks
    from ultralytics.utils import dist

    for name, cls in LAYERS.items():
        setattr(tasks, name, cls)
    setattr(tasks, _PROBE, _ChannelProbe)
    if not getattr(tasks.parse_model, "_dilateformer", False):
        tasks.parse_model = _wrap_parse_model(tasks.parse_model)
    if not getattr(tasks.check_yaml, "_dilateformer", False):
        tasks.check_yaml = _wrap_check_yaml(tasks.check_yaml)
    if not getattr(dist.generate_ddp_file, "_dilateformer", False):
        dist.generate_ddp_file = _wrap_generate_ddp_file(dist.generate_ddp_file)
    if hasattr(torch.serialization, "add_safe_globals"):
        known = set(torch.serialization.get_safe_globals())
        new = [c for c in (*LAYERS.values(), MSDABottleneck, _ChannelProbe) if c not in known]
        if new:
            torch.serialization.add_safe_globals(new)


register()
