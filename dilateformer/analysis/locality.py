"""How local attention is, measured: distance, mass inside MSDA's dilated windows, entropy, per layer.

The claim behind MSDA is that attention in shallow layers is local and sparse. :func:`measure_locality` runs a
model on images, captures every global attention layer's probabilities (``(B, heads, N, N)``) and reports, per
layer:

- ``mean_distance_px``: mean over patch queries of ``sum_j p_ij * ||pos_i - pos_j||``, in input pixels;
- ``window_share[d]``: the attention mass inside the dilated ``k x k`` window MSDA would give the query at
  dilation ``d`` (zero-border convention: the window's cells that lie inside the grid), and ``union_share`` for
  the union of all dilations' windows;
- ``uniform_window_share`` / ``uniform_union_share`` / ``uniform_distance_px``: the same for uniform attention,
  the chance level a share or a distance must be compared with;
- ``prefix_share``: the mass patch queries put on prefix tokens (ViT's cls, distillation and register tokens);
- ``entropy_ratio``: mean row entropy over all keys divided by ``log(number of keys)``: 1 uniform, 0 one key.

Prefix tokens: only patch tokens are queries; a query's keys split into prefix keys (``prefix_share``) and grid
keys. Distance and window shares are computed on the grid keys with the row renormalised over them, so they
describe where a query looks *in the image*; the entropy uses the whole row, prefix keys included.

Capturable layers: this package's :class:`~dilateformer.nn.GlobalAttention` (DilateFormer's global stages and
global twins, Ultralytics ``GlobalAttn``) and timm attention modules with an explicit-softmax path (ViT, DeiT,
with ``fused_attn`` switched off during the capture). MSDA layers are skipped: their keys are their windows, so
their window share is 1 by construction and says nothing about the claim.

:func:`locality_statistics` is the pure arithmetic on one batch of probabilities; :func:`measure_locality`
captures and accumulates it batch by batch, so no more than one batch of N x N maps is held at a time.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dilateformer.analysis.capture import attention_kind, capturable_layers, capture_attention
from dilateformer.analysis.measure import format_table
from dilateformer.ops.neighborhood import window_table

DEFAULT_DILATIONS = (1, 2, 3)


@dataclass
class LayerLocality:
    """Locality statistics of one attention layer, averaged over heads, patch queries and images."""

    name: str  # module name in the model
    grid: tuple[int, int]  # (H, W) token grid of the patch/pixel tokens
    stride_px: float  # input pixels per token step along the height (image height / grid height)
    num_prefix: int  # prefix tokens (cls/dist/register) excluded from the spatial grid
    mean_distance_px: float
    window_share: dict[int, float]  # dilation -> mass inside MSDA's dilated k x k window at that dilation
    union_share: float  # mass inside the union of the windows of all dilations
    uniform_window_share: dict[int, float]  # the same for uniform attention over the grid keys (chance level)
    prefix_share: float
    entropy_ratio: float
    uniform_union_share: float = 0.0
    uniform_distance_px: float = 0.0  # mean distance of uniform attention over the grid keys
    kind: str = "global"  # "global" (this package's layer) or "timm"
    num_heads: int = 0
    kernel_size: int = 3
    dilations: tuple[int, ...] = DEFAULT_DILATIONS
    stride_yx: tuple[float, float] = (1.0, 1.0)
    num_images: int = 0
    per_head: dict[str, list[float]] = field(default_factory=dict)  # metric -> one value per head

    def as_dict(self) -> dict:
        """JSON-ready: dict keys as strings."""
        out = asdict(self)
        out["window_share"] = {str(d): v for d, v in self.window_share.items()}
        out["uniform_window_share"] = {str(d): v for d, v in self.uniform_window_share.items()}
        return out


@dataclass
class LocalitySums:
    """Per-head sums over patch queries (float64), to add up batch by batch; :meth:`finish` turns them into means."""

    queries: int  # patch queries summed (batch x grid cells)
    distance: torch.Tensor  # (heads,)
    window: torch.Tensor  # (dilations, heads)
    union: torch.Tensor  # (heads,)
    prefix: torch.Tensor  # (heads,)
    entropy: torch.Tensor  # (heads,)

    def __add__(self, other: LocalitySums) -> LocalitySums:
        return LocalitySums(
            self.queries + other.queries,
            self.distance + other.distance,
            self.window + other.window,
            self.union + other.union,
            self.prefix + other.prefix,
            self.entropy + other.entropy,
        )

    def means(self) -> dict[str, torch.Tensor]:
        n = max(self.queries, 1)
        return dict(
            distance=self.distance / n,
            window=self.window / n,
            union=self.union / n,
            prefix=self.prefix / n,
            entropy=self.entropy / n,
        )


# --------------------------------------------------------------------------------------------- the geometry


def _check_geometry(kernel_size: int, dilations: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
    dilations = tuple(dilations)
    if not dilations or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dilations):
        raise ValueError(f"dilations must be positive ints, got {dilations!r}")
    return kernel_size, dilations


def window_masks(grid: tuple[int, int], kernel_size: int, dilations: Sequence[int]) -> torch.Tensor:
    """``(len(dilations), H*W, H*W)`` bool: key j lies in query i's dilated window (MSDA's zero-border window).

    Built from :func:`dilateformer.ops.neighborhood.window_table`, the table MSDA itself indexes with, so the
    window here is MSDA's window by construction.
    """
    height, width = grid
    masks = []
    for d in dilations:
        axes = []
        for length in (height, width):
            position, valid = window_table(length, kernel_size, d, "zero")
            hit = torch.zeros(length, length, dtype=torch.bool)
            rows = torch.arange(length).unsqueeze(1).expand_as(position)
            hit[rows[valid], position[valid]] = True
            axes.append(hit)
        rows_hit, cols_hit = axes
        masks.append((rows_hit[:, None, :, None] & cols_hit[None, :, None, :]).reshape(height * width, -1))
    return torch.stack(masks)


def pixel_distances(grid: tuple[int, int], stride_yx: tuple[float, float]) -> torch.Tensor:
    """``(H*W, H*W)`` float64 distance in input pixels between token centres."""
    height, width = grid
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten().double() * stride_yx[0], xs.flatten().double() * stride_yx[1]
    # Not torch.cdist: its matrix-product form loses digits that the float64 reference checks.
    return torch.hypot(ys[:, None] - ys[None, :], xs[:, None] - xs[None, :])


# ------------------------------------------------------------------------------------------- the arithmetic


def locality_statistics(
    probs: torch.Tensor,
    grid: tuple[int, int],
    *,
    num_prefix: int = 0,
    stride_yx: tuple[float, float] = (1.0, 1.0),
    kernel_size: int = 3,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
    _geometry: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LocalitySums:
    """Per-head sums of the locality statistics of ``probs`` ``(B, heads, N, N)``, ``N = num_prefix + H*W``.

    Rows are queries, columns keys; the first ``num_prefix`` tokens are prefix tokens, the rest the ``grid``
    in row-major order. Rows of prefix queries are ignored. See the module docstring for the definitions.
    """
    kernel_size, dilations = _check_geometry(kernel_size, dilations)
    if probs.ndim != 4 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"probs must be (B, heads, N, N), got {tuple(probs.shape)}")
    cells = grid[0] * grid[1]
    if probs.shape[-1] != num_prefix + cells:
        raise ValueError(
            f"probs have {probs.shape[-1]} tokens, expected num_prefix {num_prefix} + grid {grid[0]}x{grid[1]} "
            f"= {num_prefix + cells}"
        )
    masks, dist = _geometry or (window_masks(grid, kernel_size, dilations), pixel_distances(grid, stride_yx))
    rows = probs[:, :, num_prefix:]  # patch queries only
    prefix = rows[..., :num_prefix].sum(-1)
    keys = rows[..., num_prefix:]
    # Renormalised over the grid keys: where the query looks in the image, whatever it gives the prefix tokens.
    on_grid = keys / keys.sum(-1, keepdim=True).clamp_min(torch.finfo(keys.dtype).tiny)
    dtype = keys.dtype
    distance = torch.einsum("bhij,ij->h", on_grid, dist.to(dtype))
    window = torch.stack([torch.einsum("bhij,ij->h", on_grid, m.to(dtype)) for m in masks])
    union = torch.einsum("bhij,ij->h", on_grid, masks.any(0).to(dtype))
    # One key leaves no choice: log(1) = 0, and the ratio is taken as 0 ("one key").
    entropy = -torch.special.xlogy(rows, rows).sum(-1) / (math.log(probs.shape[-1]) if probs.shape[-1] > 1 else 1.0)
    return LocalitySums(
        queries=rows.shape[0] * cells,
        distance=distance.double(),
        window=window.double(),
        union=union.double(),
        prefix=prefix.sum((0, 2)).double(),
        entropy=entropy.sum((0, 2)).double(),
    )


def _uniform(masks: torch.Tensor, dist: torch.Tensor) -> tuple[list[float], float, float]:
    cells = masks.shape[-1]
    window = (masks.double().sum(-1) / cells).mean(-1).tolist()
    union = float((masks.any(0).double().sum(-1) / cells).mean())
    return window, union, float(dist.mean())


def finish(
    sums: LocalitySums,
    *,
    name: str,
    grid: tuple[int, int],
    stride_yx: tuple[float, float],
    num_prefix: int,
    kernel_size: int,
    dilations: Sequence[int],
    kind: str = "global",
    num_images: int = 0,
    _geometry: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LayerLocality:
    """The :class:`LayerLocality` of accumulated ``sums``: means over queries, then over heads."""
    masks, dist = _geometry or (window_masks(grid, kernel_size, dilations), pixel_distances(grid, stride_yx))
    means = sums.means()
    uniform_window, uniform_union, uniform_distance = _uniform(masks, dist)
    return LayerLocality(
        name=name,
        grid=tuple(grid),
        stride_px=float(stride_yx[0]),
        num_prefix=num_prefix,
        mean_distance_px=float(means["distance"].mean()),
        window_share={d: float(v) for d, v in zip(dilations, means["window"].mean(1), strict=True)},
        union_share=float(means["union"].mean()),
        uniform_window_share=dict(zip(dilations, uniform_window, strict=True)),
        prefix_share=float(means["prefix"].mean()),
        entropy_ratio=float(means["entropy"].mean()),
        uniform_union_share=uniform_union,
        uniform_distance_px=uniform_distance,
        kind=kind,
        num_heads=int(means["distance"].numel()),
        kernel_size=kernel_size,
        dilations=tuple(dilations),
        stride_yx=tuple(float(s) for s in stride_yx),
        num_images=num_images,
        per_head=dict(
            distance_px=means["distance"].tolist(),
            union_share=means["union"].tolist(),
            prefix_share=means["prefix"].tolist(),
            entropy_ratio=means["entropy"].tolist(),
        ),
    )


# ------------------------------------------------------------------------------------------------ capturing


def _unwrap(model: nn.Module) -> nn.Module:
    """An Ultralytics ``YOLO`` object runs predict() when called: measure its network (``.model``) instead."""
    if "ultralytics" in sys.modules:
        from ultralytics.engine.model import Model

        if isinstance(model, Model):
            return model.model
    return model


def _batches(images, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        images = [images]
    elif not isinstance(images, Iterable):
        raise TypeError(f"images must be a (B, 3, H, W) tensor or an iterable of them, got {type(images).__name__}")
    for item in images:
        if isinstance(item, (tuple, list)):  # (images, labels) from a DataLoader
            item = item[0]
        if not isinstance(item, torch.Tensor) or item.ndim != 4:
            shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise ValueError(f"images: expected (B, C, H, W) tensors, got {shape}")
        yield from item.split(batch_size)


def _select(model: nn.Module, layers) -> dict[str, nn.Module]:
    if layers is None:
        found = {n: m for n, m in capturable_layers(model).items() if attention_kind(m) != "msda"}
        if not found:
            raise ValueError(
                f"layers: {type(model).__name__} has no global attention layer whose probabilities can be captured "
                "(this package's GlobalAttention or a timm attention module; MSDA layers are not measured)"
            )
        return found
    by_module = {id(m): n for n, m in model.named_modules()}
    named = {}
    for item in layers:
        if isinstance(item, str):
            try:
                module = model.get_submodule(item)
            except AttributeError:
                raise ValueError(f"layers: {item!r} is not a module of the model") from None
            name = item
        else:
            module, name = item, by_module.get(id(item))
            if name is None:
                raise ValueError(f"layers: a {type(item).__name__} that is not part of the model")
        kind = attention_kind(module)
        if kind == "msda":
            raise ValueError(
                f"layers: {name} is MSDA, whose keys are its own windows (window share 1 by construction); "
                "measure a global-attention twin instead"
            )
        named[name] = module
    return named


def _token_grid(model: nn.Module, record, image_hw: tuple[int, int]) -> tuple[tuple[int, int], int]:
    """(grid, num_prefix) of a captured layer: our layers know their grid; timm ViTs' comes from patch_embed."""
    if record.grid is not None:
        return record.grid, 0
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None:
        raise ValueError(f"cannot tell the token grid of {type(model).__name__}: it has no patch_embed")
    if getattr(model, "dynamic_img_size", False) and hasattr(patch_embed, "dynamic_feat_size"):
        grid = tuple(patch_embed.dynamic_feat_size(image_hw))
    else:
        grid = tuple(patch_embed.grid_size)
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))
    tokens = record.probs.shape[-1]
    if tokens != num_prefix + grid[0] * grid[1]:
        raise ValueError(
            f"{type(model).__name__}: attention over {tokens} tokens, but patch_embed's grid {grid[0]}x{grid[1]} "
            f"plus {num_prefix} prefix tokens is {num_prefix + grid[0] * grid[1]} (pooled or windowed attention?)"
        )
    return grid, num_prefix


