"""Datasets for the train commands: ImageFolder directories and the built-in offline digits set.

Both yield ``(PIL.Image, label)`` so that the same timm transforms (``timm.data.create_transform``) serve them.
A corrupt image stops the run with :class:`CorruptImageError` naming its path: silently skipping would change
which samples each step sees, and so the exact results a resumed run must reproduce.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dilateformer.errors import CommandError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DIGITS_NAMES = [str(i) for i in range(10)]
# Decompression-bomb guard: an image above this many pixels is refused before it is decoded. 8-bit RGB at this
# size is 300 MB in memory (PIL's own limit, 89.5 MP, only warns and lets twice that through).
MAX_IMAGE_PIXELS = 100_000_000
# A class this many times larger than the smallest one gets a warning: the model may just learn the majority.
IMBALANCE_WARNING_RATIO = 10


class CorruptImageError(CommandError):
    """An image file that PIL cannot decode, or one refused (too large, unsupported values); names its path."""


@dataclass
class Sample:
    path: str
    label: int


class ImageFolderDataset(torch.utils.data.Dataset):
    """One folder per class, images inside (any depth), classes sorted by name as in torchvision."""

    def __init__(
        self, root: str | os.PathLike, transform: Callable | None = None, classes: Sequence[str] | None = None
    ):
        self.root = Path(root)
        self.transform = transform
        self.skipped: list[str] = []
        found = scan_class_folders(self.root, self.skipped)
        if classes is not None and list(found) != list(classes):
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise CommandError(
                f"class folders of {self.root} do not match the training classes "
                f"(missing: {missing or 'none'}, extra: {extra or 'none'}); give every split the same class folders"
            )
        self.classes = list(found)
        self.samples = [Sample(str(p), i) for i, name in enumerate(self.classes) for p in found[name]]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = load_image(sample.path)
        return (self.transform(image) if self.transform else image), sample.label


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image as 8-bit RGB, or raise a one-line :class:`CorruptImageError` naming the file.

    16-bit and 32-bit integer images are scaled from 0..65535 to 0..255, float images from [0, 1] (or an
    8-bit range [0, 255]) to 0..255; values outside those ranges are refused rather than guessed. Palette,
    grey+alpha, CMYK and other modes go through Pillow's RGB conversion. Images above ``max_pixels`` are refused
    before decoding.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise CorruptImageError(_too_large(path, f"{width}x{height}", max_pixels))
                return to_rgb8(image, path)
    except Image.DecompressionBombError:
        raise CorruptImageError(_too_large(path, "over twice the limit", max_pixels)) from None
    # ImportError: once Ultralytics is imported it patches Image.open to fall back to a HEIF plugin that may be
    # missing, so an unreadable file surfaces as ModuleNotFoundError instead of UnidentifiedImageError.
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, ImportError) as error:
        raise CorruptImageError(
            f"cannot read image {path} ({type(error).__name__}: {error}); remove or replace the file"
        ) from None


def _too_large(path, size: str, max_pixels: int) -> str:
    return (
        f"image {path} is {size} pixels, above the {max_pixels / 1e6:g}-megapixel limit (a guard against "
        "decompression bombs); downscale it or remove it"
    )


def to_rgb8(image: Image.Image, path: str | os.PathLike = "image") -> Image.Image:
    """``image`` as 8-bit RGB, with high-bit-depth values scaled (see :func:`load_image`), not clipped."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise CorruptImageError(f"image {path} ({image.mode}) holds NaN or infinite values; fix or remove it")
        low, high = float(values.min()), float(values.max())
        if image.mode == "F" and low >= 0 and high <= 1:
            scale = 255.0
        elif image.mode == "F" and low >= 0 and high <= 255:
            scale = 1.0
        elif image.mode != "F" and low >= 0 and high <= 65535:
            scale = 255.0 / 65535.0
        else:
            expected = "[0, 1] or [0, 255]" if image.mode == "F" else "[0, 65535]"
            raise CorruptImageError(
                f"image {path} ({image.mode}) has values in [{low:g}, {high:g}], outside {expected}; "
                "convert it to 8 or 16 bits per channel"
            )
        grey = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # a palette's transparent entry survives only through RGBA
    return image.convert("RGB")


def is_hidden(name: str) -> bool:
    """Dot files and folders: .ipynb_checkpoints, .git, macOS ``._name`` AppleDouble files, .DS_Store."""
    return name.startswith(".")


