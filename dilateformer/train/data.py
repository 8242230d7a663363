"""Datasets for the train commands: ImageFolder directories and the built-in offline digits set.

Both yield ``(PIL.Image, label)`` so that the same timm transforms (``timm.data.create_transform``) serve them.
A corrupt image stops the run with :class:`CorruptImageError` naming its path: silently skipping would change
which samples each step sees, and so the exact results a resumed run must reproduce.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dilateformer.train.errors import CLIError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DIGITS_NAMES = [str(i) for i in range(10)]


class CorruptImageError(CLIError):
    """An image file that PIL cannot decode; the message names its path."""


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
        found = scan_class_folders(self.root)
        if classes is not None and list(found) != list(classes):
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise CLIError(
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


def load_image(path: str) -> Image.Image:
    """Open an image as RGB, or raise a one-line :class:`CorruptImageError` naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    # ImportError: once Ultralytics is imported it patches Image.open to fall back to a HEIF plugin that may be
    # missing, so an unreadable file surfaces as ModuleNotFoundError instead of UnidentifiedImageError.
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, ImportError) as error:
        raise CorruptImageError(
            f"cannot read image {path} ({type(error).__name__}: {error}); remove or replace the file"
        ) from None


def scan_class_folders(root: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image paths, with a clear error for a missing or empty dir or an empty class."""
    if not root.exists():
        raise CLIError(f"dataset directory {root} does not exist; pass --data-dir DIR with one folder per class")
    if not root.is_dir():
        raise CLIError(f"dataset path {root} is not a directory; pass --data-dir DIR with one folder per class")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise CLIError(f"dataset directory {root} has no class folders; put each class's images in {root}/CLASS/")
    found: dict[str, list[Path]] = {}
    for class_dir in class_dirs:
        images = sorted(
            Path(dirpath) / name
            for dirpath, _, names in os.walk(class_dir, followlinks=True)
            for name in names
            if name.lower().endswith(IMG_EXTENSIONS)
        )
        if not images:
            raise CLIError(
                f"class folder {class_dir} has no images (looked for {', '.join(IMG_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        found[class_dir.name] = images
    return found


def find_split(data_dir: str | os.PathLike, split: str) -> Path:
    """``DATA/train`` or ``DATA/val`` (``validation`` also accepted), with a clear error if absent."""
    root = Path(data_dir)
    if not root.exists():
        raise CLIError(f"dataset directory {root} does not exist; pass --data-dir DIR containing train/ and val/")
    if not root.is_dir():
        raise CLIError(f"dataset path {root} is not a directory; pass --data-dir DIR containing train/ and val/")
    names = ("train", "training") if split == "train" else ("val", "validation", "valid")
    for name in names:
        if (root / name).is_dir():
            return root / name
    if not any(root.iterdir()):
        raise CLIError(f"dataset directory {root} is empty; it needs train/ and val/ with one folder per class")
    raise CLIError(
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
        raise CLIError(f"unknown --dataset {dataset!r}; use 'digits' or give --data-dir with an ImageFolder tree")
    if not data_dir:
        raise CLIError("no data: pass --data-dir DIR (ImageFolder with train/ and val/) or --dataset digits")
    return ImageFolderDataset(find_split(data_dir, split), transform=transform, classes=classes)


def worker_error_message(error: BaseException) -> str:
    """The original one-line message of an error re-raised from a DataLoader worker (it carries a traceback)."""
    text = str(error)
    match = re.findall(r"^\S*CorruptImageError: (.*)$", text, flags=re.MULTILINE)
    if match:
        return match[-1]
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


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