def measure_locality(
    model: nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    *,
    kernel_size: int = 3,
    dilations: Sequence[int] = DEFAULT_DILATIONS,
    layers: Sequence[str | nn.Module] | None = None,
    batch_size: int = 8,
) -> list[LayerLocality]:
    """Locality statistics of every global attention layer of ``model`` over ``images``, one per layer.

    Args:
        model: a DilateFormer (its global stages; a global twin has them everywhere), a timm ViT/DeiT, an
            Ultralytics YOLO model (or its ``YOLO`` wrapper) built with ``GlobalAttn``. Run in eval mode under
            ``no_grad``; its mode is restored afterwards.
        images: a ``(B, 3, H, W)`` tensor, or an iterable of them (a DataLoader's ``(images, labels)`` batches
            too), already normalised for the model. Every batch must have the same size (the grids must agree).
        kernel_size, dilations: the MSDA windows to measure the attention mass in.
        layers: module names or modules to measure; default every capturable global attention layer.
        batch_size: images per forward; only one batch's N x N maps are held at a time.

    The token grid of our layers is their input's; a ViT's comes from ``model.patch_embed`` for the actual input
    size. ``stride_px`` is the input height over the grid height.
    """
    kernel_size, dilations = _check_geometry(kernel_size, dilations)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    model = _unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = _select(model, layers)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sums: dict[str, LocalitySums] = {}
    meta: dict[str, tuple] = {}
    geometry: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    image_hw = None
    num_images = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), capture_attention(model, named) as records:
            for batch in _batches(images, batch_size):
                if image_hw is None:
                    image_hw = tuple(batch.shape[2:])
                elif tuple(batch.shape[2:]) != image_hw:
                    shape = tuple(batch.shape)
                    raise ValueError(f"images: every batch must be {image_hw[0]}x{image_hw[1]}, got {shape}")
                records.clear()
                model(batch.to(device))
                num_images += batch.shape[0]
                for name in named:
                    if name not in records:
                        raise ValueError(f"layers: {name} did not run in the model's forward")
                    record = records.pop(name)
                    grid, num_prefix = _token_grid(model, record, image_hw)
                    stride = (image_hw[0] / grid[0], image_hw[1] / grid[1])
                    key = (grid, stride)
                    if key not in geometry:
                        geometry[key] = (window_masks(grid, kernel_size, dilations), pixel_distances(grid, stride))
                    part = locality_statistics(
                        record.probs, grid, num_prefix=num_prefix, stride_yx=stride, kernel_size=kernel_size,
                        dilations=dilations, _geometry=geometry[key],
                    )  # fmt: skip
                    sums[name] = sums[name] + part if name in sums else part
                    meta[name] = (grid, stride, num_prefix, record.kind)
    finally:
        model.train(was_training)
    if not num_images:
        raise ValueError("images: no image to measure (an empty iterable)")
    results = []
    for name in named:
        grid, stride, num_prefix, kind = meta[name]
        results.append(
            finish(
                sums[name],
                name=name,
                grid=grid,
                stride_yx=stride,
                num_prefix=num_prefix,
                kernel_size=kernel_size,
                dilations=dilations,
                kind=kind,
                num_images=num_images,
                _geometry=geometry[(grid, stride)],
            )  # fmt: skip
        )
    return results


