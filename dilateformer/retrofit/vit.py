"""Retrofit MSDA into the shallow blocks of a timm ViT (DeiT, distilled, register tokens, EVA), keeping its weights."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dilateformer.functional import check_border, check_dilations, check_heads_divisible, check_kernel_size
from dilateformer.retrofit.attention import PREFIX_MODES, PatchGrid, RetrofitAttention

__all__ = ["DEFAULT_THRESHOLD", "RetrofitReport", "msda_vit", "parse_blocks", "retrofit_config"]

# blocks="auto" keeps a block when at least this share of its patch queries' attention mass falls in the union of
# their dilated windows. Uniform attention puts only |union| / N there (0.25 for a 3x3, dilations 1-3 window on a
# 14x14 grid, under 0.1 on larger grids), and a block at 0.5 keeps most of what it attends to when the rest is cut.
DEFAULT_THRESHOLD = 0.5
# ... and at least this many times what uniform attention would put there.
MIN_OVER_CHANCE = 2.0


def _vit_types() -> tuple[type, ...]:
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, Eva


def _attention_types() -> tuple[type, ...]:
    from timm.models.eva import EvaAttention
    from timm.models.vision_transformer import Attention

    return Attention, EvaAttention


def parse_blocks(blocks: str | int | Iterable[int], depth: int) -> list[int]:
    """Block indices from ``range(6)``, ``[0, 2]``, ``3``, ``"0-5"``, ``"0,2,4"`` or ``"0-2,5"``, checked.

    (``"auto"`` is resolved by :func:`msda_vit`.)"""
    if isinstance(blocks, str):
        indices: list[int] = []
        for part in blocks.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if match is None:
                raise ValueError(f"blocks: expected 'auto', 'A-B' or 'A,B,...' of block indices, got {blocks!r}")
            first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
            if last < first:
                raise ValueError(f"blocks: range {part.strip()!r} runs backwards")
            indices += range(first, last + 1)
    elif isinstance(blocks, int) and not isinstance(blocks, bool):
        indices = [blocks]
    elif isinstance(blocks, Iterable):
        indices = list(blocks)
        for i in indices:
            if not isinstance(i, int) or isinstance(i, bool):
                raise TypeError(f"blocks: every block index must be an int, got {i!r}")
    else:
        raise TypeError(f"blocks must be 'auto', a string like '0-5', an int or ints, got {type(blocks).__name__}")
    if not indices:
        raise ValueError("blocks: no block chosen")
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise ValueError(f"blocks: {bad} out of range; this model has blocks 0..{depth - 1}")
    return sorted(set(indices))


@dataclass
class RetrofitReport:
    """What :func:`msda_vit` changed. GMACs are of one image at ``input_size``; ``block_gmacs_*`` per block."""

    model: str
    blocks: list[int]
    depth: int
    kernel_size: int
    dilations: tuple[int, ...]
    border: str
    prefix: str
    num_prefix_tokens: int
    input_size: tuple[int, int, int]
    params_before: int
    params_after: int
    gmacs_before: float
    gmacs_after: float
    block_gmacs_before: list[float]
    block_gmacs_after: list[float]
    locality: list[dict] | None = None
    """Per block (measure_locality's fields), when blocks were chosen by measurement."""
    threshold: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        from dilateformer.analysis.measure import format_table

        headers = ["block", "attention", "GMACs before", "GMACs after"]
        if self.locality is not None:
            headers += ["in-window mass", "uniform chance"]
        rows = []
        for i in range(self.depth):
            row = [i, "MSDA" if i in self.blocks else "global", self.block_gmacs_before[i], self.block_gmacs_after[i]]
            if self.locality is not None:
                row += [self.locality[i]["union_share"], self.locality[i]["uniform_union_share"]]
            rows.append(row)
        c, h, w = self.input_size
        summary = [
            f"{self.model}: blocks {self.blocks} -> MSDA (kernel {self.kernel_size}, dilations {self.dilations}, "
            f"border {self.border}, prefix {self.prefix}, {self.num_prefix_tokens} prefix tokens)",
            f"params {self.params_before:,} -> {self.params_after:,}; at {c}x{h}x{w}: "
            f"{self.gmacs_before:.4g} -> {self.gmacs_after:.4g} GMACs ({self.gmacs_after / self.gmacs_before:.2f}x)",
        ]
        if self.threshold is not None:
            summary.append(f"blocks chosen: in-window attention mass >= {self.threshold}")
        return "\n".join([*summary, *self.notes, format_table(headers, rows)])


def retrofit_config(model: nn.Module) -> dict | None:
    """The settings a retrofitted model was built with (to record next to its weights), or None."""
    found = [(i, b.attn) for i, b in enumerate(model.blocks) if isinstance(b.attn, RetrofitAttention)]
    if not found:
        return None
    first = found[0][1]
    return {
        "blocks": [i for i, _ in found],
        "kernel_size": first.kernel_size,
        "dilations": list(first.dilations),
        "border": first.border,
        "prefix": first.prefix,
    }


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, _vit_types()):
        raise TypeError(
            f"model must be a timm VisionTransformer (ViT, DeiT, distilled DeiT, register tokens) or Eva, "
            f"got {type(model).__name__}"
        )
    patch_drop = getattr(model, "patch_drop", None)
    if patch_drop is not None and not isinstance(patch_drop, nn.Identity) and getattr(patch_drop, "prob", 0) > 0:
        raise ValueError("model: patch dropout (patch_drop_rate > 0) removes grid tokens; build it with 0")


