"""Attention maps: where an MSDA query looks, compared with where a global-attention query looks.

The probabilities come from the layers' documented hook (:func:`dilateformer.analysis.capture.capture_attention`,
re-exported here): while a forward hook sits on ``layer.attn_drop``,
:class:`~dilateformer.nn.MultiScaleDilatedAttention` passes its probabilities ``(B, H, W, heads, k, k)``
through ``attn_drop`` and :class:`~dilateformer.nn.GlobalAttention` passes ``(B, heads, N, N)``. Unhooked
layers keep their fast backends, so only the hooked layers pay for explicit probabilities.
``timm.utils.AttentionExtract(model, method="hook")`` uses the same hooks.

Coordinates: queries are ``(y, x)`` pixels of the original image; the figure's axes are in those pixels too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from dilateformer.analysis.capture import CapturedAttention, capture_attention
from dilateformer.analysis.plots import new_figure, save_figure
from dilateformer.nn.attention import GlobalAttention, MultiScaleDilatedAttention
from dilateformer.ops.neighborhood import head_groups, window_table

# Deepest stage stride of DilateFormer (4 * 2**3): inputs resized to a multiple keep every stage's grid exact.
SIZE_MULTIPLE = 32
QUERY_STYLE = dict(marker="*", color="red", markersize=14, markeredgecolor="white", ls="none", label="query")


@dataclass
class GroupWindow:
    """One dilation group's k x k window for one query: key cells, weights averaged over its heads."""

    dilation: int
    heads: range
    rows: np.ndarray  # (k,) key row of each window slot (clamped into the grid)
    cols: np.ndarray  # (k,)
    valid: np.ndarray  # (k, k) False where the slot falls outside the image (zero border: a zero key)
    weights: np.ndarray  # (k, k)


def msda_windows(record: CapturedAttention, token: tuple[int, int], batch: int = 0) -> list[GroupWindow]:
    """Each dilation group's sampled key cells and weights for the query at token ``(ty, tx)``."""
    layer = record.layer
    height, width = record.grid
    ty, tx = token
    probs = record.probs[batch, ty, tx]  # (heads, k, k)
    windows = []
    for heads, dilation in head_groups(layer.num_heads, layer.dilations):
        rows, rows_valid = window_table(height, layer.kernel_size, dilation, layer.border)
        cols, cols_valid = window_table(width, layer.kernel_size, dilation, layer.border)
        valid = rows_valid[ty][:, None] & cols_valid[tx][None, :]
        windows.append(
            GroupWindow(
                dilation=dilation,
                heads=range(heads.start, heads.stop),
                rows=rows[ty].numpy(),
                cols=cols[tx].numpy(),
                valid=valid.numpy(),
                weights=probs[heads].mean(0).numpy(),
            )
        )
    return windows


def global_map(record: CapturedAttention, token: tuple[int, int], batch: int = 0) -> np.ndarray:
    """The query's attention over the whole token grid, mean over heads: an (H, W) array summing to 1."""
    height, width = record.grid
    index = token[0] * width + token[1]
    return record.probs[batch, :, index].mean(0).view(height, width).numpy()


# ----------------------------------------------------------------------------------------------- the model


def attention_layers(model: nn.Module) -> dict[tuple[int, int], nn.Module]:
    """``(stage, block) -> attention layer`` of a DilateFormer-shaped model (``stages[i].blocks[j].attn``)."""
    stages = getattr(model, "stages", None)
    if stages is None:
        raise ValueError(f"{type(model).__name__} has no .stages: expected a DilateFormer model")
    found = {}
    for i, stage in enumerate(stages):
        for j, block in enumerate(getattr(stage, "blocks", ())):
            attn = getattr(block, "attn", None)
            if isinstance(attn, (MultiScaleDilatedAttention, GlobalAttention)):
                found[(i, j)] = attn
    return found


def stages_with(model: nn.Module, kind: type[nn.Module]) -> list[int]:
    return sorted({s for (s, _), layer in attention_layers(model).items() if isinstance(layer, kind)})


def pick_msda_layer(model: nn.Module, stage: int, block: int) -> tuple[str, nn.Module]:
    layers = attention_layers(model)
    msda = stages_with(model, MultiScaleDilatedAttention)
    if not msda:
        raise ValueError("this model has no MSDA layer in any stage")
    if (stage, 0) not in layers:
        raise ValueError(f"stage {stage} does not exist; the model has stages 0-{max(s for s, _ in layers)}")
    if stage not in msda:
        raise ValueError(
            f"stage {stage} has no MSDA (it uses global attention); stages with MSDA: {', '.join(map(str, msda))}"
        )
    blocks = sorted(b for s, b in layers if s == stage)
    if block not in blocks:
        raise ValueError(f"stage {stage} has blocks 0-{blocks[-1]}, got --block {block}")
    return f"stages.{stage}.blocks.{block}.attn", layers[(stage, block)]