# --------------------------------------------------------------------------------------------------- images

SAMPLE_IMAGES = ("chelsea", "coffee", "astronaut", "china.jpg", "flower.jpg")


def sample_images() -> dict[str, object]:
    """The offline photos shipped with scikit-image (chelsea, coffee, astronaut) and scikit-learn (china, flower)."""
    from PIL import Image
    from skimage import data as skdata
    from sklearn.datasets import load_sample_image

    images = {}
    for name in SAMPLE_IMAGES:
        array = load_sample_image(name) if name.endswith(".jpg") else getattr(skdata, name)()
        images[name] = Image.fromarray(array).convert("RGB")
    return images


def images_tensor(images: Iterable, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL images -> a normalised ``(N, 3, size, size)`` batch: shorter side to ``size``, centre crop."""
    from PIL import Image

    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    out = []
    for image in images:
        scale = size / min(image.width, image.height)
        w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        crop = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32)
        out.append(torch.from_numpy(crop.copy()).permute(2, 0, 1) / 255)
    if not out:
        raise ValueError("images: none given")
    batch = torch.stack(out)
    return (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------------ reporting

TABLE_LEGEND = (
    "dist px: mean attention distance in input pixels (uniform px: the same for uniform attention); win dN, "
    "union: attention mass inside MSDA's dilated windows at dilation N, or any of them; chance: the same for "
    "uniform attention; x chance: union / chance; prefix: mass on cls/register tokens; entropy: 1 = uniform"
)
SUGGEST_METRICS = ("union_share", "union_over_chance", "entropy_ratio")


def union_over_chance(result: LayerLocality) -> float:
    """How many times more mass the union of the windows gets than uniform attention would give it."""
    return result.union_share / result.uniform_union_share if result.uniform_union_share > 0 else float("nan")


def suggest_blocks(results: Sequence[LayerLocality], threshold: float = 0.5, metric: str = "union_share") -> list[str]:
    """Names of the layers local enough for MSDA: ``metric`` at least ``threshold``.

    ``metric``: ``"union_share"`` (mass inside the union of the dilated windows, default), ``"union_over_chance"``
    (that share over uniform attention's) or ``"entropy_ratio"`` (then a layer qualifies at *most* ``threshold``:
    low entropy is peaked attention).
    """
    if metric not in SUGGEST_METRICS:
        raise ValueError(f"metric must be one of {SUGGEST_METRICS}, got {metric!r}")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")

    def value(r: LayerLocality) -> float:
        return union_over_chance(r) if metric == "union_over_chance" else getattr(r, metric)

    if metric == "entropy_ratio":
        return [r.name for r in results if value(r) <= threshold]
    return [r.name for r in results if value(r) >= threshold]


def locality_table(results: Sequence[LayerLocality]) -> str:
    """One row per layer: grid, distance against uniform's, window shares against chance, prefix and entropy."""
    if not results:
        return "(no layer measured)"
    dilations = tuple(results[0].window_share)
    headers = ["layer", "grid", "stride px", "dist px", "uniform px"]
    headers += [f"win d{d}" for d in dilations] + ["union", "chance", "x chance", "prefix", "entropy"]
    rows = []
    for r in results:
        row = [r.name, f"{r.grid[0]}x{r.grid[1]}", r.stride_px, r.mean_distance_px, r.uniform_distance_px]
        row += [r.window_share[d] for d in dilations]
        row += [r.union_share, r.uniform_union_share, union_over_chance(r), r.prefix_share, r.entropy_ratio]
        rows.append(row)
    return format_table(headers, rows)


def _two_lines(name: str) -> str:
    """A long module name split at the dot nearest its middle, so neighbouring tick labels do not run together."""
    dots = [i for i, c in enumerate(name) if c == "."]
    if len(name) <= 12 or not dots:
        return name
    cut = min(dots, key=lambda i: abs(i - len(name) / 2))
    return f"{name[: cut + 1]}\n{name[cut + 1 :]}"


def locality_figure(
    results: Sequence[LayerLocality], output: str | Path, title: str = "How local is attention?"
) -> Path:
    """Per-layer plot: distance against uniform's, window shares against chance, entropy and prefix share."""
    import matplotlib as mpl

    from dilateformer.analysis.plots import new_figure, save_figure

    if not results:
        raise ValueError("results: nothing to plot")
    x = list(range(len(results)))
    names = [r.name for r in results]
    fig, (axes,) = new_figure(1, 3, (16, 5.2))
    ax = axes[0]
    ax.plot(x, [r.mean_distance_px for r in results], "o-", label="attention")
    ax.plot(x, [r.uniform_distance_px for r in results], "s--", color="grey", label="uniform attention")
    ax.set_ylabel("mean attention distance (input pixels)")
    top = max(max(r.mean_distance_px, r.uniform_distance_px) for r in results)
    ax.set_ylim(0, 1.1 * top if top > 0 else 1.0)
    ax.set_title("distance from the query", pad=4)
    ax = axes[1]
    colours = mpl.colormaps["tab10"]
    for i, d in enumerate(results[0].window_share):
        ax.plot(x, [r.window_share[d] for r in results], "o-", color=colours(i), label=f"window d={d}")
        ax.plot(x, [r.uniform_window_share[d] for r in results], ":", color=colours(i), label=f"chance d={d}")
    ax.plot(x, [r.union_share for r in results], "o-", color="black", lw=2, label="union of windows")
    ax.plot(x, [r.uniform_union_share for r in results], ":", color="black", label="chance (union)")
    k = results[0].kernel_size
    ax.set_ylabel("attention mass (share of the row)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"mass inside MSDA's {k}x{k} dilated windows", pad=4)
    ax = axes[2]
    ax.plot(x, [r.entropy_ratio for r in results], "o-", label="entropy / log(keys)")
    if any(r.num_prefix for r in results):
        ax.plot(x, [r.prefix_share for r in results], "^-", label="mass on prefix tokens")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("ratio")
    ax.set_title("spread (1 = uniform, 0 = one key)", pad=4)
    many = len(x) > 4  # then one rotated line per label; a few fit as two upright lines
    ticks = [
        f"{n} ({r.grid[0]}x{r.grid[1]})" if many else f"{_two_lines(n)}\n{r.grid[0]}x{r.grid[1]}"
        for n, r in zip(names, results, strict=True)
    ]
    for ax in axes:
        ax.set_xticks(x, ticks, rotation=50 if many else 0, fontsize=8, ha="right" if many else "center")
        ax.set_xlabel("layer (token grid)")
        ax.grid(alpha=0.3)
        # Above the panel, not on it: the curves may lie anywhere in [0, 1].
        ax.legend(fontsize=8, ncols=2, loc="lower center", bbox_to_anchor=(0.5, 1.07), frameon=False)
    fig.suptitle(title, fontsize=13)
    return save_figure(fig, output)