def _check_attention(index: int, attn: nn.Module) -> None:
    if isinstance(attn, RetrofitAttention):
        raise ValueError(f"blocks: block {index} is already retrofitted")
    if type(attn) not in _attention_types():
        raise TypeError(
            f"block {index}: attention {type(attn).__name__} is not supported (timm Attention and EvaAttention "
            "with a fused qkv Linear are)"
        )
    if getattr(attn, "qkv", None) is None:
        raise TypeError(
            f"block {index}: {type(attn).__name__} has separate q/k/v projections (qkv_fused=False); "
            "only a fused qkv Linear is supported"
        )


def _input_size(model: nn.Module) -> tuple[int, int, int]:
    embed = model.patch_embed
    return (embed.proj.in_channels, *(int(s) for s in embed.img_size))


class _BlockCall(nn.Module):
    """``block(x, **tensors)`` as a one-input module, so count_macs can count a block that takes EVA's rope."""

    def __init__(self, block: nn.Module, kwargs: dict) -> None:
        super().__init__()
        self.block = block
        self.names = []
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                self.register_buffer(name, value, persistent=False)
                self.names.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, **{name: getattr(self, name) for name in self.names})


def _per_block_gmacs(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[float, list[float]]:
    """GMACs of one image for the whole model and for each block (from the block inputs of that forward)."""
    from dilateformer.analysis.measure import GIGA, count_macs

    inputs: dict[int, tuple] = {}
    handles = [
        block.register_forward_pre_hook(lambda m, a, k, i=i: inputs.__setitem__(i, (m, a, k)), with_kwargs=True)
        for i, block in enumerate(model.blocks)
    ]
    try:
        dtype = next(model.parameters()).dtype
        total = count_macs(model, torch.zeros(1, *input_size, dtype=dtype), on_meta=True)
    finally:
        for handle in handles:
            handle.remove()
    # The hooks ran in count_macs' meta copy: its blocks (their patch grid recorded) count on their own inputs.
    per_block = [count_macs(_BlockCall(m, k), a[0], on_meta=True) for m, a, k in (inputs[i] for i in sorted(inputs))]
    return total / GIGA, [m / GIGA for m in per_block]


def _find_grid(model: nn.Module) -> PatchGrid:
    """The model's patch-grid recorder: the one its earlier retrofit installed, else a new one hooked in."""
    for block in model.blocks:
        if isinstance(block.attn, RetrofitAttention):
            return block.attn._grid
    grid = PatchGrid()
    model.patch_embed.register_forward_hook(grid.record)
    return grid


def _auto_blocks(model, images, kernel_size, dilations, threshold) -> tuple[list[int], list[dict]]:
    if images is None:
        raise ValueError("blocks='auto' needs images=... (a (B, 3, H, W) batch or batches) to measure locality on")
    from dilateformer.analysis.locality import measure_locality, suggest_blocks

    names = {f"blocks.{i}.attn": i for i in range(len(model.blocks))}
    results = measure_locality(model, images, kernel_size=kernel_size, dilations=dilations, layers=list(names))
    # Local enough in absolute terms, and clearly above chance: on a small grid the windows cover so much that
    # uniform attention alone would pass an absolute threshold.
    local = set(suggest_blocks(results, threshold=threshold))
    above_chance = set(suggest_blocks(results, threshold=MIN_OVER_CHANCE, metric="union_over_chance"))
    chosen = sorted(names[name] for name in local & above_chance)
    fields = ("name", "grid", "mean_distance_px", "union_share", "uniform_union_share", "prefix_share", "entropy_ratio")
    per_block = []
    for result in results:
        row = {k: getattr(result, k) for k in fields}
        row["window_share"] = {str(d): share for d, share in result.window_share.items()}
        per_block.append(row)
    return chosen, per_block


def msda_vit(
    model: nn.Module,
    blocks: str | int | Iterable[int] = range(6),
    *,
    kernel_size: int = 3,
    dilations: Sequence[int] = (1, 2, 3),
    border: str = "zero",
    prefix: str = "global",
    images: torch.Tensor | Iterable | None = None,
    threshold: float | None = None,
    measure: bool = True,
) -> tuple[nn.Module, RetrofitReport]:
    """Swap the attention of ``blocks`` of a timm ViT to MSDA over its patch grid, in place, keeping every weight.

    Each chosen ``block.attn`` becomes a :class:`~dilateformer.retrofit.attention.RetrofitAttention` built from
    the block's own ``qkv``, ``proj``, ``q_norm``/``k_norm`` (and EVA's biases and rope): same parameter objects,
    same state-dict keys, so a checkpoint of the original model loads into the retrofitted one and back.

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, register tokens) or ``Eva`` with fused qkv.
        blocks: indices (``range(6)``, ``[0, 2]``, ``"0-5"``, ``"0,2,4"``) or ``"auto"``: measure each block's
            attention on ``images`` and keep those whose patch queries put at least ``threshold`` (default
            :data:`DEFAULT_THRESHOLD`) of their attention mass into the union of their dilated windows, and at
            least :data:`MIN_OVER_CHANCE` times what uniform attention would put there.
        kernel_size, dilations, border: the MSDA window (as for
            :func:`dilateformer.functional.multi_scale_dilated_attention`); the heads split into
            ``len(dilations)`` groups, so the head count must be divisible by it.
        prefix: ``"global"``: class/distillation/register tokens attend to every token and patch queries to
            their window only; ``"keys"``: patch queries also see the prefix tokens as extra keys.
        images: what locality is measured on; needed by ``"auto"``, and with explicit blocks measured for the report.
        measure: count the GMACs before and after (on the meta device: milliseconds at any size).

    Returns:
        ``(model, report)``: the same model object, modified, and a :class:`RetrofitReport`.
    """
    _check_model(model)
    kernel_size, dilations, border = check_kernel_size(kernel_size), check_dilations(dilations), check_border(border)
    if prefix not in PREFIX_MODES:
        raise ValueError(f"prefix must be one of {PREFIX_MODES}, got {prefix!r}")
    if threshold is not None and blocks != "auto":
        raise ValueError("threshold applies to blocks='auto' only")
    depth = len(model.blocks)
    locality = None
    if isinstance(blocks, str) and blocks.strip() == "auto":
        threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        chosen, locality = _auto_blocks(model, images, kernel_size, dilations, threshold)
    else:
        chosen = parse_blocks(blocks, depth)
        if images is not None:  # measured for the report only
            locality = _auto_blocks(model, images, kernel_size, dilations, DEFAULT_THRESHOLD)[1]
    for i in chosen:
        attn = model.blocks[i].attn
        _check_attention(i, attn)
        check_heads_divisible(attn.num_heads, dilations, what=f"block {i}'s heads")
    input_size = _input_size(model)
    params_before = sum(p.numel() for p in model.parameters())
    gmacs_before, block_before = _per_block_gmacs(model, input_size) if measure else (float("nan"), [])
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))
    if chosen:
        grid = _find_grid(model)
        for i in chosen:
            block = model.blocks[i]
            block.attn = RetrofitAttention(block.attn, grid, num_prefix, kernel_size, dilations, border, prefix)
    params_after = sum(p.numel() for p in model.parameters())
    gmacs_after, block_after = _per_block_gmacs(model, input_size) if measure else (float("nan"), [])
    notes = [] if chosen else ["no block was local enough: the model is unchanged"]
    report = RetrofitReport(
        model=type(model).__name__, blocks=chosen, depth=depth, kernel_size=kernel_size, dilations=dilations,
        border=border, prefix=prefix, num_prefix_tokens=num_prefix, input_size=input_size,
        params_before=params_before, params_after=params_after, gmacs_before=gmacs_before, gmacs_after=gmacs_after,
        block_gmacs_before=block_before, block_gmacs_after=block_after, locality=locality,
        threshold=threshold if locality is not None else None, notes=notes,
    )  # fmt: skip
    return model, report
