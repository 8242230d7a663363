"""``dilateformer retrofit``: swap chosen blocks of a timm ViT to MSDA, write its weights and a report.

Argument parsing, model loading and the report's files only; the work is :func:`dilateformer.retrofit.msda_vit`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dilateformer.analysis.commands import _progress
from dilateformer.argtypes import int_list, positive_float
from dilateformer.errors import CommandError
from dilateformer.files import atomic_write_json

WEIGHTS_FILE = "retrofit.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _load_model(args: argparse.Namespace):
    """The model with --checkpoint's weights; a checkpoint written by ``dilateformer train`` also lends its
    model kwargs and class count. Returns (model, metadata to carry over)."""
    from dilateformer.train.checkpoint import read_checkpoint_weights, read_metadata
    from dilateformer.train.modeling import create_model, load_file_into, load_state_into, parse_model_kwargs

    kwargs = parse_model_kwargs(args.model_kwargs)
    meta: dict = {}
    if args.checkpoint is None:
        return create_model(args.model, kwargs.pop("num_classes", 1000), model_kwargs=kwargs), {"model_kwargs": kwargs}
    path = Path(args.checkpoint)
    if not path.is_file():
        raise CommandError(f"--checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
    if meta.get("retrofit"):
        raise CommandError(f"--checkpoint {path} is retrofitted already (blocks {meta['retrofit']['blocks']})")
    if "model" in meta:
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in (meta.get("model_kwargs") or {}).items()}
        model = create_model(args.model, int(meta["num_classes"]), model_kwargs={**saved, **kwargs})
        load_state_into(model, read_checkpoint_weights(path)[0], source=str(path))
        return model, {**meta, "model_kwargs": {**saved, **kwargs}}
    from dilateformer.models import load_checkpoint_file

    try:
        head = load_checkpoint_file(path, convert=False).get("head.weight")
    except ValueError as error:
        raise CommandError(str(error)) from None
    num_classes = kwargs.pop("num_classes", int(head.shape[0]) if head is not None else 1000)
    model = create_model(args.model, num_classes, model_kwargs=kwargs)
    load_file_into(model, path, strict=True, new_head_ok=False, flag="--checkpoint")
    return model, {"model_kwargs": kwargs}


def _load_images(items: list[str], model, limit: int, meta: dict):
    """A (B, 3, H, W) batch at the model's input size: image files, folders of them, or ``digits`` (its val
    split), normalised as the checkpoint's training run did where its metadata says how."""
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    config.update({k: meta[k] for k in ("mean", "std", "crop_pct") if meta.get(k) is not None})
    # The model's own input size: a timm config keeps the pretrained default (224) when img_size was changed.
    size = int(meta.get("img_size") or model.patch_embed.img_size[0])
    transform = create_transform(size, **{k: config[k] for k in ("mean", "std", "crop_pct")})
    if items == ["digits"]:
        from dilateformer.train.data import DigitsDataset

        dataset = DigitsDataset("val", image_size=size, transform=transform)
        return torch.stack([dataset[i][0] for i in range(min(limit, len(dataset)))])
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise CommandError(f"--images: {item} does not exist")
    if not files:
        raise CommandError(f"--images: no images ({', '.join(IMAGE_SUFFIXES)}) in {' '.join(items)}")
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files[:limit]])