def pick_global_layer(model: nn.Module, twin: nn.Module | None, stage: int, block: int) -> tuple[nn.Module, str, str]:
    """The global layer to compare with: the twin's layer at the same place, else the first global stage's.

    Returns ``(model_to_run, layer_name, description)``.
    """
    if twin is not None:
        layer = attention_layers(twin).get((stage, block))
        if isinstance(layer, GlobalAttention):
            return twin, f"stages.{stage}.blocks.{block}.attn", f"global twin stages.{stage}.blocks.{block}"
    global_stages = stages_with(model, GlobalAttention)
    if not global_stages:
        raise ValueError("no global-attention layer to compare with: pass a global-attention twin")
    s = global_stages[0]
    return model, f"stages.{s}.blocks.0.attn", f"this model's global stages.{s}.blocks.0"


# ----------------------------------------------------------------------------------------------- the image


def load_image(path: str | Path):
    """Open an image as 8-bit RGB, with a one-line error for a missing, unreadable or oversized file.

    The training loader's rules apply: 16-bit and float images are scaled, images above
    ``dilateformer.train.data.MAX_IMAGE_PIXELS`` are refused before decoding.
    """
    from dilateformer.train.data import CorruptImageError
    from dilateformer.train.data import load_image as load_rgb8

    if not Path(path).is_file():
        raise ValueError(f"image not found: {path}")
    try:
        return load_rgb8(path)
    except CorruptImageError as error:
        raise ValueError(str(error)) from None


def model_input_size(image_hw: tuple[int, int], size: int) -> tuple[int, int]:
    """Shorter side ``size``, aspect ratio kept, both sides rounded to a multiple of 32 (at least 32)."""
    h, w = image_hw
    scale = size / min(h, w)
    return tuple(max(SIZE_MULTIPLE, round(v * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE) for v in (h, w))


def prepare_image(image, size: int, model: nn.Module) -> tuple[np.ndarray, torch.Tensor]:
    """``image`` (PIL, HxWx3 uint8 array or path) -> (resized RGB array, normalised (1, 3, H, W) tensor)."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        image = load_image(image)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8)).convert("RGB")
    in_h, in_w = model_input_size((image.height, image.width), size)
    resized = np.asarray(image.resize((in_w, in_h), Image.BICUBIC))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", IMAGENET_DEFAULT_MEAN)).view(3, 1, 1)
    std = torch.tensor(cfg.get("std", IMAGENET_DEFAULT_STD)).view(3, 1, 1)
    x = (torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255 - mean) / std
    return resized, x.unsqueeze(0)


def check_queries(queries: Sequence[tuple[float, float]], image_hw: tuple[int, int]) -> list[tuple[float, float]]:
    h, w = image_hw
    for y, x in queries:
        if not (0 <= y < h and 0 <= x < w):
            raise ValueError(
                f"query y={y:g}, x={x:g} is outside the image (height {h}, width {w}; y in [0, {h}), x in [0, {w}))"
            )
    return list(queries)


def parse_query(text: str) -> tuple[float, float]:
    """``"y,x"`` -> (y, x) in pixels."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        y, x = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--query takes 'y,x' in pixels, e.g. 120,200; got {text!r}") from None
    return y, x


# ---------------------------------------------------------------------------------------------- the figure