def scan_class_folders(root: Path, skipped: list[str] | None = None) -> dict[str, list[Path]]:
    """Class name -> sorted image paths, with a clear error for a missing or empty dir or an empty class.

    Symlinks are followed, but each real folder is read once (a link back up the tree is a loop, not more data),
    and hidden files and folders are skipped. What was skipped is appended to ``skipped``.
    """
    skipped = [] if skipped is None else skipped
    if not root.exists():
        raise CommandError(f"dataset directory {root} does not exist; pass --data-dir DIR with one folder per class")
    if not root.is_dir():
        raise CommandError(f"dataset path {root} is not a directory; pass --data-dir DIR with one folder per class")
    entries = sorted(d for d in root.iterdir() if d.is_dir())
    skipped.extend(f"hidden folder {d}" for d in entries if is_hidden(d.name))
    class_dirs = [d for d in entries if not is_hidden(d.name)]
    if not class_dirs:
        raise CommandError(f"dataset directory {root} has no class folders; put each class's images in {root}/CLASS/")
    found: dict[str, list[Path]] = {}
    for class_dir in class_dirs:
        images, seen = [], set()
        for dirpath, dirnames, names in os.walk(class_dir, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                skipped.append(f"symlink loop {dirpath} (already read as {real})")
                dirnames[:] = []
                continue
            seen.add(real)
            skipped.extend(f"hidden folder {Path(dirpath) / d}" for d in dirnames if is_hidden(d))
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            for name in names:
                if not name.lower().endswith(IMG_EXTENSIONS):
                    continue
                if is_hidden(name):
                    skipped.append(f"hidden file {Path(dirpath) / name}")
                else:
                    images.append(Path(dirpath) / name)
        if not images:
            raise CommandError(
                f"class folder {class_dir} has no images (looked for {', '.join(IMG_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        found[class_dir.name] = sorted(images)
    return found


def summarize_skipped(skipped: Sequence[str], limit: int = 3) -> str | None:
    """One line for what dataset discovery left out, or None if nothing."""
    if not skipped:
        return None
    shown = "; ".join(skipped[:limit]) + (f"; and {len(skipped) - limit} more" if len(skipped) > limit else "")
    return f"skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} of the dataset: {shown}"


def balance_warning(classes: Sequence[str], counts: Sequence[int]) -> str | None:
    """A warning for one class (nothing to learn) or a class far larger than another, else None."""
    if len(classes) == 1:
        return (
            f"the data has a single class ({classes[0]!r}): every prediction is right, the loss goes to 0 and "
            "nothing is learnt; add a folder per class"
        )
    if min(counts) * IMBALANCE_WARNING_RATIO <= max(counts):
        big, small = int(np.argmax(counts)), int(np.argmin(counts))
        return (
            f"the classes are very unbalanced: {classes[big]!r} has {counts[big]} images, {classes[small]!r} "
            f"{counts[small]}; accuracy may reward always guessing {classes[big]!r} (balance or resample the data)"
        )
    return None


def find_split(data_dir: str | os.PathLike, split: str) -> Path:
    """``DATA/train`` or ``DATA/val`` (``validation`` also accepted), with a clear error if absent."""
    root = Path(data_dir)
    if not root.exists():
        raise CommandError(f"dataset directory {root} does not exist; pass --data-dir DIR containing train/ and val/")
    if not root.is_dir():
        raise CommandError(f"dataset path {root} is not a directory; pass --data-dir DIR containing train/ and val/")
    names = ("train", "training") if split == "train" else ("val", "validation", "valid")
    for name in names:
        if (root / name).is_dir():
            return root / name
    if not any(root.iterdir()):
        raise CommandError(f"dataset directory {root} is empty; it needs train/ and val/ with one folder per class")
    raise CommandError(
        f"dataset directory {root} has no {split}/ folder; it needs train/ and val/ with one folder per class"
    )


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), upsampled to RGB, split reproducibly.

    The split is stratified with a fixed seed, so train and val never overlap and do not depend on ``--seed``.
    """

    def __init__(self, split: str, image_size: int = 32, transform: Callable | None = None, val_fraction=0.2):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        index = np.arange(len(digits.target))
        train_idx, val_idx = train_test_split(index, test_size=val_fraction, random_state=0, stratify=digits.target)
        chosen = np.sort(train_idx if split == "train" else val_idx)
        # 0..16 grey levels -> 0..255; upsample once here so the timm transforms see a normal-sized photo.
        pixels = (digits.images[chosen] * (255.0 / 16.0)).round().astype(np.uint8)
        self.images = [
            Image.fromarray(p, mode="L").resize((image_size, image_size), Image.BILINEAR).convert("RGB") for p in pixels
        ]
        self.targets = [int(t) for t in digits.target[chosen]]
        self.classes = list(DIGITS_NAMES)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


def build_dataset(dataset: str, data_dir: str | None, split: str, transform, image_size: int, classes=None):
    """The ``split`` ("train" or "val") of ``--dataset digits`` or of an ImageFolder ``--data-dir``."""
    if dataset == "digits":
        return DigitsDataset(split, image_size=image_size, transform=transform)
    if dataset not in ("", "folder", "imagefolder"):
        raise CommandError(f"unknown --dataset {dataset!r}; use 'digits' or give --data-dir with an ImageFolder tree")
    if not data_dir:
        raise CommandError("no data: pass --data-dir DIR (ImageFolder with train/ and val/) or --dataset digits")
    return ImageFolderDataset(find_split(data_dir, split), transform=transform, classes=classes)


def _posterize_any_bits(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, keeping Pillow < 12's meaning of 0 bits (a black image) instead of raising."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    from PIL import ImageOps

    return ImageOps.posterize(img, bits_to_keep)


def patch_rand_augment(transform: Callable) -> Callable:
    """Make timm's RandAugment safe on current Pillow, in place.

    The DeiT policy ``rand-m9-mstd0.5-inc1`` samples magnitudes up to 10, which asks PosterizeIncreasing for
    0 bits; Pillow >= 12 refuses that with a ValueError that would kill a run after hours. Restore the old
    result (all bits dropped) for that one case.
    """
    from timm.data.auto_augment import RandAugment, posterize

    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.aug_fn is posterize:
                    op.aug_fn = _posterize_any_bits
    return transform