def report_figure(report, output: Path) -> Path:
    """GMACs per block before and after, next to each block's in-window attention mass (if measured)."""
    from dilateformer.analysis.plots import new_figure, save_figure

    panels = 2 if report.locality is not None else 1
    fig, axes = new_figure(1, panels, (6.5 * panels, 4.4))
    blocks = list(range(report.depth))
    ax = axes[0][0]
    width = 0.4
    ax.bar([b - width / 2 for b in blocks], report.block_gmacs_before, width, label="global (before)", color="grey")
    ax.bar([b + width / 2 for b in blocks], report.block_gmacs_after, width, label="after retrofit", color="C0")
    ax.set_xlabel("block")
    ax.set_ylabel("GMACs per image")
    ax.set_xticks(blocks)
    ax.set_title(f"GMACs per block at {report.input_size[1]}x{report.input_size[2]}")
    ax.set_ylim(0, 1.3 * max(report.block_gmacs_before))
    ax.legend(loc="upper center", ncol=2)
    if report.locality is not None:
        ax = axes[0][1]
        ax.plot(blocks, [r["union_share"] for r in report.locality], "o-", label="in-window attention mass")
        ax.plot(blocks, [r["uniform_union_share"] for r in report.locality], "s--", color="grey",
                label="uniform attention (chance)")  # fmt: skip
        if report.threshold is not None:
            ax.axhline(report.threshold, color="C3", lw=1, ls=":", label=f"threshold {report.threshold}")
        for b in report.blocks:
            ax.axvspan(b - 0.4, b + 0.4, color="C0", alpha=0.12, lw=0)
        ax.set_ylim(0, 1.05)
        ax.set_xticks(blocks)
        ax.set_xlabel("block (shaded: swapped to MSDA)")
        ax.set_ylabel("share of patch queries' attention")
        ax.set_title(f"Attention inside the {report.kernel_size}x{report.kernel_size} windows, d={report.dilations}")
        ax.legend(loc="upper right", fontsize=8)
    swapped = f"blocks {report.blocks} retrofitted to MSDA" if report.blocks else "no block retrofitted"
    fig.suptitle(f"{report.model}: {swapped}")
    return save_figure(fig, output)


def _run_retrofit(args: argparse.Namespace) -> int:
    from dilateformer.retrofit import msda_vit, retrofit_config
    from dilateformer.train.checkpoint import save_checkpoint_weights

    output = Path(args.output)
    try:
        model, meta = _load_model(args)
        model.eval()
        images = _load_images(args.images, model, args.num_images, meta) if args.images else None
        if args.blocks == "auto" and images is None:
            raise CommandError("--blocks auto needs --images (files, folders, or 'digits') to measure locality on")
        model, report = msda_vit(
            model, args.blocks, kernel_size=args.kernel_size, dilations=args.dilations, border=args.border,
            prefix=args.prefix, images=images, threshold=args.threshold,
        )  # fmt: skip
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from None
    output.mkdir(parents=True, exist_ok=True)
    metadata = {**meta, "model": args.model, "retrofit": retrofit_config(model)}
    metadata.setdefault("num_classes", model.num_classes)
    save_checkpoint_weights(output / WEIGHTS_FILE, model.state_dict(), metadata)
    atomic_write_json(output / "report.json", report.to_dict())
    report_figure(report, output / "report.png")
    print(report)
    _progress(f"wrote {output / WEIGHTS_FILE}, {output / 'report.json'}, {output / 'report.png'}")
    return 0


def _blocks(text: str) -> str:
    import re

    if text != "auto" and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text):
        raise argparse.ArgumentTypeError(f"expected 'auto', 'A-B' or 'A,B,...', got {text!r}")
    return text


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "retrofit",
        help="swap chosen blocks of a timm ViT/DeiT/EVA to MSDA, keeping its weights",
        description="Replace the global attention of chosen blocks of a timm ViT by MSDA over the patch grid, "
        "reusing each block's own qkv/proj weights; write the weights, report.json and report.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="NAME", help="timm model name, e.g. vit_small_patch16_224")
    p.add_argument("--checkpoint", metavar="FILE", help="weights to start from (nothing is downloaded)")
    p.add_argument("--model-kwargs", nargs="*", metavar="KEY=VALUE", help="extra timm.create_model arguments")
    p.add_argument("--blocks", type=_blocks, default="0-5", help="block indices ('0-5', '0,2,4') or 'auto'")
    p.add_argument(
        "--images",
        nargs="+",
        metavar="PATH",
        help="images or folders (or 'digits') to measure locality on (needed by --blocks auto)",
    )
    p.add_argument("--num-images", type=int, default=32, help="at most this many --images are measured")
    p.add_argument("--threshold", type=positive_float, help="--blocks auto: least in-window attention mass [0.5]")
    p.add_argument("--kernel-size", type=int, default=3, help="odd MSDA window size")
    p.add_argument("--dilations", type=int_list(), default=(1, 2, 3), help="comma-separated dilation rates")
    p.add_argument("--border", choices=("zero", "clamp"), default="zero", help="MSDA border convention")
    p.add_argument("--prefix", choices=("global", "keys"), default="global", help="how prefix tokens are treated")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the weights and the report")
    p.set_defaults(func=_run_retrofit)