def _token(y: float, x: float, stride: float, grid: tuple[int, int]) -> tuple[int, int]:
    return min(int(y // stride), grid[0] - 1), min(int(x // stride), grid[1] - 1)


def attention_figure(
    image,
    model: nn.Module,
    queries: Sequence[tuple[float, float]] | None = None,
    stage: int = 0,
    block: int = 0,
    output: str | Path | None = None,
    *,
    twin: nn.Module | None = None,
    size: int = 224,
    labels: Sequence[str] | None = None,
    title: str | None = None,
):
    """Draw where MSDA and global attention look for each query; write a PNG if ``output`` is given.

    Args:
        image: a path, a PIL image or an HxWx3 uint8 array (e.g. ``skimage.data.chelsea()``); or a list of
            them, one figure row each.
        model: a DilateFormer-shaped model (``model.stages[i].blocks[j].attn``), in eval mode or not.
        queries: ``(y, x)`` pixels of ``image``, one row each; default its centre. With a list of images:
            one query per image (default each image's centre).
        stage, block: the MSDA layer to show.
        output: PNG path.
        twin: a global-attention twin (e.g. :func:`dilateformer.models.global_twin`); its layer at
            ``(stage, block)`` is the comparison. Without one, the comparison is this model's first global stage.
        size: shorter side of the model input; both sides are rounded to a multiple of 32. Give a model the
            resolution it was trained at: its attention at another one is not what it learned.
        labels: one line per row shown above its query, e.g. ``"digit 3"``.
        title: the figure's title; default names the layers, strides and input size.

    Small images (under 100 pixels a side) are drawn with nearest-neighbour upsampling, so their pixels stay
    visible. Returns the matplotlib Figure (closed if it was written to ``output``).
    """
    import matplotlib as mpl
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import MaxNLocator

    layer_name, msda_layer = pick_msda_layer(model, stage, block)
    if isinstance(image, (list, tuple)):
        images = [load_image(i) if isinstance(i, (str, Path)) else i for i in image]
        if queries is not None and len(queries) != len(images):
            raise ValueError(f"with {len(images)} images, give one query per image, got {len(queries)}")
        per_image = [[q] if q is not None else None for q in (queries or [None] * len(images))]
    else:
        images = [load_image(image) if isinstance(image, (str, Path)) else image]
        per_image = [queries]
    rows = []  # (label, query, model-input pixels, MSDA record, global record, original image hw)
    global_model, global_name, global_desc = pick_global_layer(model, twin, stage, block)
    for n, (img, img_queries) in enumerate(zip(images, per_image, strict=True)):
        image_hw = (img.height, img.width) if hasattr(img, "height") else tuple(np.asarray(img).shape[:2])
        img_queries = check_queries(img_queries or [((image_hw[0] - 1) / 2, (image_hw[1] - 1) / 2)], image_hw)
        resized, x = prepare_image(img, size, model)
        msda_rec = _run_and_capture(model, layer_name, x)
        glob_rec = _run_and_capture(global_model, global_name, x)
        label = labels[n] if labels else None
        for query in img_queries:
            rows.append((label, query, resized, msda_rec, glob_rec, image_hw))
    in_hw = rows[0][2].shape[:2]
    msda_stride = in_hw[0] / rows[0][3].grid[0]
    glob_stride = in_hw[0] / rows[0][4].grid[0]

    n_groups = len(msda_layer.dilations)
    ncols = n_groups + 2
    fig, axes = new_figure(len(rows), ncols, (3.3 * ncols + 0.9, 3.3 * len(rows) + 1.6))
    cmap = mpl.colormaps["viridis"]
    geometry = []
    for _, (qy, qx), resized, msda_rec, _, image_hw in rows:
        sy, sx = image_hw[0] / resized.shape[0], image_hw[1] / resized.shape[1]  # model pixels -> original pixels
        token = _token(qy / sy, qx / sx, in_hw[0] / msda_rec.grid[0], msda_rec.grid)
        geometry.append((sy, sx, token, msda_windows(msda_rec, token)))
    # One colour scale for every MSDA panel, so weights compare across groups and queries.
    vmax = max(float(w.weights.max()) for *_, windows in geometry for w in windows)
    reach = (msda_layer.kernel_size // 2) * max(msda_layer.dilations) + 1.5
    glob_artist = None

    for row, ((label, (qy, qx), resized, _, glob_rec, image_hw), (sy, sx, (ty, tx), windows)) in enumerate(
        zip(rows, geometry, strict=True)
    ):
        extent = (0, image_hw[1], image_hw[0], 0)  # imshow in original pixel coordinates
        pixels = "nearest" if min(image_hw) < 100 else "antialiased"
        cell_h, cell_w = msda_stride * sy, msda_stride * sx
        crop = (
            max(0.0, (ty + 0.5 - reach) * cell_h),
            min(image_hw[0], (ty + 0.5 + reach) * cell_h),
            max(0.0, (tx + 0.5 - reach) * cell_w),
            min(image_hw[1], (tx + 0.5 + reach) * cell_w),
        )
        ax = axes[row, 0]
        ax.imshow(resized, extent=extent, interpolation=pixels)
        ax.plot(qx, qy, **QUERY_STYLE)
        ax.add_patch(
            Rectangle((crop[2], crop[0]), crop[3] - crop[2], crop[1] - crop[0], fill=False, ec="yellow", lw=1.5)
        )
        head = f"{label}\n" if label else ""
        ax.set_title(f"{head}query {row + 1}: y={qy:g}, x={qx:g}", fontsize=10)

        for g, window in enumerate(windows):
            ax = axes[row, 1 + g]
            _draw_window(ax, window, resized, extent, (cell_h, cell_w), (ty, tx), cmap, vmax, pixels)
            ax.set_xlim(crop[2], crop[3])
            ax.set_ylim(crop[1], crop[0])

        ax = axes[row, ncols - 1]
        gy, gx = _token(qy / sy, qx / sx, glob_stride, glob_rec.grid)
        # In multiples of the uniform weight 1/N: readable whatever N is, and 1 means "no preference".
        gmap = global_map(glob_rec, (gy, gx)) * glob_rec.probs.shape[-1]
        ax.imshow(resized, extent=extent, interpolation=pixels)
        glob_artist = ax.imshow(gmap, extent=extent, cmap="magma", alpha=0.65, interpolation="nearest")
        ax.plot(qx, qy, **QUERY_STYLE)
        ax.set_title(f"global attention over all {gmap.size} keys\nmax {gmap.max():.2f} x uniform", fontsize=10)

        for ax in axes[row]:
            ax.set_xlabel("x (pixels)")
            ax.set_ylabel("y (pixels)")

    fig.colorbar(
        mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0, 100 * vmax), cmap=cmap),
        ax=axes[:, 1 : 1 + n_groups],
        label="MSDA weight (%), mean over the group's heads",
        shrink=0.7,
        location="bottom",
    )
    bar = fig.colorbar(glob_artist, ax=axes[:, ncols - 1], label="global weight / uniform (1/N)", location="bottom")
    bar.locator = MaxNLocator(4)
    bar.update_ticks()
    fig.legend(
        handles=[
            Line2D([], [], **QUERY_STYLE),
            Patch(fill=False, ec="yellow", lw=1.5, label="area shown in the MSDA panels"),
            Patch(color=cmap(0.75), label="key cell sampled by MSDA (number: weight %)"),
            Patch(fill=False, ec="red", lw=2, label="query's own cell"),
        ],
        loc="outside lower center",
        ncols=4,
        fontsize=9,
    )
    fig.suptitle(
        title
        or f"Where a query looks: MSDA {layer_name} (stride {msda_stride:g} px, {msda_layer.kernel_size}x"
        f"{msda_layer.kernel_size} window) vs {global_desc} (stride {glob_stride:g} px); "
        f"model input {in_hw[0]}x{in_hw[1]}",
        fontsize=12,
    )
    if output is not None:
        save_figure(fig, output)
    return fig


def _run_and_capture(model: nn.Module, name: str, x: torch.Tensor) -> CapturedAttention:
    was_training = model.training
    model.eval()  # dropout off: the weights shown are the ones inference uses
    try:
        with torch.no_grad(), capture_attention(model, [name]) as captured:
            model(x)
    finally:
        model.train(was_training)
    return captured[name]


def _draw_window(
    ax, window: GroupWindow, image, extent, cell, query, cmap, vmax: float, interpolation: str = "antialiased"
) -> None:
    from matplotlib.patches import Rectangle

    cell_h, cell_w = cell
    ax.imshow(image, extent=extent, alpha=0.55, interpolation=interpolation)
    k = len(window.rows)
    for a in range(k):
        for b in range(k):
            if not window.valid[a, b]:
                continue  # a zero-padding slot: no image position to draw; its weight goes in the title
            wgt = float(window.weights[a, b])
            top, left = window.rows[a] * cell_h, window.cols[b] * cell_w
            ax.add_patch(Rectangle((left, top), cell_w, cell_h, color=cmap(wgt / vmax if vmax > 0 else 0), alpha=0.85))
            color = "white" if wgt < 0.6 * vmax else "black"
            ax.text(
                left + cell_w / 2,
                top + cell_h / 2,
                f"{100 * wgt:.0f}",
                ha="center",
                va="center",
                fontsize=8,
                color=color,
            )
    ax.add_patch(Rectangle((query[1] * cell_w, query[0] * cell_h), cell_w, cell_h, fill=False, ec="red", lw=2))
    first, last = window.heads.start, window.heads.stop - 1
    heads = f"head {first}" if first == last else f"heads {first}-{last}"
    title = f"MSDA dilation {window.dilation} ({heads})"
    outside = float(window.weights[~window.valid].sum())
    if outside > 0:
        title += f"\n{100 * outside:.0f}% on zero padding outside the image"
    ax.set_title(title, fontsize=10)


def create_registered_model(model_name: str, **kwargs) -> nn.Module:
    """:func:`dilateformer.models.create_model` for a DilateFormer name; a bad name or argument is an ValueError."""
    import timm

    from dilateformer.models import create_model

    try:
        return create_model(model_name, known=timm.list_models("dilateformer*"), **kwargs)
    except ValueError as error:
        raise ValueError(str(error)) from None
