"""``dilateformer defects`` and ``yolo-compare``: argument parsing and one-line error reporting only.

Ultralytics (AGPL-3.0, the ``[yolo]`` extra) is imported only when ``yolo-compare`` runs, so ``dilateformer
--help`` and ``dilateformer defects`` work without it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from dilateformer.argtypes import positive_int, ranged
from dilateformer.errors import CommandError

# ------------------------------------------------------------------------------------------------- defects


def _run_defects(args: argparse.Namespace) -> int:
    from dilateformer.integrations.defects import DEFECT_CLASSES, dataset_stats, make_defect_dataset, sample_grid

    try:
        data_yaml = make_defect_dataset(
            args.output,
            seed=args.seed,
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.image_size,
            overwrite=args.overwrite,
        )
        grid = sample_grid(data_yaml.parent, args.grid or data_yaml.parent / "sample_grid.png")
    except (ValueError, ModuleNotFoundError) as error:
        raise CommandError(str(error)) from error
    except OSError as error:  # an unwritable or full disk: say which path, not a traceback
        raise CommandError(f"cannot write under {args.output}: {error.strerror or error}") from error
    stats = dataset_stats(data_yaml.parent)
    boxes = {name: sum(stats[s]["per_class"][name] for s in stats) for name in DEFECT_CLASSES}
    total = sum(boxes.values())
    small = sum(stats[s]["small"] for s in stats)
    per_class = ", ".join(f"{name} {count}" for name, count in boxes.items())
    print(
        f"{data_yaml}: {stats['train']['images']} train + {stats['val']['images']} val images, {total} defects "
        f"({per_class}; {small / max(total, 1):.0%} small, under 32x32 px); sample grid {grid}"
    )
    return 0


def _add_defects(subparsers) -> None:
    """``dilateformer defects --output DIR [--seed N] [--num-train N] [--num-val N] [--image-size N] ...``."""

    p = subparsers.add_parser(
        "defects",
        help="write the offline synthetic industrial-defect dataset (YOLO format) and a sample grid",
        description="Draw scratches, cracks, spots and holes on scikit-image's brick, grass and gravel textures, "
        "deterministically from --seed, and write them in YOLO format: DIR/images/{train,val}, "
        "DIR/labels/{train,val} and DIR/data.yaml (pass it to Ultralytics as data=). A rerun with the same "
        "settings reuses the dataset. Also writes a grid of sample images with their boxes.",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="dataset directory (new, empty, or one of ours)")
    from dilateformer.integrations.defects import MAX_IMAGE_SIZE

    p.add_argument("--seed", type=ranged(int, 0), default=0, help="random seed, >= 0 (default 0)")
    p.add_argument("--num-train", type=positive_int, default=240, help="training images (default 240)")
    p.add_argument("--num-val", type=positive_int, default=60, help="validation images (default 60)")
    p.add_argument(
        "--image-size",
        type=ranged(int, 64, MAX_IMAGE_SIZE, multiple_of=32),
        default=256,
        help=f"image side in pixels, a multiple of 32 in 64..{MAX_IMAGE_SIZE} (default 256)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a dataset written here with other settings")
    p.add_argument("--grid", metavar="PNG", help="sample grid image (default DIR/sample_grid.png)")
    p.set_defaults(func=_run_defects)


# -------------------------------------------------------------------------------------------- yolo-compare


_DEVICE = re.compile(r"^(cpu|\d+|cuda(:\d+)?)$")


# YOLO's largest stride is 32: other sizes are rounded by Ultralytics, and the runs would not be comparable.
_imgsz = ranged(int, 32, multiple_of=32)


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        seeds = ()
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct ints >= 0 separated by commas (e.g. 0,1,2), got {text!r}")
    return seeds


def _variant_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(","))
    if not names or not all(names):
        raise argparse.ArgumentTypeError(f"expected model names or YAML files separated by commas, got {text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a variant is named twice in {text!r}")
    if any("://" in n for n in names):
        raise argparse.ArgumentTypeError(f"expected local model names or YAML files, not URLs: {text!r}")
    return names


def _device(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"expected cpu, a CUDA index (0) or cuda:N (one device), got {text!r}")
    return text


def _data_yaml(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such data YAML: {text!r}")
    return text


def _run_yolo_compare(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    os.environ.setdefault("YOLO_OFFLINE", "1")  # before Ultralytics' first import: it reads it once
    try:
        import ultralytics  # noqa: F401
    except ImportError as error:
        raise CommandError("needs Ultralytics: pip install 'dilateformer[yolo]' (AGPL-3.0)") from error
    import torch

    from dilateformer.integrations import yolo_compare as yc

    preset = yc.QUICK if args.quick else {"variants": yc.DEFAULT_VARIANTS, "seeds": yc.DEFAULT_SEEDS}
    base = preset.get("settings", yc.CompareSettings())
    device = args.device or ("0" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available here; use --device cpu")
    if args.amp and device == "cpu":
        raise CommandError("--amp needs a CUDA --device (Ultralytics trains in float32 on CPU)")
    overrides = {k: getattr(args, k) for k in ("epochs", "imgsz", "batch") if getattr(args, k) is not None}
    settings = dataclasses.replace(base, device=device, amp=args.amp, **overrides)
    try:
        variants = [yc.resolve_variant(v) for v in (args.variants or preset["variants"])]
        payload = yc.run_comparison(variants, args.seeds or preset["seeds"], settings, args.output, data=args.data)
    except ValueError as error:
        raise CommandError(str(error)) from error
    print(payload["table"])
    if payload["locality"]:
        loc = payload["locality"]
        print(
            f"\nattention locality of {loc['variant']} (seed {loc['seed']}, best.pt) on {loc['images']} validation "
            f"images:\n{loc['table']}"
        )
    wrote = [Path(args.output) / "yolo-compare.json", payload["png"]] + (
        [payload["locality"]["png"]] if payload["locality"] else []
    )
    print(
        f"\ntotal {payload['total_wall_s']:.0f} s (training runs {payload['runs_wall_s']:.0f} s); wrote "
        + ", ".join(str(w) for w in wrote)
    )
    return 0


def _add_yolo_compare(subparsers) -> None:
    """``dilateformer yolo-compare [--data YAML] [--variants ...] [--seeds ...] [--epochs N] [--imgsz N] ...``."""

    p = subparsers.add_parser(
        "yolo-compare",
        help="train YOLO variants (MSDA, global, CBAM, PSA, ...) with one recipe and several seeds; compare them",
        description="Train each YOLO variant with Ultralytics' trainer on one data YAML, with the same recipe "
        "and seeds, then print one table (mAP50 and mAP50-95 mean ± std over seeds, the difference to the first "
        "variant and whether it exceeds seed spread, params, GFLOPs, training memory, train img/s, inference ms) "
        "and write it as JSON and PNG. Finished runs are kept: a rerun skips them. Needs Ultralytics "
        "(pip install 'dilateformer[yolo]', AGPL-3.0).",
    )
    p.add_argument(
        "--data",
        type=_data_yaml,
        help="Ultralytics detection data YAML (default: the synthetic defect set, generated into OUTPUT/data)",
    )
    p.add_argument(
        "--variants",
        type=_variant_list,
        help="comma-separated model names (shipped: yolov8n-msda, yolov8n-global, yolov8n-cbam, yolov8n-psa, "
        "yolo11n-msda; Ultralytics': yolov8n, yolo11n, ...) or YAML files; the first is the baseline "
        "(default: yolov8n,yolov8n-msda,yolov8n-global,yolov8n-cbam,yolov8n-psa)",
    )
    p.add_argument("--seeds", type=_seed_list, help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--epochs", type=positive_int, help="training epochs per run (default 8)")
    p.add_argument("--imgsz", type=_imgsz, help="training image size, a multiple of 32 (default 256)")
    p.add_argument("--batch", type=positive_int, help="training batch size (default 8)")
    p.add_argument("--device", type=_device, help="cpu, or one CUDA device: 0, cuda:1 (default: 0 if CUDA, else cpu)")
    p.add_argument("--amp", action="store_true", help="mixed-precision training (CUDA only; default float32)")
    p.add_argument(
        "--output",
        default="runs/yolo-compare",
        help="folder for the runs, the table JSON and the PNGs; rerunning into it skips finished runs "
        "(default runs/yolo-compare)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test of a few minutes: 3 variants x 2 seeds, 1 epoch, 64 px, 16 generated images "
        "(explicit flags still override)",
    )
    p.set_defaults(func=_run_yolo_compare)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``defects`` and ``yolo-compare`` to the ``dilateformer`` command line."""
    _add_defects(subparsers)
    _add_yolo_compare(subparsers)
