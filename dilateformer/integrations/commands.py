"""``dilateformer defects`` and ``yolo-compare``: argument parsing and one-line error reporting only.

Ultralytics (AGPL-3.0, the ``[yolo]`` extra) is imported only when ``yolo-compare`` runs, so ``dilateformer
--help`` and ``dilateformer defects`` work without it.
"""

from __future__ import annotations

import argparse

# ------------------------------------------------------------------------------------------------- defects


def _image_size(text: str) -> int:
    from dilateformer.integrations.defects import MAX_IMAGE_SIZE

    try:
        value = int(text)
    except ValueError:
        value = 0
    if not (64 <= value <= MAX_IMAGE_SIZE and value % 32 == 0):
        raise argparse.ArgumentTypeError(f"expected a multiple of 32 in 64..{MAX_IMAGE_SIZE}, got {text!r}")
    return value


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _run_defects(args: argparse.Namespace) -> int:
    from dilateformer.analysis.commands import CommandError
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
    from dilateformer.analysis.commands import _guarded

    p = subparsers.add_parser(
        "defects",
        help="write the offline synthetic industrial-defect dataset (YOLO format) and a sample grid",
        description="Draw scratches, cracks, spots and holes on scikit-image's brick, grass and gravel textures, "
        "deterministically from --seed, and write them in YOLO format: DIR/images/{train,val}, "
        "DIR/labels/{train,val} and DIR/data.yaml (pass it to Ultralytics as data=). A rerun with the same "
        "settings reuses the dataset. Also writes a grid of sample images with their boxes.",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="dataset directory (new, empty, or one of ours)")
    p.add_argument("--seed", type=_count(0), default=0, help="random seed, >= 0 (default 0)")
    p.add_argument("--num-train", type=_count(1), default=240, help="training images (default 240)")
    p.add_argument("--num-val", type=_count(1), default=60, help="validation images (default 60)")
    p.add_argument("--image-size", type=_image_size, default=256, help="image side in pixels (default 256)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset written here with other settings")
    p.add_argument("--grid", metavar="PNG", help="sample grid image (default DIR/sample_grid.png)")
    p.set_defaults(func=_guarded("defects", _run_defects))


# -------------------------------------------------------------------------------------------- yolo-compare


def _add_yolo_compare(subparsers) -> None:
    """Owned by the YOLO comparison work: ``dilateformer yolo-compare [--data YAML] [--variants ...] ...``."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``defects`` and ``yolo-compare`` to the ``dilateformer`` command line."""
    _add_defects(subparsers)
    _add_yolo_compare(subparsers)
